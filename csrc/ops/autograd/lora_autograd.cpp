// Autograd of the reslora ops, in C++ so that the C++ modules train without Python. Backward
// calls the backward ops through the dispatcher, so autograd is made of ops and compiles.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../lora_impl.h"
#include "reslora/ops.h"

namespace reslora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The base weight gets no gradient: refuse it requiring one rather than drop it. The bias may
// be trained (PEFT's bias="all" / "lora_only"): its gradient is dY summed over the tokens.
void check_frozen(const char* op, const at::Tensor& weight) {
  TORCH_CHECK(!weight.requires_grad(), "reslora::", op,
              ": weight must be frozen (requires_grad=False), got a weight that requires grad; "
              "ResLoRA trains A and B (and the bias, if asked), never the base weight");
}

bool bias_needs_grad(const std::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() && bias->requires_grad();
}

at::Tensor bias_grad(const at::Tensor& grad_y, const at::ScalarType dtype) {
  return grad_y.reshape({-1, grad_y.size(-1)}).sum(0, /*keepdim=*/false, at::kFloat).to(dtype);
}

class LoraDownFunction : public torch::autograd::Function<LoraDownFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& x_prev, const at::Tensor& A,
                            double dropout, const std::optional<at::Tensor>& seed,
                            int64_t seed_offset, int64_t block_rank) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // Only the inputs are kept: the dropout mask and the is-sum x + x_prev are recomputed.
    // The seed tensor too: backward regenerates the masks from the value this pass drew.
    ctx->save_for_backward({x, x_prev.value_or(at::Tensor()), A, seed.value_or(at::Tensor())});
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["seed_offset"] = seed_offset;
    ctx->saved_data["block_rank"] = block_rank;
    ctx->saved_data["need_x"] =
        x.requires_grad() || (x_prev.has_value() && x_prev->requires_grad());
    return lora_down(x, x_prev, A, dropout, seed, seed_offset, block_rank);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> x_prev =
        saved[1].defined() ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
    const bool need_x = ctx->saved_data["need_x"].toBool();
    auto [grad_x, grad_A] = lora_down_backward(
        grads[0], saved[0], x_prev, saved[2], ctx->saved_data["dropout"].toDouble(),
        optional(saved[3]), ctx->saved_data["seed_offset"].toInt(),
        ctx->saved_data["block_rank"].toInt(), need_x);
    if (!need_x) grad_x = at::Tensor();
    // The input shortcut is a sum, so x and x_prev receive the same gradient.
    return {grad_x,       x_prev.has_value() ? grad_x : at::Tensor(),
            grad_A,       at::Tensor(),
            at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

class LoraUpFunction : public torch::autograd::Function<LoraUpFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& z,
                            const at::Tensor& B, double scaling) {
    check_frozen("lora_up", weight);
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({weight, z, B});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["bias_dtype"] =
        bias_needs_grad(bias) ? static_cast<int64_t>(bias->scalar_type()) : -1;
    ctx->saved_data["need_x"] = x.requires_grad();
    return lora_up(x, weight, bias, z, B, scaling);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->saved_data["need_x"].toBool();
    auto [grad_x, grad_z, grad_B] = lora_up_backward(grads[0], saved[0], saved[1], saved[2],
                                                     ctx->saved_data["scaling"].toDouble(), need_x);
    if (!need_x) grad_x = at::Tensor();
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    at::Tensor grad_bias = bias_dtype >= 0
                               ? bias_grad(grads[0], static_cast<at::ScalarType>(bias_dtype))
                               : at::Tensor();
    return {grad_x, at::Tensor(), grad_bias, grad_z, grad_B, at::Tensor()};
  }
};

