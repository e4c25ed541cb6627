// Torch-free fused kernels of the low-rank path (fp16 / bf16, tensor cores through raw mma.sync
// fragments, tiles streamed through shared memory with asynchronous copies).
//
// With dropout (and for the is sum x + x_prev) the low-rank path used to materialise the full-size
// masked input once in forward and twice in backward. These kernels read x (and x_prev) straight
// from memory, apply the counter-based mask of dropout_hash.h on the fly and never write a
// full-size temporary:
//   down:   z[:, seg k]   = drop_k(x [+ x_prev]) A_k^T                     (reads x once)
//   grad_A: dA[seg k, :]  = dz[:, seg k]^T drop_k(x [+ x_prev])            (reads x once)
//   up_dx:  out           = sum_k drop_k(dz[:, seg k] A_k)                  (writes out once)
//   up_out: out           = alpha z B^T                                    (the forward's s z B^T)
//   grad_A_up_dx: grad_A and up_dx of one segment in one pass: each element pair's mask is made
//           once for both              (reads x once, writes out2 once, and out2_copy if given)
// A segment is a block of `segment_rank` rows of A with its own mask (bs chains). Reductions run
// over a split of the long dimension into fp32 partial sums in a workspace, summed in a fixed
// order by a second small kernel, so results are deterministic. Everything runs on `stream`
// without host synchronisation (CUDA-graph safe).
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

struct LowRankParams {
  const void* x = nullptr;       // [n, d] contiguous (down, grad_A)
  const void* x_prev = nullptr;  // [n, d] or nullptr
  const void* A = nullptr;       // [segments * segment_rank, d] contiguous; B [d, R] (up_out)
  const void* dz = nullptr;      // [n, segments * segment_rank] contiguous (grad_A, up_dx); z
                                 // (up_out)
  void* out = nullptr;           // z [n, R] (down), dA [R, d] (grad_A, grad_A_up_dx), [n, d]
                                 // (up_dx, up_out)
  void* out2 = nullptr;          // [n, d]: the low-rank input gradient (grad_A_up_dx)
  void* out2_copy = nullptr;     // [n, d] or nullptr: a second copy of out2 (grad_A_up_dx; the is
                                 // variant's dx, onto which the base GEMM then accumulates)
  float* workspace = nullptr;    // fp32, at least lowrank_workspace_floats(...) elements
  int64_t n = 0;
  int64_t d = 0;
  int64_t segments = 1;
  int64_t segment_rank = 0;
  float p = 0.f;      // dropout probability in [0, 1); 0 for up_out
  float alpha = 1.f;  // factor on the result (the LoRA scaling of up_out)
  DropoutSeed seed;   // the pass seed on the device (see dropout_hash.h)
};

enum class LowRankOp { kDown, kGradA, kUpDx, kUpOut, kGradAUpDx };

// Dynamic shared memory the kernels may ask for (every GPU of compute capability 8.0+ has it).
constexpr size_t kMaxSmemBytes = 96 * 1024;

// True when the fused kernels take this problem: dtype fp16 / bf16, segment rank within
// kFusedMaxRank, the shared memory within kMaxSmemBytes, compute capability >= 8.0.
bool lowrank_supported(DType dtype, int64_t segment_rank, int64_t segments, bool with_prev,
                       int device_major);

// fp32 elements of workspace the op needs (0 for the up ops), for `num_sms` multiprocessors.
size_t lowrank_workspace_floats(LowRankOp op, const LowRankParams& params, int num_sms);

// Launches the op on `stream`; returns the launch status.
cudaError_t lowrank_launch(LowRankOp op, const LowRankParams& params, DType dtype, int num_sms,
                           cudaStream_t stream);

}  // namespace kernels
}  // namespace reslora
