// CUDA backend of the reslora ops: the torch-free dropout kernel (kernels/cuda/dropout_add.cu)
// launched on the current stream, the products through ATen (cuBLAS). No host synchronisation,
// so the ops are safe to capture in CUDA graphs.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../../kernels/cuda/dropout_add.cuh"
#include "../lora_impl.h"

namespace reslora {
namespace {

kernels::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kernels::DType::kFloat32;
    case at::kDouble: return kernels::DType::kFloat64;
    case at::kHalf: return kernels::DType::kFloat16;
    case at::kBFloat16: return kernels::DType::kBFloat16;
    default: TORCH_CHECK(false, "reslora: unsupported dtype for the CUDA dropout kernel: ", t);
  }
}

void dropout_apply_cuda(const at::Tensor& xc, const at::Tensor* xpc, at::Tensor& out,
                        bool accumulate, at::Tensor* out2, bool accumulate2, double p, int64_t seed,
                        int64_t segment) {
  if (xc.numel() == 0) return;
  kernels::DropoutAddParams prm;
  prm.x = xc.const_data_ptr();
  prm.x_prev = xpc != nullptr ? xpc->const_data_ptr() : nullptr;
  prm.out = out.mutable_data_ptr();
  prm.accumulate = accumulate;
  prm.out2 = out2 != nullptr ? out2->mutable_data_ptr() : nullptr;
  prm.accumulate2 = accumulate2;
  prm.numel = xc.numel();
  prm.p = static_cast<float>(p);
  prm.seed = static_cast<uint64_t>(seed);
  prm.segment = static_cast<uint64_t>(segment);
  const cudaError_t err = kernels::dropout_add(prm, to_kernel_dtype(xc.scalar_type()),
                                               at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "reslora: dropout kernel launch failed: ",
              cudaGetErrorString(err));
}

at::Tensor dropout_sum_cuda(const at::Tensor& x, const at::Tensor* x_prev, double p, int64_t seed,
                            int64_t segment) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor xpc = x_prev != nullptr ? x_prev->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  dropout_apply_cuda(xc, xpc.defined() ? &xpc : nullptr, out, false, nullptr, false, p, seed,
                     segment);
  return out;
}

void masked_accumulate_cuda(at::Tensor& acc, at::Tensor* out2, bool accumulate2,
                            const at::Tensor& t, double p, int64_t seed, int64_t segment) {
  const at::Tensor tc = t.contiguous();
  dropout_apply_cuda(tc, nullptr, acc, true, out2, accumulate2, p, seed, segment);
}

at::Tensor lora_down_cuda(const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
                          const at::Tensor& A, double dropout, int64_t seed,
                          int64_t segment_rank) {
  const c10::cuda::CUDAGuard guard(x.device());
  return detail::lora_down_impl(x, x_prev, A, dropout, seed, segment_rank, &dropout_sum_cuda);
}

std::tuple<at::Tensor, at::Tensor> lora_down_backward_cuda(
    const at::Tensor& grad_z, const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
    const at::Tensor& A, double dropout, int64_t seed, int64_t segment_rank, bool compute_grad_x) {
  const c10::cuda::CUDAGuard guard(x.device());
  return detail::lora_down_backward_impl(grad_z, x, x_prev, A, dropout, seed, segment_rank,
                                         compute_grad_x, &dropout_sum_cuda);
}

std::tuple<at::Tensor, at::Tensor> lora_linear_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& x_prev, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
    const std::optional<at::Tensor>& z_extra, double scaling, double dropout, int64_t seed,
    int64_t segment_rank) {
  const c10::cuda::CUDAGuard guard(x.device());
  return detail::lora_linear_impl(x, x_prev, weight, bias, A, B, z_extra, scaling, dropout, seed,
                                  segment_rank, &dropout_sum_cuda);
}

detail::LinearGrads lora_linear_backward_cuda(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_z, const at::Tensor& x,
    const std::optional<at::Tensor>& x_prev, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& z, const std::optional<at::Tensor>& z_extra,
    double scaling, double dropout, int64_t seed, int64_t segment_rank, bool compute_grad_x) {
  const c10::cuda::CUDAGuard guard(x.device());
  return detail::lora_linear_backward_impl(grad_y, grad_z, x, x_prev, weight, A, B, z, z_extra,
                                           scaling, dropout, seed, segment_rank, compute_grad_x,
                                           &dropout_sum_cuda, &masked_accumulate_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(reslora, CUDA, m) {
  m.impl("lora_linear", &lora_linear_cuda);
  m.impl("_lora_linear_backward", &lora_linear_backward_cuda);
  m.impl("lora_down", &lora_down_cuda);
  m.impl("_lora_down_backward", &lora_down_backward_cuda);
  m.impl("lora_up", &detail::lora_up_impl);
  m.impl("_lora_up_backward", &detail::lora_up_backward_impl);
}

}  // namespace reslora