class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const std::optional<at::Tensor>& x_prev, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& A,
                               const at::Tensor& B, const std::optional<at::Tensor>& z_shortcut,
                               double scaling, double dropout,
                               const std::optional<at::Tensor>& seed, int64_t seed_offset,
                               int64_t block_rank, const std::optional<at::Tensor>& x_norms,
                               const std::optional<at::Tensor>& z_norms,
                               const std::optional<at::Tensor>& stats_count,
                               at::TensorList A_shortcut, at::TensorList B_shortcut) {
    check_frozen("lora_linear", weight);
    // z is often unused downstream (every variant but ms): its gradient then stays undefined
    // instead of a zero tensor that backward would add.
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    // bs: the earlier blocks' A and B joined to the block's own here, below autograd (no node
    // of their own), and the joined pair saved for backward, which splits its gradients back.
    const auto [A_all, B_all] =
        detail::joined_ranks("lora_linear", A, B, A_shortcut, B_shortcut, block_rank);
    // The statistics carry no gradient: they are recorded below autograd, with the block.
    auto [y, z] = lora_linear(x, x_prev, weight, bias, A_all, B_all, z_shortcut, scaling, dropout,
                              seed, seed_offset, block_rank, x_norms, z_norms, stats_count);
    // Inputs and the rank-R z only: masks and the is-sum are recomputed in backward.
    // The seed tensor too: backward regenerates the masks from the value this pass drew.
    ctx->save_for_backward({x, x_prev.value_or(at::Tensor()), weight, A_all, B_all, z,
                            z_shortcut.value_or(at::Tensor()), seed.value_or(at::Tensor())});
    ctx->saved_data["own_rank"] = A.size(0);
    ctx->saved_data["shortcuts"] = static_cast<int64_t>(A_shortcut.size());
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["seed_offset"] = seed_offset;
    ctx->saved_data["block_rank"] = block_rank;
    ctx->saved_data["need_x"] =
        x.requires_grad() || (x_prev.has_value() && x_prev->requires_grad());
    ctx->saved_data["bias_dtype"] =
        bias_needs_grad(bias) ? static_cast<int64_t>(bias->scalar_type()) : -1;
    return {y, z};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto opt = [](const at::Tensor& t) {
      return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    const bool need_x = ctx->saved_data["need_x"].toBool();
    at::Tensor grad_y = grads[0];
    if (!grad_y.defined()) {  // only z was used downstream
      std::vector<int64_t> shape(s[0].sizes().begin(), s[0].sizes().end());
      shape.back() = s[2].size(0);
      grad_y = at::zeros(shape, s[0].options());
    }
    auto [gx, gxp, gA, gB, gze] = lora_linear_backward(
        grad_y, opt(grads[1]), s[0], opt(s[1]), s[2], s[3], s[4], s[5], opt(s[6]),
        ctx->saved_data["scaling"].toDouble(), ctx->saved_data["dropout"].toDouble(), opt(s[7]),
        ctx->saved_data["seed_offset"].toInt(), ctx->saved_data["block_rank"].toInt(), need_x);
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    at::Tensor grad_bias =
        bias_dtype >= 0 ? bias_grad(grad_y, static_cast<at::ScalarType>(bias_dtype)) : at::Tensor();
    // The joined gradients split back: the block's own rows / columns, then each earlier block's.
    const int64_t own = ctx->saved_data["own_rank"].toInt();
    const int64_t shortcuts = ctx->saved_data["shortcuts"].toInt();
    const int64_t br = ctx->saved_data["block_rank"].toInt();
    variable_list grad_A_shortcut, grad_B_shortcut;
    for (int64_t j = 0; j < shortcuts; ++j) {
      grad_A_shortcut.push_back(gA.narrow(0, own + j * br, br));
      grad_B_shortcut.push_back(gB.narrow(1, own + j * br, br));
    }
    if (shortcuts > 0) {
      gA = gA.narrow(0, 0, own);
      gB = gB.narrow(1, 0, own);
    }
    variable_list out{need_x ? gx : at::Tensor(),
                      (need_x && s[1].defined()) ? gxp : at::Tensor(),
                      at::Tensor(),
                      grad_bias,
                      gA,
                      gB,
                      s[6].defined() ? gze : at::Tensor(),
                      at::Tensor(),
                      at::Tensor(),
                      at::Tensor(),
                      at::Tensor(),
                      at::Tensor(),
                      at::Tensor(),  // the statistics buffers: no gradient
                      at::Tensor(),
                      at::Tensor()};
    out.insert(out.end(), grad_A_shortcut.begin(), grad_A_shortcut.end());
    out.insert(out.end(), grad_B_shortcut.begin(), grad_B_shortcut.end());
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> lora_linear_autograd(
    const at::Tensor& x, const std::optional<at::Tensor>& x_prev, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
    const std::optional<at::Tensor>& z_shortcut, double scaling, double dropout,
    const std::optional<at::Tensor>& seed, int64_t seed_offset, int64_t block_rank,
    const std::optional<at::Tensor>& x_norms, const std::optional<at::Tensor>& z_norms,
    const std::optional<at::Tensor>& stats_count, std::optional<at::TensorList> A_shortcut,
    std::optional<at::TensorList> B_shortcut) {
  // as plain lists: the autograd function tracks each of their tensors as an input
  auto out = LoraLinearFunction::apply(x, x_prev, weight, bias, A, B, z_shortcut, scaling, dropout,
                                       seed, seed_offset, block_rank, x_norms, z_norms, stats_count,
                                       A_shortcut.value_or(at::TensorList()),
                                       B_shortcut.value_or(at::TensorList()));
  return {out[0], out[1]};
}

at::Tensor lora_down_autograd(const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
                              const at::Tensor& A, double dropout,
                              const std::optional<at::Tensor>& seed, int64_t seed_offset,
                              int64_t block_rank) {
  return LoraDownFunction::apply(x, x_prev, A, dropout, seed, seed_offset, block_rank);
}

at::Tensor lora_up_autograd(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& z,
                            const at::Tensor& B, double scaling) {
  return LoraUpFunction::apply(x, weight, bias, z, B, scaling);
}

// The backward ops are not differentiable again. Under the Autograd key they run below autograd
// and, where an input requires grad (a backward run with create_graph=True), their outputs get a
// node whose backward refuses with a clear error instead of a silently wrong second derivative.
[[noreturn]] void refuse_double_backward(const char* op) {
  TORCH_CHECK(false, "reslora::", op,
              ": double backward is not supported (a gradient of ResLoRA's gradient, as "
              "torch.autograd.grad(..., create_graph=True) followed by another backward asks "
              "for); compute first-order gradients only");
}

variable_list as_list(const std::tuple<at::Tensor, at::Tensor>& t) {
  return {std::get<0>(t), std::get<1>(t)};
}
variable_list as_list(const std::tuple<at::Tensor, at::Tensor, at::Tensor>& t) {
  return {std::get<0>(t), std::get<1>(t), std::get<2>(t)};
}
variable_list as_list(
    const std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>& t) {
  return {std::get<0>(t), std::get<1>(t), std::get<2>(t), std::get<3>(t), std::get<4>(t)};
}

class LoraDownBackwardFunction : public torch::autograd::Function<LoraDownBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_z, const at::Tensor& x,
                               const std::optional<at::Tensor>& x_prev, const at::Tensor& A,
                               double dropout, const std::optional<at::Tensor>& seed,
                               int64_t seed_offset, int64_t block_rank, bool compute_grad_x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return as_list(lora_down_backward(grad_z, x, x_prev, A, dropout, seed, seed_offset, block_rank,
                                      compute_grad_x));
  }
  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward("_lora_down_backward");
  }
};

