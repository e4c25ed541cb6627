// Torch-free fused kernels of the low-rank path (fp16 / bf16, tensor cores through raw mma.sync
// fragments, tiles streamed through shared memory with asynchronous copies).
//
// With dropout (and for the is sum x + x_prev) the low-rank path used to materialise the full-size
// masked input once in forward and twice in backward. These kernels read x (and x_prev) straight
// from memory, apply the counter-based mask of dropout_hash.h on the fly and never write a
// full-size temporary. One entry per op, each with its own arguments, named by role:
//   lowrank_down:         z[:, seg k]  = drop_k(x [+ x_prev]) A_k^T           (reads x once)
//   lowrank_grad_A:       dA[seg k, :] = dz[:, seg k]^T drop_k(x [+ x_prev])  (reads x once)
//   lowrank_grad_A_up_dx: dA and grad_x = drop(dz A) of one segment in one pass over x, each
//                         element pair's mask made once for both (and a second copy of grad_x)
//   lowrank_up_dx:        grad_x       = sum_k drop_k(dz[:, seg k] A_k)       (writes once)
//   lowrank_up_out:       y            = scaling z B^T                        (the forward's)
// A segment is a block of `segment_rank` rows of A with its own mask (bs chains). Reductions run
// over a split of the long dimension into fp32 partial sums in a workspace, summed in a fixed
// order by a second small kernel, so results are deterministic. Everything runs on `stream`
// without host synchronisation (CUDA-graph safe).
//
// Sources (lowrank/): tiles.cuh (the shared device pieces), down.cuh, grad_a.cuh and up.cuh (one
// kernel family each), launch.cuh (plans), launch.cu (these entries, each launching its kernel
// picked by dtype, load path and rank with the switches of ../static_switch.h).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "dropout_add.cuh"

namespace reslora {
namespace kernels {

// The largest segment rank (rounded up to 16) the fused kernels take; larger ones use the
// generic path.
constexpr int64_t kFusedMaxRank = 64;

// The sizes of one problem: n tokens, d the width of x (down, grad_A, up_dx) or of y (up_out),
// rank R = segments * segment_rank (up_out: one segment of the whole rank).
struct LowRankShape {
  int64_t n = 0;
  int64_t d = 0;
  int64_t segments = 1;
  int64_t segment_rank = 0;
};

// The dropout of the op: probability in [0, 1) and the pass seed on the device.
struct LowRankDropout {
  float p = 0.f;
  DropoutSeed seed;
};

// Every matrix is row-major and contiguous; x_prev may be null (no is sum).
struct DownArgs {
  const void* x = nullptr;       // [n, d]
  const void* x_prev = nullptr;  // [n, d] or null
  const void* A = nullptr;       // [R, d]
  void* z = nullptr;             // [n, R], written
  float* workspace = nullptr;    // lowrank_workspace_floats(LowRankOp::kDown, ...) floats
  LowRankShape shape;
  LowRankDropout dropout;
};

struct GradAArgs {
  const void* x = nullptr;       // [n, d]
  const void* x_prev = nullptr;  // [n, d] or null
  const void* dz = nullptr;      // [n, R]: the gradient of z
  void* grad_A = nullptr;        // [R, d], written
  float* workspace = nullptr;    // lowrank_workspace_floats(LowRankOp::kGradA, ...) floats
  LowRankShape shape;
  LowRankDropout dropout;
};

// grad_A and the low-rank input gradient of one segment in one pass.
struct GradAUpDxArgs {
  GradAArgs grad;               // x, x_prev, dz, grad_A, workspace, shape (one segment), dropout
  const void* A = nullptr;      // [R, d]
  void* grad_x = nullptr;       // [n, d], written: drop(dz A) / (1 - p)
  void* grad_x_copy = nullptr;  // [n, d] or null: a second copy of grad_x (the is variant's dx,
                                // onto which the base GEMM then accumulates)
};

struct UpDxArgs {
  const void* dz = nullptr;  // [n, R]
  const void* A = nullptr;   // [R, d]
  void* grad_x = nullptr;    // [n, d], written: sum_k drop_k(dz_k A_k) / (1 - p)
  LowRankShape shape;
  LowRankDropout dropout;
};

struct UpOutArgs {
  const void* z = nullptr;  // [n, R]
  const void* B = nullptr;  // [d_out, R]
  void* y = nullptr;        // [n, d_out], written: scaling z B^T
  LowRankShape shape;       // d = d_out, one segment
  float scaling = 1.f;
};

enum class LowRankOp { kDown, kGradA, kUpDx, kUpOut, kGradAUpDx };

// Dynamic shared memory the kernels may ask for (every GPU of compute capability 8.0+ has it).
constexpr size_t kMaxSmemBytes = 96 * 1024;

// True when the fused kernels take this problem: dtype fp16 / bf16, segment rank within
// kFusedMaxRank, the shared memory within kMaxSmemBytes, compute capability >= 8.0.
bool lowrank_supported(DType dtype, int64_t segment_rank, int64_t segments, bool with_prev,
                       int device_major);

// fp32 elements of workspace the op needs (0 for the up ops), for `num_sms` multiprocessors.
size_t lowrank_workspace_floats(LowRankOp op, const LowRankShape& shape, int num_sms);

// Launch the op on `stream`; each returns the launch status (cudaErrorInvalidValue for
// arguments the kernels do not take).
cudaError_t lowrank_down(const DownArgs& args, DType dtype, int num_sms, cudaStream_t stream);
cudaError_t lowrank_grad_A(const GradAArgs& args, DType dtype, int num_sms, cudaStream_t stream);
cudaError_t lowrank_grad_A_up_dx(const GradAUpDxArgs& args, DType dtype, int num_sms,
                                 cudaStream_t stream);
cudaError_t lowrank_up_dx(const UpDxArgs& args, DType dtype, int num_sms, cudaStream_t stream);
cudaError_t lowrank_up_out(const UpOutArgs& args, DType dtype, int num_sms, cudaStream_t stream);

}  // namespace kernels
}  // namespace reslora
