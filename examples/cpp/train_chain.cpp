// Trains a chain of middle-shortcut ResLoRA blocks from C++ (exit status 1 if the loss does not
// go down) and merges it into plain LoRA blocks; on a machine with CUDA, also on the GPU, which
// runs the library's CUDA kernels through the installed library alone.
#include <cstdio>

#include <torch/torch.h>

#include <reslora/modules.h>
#include <reslora/version.h>

// Returns true when training on `device` lowered the loss.
bool train_and_merge(const torch::Device& device) {
  using namespace reslora;
  torch::manual_seed(0);
  ResLoRAChain chain("mlp.up_proj");
  for (int layer = 0; layer < 4; ++layer) {
    chain->push_back(
        ResLoRALinear((torch::randn({32, 32}) * 0.2).to(device), torch::zeros({32}, device),
                      ResLoRAOptions(4).variant(Variant::kMS).lora_alpha(8).dropout(0.1)));
  }
  torch::optim::AdamW opt(chain->parameters(), torch::optim::AdamWOptions(1e-2));
  const auto x = torch::randn({64, 32}).to(device);
  const auto target = torch::tanh(torch::randn({64, 32})).to(device);
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
  std::printf("%s: loss %.4f -> %.4f\n", device.str().c_str(), first, last);
  chain->merge_to_lora(MergeKind::kInput);
  std::printf("%s: merged, block 3 is now plain LoRA of rank %lld\n", device.str().c_str(),
              static_cast<long long>(chain[3]->lora_A.size(0)));
  return last < first;
}

int main() {
  const auto info = reslora::build_info();
  std::printf("reslora %s (torch %s, CUDA kernels %s)\n", info.version.c_str(),
              info.torch_version.c_str(), info.cuda_kernels ? "yes" : "no");
  bool ok = train_and_merge(torch::kCPU);
  if (torch::cuda::is_available()) ok = train_and_merge(torch::kCUDA) && ok;
  return ok ? 0 : 1;
}
