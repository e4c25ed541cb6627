// CUDA backend of the reslora ops (CudaKernels, the traits lora_impl.h's bodies call): the
// torch-free kernels (kernels/cuda/) launched on the current stream. fp16 / bf16 take the fused
// low-rank kernels (kernels/cuda/lowrank.cuh: no full-size masked copy of the input, ever), one
// function here per kernel entry; other dtypes and ranks the dropout kernel plus ATen products. The
// large products go through ATen (cuBLAS). No host synchronisation, so the ops are safe to capture
// in CUDA graphs.
#include <optional>
#include <vector>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../../kernels/cuda/dropout_add.cuh"
#include "../../kernels/cuda/extra_k_gemm.cuh"
#include "../../kernels/cuda/lowrank.cuh"
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

// The CUDA backend (lora_impl.h's traits): its dropout kernel, the fused low-rank kernels
// (kernels/cuda/lowrank.cuh) for fp16 / bf16, and the extra-K GEMM on Hopper.
struct CudaKernels {
  static void dropout_apply(const at::Tensor& xc, const at::Tensor* xpc, at::Tensor& out,
                            bool accumulate, double p, const kernels::DropoutSeed& seed,
                            int64_t segment);
  static bool down(const at::Tensor& x2, const at::Tensor& xp2, const at::Tensor& A, double p,
                   const kernels::DropoutSeed& seed, int64_t block_rank, at::Tensor* z);
  static bool grad_A(const at::Tensor& dz, const at::Tensor& x2, const at::Tensor& xp2,
                     const at::Tensor& A, double p, const kernels::DropoutSeed& seed,
                     int64_t block_rank, at::Tensor* grad_A);
  static bool up_dx(const at::Tensor& dz, const at::Tensor& A, double p,
                    const kernels::DropoutSeed& seed, int64_t block_rank, at::Tensor* out);
  static bool up_out(const at::Tensor& z2, const at::Tensor& B, double scaling, at::Tensor* y);
  static bool grad_A_up_dx(const at::Tensor& dz, const at::Tensor& x2, const at::Tensor& xp2,
                           const at::Tensor& A, double p, const kernels::DropoutSeed& seed,
                           int64_t block_rank, at::Tensor* grad_A, at::Tensor* grad_x,
                           at::Tensor* grad_x_copy);
  static bool linear_out(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& zt2, const at::Tensor& B, double scaling, at::Tensor* y);
  static bool grad_x(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dz,
                     const at::Tensor& A, at::Tensor* dx);
};

void CudaKernels::dropout_apply(const at::Tensor& xc, const at::Tensor* xpc, at::Tensor& out,
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

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess,
              "reslora: fused low-rank kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor contiguous_or_undefined(const at::Tensor& t) {
  return t.defined() ? t.contiguous() : at::Tensor();
}
const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// What every launch of a fused low-rank kernel does, in one place: whether the kernels take the
// problem (dtype, segment rank, device; else the generic path runs), the launch on `like`'s
// device and its current stream, the fp32 workspace of a reduction (held until the launch is
// queued: the caching allocator reuses it only after the stream has passed it), and an error for
// a failed launch. Without dropout every segment sees the same input, so the whole rank is one
// segment when it fits.
class LowRankLaunch {
 public:
  LowRankLaunch(const at::Tensor& like, int64_t n, int64_t d, int64_t R, double p,
                int64_t block_rank, bool with_prev, bool one_segment = false)
      : like_(like), p_(p) {
    if (n == 0 || d == 0 || R == 0) return;
    if (like.scalar_type() != at::kHalf && like.scalar_type() != at::kBFloat16) return;
    const int64_t sr = p == 0.0 && R <= kernels::kFusedMaxRank ? R : block_rank;
    if (one_segment && sr != R) return;
    shape_ = kernels::LowRankShape{n, d, R / sr, sr};
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(like.device().index());
    num_sms_ = prop->multiProcessorCount;
    ok_ = kernels::lowrank_supported(to_kernel_dtype(like.scalar_type()), sr, R / sr, with_prev,
                                     prop->major);
    if (ok_) guard_.emplace(like.device());
  }
  bool ok() const { return ok_; }
  const kernels::LowRankShape& shape() const { return shape_; }
  kernels::LowRankDropout dropout(const kernels::DropoutSeed& seed) const {
    return kernels::LowRankDropout{static_cast<float>(p_), seed};
  }
  float* workspace(kernels::LowRankOp op) {
    const size_t floats = kernels::lowrank_workspace_floats(op, shape_, num_sms_);
    workspace_ = at::empty({static_cast<int64_t>(floats)}, like_.options().dtype(at::kFloat));
    return workspace_.mutable_data_ptr<float>();
  }
  template <class Args>
  bool run(cudaError_t (*entry)(const Args&, kernels::DType, int, cudaStream_t), const Args& a) {
    check_launch(
        entry(a, to_kernel_dtype(like_.scalar_type()), num_sms_, at::cuda::getCurrentCUDAStream()));
    return true;
  }

