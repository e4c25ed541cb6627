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

}  // namespace

TORCH_LIBRARY_IMPL(reslora, Meta, m) {
  m.impl("lora_down", &lora_down_meta);
  m.impl("_lora_down_backward", &lora_down_backward_meta);
  m.impl("lora_up", &detail::lora_up_impl);
  m.impl("_lora_up_backward", &detail::lora_up_backward_impl);
}

}  // namespace reslora
