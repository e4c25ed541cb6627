#include "reslora/modules.h"

#include <cmath>
#include <mutex>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "reslora/ops.h"

namespace reslora {

// Per-forward state of one chain: what each block produced in the current pass.
struct ChainState {
  std::string name;
  std::vector<ResLoRALinearImpl*> blocks;  // owned by the chain module
  std::vector<torch::Tensor> inputs;       // x_n (is)
  std::vector<torch::Tensor> mids;         // z_n = drop(x_n) A_n^T (ms)
  std::vector<bool> ran;

  void begin() {
    inputs.assign(blocks.size(), torch::Tensor());
    mids.assign(blocks.size(), torch::Tensor());
    ran.assign(blocks.size(), false);
  }
};

void validate(const ResLoRAOptions& o) {
  TORCH_CHECK(o.r() >= 1, "reslora: r must be >= 1, got ", o.r());
  TORCH_CHECK(std::isfinite(o.lora_alpha()),
              "reslora: lora_alpha must be finite (scaling = lora_alpha / r), got ",
              o.lora_alpha());
  TORCH_CHECK(o.dropout() >= 0.0 && o.dropout() < 1.0, "reslora: dropout must be in [0, 1), got ",
              o.dropout());
  TORCH_CHECK(o.pre_num() >= -1, "reslora: pre_num must be -1 (all) or >= 0, got ", o.pre_num());
  TORCH_CHECK(o.stats_window() >= 1, "reslora: stats_window must be >= 1, got ",
              o.stats_window());
}

namespace {

int64_t draw_seed() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return static_cast<int64_t>(gen.get<at::CPUGeneratorImpl>()->random64() >> 1);
}

}  // namespace

ResLoRALinearImpl::ResLoRALinearImpl(const torch::Tensor& w, const torch::Tensor& b,
                                     ResLoRAOptions options)
    : options_(std::move(options)) {
  validate(options_);
  TORCH_CHECK(w.defined() && w.dim() == 2, "reslora: weight must be a 2-D tensor [d_out, d_in], got ",
              w.defined() ? w.sizes() : at::IntArrayRef{});
  TORCH_CHECK(!b.defined() || (b.dim() == 1 && b.size(0) == w.size(0)),
              "reslora: bias must have shape [d_out] = [", w.size(0), "], got ", b.sizes());
  weight = register_buffer("weight", w.detach());
  if (b.defined()) bias = register_buffer("bias", b.detach());
  const int64_t d_in = w.size(1);
  const double bound = 1.0 / std::sqrt(static_cast<double>(d_in));
  torch::NoGradGuard no_grad;
  lora_A = register_parameter("lora_A", torch::empty({options_.r(), d_in}, w.options()).uniform_(-bound, bound));
  lora_B = register_parameter("lora_B", torch::zeros({w.size(0), options_.r()}, w.options()));
  const auto f32 = w.options().dtype(torch::kFloat);
  x_norms = register_buffer("x_norms", torch::zeros({options_.stats_window()}, f32));
  z_norms = register_buffer("z_norms", torch::zeros({options_.stats_window()}, f32));
  stats_count = register_buffer("stats_count", torch::zeros({1}, f32.dtype(torch::kLong)));
}