 private:
  const at::Tensor& like_;
  double p_;
  bool ok_ = false;
  kernels::LowRankShape shape_;
  int num_sms_ = 0;
  at::Tensor workspace_;
  std::optional<c10::cuda::CUDAGuard> guard_;
};

// z = drop_k(x2 [+ xp2]) A_k^T ([N, R]).
bool CudaKernels::down(const at::Tensor& x2, const at::Tensor& xp2, const at::Tensor& A, double p,
                       const kernels::DropoutSeed& seed, int64_t block_rank, at::Tensor* z) {
  LowRankLaunch l(x2, x2.size(0), x2.size(1), A.size(0), p, block_rank, xp2.defined());
  if (!l.ok()) return false;
  const at::Tensor xc = x2.contiguous(), xpc = contiguous_or_undefined(xp2), Ac = A.contiguous();
  *z = at::empty({x2.size(0), A.size(0)}, x2.options());
  kernels::DownArgs a;
  a.x = xc.const_data_ptr();
  a.x_prev = ptr_or_null(xpc);
  a.A = Ac.const_data_ptr();
  a.z = z->mutable_data_ptr();
  a.workspace = l.workspace(kernels::LowRankOp::kDown);
  a.shape = l.shape();
  a.dropout = l.dropout(seed);
  return l.run(kernels::lowrank_down, a);
}

// grad_A = dz_k^T drop_k(x2 [+ xp2]) ([R, d]).
bool CudaKernels::grad_A(const at::Tensor& dz, const at::Tensor& x2, const at::Tensor& xp2,
                         const at::Tensor& A, double p, const kernels::DropoutSeed& seed,
                         int64_t block_rank, at::Tensor* grad_A) {
  LowRankLaunch l(x2, x2.size(0), x2.size(1), A.size(0), p, block_rank, xp2.defined());
  if (!l.ok()) return false;
  const at::Tensor xc = x2.contiguous(), xpc = contiguous_or_undefined(xp2), dzc = dz.contiguous();
  *grad_A = at::empty({A.size(0), x2.size(1)}, x2.options());
  kernels::GradAArgs a;
  a.x = xc.const_data_ptr();
  a.x_prev = ptr_or_null(xpc);
  a.dz = dzc.const_data_ptr();
  a.grad_A = grad_A->mutable_data_ptr();
  a.workspace = l.workspace(kernels::LowRankOp::kGradA);
  a.shape = l.shape();
  a.dropout = l.dropout(seed);
  return l.run(kernels::lowrank_grad_A, a);
}

// The low-rank input gradient sum_k drop_k(dz_k A_k) ([N, d]).
bool CudaKernels::up_dx(const at::Tensor& dz, const at::Tensor& A, double p,
                        const kernels::DropoutSeed& seed, int64_t block_rank, at::Tensor* out) {
  LowRankLaunch l(dz, dz.size(0), A.size(1), A.size(0), p, block_rank, false);
  if (!l.ok()) return false;
  const at::Tensor dzc = dz.contiguous(), Ac = A.contiguous();
  *out = at::empty({dz.size(0), A.size(1)}, dz.options());
  kernels::UpDxArgs a;
  a.dz = dzc.const_data_ptr();
  a.A = Ac.const_data_ptr();
  a.grad_x = out->mutable_data_ptr();
  a.shape = l.shape();
  a.dropout = l.dropout(seed);
  return l.run(kernels::lowrank_up_dx, a);
}

// Outputs up to this many elements take the fused up kernel in the forward; larger ones take
// cuBLAS. Measured on the H200: at large sizes cuBLAS writes s z B^T at about 2.9 TB/s (the Llama
// step of bench/results/profiles/) and the up kernel at 1.8 TB/s (bench/cuda/lowrank_bench.cu,
// 8192 x 4096), while at small sizes the time is the launch, and a kernel launch costs the host a
// fraction of a cuBLAS call.
constexpr int64_t kFusedUpOutMaxElements = int64_t(1) << 22;