class LoraUpBackwardFunction : public torch::autograd::Function<LoraUpBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_y, const at::Tensor& weight,
                               const at::Tensor& z, const at::Tensor& B, double scaling,
                               bool compute_grad_x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return as_list(lora_up_backward(grad_y, weight, z, B, scaling, compute_grad_x));
  }
  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward("_lora_up_backward");
  }
};

class LoraLinearBackwardFunction : public torch::autograd::Function<LoraLinearBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_y,
                               const std::optional<at::Tensor>& grad_z, const at::Tensor& x,
                               const std::optional<at::Tensor>& x_prev, const at::Tensor& weight,
                               const at::Tensor& A, const at::Tensor& B, const at::Tensor& z,
                               const std::optional<at::Tensor>& z_shortcut, double scaling,
                               double dropout, const std::optional<at::Tensor>& seed,
                               int64_t seed_offset, int64_t block_rank, bool compute_grad_x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return as_list(lora_linear_backward(grad_y, grad_z, x, x_prev, weight, A, B, z, z_shortcut,
                                        scaling, dropout, seed, seed_offset, block_rank,
                                        compute_grad_x));
  }
  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward("_lora_linear_backward");
  }
};

std::tuple<at::Tensor, at::Tensor> lora_down_backward_autograd(
    const at::Tensor& grad_z, const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
    const at::Tensor& A, double dropout, const std::optional<at::Tensor>& seed, int64_t seed_offset,
    int64_t block_rank, bool compute_grad_x) {
  auto out = LoraDownBackwardFunction::apply(grad_z, x, x_prev, A, dropout, seed, seed_offset,
                                             block_rank, compute_grad_x);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_up_backward_autograd(
    const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& z, const at::Tensor& B,
    double scaling, bool compute_grad_x) {
  auto out = LoraUpBackwardFunction::apply(grad_y, weight, z, B, scaling, compute_grad_x);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lora_linear_backward_autograd(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_z,
                              const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
                              const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                              const at::Tensor& z, const std::optional<at::Tensor>& z_shortcut,
                              double scaling, double dropout, const std::optional<at::Tensor>& seed,
                              int64_t seed_offset, int64_t block_rank, bool compute_grad_x) {
  auto out = LoraLinearBackwardFunction::apply(grad_y, grad_z, x, x_prev, weight, A, B, z,
                                               z_shortcut, scaling, dropout, seed, seed_offset,
                                               block_rank, compute_grad_x);
  return {out[0], out[1], out[2], out[3], out[4]};
}

// Statistics carry no gradient: the recording runs below autograd on whatever the inputs are.
void record_stats_autograd(at::Tensor& x_norms, at::Tensor& z_norms, at::Tensor& count,
                           const at::Tensor& x, const at::Tensor& z) {
  at::AutoDispatchBelowADInplaceOrView guard;
  record_stats_(x_norms, z_norms, count, x, z);
}

}  // namespace

TORCH_LIBRARY_IMPL(reslora, Autograd, m) {
  m.impl("record_stats_", &record_stats_autograd);
  m.impl("lora_down", &lora_down_autograd);
  m.impl("lora_up", &lora_up_autograd);
  m.impl("lora_linear", &lora_linear_autograd);
  m.impl("_lora_down_backward", &lora_down_backward_autograd);
  m.impl("_lora_up_backward", &lora_up_backward_autograd);
  m.impl("_lora_linear_backward", &lora_linear_backward_autograd);
}

}  // namespace reslora
