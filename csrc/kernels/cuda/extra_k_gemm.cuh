// Torch-free GEMM with the low-rank term as extra K (Hopper, CUTLASS: TMA + WGMMA, warp-
// specialised persistent mainloop).
//
//   out[m, n] = sum_k x[m, k] w(k, n) + sum_j z[m, j] v(j, n)         (fp32 accumulation)
//
// one GEMM whose K loop runs over the tiles of x / w and then over those of z / v: the low-rank
// product is added inside the accumulator, so the output is written once and never read back.
// The forward of a block is out = [x | s z (| 1)] [W | B (| b)]^T (kNK: w and v stored [N, K]
// row-major, as nn.Linear keeps its weight); the input gradient without dropout is
// dx = [dy | dz] [W ; A] (kKN: w and v stored [K, N] row-major).
//
// Sources (extra_k/): mainloop.cuh (the two-source producer on top of CUTLASS's mainloop),
// gemm.cuh (the kernel types and the launch), instances_<dtype>_<tile>.cu.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "dropout_add.cuh"

namespace reslora {
namespace kernels {

enum class WeightLayout {
  kNK,  // w: [N, K], v: [N, R]  (out = x w^T + z v^T)
  kKN,  // w: [K, N], v: [R, N]  (out = x w + z v)
};

// The output tile of one CTA (M x N; K tiles of 64, a cluster of two CTAs along M). The wide tile
// is the one cuBLAS picks for these products on Hopper; the narrow one doubles the tiles of a
// narrow output (the k / v projections of grouped-query attention, N = 256).
enum class ExtraKTile { k128x256, k128x128 };

// The order the persistent CTAs walk the output tiles in (CUTLASS's raster order): kHeuristic
// walks along the shorter side.
enum class ExtraKRaster { kHeuristic, kAlongM, kAlongN };

// Every matrix is row-major and contiguous.
struct ExtraKGemmArgs {
  const void* x = nullptr;  // [M, K]
  const void* w = nullptr;  // [N, K] (kNK) or [K, N] (kKN)
  const void* z = nullptr;  // [M, R]
  const void* v = nullptr;  // [N, R] (kNK) or [R, N] (kKN)
  void* out = nullptr;      // [M, N], written
  int64_t m = 0, n = 0, k = 0, r = 0;
  WeightLayout layout = WeightLayout::kNK;
  ExtraKTile tile = ExtraKTile::k128x256;
  ExtraKRaster raster = ExtraKRaster::kHeuristic;
  int swizzle = 1;  // tiles grouped 1, 2, 4 or 8 at a time along the raster (L2 reuse)
};

inline int64_t extra_k_tile_m(ExtraKTile) { return 128; }
inline int64_t extra_k_tile_n(ExtraKTile t) { return t == ExtraKTile::k128x256 ? 256 : 128; }

// Output tiles of an M x N problem.
inline int64_t extra_k_gemm_tiles(int64_t m, int64_t n, ExtraKTile t = ExtraKTile::k128x256) {
  const int64_t tm = extra_k_tile_m(t), tn = extra_k_tile_n(t);
  return ((m + tm - 1) / tm) * ((n + tn - 1) / tn);
}

// The tile for an M x N problem on a GPU of `sm_count` multiprocessors: the wide one unless its
// tiles leave more than half of them idle.
inline ExtraKTile extra_k_gemm_tile(int64_t m, int64_t n, int sm_count) {
  return 2 * extra_k_gemm_tiles(m, n) >= sm_count ? ExtraKTile::k128x256 : ExtraKTile::k128x128;
}

// Whether the extra-K GEMM pays on a GPU of `sm_count` multiprocessors: below about a quarter of
// them in wide tiles the persistent kernel leaves most idle while cuBLAS splits K. Measured on the
// H200 (bench/results/): 16 tokens x 4096 (16 tiles) took 1.5 times the generic path, while the
// Llama step's k / v projection, 8192 x 256 (64 tiles), gained.
inline bool extra_k_gemm_pays(int64_t m, int64_t n, int sm_count) {
  return 4 * extra_k_gemm_tiles(m, n) >= sm_count;
}

// True when this build has the kernel and it takes the problem: fp16 / bf16, compute capability
// 9.0, K, N and R multiples of 8 (the 16-byte rows TMA needs), every pointer 16-byte aligned,
// M, N, K, R > 0 and within 32 bits.
bool extra_k_gemm_supported(const ExtraKGemmArgs& args, DType dtype, int device_major);

// True when the CUDA sources were compiled with the kernel (CUTLASS found, sm_90a).
bool extra_k_gemm_built();

// Launch on `stream` (no host synchronisation). cudaErrorInvalidValue for what it does not take.
cudaError_t extra_k_gemm(const ExtraKGemmArgs& args, DType dtype, cudaStream_t stream);

}  // namespace kernels
}  // namespace reslora
