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
  // The launch goes to the current stream of x's device, whatever device is current.
  const c10::cuda::CUDAGuard guard(xc.device());
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

}  // namespace

TORCH_LIBRARY_IMPL(reslora, CUDA, m) {
  detail::Backend<&dropout_sum_cuda, &masked_accumulate_cuda>::register_kernels(m);
}

}  // namespace reslora