// The forward's low-rank output y = scaling z2 B^T (one segment of the whole rank, no dropout),
// which the base GEMM then accumulates onto.
bool CudaKernels::up_out(const at::Tensor& z2, const at::Tensor& B, double scaling, at::Tensor* y) {
  const int64_t n = z2.size(0), d = B.size(0), R = B.size(1);
  if (n * d > kFusedUpOutMaxElements) return false;
  LowRankLaunch l(z2, n, d, R, 0.0, R, false, /*one_segment=*/true);
  if (!l.ok()) return false;
  const at::Tensor zc = z2.contiguous(), Bc = B.contiguous();
  *y = at::empty({n, d}, z2.options());
  kernels::UpOutArgs a;
  a.z = zc.const_data_ptr();
  a.B = Bc.const_data_ptr();
  a.y = y->mutable_data_ptr();
  a.shape = l.shape();
  a.scaling = static_cast<float>(scaling);
  return l.run(kernels::lowrank_up_out, a);
}

// grad_A and the low-rank dx of a one-segment problem in one pass over x (the mask of each
// element pair made once for both), and a second copy of the dx when grad_x_copy is given.
bool CudaKernels::grad_A_up_dx(const at::Tensor& dz, const at::Tensor& x2, const at::Tensor& xp2,
                               const at::Tensor& A, double p, const kernels::DropoutSeed& seed,
                               int64_t block_rank, at::Tensor* grad_A, at::Tensor* grad_x,
                               at::Tensor* grad_x_copy) {
  const int64_t n = x2.size(0), d = x2.size(1), R = A.size(0);
  LowRankLaunch l(x2, n, d, R, p, block_rank, xp2.defined(), /*one_segment=*/true);
  if (!l.ok()) return false;
  const at::Tensor xc = x2.contiguous(), xpc = contiguous_or_undefined(xp2);
  const at::Tensor dzc = dz.contiguous(), Ac = A.contiguous();
  *grad_A = at::empty({R, d}, x2.options());
  *grad_x = at::empty({n, d}, x2.options());
  if (grad_x_copy != nullptr) *grad_x_copy = at::empty({n, d}, x2.options());
  kernels::GradAUpDxArgs a;
  a.grad.x = xc.const_data_ptr();
  a.grad.x_prev = ptr_or_null(xpc);
  a.grad.dz = dzc.const_data_ptr();
  a.grad.grad_A = grad_A->mutable_data_ptr();
  a.grad.workspace = l.workspace(kernels::LowRankOp::kGradAUpDx);
  a.grad.shape = l.shape();
  a.grad.dropout = l.dropout(seed);
  a.A = Ac.const_data_ptr();
  a.grad_x = grad_x->mutable_data_ptr();
  a.grad_x_copy = grad_x_copy != nullptr ? grad_x_copy->mutable_data_ptr() : nullptr;
  return l.run(kernels::lowrank_grad_A_up_dx, a);
}

// The extra-K GEMM's operands padded to a rank the kernel takes (a multiple of 8, for TMA's
// 16-byte rows): t [rows, r] -> [rows, r2] with `fill` (if defined, [rows, 1]) in column r and
// zeros after. Only the small low-rank operands are ever padded.
at::Tensor padded_rank(const at::Tensor& t, int64_t r2, const at::Tensor& fill) {
  const int64_t r = t.size(1);
  if (r2 == r && !fill.defined()) return t.contiguous();
  std::vector<at::Tensor> parts{t};
  if (fill.defined()) parts.push_back(fill);
  const int64_t used = r + (fill.defined() ? 1 : 0);
  if (r2 > used) parts.push_back(at::zeros({t.size(0), r2 - used}, t.options()));
  return at::cat(parts, 1);
}

int64_t round_up8(int64_t v) { return (v + 7) / 8 * 8; }

// Hopper, and enough output tiles to keep the GPU busy (kernels::extra_k_gemm_pays): small
// problems (decoding, a few tokens) keep the generic path.
bool extra_k_takes(const at::Tensor& t, int64_t m, int64_t n) {
  if (!kernels::extra_k_gemm_built()) return false;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(t.device().index());
  return prop->major == 9 && kernels::extra_k_gemm_pays(m, n, prop->multiProcessorCount);
}

bool half_or_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

cudaError_t run_extra_k(kernels::ExtraKGemmArgs& a, const at::Tensor& like) {
  return kernels::extra_k_gemm(a, to_kernel_dtype(like.scalar_type()),
                               at::cuda::getCurrentCUDAStream());
}

