#include "reslora/modules.h"

#include <cmath>

#include <torch/torch.h>

#include "reslora/ops.h"

namespace reslora {

// What one pass of a chain produced, for its later blocks: inputs (is), mid activations (ms),
// which blocks ran, and the pass's dropout seed (drawn by its first block with dropout).
struct PassState {
  std::vector<torch::Tensor> inputs;
  std::vector<torch::Tensor> mids;
  std::vector<torch::Tensor> sums;  // ms, pre_num -1: the mid activations of blocks 0..n summed
  std::vector<bool> ran;
  torch::Tensor seed;
};

// A chain's links: its blocks in order and the pass in progress (none between passes).
struct ChainState {
  std::string name;
  std::vector<ResLoRALinearImpl*> blocks;  // owned by the chain module
  std::shared_ptr<PassState> pass;

  void begin() {
    pass = std::make_shared<PassState>();
    pass->inputs.assign(blocks.size(), torch::Tensor());
    pass->mids.assign(blocks.size(), torch::Tensor());
    pass->sums.assign(blocks.size(), torch::Tensor());
    pass->ran.assign(blocks.size(), false);
  }
  void end() { pass.reset(); }
};

ResLoRALinearImpl::ResLoRALinearImpl(const torch::Tensor& w, const torch::Tensor& b,
                                     ResLoRAOptions options)
    : options_(std::move(options)) {
  validate(options_);
  if (const std::string warning = option_warning(options_); !warning.empty())
    TORCH_WARN_ONCE(warning);
  TORCH_CHECK(w.defined() && w.dim() == 2,
              "reslora: weight must be a 2-D tensor [d_out, d_in], got ",
              w.defined() ? w.sizes() : at::IntArrayRef{});
  TORCH_CHECK(!b.defined() || (b.dim() == 1 && b.size(0) == w.size(0)),
              "reslora: bias must have shape [d_out] = [", w.size(0), "], got ", b.sizes());
  weight = register_buffer("weight", w.detach());
  if (b.defined()) bias = register_buffer("bias", b.detach());
  const int64_t d_in = w.size(1);
  const double bound = 1.0 / std::sqrt(static_cast<double>(d_in));
  torch::NoGradGuard no_grad;
  lora_A = register_parameter(
      "lora_A", torch::empty({options_.r(), d_in}, w.options()).uniform_(-bound, bound));
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
  const std::shared_ptr<PassState> pass = state ? state->pass : nullptr;
  const int64_t k_max = shortcut_reach(options_.variant(), n, options_.pre_num());
  const bool running_sum = shortcut_running_sum(options_.variant(), options_.pre_num());
  const auto need = [&](int64_t j, const char* what) -> const PassState& {
    TORCH_CHECK(pass && pass->ran[j], "reslora: block ", n, " of chain '", state->name,
                "' needs the ", what, " of block ", j, " from this forward pass, but block ", j,
                " has not run since the chain's head (block 0) started the pass");
    return *pass;
  };
  const double p = is_training() ? options_.dropout() : 0.0;
  std::optional<torch::Tensor> seed;
  if (p > 0.0) {
    // One seed per chain pass, on x's device; block n reads stream n of it.
    if (!pass) {
      seed = draw_seed(x);
    } else {
      if (!pass->seed.defined()) pass->seed = draw_seed(x);
      seed = pass->seed;
    }
  }
  const int64_t r = options_.r();
  const double s = scaling();
  const std::optional<torch::Tensor> b =
      bias.defined() ? std::optional<torch::Tensor>(bias) : std::nullopt;
  // Every variant is one lora_linear op (one autograd node per block); in training is and ms
  // blocks record their norm statistics in the same op (only the is / ms merges read them).
  torch::Tensor z_own, y;
  const std::optional<torch::Tensor> none;
  const bool stats =
      is_training() && (options_.variant() == Variant::kIS || options_.variant() == Variant::kMS);
  const std::optional<torch::Tensor> xn = stats ? std::optional<torch::Tensor>(x_norms) : none;
  const std::optional<torch::Tensor> zn = stats ? std::optional<torch::Tensor>(z_norms) : none;
  const std::optional<torch::Tensor> count =
      stats ? std::optional<torch::Tensor>(stats_count) : none;
  switch (options_.variant()) {
    case Variant::kLoRA:
      std::tie(y, z_own) = lora_linear(x, none, weight, b, lora_A, lora_B, none, s, p, seed, n, r);
      break;
    case Variant::kIS: {
      // A head has no previous input and uses its own: drop(2 x).
      const torch::Tensor x_prev = k_max == 0 ? x : need(n - 1, "input").inputs[n - 1];
      std::tie(y, z_own) =
          lora_linear(x, x_prev, weight, b, lora_A, lora_B, none, s, p, seed, n, r, xn, zn, count);
      break;
    }
    case Variant::kBS: {
      if (k_max == 0) {
        std::tie(y, z_own) =
            lora_linear(x, none, weight, b, lora_A, lora_B, none, s, p, seed, n, r);
      } else {
        // All k + 1 products as one of rank (k + 1) r, one dropout mask per segment: the op
        // joins the earlier blocks' A and B to this block's.
        std::vector<torch::Tensor> As, Bs;
        for (int64_t k = 1; k <= k_max; ++k) {
          As.push_back(state->blocks[n - k]->lora_A);
          Bs.push_back(state->blocks[n - k]->lora_B);
        }
        torch::Tensor z;
        std::tie(y, z) = lora_linear(x, none, weight, b, lora_A, lora_B, none, s, p, seed, n, r,
                                     none, none, none, As, Bs);
        z_own = z.narrow(-1, 0, r);
      }
      break;
    }
    case Variant::kMS: {
      std::optional<torch::Tensor> z_shortcut;
      if (k_max > 0 && running_sum) {
        // Every earlier block: the running sum the previous block left (one add per block,
        // not one per earlier block).
        z_shortcut = need(n - 1, "mid activation").sums[n - 1];
      } else {
        for (int64_t k = 1; k <= k_max; ++k) {
          const torch::Tensor& zk = need(n - k, "mid activation").mids[n - k];
          z_shortcut = z_shortcut.has_value() ? *z_shortcut + zk : zk;
        }
      }
      std::tie(y, z_own) = lora_linear(x, none, weight, b, lora_A, lora_B, z_shortcut, s, p, seed,
                                       n, r, xn, zn, count);
      break;
    }
  }
  if (pass) {
    // Only what a later block of this pass reads; the last block ends the pass.
    if (options_.variant() == Variant::kIS) pass->inputs[n] = x;
    const bool last = n + 1 == static_cast<int64_t>(state->blocks.size());
    if (options_.variant() == Variant::kMS) {
      pass->mids[n] = z_own;
      if (running_sum && !last) pass->sums[n] = n == 0 ? z_own : pass->sums[n - 1] + z_own;
    }
    pass->ran[n] = true;
    if (last) state->end();
  }
  return y;
}

torch::Tensor ResLoRALinearImpl::x_norm_mean() const { return stats_mean(x_norms, stats_count); }
torch::Tensor ResLoRALinearImpl::z_norm_mean() const { return stats_mean(z_norms, stats_count); }

void ResLoRALinearImpl::load_lora(const torch::Tensor& A, const torch::Tensor& B) {
  TORCH_CHECK(A.dim() == 2 && A.size(1) == in_features(),
              "reslora: A must have shape [r, d_in] = [", A.size(0), ", ", in_features(), "], got ",
              A.sizes());
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
    check_link(name_, n, head->options(), head->out_features(), head->in_features(),
               block->options(), block->out_features(), block->in_features());
  }
  ResLoRALinearImpl* impl = block.ptr().get();
  register_module(std::to_string(n), block);
  impl->state_ = state_;
  impl->position_ = n;
  blocks_.push_back(block);
  state_->blocks.push_back(impl);
  state_->end();
}

