// CUDA backend of record_stats_: one fused pass (kernels/cuda/norm_stats.cu) instead of the
// eight ATen calls of the generic composition, which it falls back to for layouts it does not
// take (float32 contiguous rings, x and z of one dtype, everything on one device).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../../kernels/cuda/norm_stats.cuh"
#include "../stats.h"

namespace reslora {
namespace {

bool to_kernel_dtype(at::ScalarType t, kernels::DType* out) {
  switch (t) {
    case at::kFloat:
      *out = kernels::DType::kFloat32;
      return true;
    case at::kDouble:
      *out = kernels::DType::kFloat64;
      return true;
    case at::kHalf:
      *out = kernels::DType::kFloat16;
      return true;
    case at::kBFloat16:
      *out = kernels::DType::kBFloat16;
      return true;
    default:
      return false;
  }
}

void record_stats_cuda(at::Tensor& x_norms, at::Tensor& z_norms, at::Tensor& count,
                       const at::Tensor& x, const at::Tensor& z) {
  detail::check_record_stats(x_norms, z_norms, count);
  kernels::DType dtype;
  const auto dev = x_norms.device();
  const auto fused_ring = [&](const at::Tensor& r) {
    return r.scalar_type() == at::kFloat && r.is_contiguous() && r.device() == dev;
  };
  if (!fused_ring(x_norms) || !fused_ring(z_norms) || !count.is_contiguous() || x.device() != dev ||
      z.device() != dev || x.scalar_type() != z.scalar_type() ||
      !to_kernel_dtype(x.scalar_type(), &dtype)) {
    detail::record_stats_generic(x_norms, z_norms, count, x, z);
    return;
  }
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor xc = x.contiguous();
  const at::Tensor zc = z.contiguous();
  kernels::NormStatsParams prm;
  prm.x = xc.const_data_ptr();
  prm.nx = xc.numel();
  prm.z = zc.const_data_ptr();
  prm.nz = zc.numel();
  prm.ring_x = x_norms.mutable_data_ptr<float>();
  prm.ring_z = z_norms.mutable_data_ptr<float>();
  prm.ring_len = x_norms.size(0);
  prm.count = count.mutable_data_ptr<int64_t>();
  prm.blocks = kernels::norm_stats_blocks(
      prm.nx, prm.nz, at::cuda::getDeviceProperties(dev.index())->multiProcessorCount);
  const at::Tensor ws =
      at::empty({static_cast<int64_t>(kernels::norm_stats_workspace_doubles(prm.blocks))},
                x_norms.options().dtype(at::kDouble));
  prm.workspace = ws.mutable_data_ptr<double>();
  const cudaError_t err = kernels::norm_stats_launch(prm, dtype, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess,
              "reslora::record_stats_: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(reslora, CUDA, m) { m.impl("record_stats_", &record_stats_cuda); }

}  // namespace reslora