torch::Tensor ResLoRALinearImpl::forward(const torch::Tensor& x) {
  const auto state = state_.lock();
  const int64_t n = state ? position_ : 0;
  if (state && n == 0) state->begin();  // the head starts a new pass
  const auto need = [&](int64_t j, const char* what) -> const ChainState& {
    TORCH_CHECK(state->ran[j], "reslora: block ", n, " of chain '", state->name, "' needs the ",
                what, " of block ", j, " from this forward pass, but block ", j,
                " has not run since the chain's head (block 0) started the pass");
    return *state;
  };
  const double p = is_training() ? options_.dropout() : 0.0;
  const int64_t seed = p > 0.0 ? draw_seed() : 0;
  const int64_t r = options_.r();
  const double s = scaling();
  const std::optional<torch::Tensor> b = bias.defined() ? std::optional<torch::Tensor>(bias) : std::nullopt;
  // Every variant is one lora_linear op (one autograd node per block).
  torch::Tensor z_own, y;
  const std::optional<torch::Tensor> none;
  switch (options_.variant()) {
    case Variant::kLoRA:
      std::tie(y, z_own) = lora_linear(x, none, weight, b, lora_A, lora_B, none, s, p, seed, r);
      break;
    case Variant::kIS: {
      // A head has no previous input and uses its own: drop(2 x).
      const torch::Tensor x_prev = n == 0 ? x : need(n - 1, "input").inputs[n - 1];
      std::tie(y, z_own) = lora_linear(x, x_prev, weight, b, lora_A, lora_B, none, s, p, seed, r);
      break;
    }
    case Variant::kBS: {
      const int64_t k_max = reach(n, options_.pre_num());
      if (k_max == 0) {
        std::tie(y, z_own) = lora_linear(x, none, weight, b, lora_A, lora_B, none, s, p, seed, r);
      } else {
        // All k + 1 products as one of rank (k + 1) r, one dropout mask per segment.
        std::vector<torch::Tensor> As{lora_A}, Bs{lora_B};
        for (int64_t k = 1; k <= k_max; ++k) {
          As.push_back(state->blocks[n - k]->lora_A);
          Bs.push_back(state->blocks[n - k]->lora_B);
        }
        torch::Tensor z;
        std::tie(y, z) = lora_linear(x, none, weight, b, torch::cat(As, 0), torch::cat(Bs, 1),
                                     none, s, p, seed, r);
        z_own = z.narrow(-1, 0, r);
      }
      break;
    }
    case Variant::kMS: {
      std::optional<torch::Tensor> z_extra;
      for (int64_t k = 1; k <= reach(n, options_.pre_num()); ++k) {
        const torch::Tensor& zk = need(n - k, "mid activation").mids[n - k];
        z_extra = z_extra.has_value() ? *z_extra + zk : zk;
      }
      std::tie(y, z_own) = lora_linear(x, none, weight, b, lora_A, lora_B, z_extra, s, p, seed, r);
      break;
    }
  }
  if (state) {
    if (options_.variant() == Variant::kIS) state->inputs[n] = x;
    if (options_.variant() == Variant::kMS) state->mids[n] = z_own;
    state->ran[n] = true;
  }
  if (is_training() && (options_.variant() == Variant::kIS || options_.variant() == Variant::kMS)) {
    // Only the is / ms merges read the norm statistics.
    torch::NoGradGuard no_grad;
    record_stats_(x_norms, z_norms, stats_count, x, z_own);
  }
  return y;
}

torch::Tensor ResLoRALinearImpl::x_norm_mean() const { return stats_mean(x_norms, stats_count); }
torch::Tensor ResLoRALinearImpl::z_norm_mean() const { return stats_mean(z_norms, stats_count); }

void ResLoRALinearImpl::load_lora(const torch::Tensor& A, const torch::Tensor& B) {
  TORCH_CHECK(A.dim() == 2 && A.size(1) == in_features(), "reslora: A must have shape [r, d_in] = [",
              A.size(0), ", ", in_features(), "], got ", A.sizes());
  TORCH_CHECK(B.dim() == 2 && B.size(0) == out_features() && B.size(1) == A.size(0),
              "reslora: B must have shape [d_out, r] = [", out_features(), ", ", A.size(0),
              "], got ", B.sizes());
  const double s = scaling();
  torch::NoGradGuard no_grad;
  lora_A.set_data(A.detach().to(lora_A.options()).clone());
  lora_B.set_data(B.detach().to(lora_B.options()).clone());
  options_.variant(Variant::kLoRA).r(A.size(0)).lora_alpha(s * static_cast<double>(A.size(0)));
}

ResLoRAChainImpl::ResLoRAChainImpl(std::string name)
    : name_(std::move(name)), state_(std::make_shared<ChainState>()) {
  state_->name = name_;
}

