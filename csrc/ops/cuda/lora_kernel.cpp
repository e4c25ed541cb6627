// CUDA backend of the reslora ops: the torch-free kernels (kernels/cuda/) launched on the current
// stream. fp16 / bf16 take the fused low-rank kernels (lora_fused.cu: no full-size masked copy
// of the input, ever); other dtypes and ranks the dropout kernel plus ATen products. The large
// products go through ATen (cuBLAS). No host synchronisation, so the ops are safe to capture in
// CUDA graphs.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../../kernels/cuda/dropout_add.cuh"
#include "../../kernels/cuda/lora_fused.cuh"
#include "../lora_impl.h"

namespace reslora {
namespace {

kernels::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kernels::DType::kFloat32;
    case at::kDouble:
      return kernels::DType::kFloat64;
    case at::kHalf:
      return kernels::DType::kFloat16;
    case at::kBFloat16:
      return kernels::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "reslora: unsupported dtype for the CUDA dropout kernel: ", t);
  }
}

void dropout_apply_cuda(const at::Tensor& xc, const at::Tensor* xpc, at::Tensor& out,
                        bool accumulate, double p, const kernels::DropoutSeed& seed,
                        int64_t segment) {
  if (xc.numel() == 0) return;
  // The launch goes to the current stream of x's device, whatever device is current.
  const c10::cuda::CUDAGuard guard(xc.device());
  kernels::DropoutAddParams prm;
  prm.x = xc.const_data_ptr();
  prm.x_prev = xpc != nullptr ? xpc->const_data_ptr() : nullptr;
  prm.out = out.mutable_data_ptr();
  prm.accumulate = accumulate;
  prm.numel = xc.numel();
  prm.p = static_cast<float>(p);
  prm.seed = seed;
  prm.segment = static_cast<uint64_t>(segment);
  const cudaError_t err = kernels::dropout_add(prm, to_kernel_dtype(xc.scalar_type()),
                                               at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess,
              "reslora: dropout kernel launch failed: ", cudaGetErrorString(err));
}

// The fused kernels take the problem when its dtype, segment rank and device allow. Without
// dropout every segment sees the same input, so the whole rank is one segment when it fits.
struct FusedProblem {
  bool ok = false;
  int64_t segment_rank = 0;
  int num_sms = 0;
};

FusedProblem fused_problem(const at::Tensor& t, int64_t n, int64_t d, int64_t R, double p,
                           int64_t segment_rank, bool with_prev) {
  FusedProblem fp;
  if (n == 0 || d == 0 || R == 0) return fp;
  if (t.scalar_type() != at::kHalf && t.scalar_type() != at::kBFloat16) return fp;
  fp.segment_rank = p == 0.0 && R <= kernels::kFusedMaxRank ? R : segment_rank;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(t.device().index());
  fp.num_sms = prop->multiProcessorCount;
  fp.ok = kernels::lowrank_supported(to_kernel_dtype(t.scalar_type()), fp.segment_rank,
                                     R / fp.segment_rank, with_prev, prop->major);
  return fp;
}

kernels::LowRankParams lowrank_params(int64_t n, int64_t d, int64_t R, const FusedProblem& fp,
                                      double p, const kernels::DropoutSeed& seed) {
  kernels::LowRankParams prm;
  prm.n = n;
  prm.d = d;
  prm.segment_rank = fp.segment_rank;
  prm.segments = R / fp.segment_rank;
  prm.p = static_cast<float>(p);
  prm.seed = seed;
  return prm;
}

void launch_lowrank(kernels::LowRankOp op, kernels::LowRankParams& prm, const at::Tensor& like,
                    const FusedProblem& fp) {
  at::Tensor ws;
  const size_t floats = kernels::lowrank_workspace_floats(op, prm, fp.num_sms);
  if (floats > 0) {
    ws = at::empty({static_cast<int64_t>(floats)}, like.options().dtype(at::kFloat));
    prm.workspace = ws.mutable_data_ptr<float>();
  }
  const cudaError_t err = kernels::lowrank_launch(op, prm, to_kernel_dtype(like.scalar_type()),
                                                  fp.num_sms, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess,
              "reslora: fused low-rank kernel launch failed: ", cudaGetErrorString(err));
}

