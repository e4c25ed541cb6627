// The up kernels: the low-rank input gradient sum_k drop_k(dz_k A_k) (up_dx_kernel) and the
// forward's scaling z B^T (up_out_kernel), one pass writing the full-size output.
#pragma once

#include "tiles.cuh"

namespace reslora {
namespace kernels {
namespace lowrank {

// out = alpha / (1 - p) * sum_k drop_k(dz[:, seg k] M_k) for 64 rows and the 64-column tiles of
// this split, M_k being the segment's rows of A ([R, d], up_dx) or, BT, its columns of B
// transposed (B [d, R]; the forward's s z B^T with dz = z, one segment, no dropout). The block
// keeps its dz rows in shared memory and streams tiles of M; each warp owns 16 rows, masks its
// fp32 results in registers and stores them from there.
template <typename T, bool VEC, int NF, bool BT>
__device__ __forceinline__ void up_body(const T* __restrict__ dz, const T* __restrict__ M,
                                        T* __restrict__ out, const Common& c) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int RP = 16 * NF;
  constexpr int kLdz = RP + 8;
  constexpr int kStage = BT ? kTile * kLdz : RP * kLd;  // elements of one segment's M tile
  constexpr int kLdo = 32 + 8;                          // staging rows of 32 output columns
  extern __shared__ __align__(128) unsigned char smem[];
  T* stg = reinterpret_cast<T*>(smem);     // [64][kLdo]: 16 rows per warp
  T* ds = stg + kTile * kLdo;              // [segments][64][kLdz]
  T* ms = ds + c.segments * kTile * kLdz;  // [kStages][segments][kStage]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t4 = lane % 4;
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  int64_t t_begin, t_end;
  split_range((c.d + kTile - 1) / kTile, c.per_split, blockIdx.y, &t_begin, &t_end);
  // The stream's seed, read once; each segment's key is made from it below.
  const uint64_t seed =
      c.dropout ? stream_seed(static_cast<uint64_t>(*c.seed.ptr), c.seed.offset) : 0;

  // Rank columns past the segment's stay zero: zero everything once.
  const int zero_elems = c.segments * (kTile * kLdz + (BT ? kStages * kStage : 0));
  for (int e = tid; e < zero_elems; e += kThreads) ds[e] = Cvt<T>::t(0.f);
  __syncthreads();
  for (int64_t seg = 0; seg < c.segments; ++seg)
    copy_dz<T, VEC, RP>(ds + seg * kTile * kLdz, dz, row0, c.n, c, seg, tid);
  const float alpha = c.scale;
  const int64_t rg = row0 + warp * 16 + g;  // this thread's rows: rg and rg + 8
  stream_tiles(
      t_begin, t_end,
      [&](int64_t t, int stage) {
        for (int64_t seg = 0; seg < c.segments; ++seg) {
          T* dst = ms + (stage * c.segments + seg) * kStage;
          if (BT) {
            copy_dz<T, VEC, RP>(dst, M, t * kTile, c.d, c, seg, tid);
          } else {
            copy_rows<T, VEC, RP>(dst, M + seg * c.sr * c.d, c.sr, t * kTile, c.d, tid);
          }
        }
      },
      [&](int64_t t, int stage) {
  // Two halves of 32 columns, one after the other, keep the fragments of one half live.
#pragma unroll 1
        for (int half = 0; half < 2; ++half) {
          const int64_t col0 = t * kTile + half * 32;
          float sum[4][4];
#pragma unroll
          for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) sum[nt][e] = 0.f;
          for (int64_t seg = 0; seg < c.segments; ++seg) {
            const T* dseg = ds + seg * kTile * kLdz;
            const T* mseg = ms + (stage * c.segments + seg) * kStage;
            float acc[4][4];
            mma_up_half<T, NF, BT>(acc, dseg, mseg, half, lane, warp);
            if (c.dropout) {
              const uint64_t key = dropout_key(seed, seg);
              const uint64_t flat0 = uint64_t(rg * c.d + col0 + 2 * t4);  // row rg, first pair
#pragma unroll
              for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {  // rows rg and rg + 8
                  const uint32_t keep =
                      keep2<VEC>(key, flat0 + uint64_t(8 * h * c.d + nt * 8), c.threshold);
                  if (keep & 1u) sum[nt][2 * h] += acc[nt][2 * h];
                  if (keep & 2u) sum[nt][2 * h + 1] += acc[nt][2 * h + 1];
                }
            } else {
#pragma unroll
              for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) sum[nt][e] += acc[nt][e];
            }
          }
          if (VEC) {
            // Through the warp's own staging rows: 16-byte stores, each row's 64 bytes whole
            // sectors (4-byte stores straight from the fragments halve the store throughput).
            stage_half<T>(stg + warp * 16 * kLdo, kLdo, sum, alpha, lane);
            __syncwarp();
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              const int r = lane / 4 + 8 * i, cu = (lane % 4) * 8;
              const int64_t row = row0 + warp * 16 + r, col = col0 + cu;
              const uint4 v = *reinterpret_cast<const uint4*>(stg + (warp * 16 + r) * kLdo + cu);
              if (row < c.n && col < c.d) *reinterpret_cast<uint4*>(out + row * c.d + col) = v;
            }
            __syncwarp();  // the staging rows are rewritten by the next half
          } else {
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
              const int64_t col = col0 + nt * 8 + 2 * t4;
#pragma unroll
              for (int h = 0; h < 2; ++h)
                store_pair<T>(out, rg + 8 * h, col, c, alpha * sum[nt][2 * h],
                              alpha * sum[nt][2 * h + 1]);
            }
          }
        }
      });
#endif
}

template <typename T>
struct UpDxKernelArgs {
  const T* dz;  // [n, R]
  const T* A;   // [R, d]
  T* grad_x;    // [n, d], written
};

template <typename T>
struct UpOutKernelArgs {
  const T* z;  // [n, R]
  const T* B;  // [d_out, R]
  T* y;        // [n, d_out], written
};

// The two entries of up_body (the last parameter, a padded size, is the reductions').
template <typename T, bool VEC, int NF>
__global__ void __launch_bounds__(kThreads)
    up_dx_kernel(const UpDxKernelArgs<T> args, const Common c, const int64_t /*pad*/) {
  up_body<T, VEC, NF, false>(args.dz, args.A, args.grad_x, c);
}
template <typename T, bool VEC, int NF>
__global__ void __launch_bounds__(kThreads)
    up_out_kernel(const UpOutKernelArgs<T> args, const Common c, const int64_t /*pad*/) {
  up_body<T, VEC, NF, true>(args.z, args.B, args.y, c);
}

}  // namespace lowrank
}  // namespace kernels
}  // namespace reslora
