// The dA kernels: dA = dz_k^T drop_k(x [+ x_prev]) per segment k, the reduction over the
// tokens; grad_a_up_dx_kernel also writes the low-rank input gradient drop(dz A) of its one
// segment in the same pass over x.
#pragma once

#include "tiles.cuh"

namespace reslora {
namespace kernels {
namespace lowrank {

template <typename T>
struct GradAKernelArgs {
  const T* x;       // [n, d]
  const T* x_prev;  // [n, d] or null
  const T* dz;      // [n, R]
  float* partials;  // [splits][segments][RP][d_pad], reduced into dA afterwards
  const T* A;       // grad_a_up_dx_kernel: [R, d] (one segment); else unused
  T* grad_x;        // grad_a_up_dx_kernel: [n, d], written; else unused
  T* grad_x_copy;   // grad_a_up_dx_kernel: [n, d] or null, a second copy of grad_x
};

// --- Pieces of the two dA kernels (grad_a_kernel, grad_a_up_dx_kernel). Each warp owns 16 of the
// block's 64 columns; its accumulators are rank (RP = 16 NF) x 16 columns in m16n8 fragments.

// Tile t of x [+ x_prev] (rows t * 64 .., the block's columns) and the same rows of dz's
// segment `seg` into their stages.
template <typename T, bool VEC, int RP>
__device__ __forceinline__ void copy_grad_a_tile(T* xs, T* ps, T* ds, const T* x, const T* xp,
                                                 const T* dz, int64_t t, int64_t col0,
                                                 const Common& c, int64_t seg, int tid) {
  copy_swz<T, VEC, kTile>(xs, x, t * kTile, c.n, col0, c.d, tid);
  if (xp != nullptr) copy_swz<T, VEC, kTile>(ps, xp, t * kTile, c.n, col0, c.d, tid);
  copy_dz<T, VEC, RP>(ds, dz, t * kTile, c.n, c, seg, tid);
}

template <int NF>
__device__ __forceinline__ void zero_grad_a(float (&acc)[NF][2][4]) {
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[f][nt][e] = 0.f;
}

// acc += dz^T x over one landed tile: xs the masked x stage, ds the dz stage ([64][RP + 8]).
template <typename T, int NF>
__device__ __forceinline__ void mma_grad_a(float (&acc)[NF][2][4], const T* xs, const T* ds,
                                           int lane, int warp) {
  constexpr int kLdz = 16 * NF + 8;
  const int j = lane / 8, i8 = lane % 8;
#pragma unroll
  for (int kk = 0; kk < kTile / 16; ++kk) {
    uint32_t b[4];  // masked x rows (k) x this warp's 16 columns (n), transposed
    ldmatrix_x4<true>(b, xs + swz(kk * 16 + (j % 2) * 8 + i8, warp * 2 + j / 2));
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      uint32_t a[4];  // dz^T: rank (m) x rows (k), from the [k][m] stage
      ldmatrix_x4<true>(a, ds + (kk * 16 + (j / 2) * 8 + i8) * kLdz + f * 16 + (j % 2) * 8);
      Mma<T>::run(acc[f][0], a, b[0], b[1]);
      Mma<T>::run(acc[f][1], a, b[2], b[3]);
    }
  }
}

// scale * acc into the warp's columns of a [RP][d_pad] partial-sum slice.
template <int NF>
__device__ __forceinline__ void store_grad_a(const float (&acc)[NF][2][4], float* out,
                                             int64_t d_pad, int lane, float scale) {
  const int g = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        *reinterpret_cast<float2*>(out + (f * 16 + g + 8 * h) * d_pad + nt * 8 + 2 * t4) =
            make_float2(acc[f][nt][2 * h] * scale, acc[f][nt][2 * h + 1] * scale);
}

// dA partial sums ws[split][seg][RP][d_pad] over the row tiles of this split; each warp owns 16
// columns. A landed tile of x [+ x_prev] is summed and masked in place (skipped without dropout
// and x_prev), then read transposed by ldmatrix.
// UP (one segment): the same pass also writes the low-rank input gradient grad_x = drop(dz A),
// the other backward product that shares the mask of x. Per tile of 64 rows x the block's 64
// columns the tensor cores write dz A (times 1 / (1 - p)) into a staging tile; one pass makes
// each element pair's mask once, masks x [+ x_prev] in place and the staged tile on its way to
// memory (16-byte stores); then dA accumulates over the masked x.
template <typename T, bool VEC, int NF, bool UP>
__device__ __forceinline__ void grad_a_body(const GradAKernelArgs<T>& args, const Common& c,
                                            int64_t d_pad) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const T* __restrict__ x = args.x;
  const T* __restrict__ xp = args.x_prev;
  const T* __restrict__ dz = args.dz;
  const T* __restrict__ A = args.A;
  float* __restrict__ ws = args.partials;
  T* __restrict__ out2 = args.grad_x;
  constexpr int RP = 16 * NF;
  constexpr int kLdz = RP + 8;
  extern __shared__ __align__(128) unsigned char smem[];
  const bool prev = xp != nullptr;
  T* xr = reinterpret_cast<T*>(smem);                 // x stages [kStages][64][64]
  T* pr = xr + kStages * kTile * kTile;               // x_prev stages, when given
  T* dr = pr + (prev ? kStages * kTile * kTile : 0);  // dz stages [kStages][64][kLdz]
  T* as = dr + kStages * kTile * kLdz;                // UP: A columns [RP][kLd]
  T* os = as + RP * kLd;                              // UP: staged dz A tile [64][kLd]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t col0 = int64_t(blockIdx.x) * kTile;
  const int64_t split = blockIdx.y, seg = UP ? 0 : blockIdx.z;
  int64_t t_begin, t_end;
  split_range((c.n + kTile - 1) / kTile, c.per_split, split, &t_begin, &t_end);
  const uint64_t key = dropout_key(c.seed, seg);