// The two reductions over x: down (z = drop(x [+ x_prev]) A^T, [N, R]) and grad_A
// (dz^T drop(x [+ x_prev]), [R, d]); `operand` is A for the first and dz for the second.
bool fused_over_x(kernels::LowRankOp op, const at::Tensor& x2, const at::Tensor& xp2,
                  const at::Tensor& A, const at::Tensor& operand, double p,
                  const kernels::DropoutSeed& seed, int64_t segment_rank, at::Tensor* out) {
  const int64_t n = x2.size(0), d = x2.size(1), R = A.size(0);
  const FusedProblem fp = fused_problem(x2, n, d, R, p, segment_rank, xp2.defined());
  if (!fp.ok) return false;
  const c10::cuda::CUDAGuard guard(x2.device());
  const at::Tensor xc = x2.contiguous();
  const at::Tensor xpc = xp2.defined() ? xp2.contiguous() : at::Tensor();
  const at::Tensor oc = operand.contiguous();
  const bool down = op == kernels::LowRankOp::kDown;
  *out = down ? at::empty({n, R}, x2.options()) : at::empty({R, d}, x2.options());
  kernels::LowRankParams prm = lowrank_params(n, d, R, fp, p, seed);
  prm.x = xc.const_data_ptr();
  prm.x_prev = xpc.defined() ? xpc.const_data_ptr() : nullptr;
  (down ? prm.A : prm.dz) = oc.const_data_ptr();
  prm.out = out->mutable_data_ptr();
  launch_lowrank(op, prm, x2, fp);
  return true;
}

bool fused_down_cuda(const at::Tensor& x2, const at::Tensor& xp2, const at::Tensor& A, double p,
                     const kernels::DropoutSeed& seed, int64_t segment_rank, at::Tensor* z) {
  return fused_over_x(kernels::LowRankOp::kDown, x2, xp2, A, A, p, seed, segment_rank, z);
}

bool fused_grad_A_cuda(const at::Tensor& dz, const at::Tensor& x2, const at::Tensor& xp2,
                       const at::Tensor& A, double p, const kernels::DropoutSeed& seed,
                       int64_t segment_rank, at::Tensor* grad_A) {
  return fused_over_x(kernels::LowRankOp::kGradA, x2, xp2, A, dz, p, seed, segment_rank, grad_A);
}

bool fused_up_dx_cuda(const at::Tensor& dz, const at::Tensor& A, double p,
                      const kernels::DropoutSeed& seed, int64_t segment_rank, at::Tensor* out) {
  const int64_t n = dz.size(0), d = A.size(1), R = A.size(0);
  const FusedProblem fp = fused_problem(dz, n, d, R, p, segment_rank, false);
  if (!fp.ok) return false;
  const c10::cuda::CUDAGuard guard(dz.device());
  const at::Tensor dzc = dz.contiguous();
  const at::Tensor Ac = A.contiguous();
  *out = at::empty({n, d}, dz.options());
  kernels::LowRankParams prm = lowrank_params(n, d, R, fp, p, seed);
  prm.dz = dzc.const_data_ptr();
  prm.A = Ac.const_data_ptr();
  prm.out = out->mutable_data_ptr();
  launch_lowrank(kernels::LowRankOp::kUpDx, prm, dz, fp);
  return true;
}

// Outputs up to this many elements take the fused up kernel in the forward; larger ones take
// cuBLAS. Measured on the H200: at large sizes cuBLAS writes s z B^T at about 2.9 TB/s (the Llama
// step of bench/results/profiles/) and the up kernel at 1.8 TB/s (bench/cuda/lowrank_bench.cu,
// 8192 x 4096), while at small sizes the time is the launch, and a kernel launch costs the host a
// fraction of a cuBLAS call.
constexpr int64_t kFusedUpOutMaxElements = int64_t(1) << 22;

