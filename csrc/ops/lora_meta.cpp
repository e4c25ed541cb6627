// Meta kernels: the same bodies as the real backends with a shape-only dropout, so fake tensors
// (torch.compile, torch.export, opcheck) get the real shapes, dtypes and argument errors.
#include <torch/library.h>

#include "lora_impl.h"

namespace reslora {
namespace {

at::Tensor dropout_sum_meta(const at::Tensor& x, const at::Tensor* /*x_prev*/, double /*p*/,
                            int64_t /*seed*/, int64_t /*segment*/) {
  return at::empty(x.sizes(), x.options());
}

at::Tensor lora_down_meta(const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
                          const at::Tensor& A, double dropout, int64_t seed,
                          int64_t segment_rank) {
  return detail::lora_down_impl(x, x_prev, A, dropout, seed, segment_rank, &dropout_sum_meta);
}

std::tuple<at::Tensor, at::Tensor> lora_down_backward_meta(
    const at::Tensor& grad_z, const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
    const at::Tensor& A, double dropout, int64_t seed, int64_t segment_rank, bool compute_grad_x) {
  return detail::lora_down_backward_impl(grad_z, x, x_prev, A, dropout, seed, segment_rank,
                                         compute_grad_x, &dropout_sum_meta);
}

void masked_accumulate_meta(at::Tensor&, at::Tensor*, bool, const at::Tensor&, double, int64_t,
                            int64_t) {}

std::tuple<at::Tensor, at::Tensor> lora_linear_meta(
    const at::Tensor& x, const std::optional<at::Tensor>& x_prev, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
    const std::optional<at::Tensor>& z_extra, double scaling, double dropout, int64_t seed,
    int64_t segment_rank) {
  return detail::lora_linear_impl(x, x_prev, weight, bias, A, B, z_extra, scaling, dropout, seed,
                                  segment_rank, &dropout_sum_meta);
}

detail::LinearGrads lora_linear_backward_meta(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_z, const at::Tensor& x,
    const std::optional<at::Tensor>& x_prev, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& z, const std::optional<at::Tensor>& z_extra,
    double scaling, double dropout, int64_t seed, int64_t segment_rank, bool compute_grad_x) {
  return detail::lora_linear_backward_impl(grad_y, grad_z, x, x_prev, weight, A, B, z, z_extra,
                                           scaling, dropout, seed, segment_rank, compute_grad_x,
                                           &dropout_sum_meta, &masked_accumulate_meta);
}

}  // namespace

TORCH_LIBRARY_IMPL(reslora, Meta, m) {
  m.impl("lora_linear", &lora_linear_meta);
  m.impl("_lora_linear_backward", &lora_linear_backward_meta);
  m.impl("lora_down", &lora_down_meta);
  m.impl("_lora_down_backward", &lora_down_backward_meta);
  m.impl("lora_up", &detail::lora_up_impl);
  m.impl("_lora_up_backward", &detail::lora_up_backward_impl);
}

}  // namespace reslora