void ResLoRAChainImpl::push_back(const ResLoRALinear& block) {
  TORCH_CHECK(block, "reslora: chain '", name_, "': push_back needs a block, got an empty holder");
  TORCH_CHECK(block->state_.expired(), "reslora: chain '", name_,
              "': the block is already linked in another chain");
  const int64_t n = static_cast<int64_t>(blocks_.size());
  if (n > 0) {
    const auto& head = blocks_[0];
    const auto& o = block->options();
    const auto& h = head->options();
    TORCH_CHECK(o.variant() == h.variant(), "reslora: chain '", name_, "': block ", n,
                " must have the head's variant '", to_string(h.variant()), "', got '",
                to_string(o.variant()), "'");
    if (h.variant() != Variant::kLoRA) {
      TORCH_CHECK(block->out_features() == head->out_features() &&
                      block->in_features() == head->in_features(),
                  "reslora: chain '", name_, "': block ", n, " must have the head's shape [d_out, d_in] = [",
                  head->out_features(), ", ", head->in_features(), "] for the '",
                  to_string(h.variant()), "' shortcut, got [", block->out_features(), ", ",
                  block->in_features(), "]; start a new chain for it");
      TORCH_CHECK(o.r() == h.r() && o.lora_alpha() == h.lora_alpha() && o.pre_num() == h.pre_num(),
                  "reslora: chain '", name_, "': block ", n,
                  " must have the head's r, lora_alpha and pre_num (", h.r(), ", ", h.lora_alpha(),
                  ", ", h.pre_num(), "), got (", o.r(), ", ", o.lora_alpha(), ", ", o.pre_num(), ")");
    }
  }
  ResLoRALinearImpl* impl = block.ptr().get();
  register_module(std::to_string(n), block);
  impl->state_ = state_;
  impl->position_ = n;
  blocks_.push_back(block);
  state_->blocks.push_back(impl);
  state_->begin();
}

torch::Tensor ResLoRAChainImpl::forward(int64_t index, const torch::Tensor& x) {
  TORCH_CHECK(index >= 0 && index < static_cast<int64_t>(blocks_.size()), "reslora: chain '",
              name_, "': index must be in [0, ", blocks_.size(), "), got ", index);
  return blocks_[index]->forward(x);
}

std::vector<torch::Tensor> ResLoRAChainImpl::forward(const std::vector<torch::Tensor>& xs) {
  TORCH_CHECK(xs.size() == blocks_.size(), "reslora: chain '", name_, "': forward needs one input per block (",
              blocks_.size(), "), got ", xs.size());
  std::vector<torch::Tensor> ys;
  for (size_t i = 0; i < xs.size(); ++i) ys.push_back(blocks_[i]->forward(xs[i]));
  return ys;
}

void ResLoRAChainImpl::reset() { state_->begin(); }

std::vector<LoRAPair> ResLoRAChainImpl::merged_lora(MergeKind merge) const {
  TORCH_CHECK(!blocks_.empty(), "reslora: chain '", name_, "' has no blocks to merge");
  std::vector<MergeBlock> mb;
  for (const auto& b : blocks_) {
    mb.push_back({b->weight, b->lora_A, b->lora_B, b->x_norm_mean(), b->z_norm_mean()});
  }
  torch::NoGradGuard no_grad;
  const auto& h = blocks_[0]->options();
  return merge_chain(mb, h.variant(), merge, h.pre_num(), blocks_[0]->scaling());
}

std::vector<LoRAPair> ResLoRAChainImpl::merged_lora() const {
  TORCH_CHECK(!blocks_.empty(), "reslora: chain '", name_, "' has no blocks to merge");
  return merged_lora(merges_for(blocks_[0]->options().variant()).front());
}

void ResLoRAChainImpl::merge_to_lora(MergeKind merge) {
  const auto pairs = merged_lora(merge);
  for (size_t i = 0; i < blocks_.size(); ++i) blocks_[i]->load_lora(pairs[i].A, pairs[i].B);
  state_->begin();
}

void ResLoRAChainImpl::merge_to_lora() {
  TORCH_CHECK(!blocks_.empty(), "reslora: chain '", name_, "' has no blocks to merge");
  merge_to_lora(merges_for(blocks_[0]->options().variant()).front());
}

std::vector<torch::Tensor> ResLoRAChainImpl::merged_weights() const {
  TORCH_CHECK(!blocks_.empty(), "reslora: chain '", name_, "' has no blocks to merge");
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> out;
  const auto pairs = merged_lora();
  for (size_t i = 0; i < blocks_.size(); ++i) {
    out.push_back(blocks_[i]->weight + blocks_[i]->scaling() * torch::mm(pairs[i].B, pairs[i].A));
  }
  return out;
}

}  // namespace reslora