torch::Tensor ResLoRAChainImpl::forward(int64_t index, const torch::Tensor& x) {
  TORCH_CHECK(index >= 0 && index < static_cast<int64_t>(blocks_.size()), "reslora: chain '", name_,
              "': index must be in [0, ", blocks_.size(), "), got ", index);
  return blocks_[index]->forward(x);
}

std::vector<torch::Tensor> ResLoRAChainImpl::forward(const std::vector<torch::Tensor>& xs) {
  TORCH_CHECK(xs.size() == blocks_.size(), "reslora: chain '", name_,
              "': forward needs one input per block (", blocks_.size(), "), got ", xs.size());
  std::vector<torch::Tensor> ys;
  for (size_t i = 0; i < xs.size(); ++i) ys.push_back(blocks_[i]->forward(xs[i]));
  state_->end();
  return ys;
}

void ResLoRAChainImpl::reset() { state_->end(); }

void ResLoRAChainImpl::calibrate(const std::vector<torch::Tensor>& xs) {
  TORCH_CHECK_VALUE(xs.size() == blocks_.size(), "reslora: chain '", name_,
                    "': calibrate needs one "
                    "input per block (",
                    blocks_.size(), "), got ", xs.size());
  torch::NoGradGuard no_grad;
  const auto& h = blocks_[0]->options();
  if (fit_xx_.empty()) {
    for (const auto& b : blocks_) {
      const int64_t d = b->lora_A.size(1), r = b->lora_A.size(0);
      fit_xx_.push_back(torch::zeros({d, d}, b->lora_A.options().dtype(torch::kFloat)));
      fit_zx_.push_back(torch::zeros({r, d}, b->lora_A.options().dtype(torch::kFloat)));
    }
  }
  std::vector<torch::Tensor> flat;
  for (size_t n = 0; n < xs.size(); ++n) {
    TORCH_CHECK_VALUE(xs[n].size(-1) == blocks_[n]->lora_A.size(1), "reslora: chain '", name_,
                      "': calibrate input ", n, " must have d_in = ", blocks_[n]->lora_A.size(1),
                      " features, got ", xs[n].size(-1));
    flat.push_back(xs[n].reshape({-1, xs[n].size(-1)}).to(torch::kFloat));
  }
  for (size_t n = 0; n < xs.size(); ++n) {
    const auto& x = flat[n];
    const int64_t k_max = shortcut_reach(h.variant(), static_cast<int64_t>(n), h.pre_num());
    fit_xx_[n].add_(x.t().mm(x));
    if (k_max == 0) continue;
    torch::Tensor p;
    if (h.variant() == Variant::kIS) {
      p = flat[n - 1].mm(blocks_[n]->lora_A.to(torch::kFloat).t());
    } else {
      p = torch::zeros({x.size(0), blocks_[n]->lora_A.size(0)}, x.options());
      for (int64_t k = 1; k <= k_max; ++k)
        p.add_(flat[n - k].mm(blocks_[n - k]->lora_A.to(torch::kFloat).t()));
    }
    fit_zx_[n].add_(p.t().mm(x));
  }
  fit_tokens_ += flat[0].size(0);
}

