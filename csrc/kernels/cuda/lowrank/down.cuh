// The down kernel: z = drop_k(x [+ x_prev]) A_k^T per segment k, the reduction over d.
#pragma once

#include "tiles.cuh"

namespace reslora {
namespace kernels {
namespace lowrank {

// z partial sums: ws[split][seg][n_pad][RP] over the column tiles of this split. Each warp owns
// 16 rows. A landed tile of x [+ x_prev] is summed and masked in place (skipped without dropout
// and x_prev), then read by ldmatrix straight from its stage.
template <typename T>
struct DownKernelArgs {
  const T* x;       // [n, d]
  const T* x_prev;  // [n, d] or null
  const T* A;       // [R, d]
  float* partials;  // [splits][segments][n_pad][RP], reduced into z afterwards
};

template <typename T, bool VEC, int NF>
__global__ void __launch_bounds__(kThreads, 5)
    down_kernel(const DownKernelArgs<T> args, const Common c, const int64_t n_pad) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const T* __restrict__ x = args.x;
  const T* __restrict__ xp = args.x_prev;
  const T* __restrict__ A = args.A;
  float* __restrict__ ws = args.partials;
  constexpr int RP = 16 * NF;
  extern __shared__ __align__(128) unsigned char smem[];
  const bool prev = xp != nullptr;
  T* xr = reinterpret_cast<T*>(smem);                 // x stages [kStages][64][64]
  T* pr = xr + kStages * kTile * kTile;               // x_prev stages, when given
  T* ar = pr + (prev ? kStages * kTile * kTile : 0);  // A stages [kStages][RP][64]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t4 = lane % 4, j = lane / 8, i8 = lane % 8;
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  const int64_t split = blockIdx.y, seg = blockIdx.z;
  int64_t t_begin, t_end;
  split_range((c.d + kTile - 1) / kTile, c.per_split, split, &t_begin, &t_end);
  const uint64_t key = dropout_key(c.seed, seg);
  const T* A_seg = A + seg * c.sr * c.d;
  const int arow = warp * 16 + lane % 16;   // the row whose address this lane gives to ldmatrix
  const int64_t rg = row0 + warp * 16 + g;  // this thread's fragment rows: rg and rg + 8

  float acc[2 * NF][4];
#pragma unroll
  for (int f = 0; f < 2 * NF; ++f)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[f][e] = 0.f;

  stream_tiles(
      t_begin, t_end,
      [&](int64_t t, int stage) {
        copy_swz<T, VEC, kTile>(xr + stage * kTile * kTile, x, row0, c.n, t * kTile, c.d, tid);
        if (prev)
          copy_swz<T, VEC, kTile>(pr + stage * kTile * kTile, xp, row0, c.n, t * kTile, c.d, tid);
        copy_swz<T, VEC, RP>(ar + stage * RP * kTile, A_seg, 0, c.sr, t * kTile, c.d, tid);
      },
      [&](int64_t t, int stage) {
        const T* xs = xr + stage * kTile * kTile;
        const T* ps = pr + stage * kTile * kTile;
        const T* as = ar + stage * RP * kTile;
        if (prev || c.dropout) {
          mask_stage<T, VEC>(xr + stage * kTile * kTile, ps, prev, row0, t * kTile, c, key, tid);
          __syncthreads();
        }
#pragma unroll
        for (int kk = 0; kk < kTile / 16; ++kk) {
          uint32_t a[4];
          ldmatrix_x4<false>(a, xs + swz(arow, 2 * kk + lane / 16));
#pragma unroll
          for (int f = 0; f < NF; ++f) {  // A rows are the B operand's columns: [n][k]
            uint32_t b[4];
            ldmatrix_x4<false>(b, as + swz(f * 16 + (j / 2) * 8 + i8, 2 * kk + (j % 2)));
            Mma<T>::run(acc[2 * f], a, b[0], b[1]);
            Mma<T>::run(acc[2 * f + 1], a, b[2], b[3]);
          }
        }
      });
  float* out = ws + (split * c.segments + seg) * n_pad * RP;
#pragma unroll
  for (int f = 0; f < 2 * NF; ++f)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      *reinterpret_cast<float2*>(out + (rg + 8 * h) * RP + f * 8 + 2 * t4) =
          make_float2(acc[f][2 * h] * c.scale, acc[f][2 * h + 1] * c.scale);
#endif
}

}  // namespace lowrank
}  // namespace kernels
}  // namespace reslora
