// Trains a chain of middle-shortcut ResLoRA blocks from C++ (exit status 1 if the loss does not
// go down) and merges it into plain LoRA blocks.
#include <cstdio>

#include <torch/torch.h>

#include <reslora/modules.h>
#include <reslora/version.h>

int main() {
  using namespace reslora;
  torch::manual_seed(0);
  const auto info = build_info();
  std::printf("reslora %s (torch %s)\n", info.version.c_str(), info.torch_version.c_str());
  ResLoRAChain chain("mlp.up_proj");
  for (int layer = 0; layer < 4; ++layer) {
    chain->push_back(
        ResLoRALinear(torch::randn({32, 32}) * 0.2, torch::zeros({32}),
                      ResLoRAOptions(4).variant(Variant::kMS).lora_alpha(8).dropout(0.1)));
  }
  torch::optim::AdamW opt(chain->parameters(), torch::optim::AdamWOptions(1e-2));
  const auto x = torch::randn({64, 32});
  const auto target = torch::tanh(torch::randn({64, 32}));
  double first = 0, last = 0;
  for (int step = 0; step < 100; ++step) {
    torch::Tensor h = x;
    for (size_t n = 0; n < chain->size(); ++n) h = torch::tanh(chain->forward(n, h));
    const auto loss = torch::mse_loss(h, target);
    opt.zero_grad();
    loss.backward();
    opt.step();
    (step == 0 ? first : last) = loss.item<double>();
  }
  std::printf("loss %.4f -> %.4f\n", first, last);
  chain->merge_to_lora(MergeKind::kInput);
  std::printf("merged: block 3 is now plain LoRA of rank %lld\n",
              static_cast<long long>(chain[3]->lora_A.size(0)));
  return last < first ? 0 : 1;
}