// The forward's low-rank output y = scaling z2 B^T (one segment of the whole rank, no dropout),
// which the base GEMM then accumulates onto.
bool fused_up_out_cuda(const at::Tensor& z2, const at::Tensor& B, double scaling, at::Tensor* y) {
  const int64_t n = z2.size(0), d = B.size(0), R = B.size(1);
  if (n * d > kFusedUpOutMaxElements) return false;
  const FusedProblem fp = fused_problem(z2, n, d, R, 0.0, R, false);
  if (!fp.ok || fp.segment_rank != R) return false;
  const c10::cuda::CUDAGuard guard(z2.device());
  const at::Tensor zc = z2.contiguous();
  const at::Tensor Bc = B.contiguous();
  *y = at::empty({n, d}, z2.options());
  kernels::LowRankParams prm = lowrank_params(n, d, R, fp, 0.0, kernels::DropoutSeed{});
  prm.dz = zc.const_data_ptr();
  prm.A = Bc.const_data_ptr();
  prm.out = y->mutable_data_ptr();
  prm.alpha = static_cast<float>(scaling);
  launch_lowrank(kernels::LowRankOp::kUpOut, prm, z2, fp);
  return true;
}

// grad_A and the low-rank dx of a one-segment problem in one pass over x (the mask of each
// element pair made once for both), and a second copy of the dx when grad_x_copy is given.
bool fused_grad_A_up_dx_cuda(const at::Tensor& dz, const at::Tensor& x2, const at::Tensor& xp2,
                             const at::Tensor& A, double p, const kernels::DropoutSeed& seed,
                             int64_t segment_rank, at::Tensor* grad_A, at::Tensor* grad_x,
                             at::Tensor* grad_x_copy) {
  const int64_t n = x2.size(0), d = x2.size(1), R = A.size(0);
  const FusedProblem fp = fused_problem(x2, n, d, R, p, segment_rank, xp2.defined());
  if (!fp.ok || fp.segment_rank != R) return false;
  const c10::cuda::CUDAGuard guard(x2.device());
  const at::Tensor xc = x2.contiguous();
  const at::Tensor xpc = xp2.defined() ? xp2.contiguous() : at::Tensor();
  const at::Tensor dzc = dz.contiguous();
  const at::Tensor Ac = A.contiguous();
  *grad_A = at::empty({R, d}, x2.options());
  *grad_x = at::empty({n, d}, x2.options());
  if (grad_x_copy != nullptr) *grad_x_copy = at::empty({n, d}, x2.options());
  kernels::LowRankParams prm = lowrank_params(n, d, R, fp, p, seed);
  prm.x = xc.const_data_ptr();
  prm.x_prev = xpc.defined() ? xpc.const_data_ptr() : nullptr;
  prm.dz = dzc.const_data_ptr();
  prm.A = Ac.const_data_ptr();
  prm.out = grad_A->mutable_data_ptr();
  prm.out2 = grad_x->mutable_data_ptr();
  prm.out2_copy = grad_x_copy != nullptr ? grad_x_copy->mutable_data_ptr() : nullptr;
  launch_lowrank(kernels::LowRankOp::kGradAUpDx, prm, x2, fp);
  return true;
}

constexpr detail::KernelSet kCudaKernels{&detail::dropout_sum_with<&dropout_apply_cuda>,
                                         &detail::masked_accumulate_with<&dropout_apply_cuda>,
                                         &fused_down_cuda,
                                         &fused_grad_A_cuda,
                                         &fused_up_dx_cuda,
                                         &fused_up_out_cuda,
                                         &fused_grad_A_up_dx_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(reslora, CUDA, m) { detail::Backend<&kCudaKernels>::register_kernels(m); }

}  // namespace reslora