std::vector<LoRAPair> ResLoRAChainImpl::merged_lora(MergeKind merge, double ridge) const {
  TORCH_CHECK(!blocks_.empty(), "reslora: chain '", name_, "' has no blocks to merge");
  std::vector<MergeBlock> mb;
  for (size_t n = 0; n < blocks_.size(); ++n) {
    const auto& b = blocks_[n];
    MergeBlock m{b->weight, b->lora_A, b->lora_B, b->x_norm_mean(), b->z_norm_mean()};
    if (!fit_xx_.empty()) {
      m.xx = fit_xx_[n];
      m.zx = fit_zx_[n];
      m.tokens = fit_tokens_;
    }
    mb.push_back(m);
  }
  torch::NoGradGuard no_grad;
  const auto& h = blocks_[0]->options();
  return merge_chain(mb, h.variant(), merge, h.pre_num(), blocks_[0]->scaling(), ridge);
}

std::vector<LoRAPair> ResLoRAChainImpl::merged_lora() const {
  TORCH_CHECK(!blocks_.empty(), "reslora: chain '", name_, "' has no blocks to merge");
  return merged_lora(merges_for(blocks_[0]->options().variant()).front());
}

void ResLoRAChainImpl::merge_to_lora(MergeKind merge, double ridge) {
  TORCH_CHECK(!merged_, merged_twice_error("chain '" + name_ + "'"));
  const auto pairs = merged_lora(merge, ridge);
  for (size_t i = 0; i < blocks_.size(); ++i) blocks_[i]->load_lora(pairs[i].A, pairs[i].B);
  state_->end();
  fit_xx_.clear();
  fit_zx_.clear();
  fit_tokens_ = 0;
  merged_ = true;
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
