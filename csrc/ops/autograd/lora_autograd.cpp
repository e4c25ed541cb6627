// Autograd of the reslora ops, in C++ so that the C++ modules train without Python. Backward
// calls the backward ops through the dispatcher, so autograd is made of ops and compiles.
#include <torch/autograd.h>
#include <torch/library.h>

#include "reslora/ops.h"

namespace reslora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LoraDownFunction : public torch::autograd::Function<LoraDownFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& x_prev, const at::Tensor& A,
                            double dropout, int64_t seed, int64_t segment_rank) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // Only the inputs are kept: the dropout mask and the is-sum x + x_prev are recomputed.
    ctx->save_for_backward({x, x_prev.value_or(at::Tensor()), A});
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["segment_rank"] = segment_rank;
    ctx->saved_data["need_x"] =
        x.requires_grad() || (x_prev.has_value() && x_prev->requires_grad());
    return lora_down(x, x_prev, A, dropout, seed, segment_rank);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> x_prev =
        saved[1].defined() ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
    const bool need_x = ctx->saved_data["need_x"].toBool();
    auto [grad_x, grad_A] = lora_down_backward(
        grads[0], saved[0], x_prev, saved[2], ctx->saved_data["dropout"].toDouble(),
        ctx->saved_data["seed"].toInt(), ctx->saved_data["segment_rank"].toInt(), need_x);
    if (!need_x) grad_x = at::Tensor();
    // The input shortcut is a sum, so x and x_prev receive the same gradient.
    return {grad_x, x_prev.has_value() ? grad_x : at::Tensor(), grad_A,
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class LoraUpFunction : public torch::autograd::Function<LoraUpFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& z,
                            const at::Tensor& B, double scaling) {
    TORCH_CHECK(!weight.requires_grad(),
                "reslora::lora_up: weight must be frozen (requires_grad=False), got a weight "
                "that requires grad; ResLoRA trains only A and B");
    TORCH_CHECK(!bias.has_value() || !bias->requires_grad(),
                "reslora::lora_up: bias must be frozen (requires_grad=False), got a bias that "
                "requires grad; ResLoRA trains only A and B");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({weight, z, B});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["need_x"] = x.requires_grad();
    return lora_up(x, weight, bias, z, B, scaling);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->saved_data["need_x"].toBool();
    auto [grad_x, grad_z, grad_B] = lora_up_backward(
        grads[0], saved[0], saved[1], saved[2], ctx->saved_data["scaling"].toDouble(), need_x);
    if (!need_x) grad_x = at::Tensor();
    return {grad_x, at::Tensor(), at::Tensor(), grad_z, grad_B, at::Tensor()};
  }
};

at::Tensor lora_down_autograd(const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
                              const at::Tensor& A, double dropout, int64_t seed,
                              int64_t segment_rank) {
  return LoraDownFunction::apply(x, x_prev, A, dropout, seed, segment_rank);
}

at::Tensor lora_up_autograd(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& z,
                            const at::Tensor& B, double scaling) {
  return LoraUpFunction::apply(x, weight, bias, z, B, scaling);
}

}  // namespace

TORCH_LIBRARY_IMPL(reslora, Autograd, m) {
  m.impl("lora_down", &lora_down_autograd);
  m.impl("lora_up", &lora_up_autograd);
}

}  // namespace reslora