  // Rank columns past the segment's are never copied: zero them once in every stage.
  for (int e = tid; e < kStages * kTile * kLdz; e += kThreads) dr[e] = Cvt<T>::t(0.f);
  __syncthreads();
  if (UP) copy_rows<T, VEC, RP>(as, A, c.sr, col0, c.d, tid);  // lands with the first tile

  float acc[NF][2][4];
  zero_grad_a(acc);

  stream_tiles(
      t_begin, t_end,
      [&](int64_t t, int stage) {
        copy_grad_a_tile<T, VEC, RP>(xr + stage * kTile * kTile, pr + stage * kTile * kTile,
                                     dr + stage * kTile * kLdz, x, xp, dz, t, col0, c, seg, tid);
      },
      [&](int64_t t, int stage) {
        T* xs = xr + stage * kTile * kTile;
        const T* ps = pr + stage * kTile * kTile;
        const T* ds = dr + stage * kTile * kLdz;
        if (!UP) {
          if (prev || c.dropout) {
            mask_stage<T, VEC>(xs, ps, prev, t * kTile, col0, c, key, tid);
            __syncthreads();
          }
        } else {
      // dz A for this warp's 16 rows, in two halves of 32 columns, into the staging tile.
#pragma unroll 1
          for (int half = 0; half < 2; ++half) {
            float up[4][4];
            mma_up_half<T, NF, false>(up, ds, as, half, lane, warp);
            stage_half<T>(os + warp * 16 * kLd + half * 32, kLd, up, c.scale, lane);
          }
          __syncthreads();
      // One mask per element pair for both: x [+ x_prev] in place, the staged tile to memory.
#pragma unroll
          for (int u0 = 0; u0 < kUnits; ++u0) {
            const int u = tid + kThreads * u0;
            const int row = u >> 3, ch = u & 7;
            const int64_t grow = t * kTile + row, gcol = col0 + ch * 8;
            uint4 o = *reinterpret_cast<const uint4*>(os + row * kLd + ch * 8);
            if (prev || c.dropout) {
              uint4* px = reinterpret_cast<uint4*>(xs + swz(row, ch));
              uint4 v = *px;
              if (prev) v = add_chunk<T>(v, *reinterpret_cast<const uint4*>(ps + swz(row, ch)));
              if (c.dropout) {
                uint32_t m[4];
                chunk_masks<VEC>(key, uint64_t(grow * c.d + gcol), c.threshold, m);
                v = and_chunk(v, m);
                o = and_chunk(o, m);
              }
              *px = v;
            }
            if (grow < c.n && gcol < c.d) {
              store8<T, VEC>(out2 + grow * c.d + gcol, o, c.d - gcol);
              if (args.grad_x_copy != nullptr)
                store8<T, VEC>(args.grad_x_copy + grow * c.d + gcol, o, c.d - gcol);
            }
          }
          __syncthreads();
        }
        mma_grad_a<T, NF>(acc, xs, ds, lane, warp);
      });
  store_grad_a(acc, ws + (split * c.segments + seg) * RP * d_pad + col0 + warp * 16, d_pad, lane,
               c.scale);
#endif
}

// The two entries of grad_a_body: dA alone (every segment), and dA with the low-rank dx.
template <typename T, bool VEC, int NF>
__global__ void __launch_bounds__(kThreads)
    grad_a_kernel(const GradAKernelArgs<T> args, const Common c, const int64_t d_pad) {
  grad_a_body<T, VEC, NF, false>(args, c, d_pad);
}
template <typename T, bool VEC, int NF>
__global__ void __launch_bounds__(kThreads)
    grad_a_up_dx_kernel(const GradAKernelArgs<T> args, const Common c, const int64_t d_pad) {
  grad_a_body<T, VEC, NF, true>(args, c, d_pad);
}

}  // namespace lowrank
}  // namespace kernels
}  // namespace reslora