// The extra-K problem out[M, N] = x [K wide] w + (rank r2), its shapes and the large operands'
// pointers checked first, so nothing small is made for a problem the kernel refuses.
bool extra_k_args(const at::Tensor& x, const at::Tensor& weight, int64_t n, int64_t k, int64_t r2,
                  kernels::WeightLayout layout, kernels::ExtraKGemmArgs* a) {
  a->m = x.size(0);
  a->n = n;
  a->k = k;
  a->r = r2;
  a->layout = layout;
  a->tile = kernels::extra_k_gemm_tile(
      a->m, n, at::cuda::getDeviceProperties(x.device().index())->multiProcessorCount);
  a->x = x.const_data_ptr();
  a->w = weight.const_data_ptr();
  a->z = a->v = a->x;  // stand-ins until the small operands exist
  a->out = const_cast<void*>(a->x);
  return kernels::extra_k_gemm_supported(*a, to_kernel_dtype(x.scalar_type()), 9);
}

// A problem CUTLASS's own checks refuse (cudaErrorInvalidValue, nothing queued) takes the generic
// path; any other failure is an error.
bool launched(cudaError_t err) {
  if (err == cudaErrorInvalidValue) return false;
  check_launch(err);
  return true;
}

// y = x2 W^T + b + scaling zt2 B^T as one GEMM, [x2 | zt2 (| 1)] [W | scaling B (| b)]^T: the
// base product and the low-rank one share the accumulator and y is written once. Takes
// contiguous x2 and W only (a copy of x would cost more than the pass it saves).
bool CudaKernels::linear_out(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& zt2, const at::Tensor& B, double scaling,
                             at::Tensor* y) {
  if (!half_or_bf16(x2) || !x2.is_contiguous() || !weight.is_contiguous()) return false;
  const int64_t n = x2.size(0), d_in = x2.size(1), d_out = weight.size(0), R = B.size(1);
  if (!extra_k_takes(x2, n, d_out)) return false;
  const bool with_bias = bias.defined();
  const int64_t r2 = round_up8(R + (with_bias ? 1 : 0));
  kernels::ExtraKGemmArgs a;
  if (!extra_k_args(x2, weight, d_out, d_in, r2, kernels::WeightLayout::kNK, &a)) return false;
  const c10::cuda::CUDAGuard guard(x2.device());
  const at::Tensor ones = with_bias ? at::ones({n, 1}, zt2.options()) : at::Tensor();
  const at::Tensor z = padded_rank(zt2, r2, ones);
  const at::Tensor v = padded_rank(B * scaling, r2, with_bias ? bias.reshape({d_out, 1}) : bias);
  *y = at::empty({n, d_out}, x2.options());
  a.z = z.const_data_ptr();
  a.v = v.const_data_ptr();
  a.out = y->mutable_data_ptr();
  if (!kernels::extra_k_gemm_supported(a, to_kernel_dtype(x2.scalar_type()), 9)) return false;
  return launched(run_extra_k(a, x2));
}

// dx = dy W + dz A as one GEMM, [dy | dz] [W ; A]: the input gradient without dropout.
bool CudaKernels::grad_x(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dz,
                         const at::Tensor& A, at::Tensor* dx) {
  if (!half_or_bf16(dy) || !dy.is_contiguous() || !weight.is_contiguous()) return false;
  const int64_t n = dy.size(0), d_out = weight.size(0), d_in = weight.size(1), R = A.size(0);
  if (!extra_k_takes(dy, n, d_in)) return false;
  const int64_t r2 = round_up8(R);
  kernels::ExtraKGemmArgs a;
  if (!extra_k_args(dy, weight, d_in, d_out, r2, kernels::WeightLayout::kKN, &a)) return false;
  const c10::cuda::CUDAGuard guard(dy.device());
  const at::Tensor z = padded_rank(dz, r2, at::Tensor());
  const at::Tensor v =
      r2 == R ? A.contiguous() : at::cat({A, at::zeros({r2 - R, d_in}, A.options())}, 0);
  *dx = at::empty({n, d_in}, dy.options());
  a.z = z.const_data_ptr();
  a.v = v.const_data_ptr();
  a.out = dx->mutable_data_ptr();
  if (!kernels::extra_k_gemm_supported(a, to_kernel_dtype(dy.scalar_type()), 9)) return false;
  return launched(run_extra_k(a, dy));
}

}  // namespace

TORCH_LIBRARY_IMPL(reslora, CUDA, m) { detail::LoraOps<CudaKernels>::register_kernels(m); }

}  // namespace reslora
