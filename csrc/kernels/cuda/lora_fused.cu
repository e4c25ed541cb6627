#include "lora_fused.cuh"

#include <algorithm>
#include <atomic>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "../dropout_hash.h"

namespace reslora {
namespace kernels {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kTile = 64;      // rows and columns of a tile
constexpr int kLd = kTile + 8;  // padded leading dimension of 16-bit tiles in shared memory
constexpr int kThreads = 128;  // four warps
constexpr int kUnits = kTile * kTile / 8 / kThreads;  // 8-element units per thread per tile

template <typename T>
struct Cvt;
template <>
struct Cvt<__half> {
  __device__ static float f(__half v) { return __half2float(v); }
  __device__ static __half t(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  __device__ static float f(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 t(float v) { return __float2bfloat16_rn(v); }
};

// Eight consecutive elements of row `row` starting at column c (zeros outside [rows, d)). VEC:
// one 16-byte load, valid when d % 8 == 0 and the base is 16-byte aligned.
template <typename T, bool VEC>
__device__ __forceinline__ uint4 load8(const T* base, int64_t row, int64_t rows, int64_t c,
                                       int64_t d) {
  uint4 r = make_uint4(0, 0, 0, 0);
  if (row >= rows) return r;
  const T* p = base + row * d + c;
  if (VEC) {
    if (c < d) r = __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    T* e = reinterpret_cast<T*>(&r);
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (c + k < d) e[k] = p[k];
  }
  return r;
}

// 0xffff over each 16-bit half of a pair of elements whose element is kept (dropout_keep_lane),
// 0 over a dropped one. Each 15-bit lane plus 0x8000 minus the threshold cannot borrow from its
// neighbour; its bit 15 is set exactly when lane >= threshold; prmt replicates that sign bit over
// the lane's bytes.
__device__ __forceinline__ uint32_t dropout_pair_mask(uint32_t bits, uint32_t threshold) {
  const uint32_t d = ((bits & 0x7fff7fffU) | 0x80008000U) - (threshold | (threshold << 16));
  uint32_t m;
  asm("prmt.b32 %0, %1, 0, 0xBB99;" : "=r"(m) : "r"(d));
  return m;
}

// Keep flags of the eight elements at flat indices flat .. flat + 7 (bit k: element flat + k).
template <bool VEC>
__device__ __forceinline__ uint32_t keep8(uint64_t key, uint64_t flat, uint32_t threshold) {
  uint32_t keep = 0;
  if (VEC) {  // flat % 8 == 0: four pair hashes cover the eight elements
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint32_t bits = dropout_pair_bits(key, (flat >> 1) + q);
      keep |= uint32_t(dropout_keep_lane(bits, 0, threshold)) << (2 * q);
      keep |= uint32_t(dropout_keep_lane(bits, 1, threshold)) << (2 * q + 1);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) keep |= uint32_t(dropout_keep(key, flat + k, threshold)) << k;
  }
  return keep;
}

// keep * (x [+ x_prev]) rounded to T, into 8 elements of shared memory. The 1 / (1 - p) of
// dropout is applied to the float accumulators after the product instead, so without x_prev the
// mask is a bitwise AND of element pairs and the inputs are never converted.
template <typename T, bool VEC>
__device__ __forceinline__ void mask_store(uint4 rx, uint4 rp, bool has_prev, bool dropout,
                                           uint64_t key, uint64_t flat, uint32_t threshold,
                                           T* dst) {
  uint4 o = rx;
  if (has_prev) {
    const T* ex = reinterpret_cast<const T*>(&rx);
    const T* ep = reinterpret_cast<const T*>(&rp);
    T* eo = reinterpret_cast<T*>(&o);
#pragma unroll
    for (int k = 0; k < 8; ++k) eo[k] = Cvt<T>::t(Cvt<T>::f(ex[k]) + Cvt<T>::f(ep[k]));
  }
  if (dropout) {
    if (VEC) {  // flat % 8 == 0: word q holds the pair flat / 2 + q
      uint32_t* w = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
      for (int q = 0; q < 4; ++q)
        w[q] &= dropout_pair_mask(dropout_pair_bits(key, (flat >> 1) + q), threshold);
    } else {
      T* eo = reinterpret_cast<T*>(&o);
#pragma unroll
      for (int k = 0; k < 8; ++k)
        if (!dropout_keep(key, flat + k, threshold)) eo[k] = Cvt<T>::t(0.f);
    }
  }
  *reinterpret_cast<uint4*>(dst) = o;
}

struct Common {
  int64_t n, d, sr, R, segments, per_split;
  bool dropout;
  uint32_t threshold;
  float scale;
  uint64_t seed;
};

// --- Asynchronous copies (sm_80+): tiles stream into shared memory while the tensor cores work
// on earlier ones; bytes in flight live in shared memory, not in registers. src_bytes = 0
// zero-fills the destination (rows or columns past the end).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

constexpr int kStages = 3;  // tiles in flight per block: kStages - 1

// Rows [r0, r0 + 64) x columns [c0, c0 + 64) of a [rows, d] matrix into a dense [64][64] stage.
// VEC: asynchronous 16-byte copies; otherwise element loads (odd shapes).
template <typename T, bool VEC>
__device__ __forceinline__ void copy_tile(T* dst, const T* src, int64_t r0, int64_t rows,
                                          int64_t c0, int64_t d, int tid) {
#pragma unroll
  for (int j = 0; j < kUnits; ++j) {
    const int u = tid + kThreads * j;
    const int row = u >> 3, cu = (u & 7) * 8;
    T* s = dst + row * kTile + cu;
    if (VEC) {
      const bool ok = r0 + row < rows && c0 + cu < d;
      cp_async16(s, ok ? src + (r0 + row) * d + c0 + cu : src, ok);
    } else {
      *reinterpret_cast<uint4*>(s) = load8<T, false>(src, r0 + row, rows, c0 + cu, d);
    }
  }
}

// Rows [0, RP) (zero from `rows` on) x columns [c0, c0 + 64) of a [rows, d] matrix into a
// [RP][kLd] stage.
template <typename T, bool VEC, int RP>
__device__ __forceinline__ void copy_rows(T* dst, const T* src, int64_t rows, int64_t c0,
                                          int64_t d, int tid) {
#pragma unroll
  for (int j = 0; j < RP * 8 / kThreads; ++j) {
    const int u = tid + kThreads * j;
    const int r = u >> 3, cu = (u & 7) * 8;
    T* s = dst + r * kLd + cu;
    if (VEC) {
      const bool ok = r < rows && c0 + cu < d;
      cp_async16(s, ok ? src + r * d + c0 + cu : src, ok);
    } else {
      *reinterpret_cast<uint4*>(s) = load8<T, false>(src, r, rows, c0 + cu, d);
    }
  }
}

// dz[r0 .. r0 + 64, seg * sr .. + sr] into a [64][RP + 8] stage. VEC (R, sr even, dz 4-byte
// aligned): asynchronous copies of element pairs; columns sr .. RP stay as zeroed at start.
template <typename T, bool VEC, int RP>
__device__ __forceinline__ void copy_dz(T* dst, const T* dz, int64_t r0, const Common& c,
                                        int64_t seg, int tid) {
  constexpr int kLdz = RP + 8;
  if (VEC) {
    for (int e = tid; e < kTile * RP / 2; e += kThreads) {
      const int row = e / (RP / 2), col = 2 * (e % (RP / 2));
      if (col >= c.sr) continue;
      const bool ok = r0 + row < c.n;
      cp_async4(dst + row * kLdz + col, ok ? dz + (r0 + row) * c.R + seg * c.sr + col : dz, ok);
    }
  } else {
    for (int e = tid; e < kTile * RP; e += kThreads) {
      const int row = e / RP, col = e % RP;
      dst[row * kLdz + col] = r0 + row < c.n && col < c.sr
                                  ? dz[(r0 + row) * c.R + seg * c.sr + col]
                                  : Cvt<T>::t(0.f);
    }
  }
}

// x [+ x_prev] rows [r0, r0 + 64) x columns [c0, c0 + 64) into one stage each.
template <typename T, bool VEC>
__device__ __forceinline__ void copy_inputs(T* xr, T* pr, const T* x, const T* xp, int64_t r0,
                                            int64_t c0, const Common& c, int tid) {
  copy_tile<T, VEC>(xr, x, r0, c.n, c0, c.d, tid);
  if (xp != nullptr) copy_tile<T, VEC>(pr, xp, r0, c.n, c0, c.d, tid);
}

// A landed stage of x [+ x_prev] (tile origin r0, c0 in the [n, d] input), masked into xs.
template <typename T, bool VEC>
__device__ __forceinline__ void mask_tile(const T* xr, const T* pr, int64_t r0, int64_t c0,
                                          const Common& c, uint64_t key, T* xs, int tid) {
#pragma unroll
  for (int j = 0; j < kUnits; ++j) {
    const int u = tid + kThreads * j;
    const int row = u >> 3, cu = (u & 7) * 8;
    const int off = row * kTile + cu;
    const uint4 rx = *reinterpret_cast<const uint4*>(xr + off);
    const uint4 rp =
        pr != nullptr ? *reinterpret_cast<const uint4*>(pr + off) : make_uint4(0, 0, 0, 0);
    mask_store<T, VEC>(rx, rp, pr != nullptr, c.dropout, key, uint64_t((r0 + row) * c.d + c0 + cu),
                       c.threshold, xs + row * kLd + cu);
  }
}

// The 1 / (1 - p) of dropout (1 without), on a float accumulator.
__device__ __forceinline__ void scale_fragment(
    wmma::fragment<wmma::accumulator, 16, 16, 16, float>& acc, float scale) {
#pragma unroll
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= scale;
}

// Shared memory of each kernel (bytes), for the launch and the support check.
constexpr size_t down_smem(int rp, bool prev) {
  return 2 * (size_t(kTile) * kLd + size_t(kStages) * kTile * kTile * (prev ? 2 : 1) +
              size_t(kStages) * rp * kLd);
}
constexpr size_t grad_a_smem(int rp, bool prev) {
  return 2 * (size_t(kTile) * kLd + size_t(kStages) * kTile * kTile * (prev ? 2 : 1) +
              size_t(kStages) * kTile * (rp + 8));
}
constexpr size_t up_dx_smem(int rp, int64_t segments) {
  return 2 * (size_t(segments) * kTile * (rp + 8) + 2 * size_t(segments) * rp * kLd) +
         4 * size_t(kTile) * (kTile + 4);
}

// The pipeline of both reductions over x: tiles [t_begin, t_end) stream through kStages
// shared-memory stages. copy(t, stage) starts the asynchronous copies of tile t; each landed tile
// is masked into the block's tile (mask(t, stage)) and then consumed by the tensor cores
// (mma(stage)) while the next kStages - 1 tiles are in flight.
template <typename Copy, typename Mask, typename Mma>
__device__ __forceinline__ void stream_tiles(int64_t t_begin, int64_t t_end, Copy copy, Mask mask,
                                             Mma mma) {
  const auto issue = [&](int64_t t, int stage) {
    if (t < t_end) copy(t, stage);
    cp_commit();  // an empty group past the end keeps the wait counts uniform
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(t_begin + s, s);
  int stage = 0;
  for (int64_t t = t_begin; t < t_end; ++t) {
    cp_wait<kStages - 2>();
    __syncthreads();
    mask(t, stage);
    __syncthreads();
    // The stage refilled here was consumed by the previous iteration, before both barriers.
    issue(t + kStages - 1, (stage + kStages - 1) % kStages);
    mma(stage);
    stage = (stage + 1) % kStages;
  }
  cp_wait<0>();
}

// The tiles [begin, end) of split `split` when `tiles` tiles are cut into runs of per_split.
__device__ __forceinline__ void split_range(int64_t tiles, int64_t per_split, int64_t split,
                                            int64_t* begin, int64_t* end) {
  *begin = split * per_split;
  *end = *begin + per_split < tiles ? *begin + per_split : tiles;
}

// z partial sums: ws[split][seg][n_pad][RP] over the column tiles of this split.
template <typename T, bool VEC, int NF>
__global__ void __launch_bounds__(kThreads)
    down_kernel(const T* __restrict__ x, const T* __restrict__ xp, const T* __restrict__ A,
                float* __restrict__ ws, Common c, int64_t n_pad) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int RP = 16 * NF;
  extern __shared__ __align__(128) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);               // masked tile [64][kLd]
  T* xr = xs + kTile * kLd;                          // x stages [kStages][64][64]
  T* pr = xr + kStages * kTile * kTile;              // x_prev stages, when given
  T* ar = pr + (xp != nullptr ? kStages * kTile * kTile : 0);  // A stages [kStages][RP][kLd]
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  const int64_t split = blockIdx.y, seg = blockIdx.z;
  int64_t t_begin, t_end;
  split_range((c.d + kTile - 1) / kTile, c.per_split, split, &t_begin, &t_end);
  const uint64_t key = dropout_key(c.seed, seg);
  const T* A_seg = A + seg * c.sr * c.d;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.f);

  stream_tiles(
      t_begin, t_end,
      [&](int64_t t, int stage) {
        copy_inputs<T, VEC>(xr + stage * kTile * kTile, pr + stage * kTile * kTile, x, xp, row0,
                            t * kTile, c, tid);
        copy_rows<T, VEC, RP>(ar + stage * RP * kLd, A_seg, c.sr, t * kTile, c.d, tid);
      },
      [&](int64_t t, int stage) {
        mask_tile<T, VEC>(xr + stage * kTile * kTile,
                          xp != nullptr ? pr + stage * kTile * kTile : nullptr, row0, t * kTile,
                          c, key, xs, tid);
      },
      [&](int stage) {
        const T* as = ar + stage * RP * kLd;
#pragma unroll
        for (int kk = 0; kk < kTile / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::load_matrix_sync(a, xs + warp * 16 * kLd + kk * 16, kLd);
#pragma unroll
          for (int f = 0; f < NF; ++f) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // A_seg^T
            wmma::load_matrix_sync(b, as + f * 16 * kLd + kk * 16, kLd);
            wmma::mma_sync(acc[f], a, b, acc[f]);
          }
        }
      });
  float* out = ws + ((split * c.segments + seg) * n_pad + row0 + warp * 16) * RP;
#pragma unroll
  for (int f = 0; f < NF; ++f) scale_fragment(acc[f], c.scale);
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::store_matrix_sync(out + f * 16, acc[f], RP, wmma::mem_row_major);
#endif
}

// dA partial sums: ws[split][seg][RP][d_pad] over the row tiles of this split.
template <typename T, bool VEC, int NF>
__global__ void __launch_bounds__(kThreads)
    grad_a_kernel(const T* __restrict__ x, const T* __restrict__ xp, const T* __restrict__ dz,
                  float* __restrict__ ws, Common c, int64_t d_pad) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int RP = 16 * NF;
  constexpr int kLdz = RP + 8;
  extern __shared__ __align__(128) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);               // masked tile [64][kLd]
  T* xr = xs + kTile * kLd;                          // x stages [kStages][64][64]
  T* pr = xr + kStages * kTile * kTile;              // x_prev stages, when given
  T* dr = pr + (xp != nullptr ? kStages * kTile * kTile : 0);  // dz stages [kStages][64][kLdz]
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int64_t col0 = int64_t(blockIdx.x) * kTile;
  const int64_t split = blockIdx.y, seg = blockIdx.z;
  int64_t t_begin, t_end;
  split_range((c.n + kTile - 1) / kTile, c.per_split, split, &t_begin, &t_end);
  const uint64_t key = dropout_key(c.seed, seg);

  // Rank columns past the segment's are never copied: zero them once in every stage.
  for (int e = tid; e < kStages * kTile * kLdz; e += kThreads) dr[e] = Cvt<T>::t(0.f);
  __syncthreads();

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.f);

  stream_tiles(
      t_begin, t_end,
      [&](int64_t t, int stage) {
        copy_inputs<T, VEC>(xr + stage * kTile * kTile, pr + stage * kTile * kTile, x, xp,
                            t * kTile, col0, c, tid);
        copy_dz<T, VEC, RP>(dr + stage * kTile * kLdz, dz, t * kTile, c, seg, tid);
      },
      [&](int64_t t, int stage) {
        mask_tile<T, VEC>(xr + stage * kTile * kTile,
                          xp != nullptr ? pr + stage * kTile * kTile : nullptr, t * kTile, col0,
                          c, key, xs, tid);
      },
      [&](int stage) {
        const T* ds = dr + stage * kTile * kLdz;
#pragma unroll
        for (int kk = 0; kk < kTile / 16; ++kk) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;  // masked x rows
          wmma::load_matrix_sync(b, xs + kk * 16 * kLd + warp * 16, kLd);
#pragma unroll
          for (int f = 0; f < NF; ++f) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;  // dz^T
            wmma::load_matrix_sync(a, ds + kk * 16 * kLdz + f * 16, kLdz);
            wmma::mma_sync(acc[f], a, b, acc[f]);
          }
        }
      });
  float* out = ws + (split * c.segments + seg) * RP * d_pad + col0 + warp * 16;
#pragma unroll
  for (int f = 0; f < NF; ++f) scale_fragment(acc[f], c.scale);
#pragma unroll
  for (int f = 0; f < NF; ++f)
    wmma::store_matrix_sync(out + f * 16 * d_pad, acc[f], d_pad, wmma::mem_row_major);
#endif
}

// out = sum_k drop_k(dz[:, seg k] A_k) for 64 rows and the column tiles of this split.
// The block keeps its dz rows (every segment) in shared memory and streams the A tiles.
template <typename T, bool VEC, int NF>
__global__ void __launch_bounds__(kThreads)
    up_dx_kernel(const T* __restrict__ dz, const T* __restrict__ A, T* __restrict__ out,
                 Common c) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int RP = 16 * NF;
  constexpr int kLdz = RP + 8;
  constexpr int kLdt = kTile + 4;
  extern __shared__ __align__(128) unsigned char smem[];
  float* ts = reinterpret_cast<float*>(smem);                       // [64][kLdt]
  T* ds = reinterpret_cast<T*>(ts + kTile * kLdt);                   // [segments][64][kLdz]
  T* ar = ds + c.segments * kTile * kLdz;                            // [2][segments][RP][kLd]
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  int64_t t_begin, t_end;
  split_range((c.d + kTile - 1) / kTile, c.per_split, blockIdx.y, &t_begin, &t_end);

  for (int64_t seg = 0; seg < c.segments; ++seg) {
    T* dseg = ds + seg * kTile * kLdz;
    for (int e = tid; e < kTile * kLdz; e += kThreads) dseg[e] = Cvt<T>::t(0.f);
  }
  __syncthreads();
  for (int64_t seg = 0; seg < c.segments; ++seg)
    copy_dz<T, VEC, RP>(ds + seg * kTile * kLdz, dz, row0, c, seg, tid);
  auto issue = [&](int64_t t, int stage) {
    if (t < t_end) {
      for (int64_t seg = 0; seg < c.segments; ++seg)
        copy_rows<T, VEC, RP>(ar + (stage * c.segments + seg) * RP * kLd, A + seg * c.sr * c.d,
                              c.sr, t * kTile, c.d, tid);
    }
    cp_commit();
  };
  issue(t_begin, 0);
  int stage = 0;
  for (int64_t t = t_begin; t < t_end; ++t) {
    cp_wait<0>();
    __syncthreads();
    issue(t + 1, stage ^ 1);
    const int64_t col0 = t * kTile;
    float sum[kUnits][8];
#pragma unroll
    for (int j = 0; j < kUnits; ++j)
#pragma unroll
      for (int k = 0; k < 8; ++k) sum[j][k] = 0.f;
    for (int64_t seg = 0; seg < c.segments; ++seg) {
      const T* dseg = ds + seg * kTile * kLdz;
      const T* as = ar + (stage * c.segments + seg) * RP * kLd;
#pragma unroll
      for (int m = 0; m < kTile / 16; ++m) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int kk = 0; kk < NF; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(a, dseg + warp * 16 * kLdz + kk * 16, kLdz);
          wmma::load_matrix_sync(b, as + kk * 16 * kLd + m * 16, kLd);
          wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(ts + warp * 16 * kLdt + m * 16, acc, kLdt, wmma::mem_row_major);
      }
      __syncthreads();
      const uint64_t key = dropout_key(c.seed, seg);
#pragma unroll
      for (int j = 0; j < kUnits; ++j) {
        const int u = tid + kThreads * j;
        const int row = u >> 3, cu = (u & 7) * 8;
        const uint32_t keep =
            c.dropout ? keep8<VEC>(key, uint64_t((row0 + row) * c.d + col0 + cu), c.threshold)
                      : 0xFFu;
#pragma unroll
        for (int k = 0; k < 8; ++k)
          if ((keep >> k) & 1u) sum[j][k] += ts[row * kLdt + cu + k];
      }
      __syncthreads();  // ts is rewritten by the next segment or column tile
    }
#pragma unroll
    for (int j = 0; j < kUnits; ++j) {
      const int u = tid + kThreads * j;
      const int64_t row = row0 + (u >> 3);
      const int64_t col = col0 + (u & 7) * 8;
      if (row >= c.n || col >= c.d) continue;
      uint4 o;
      T* eo = reinterpret_cast<T*>(&o);
#pragma unroll
      for (int k = 0; k < 8; ++k) eo[k] = Cvt<T>::t(sum[j][k] * c.scale);
      T* p = out + row * c.d + col;
      if (VEC) {
        *reinterpret_cast<uint4*>(p) = o;
      } else {
        for (int k = 0; k < 8 && col + k < c.d; ++k) p[k] = eo[k];
      }
    }
    stage ^= 1;
  }
  cp_wait<0>();
#endif
}

// The sum over splits of the fp32 partials of down or grad_A, in a fixed order, rounded to T.
// The output has `other` (n for down, d for grad_A) rows or columns besides the R rank ones;
// rank_cols: the output is [n, R] (down) and a split's partials are [segments][pad][rp],
// otherwise it is [R, d] (grad_A) and they are [segments][rp][pad], pad being other rounded up
// to the tile.
template <typename T>
__global__ void reduce_splits_kernel(const float* __restrict__ ws, T* __restrict__ out, Common c,
                                     bool rank_cols, int64_t other, int64_t splits, int64_t pad,
                                     int rp) {
  const int64_t cols = rank_cols ? c.R : other;
  const int64_t total = c.R * other;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t row = i / cols, col = i % cols;
    const int64_t rank = rank_cols ? col : row, o = rank_cols ? row : col;
    const int64_t seg = rank / c.sr, r = rank % c.sr;
    const int64_t inner = rank_cols ? o * rp + r : r * pad + o;
    float s = 0.f;
    for (int64_t k = 0; k < splits; ++k) s += ws[(k * c.segments + seg) * pad * rp + inner];
    out[i] = Cvt<T>::t(s);
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Plan {
  int64_t splits = 1, per_split = 1, rp = 16, n_pad = 0, d_pad = 0;
};

size_t smem_bytes(LowRankOp op, const LowRankParams& p, int rp);

// Splits the long dimension (the reduced one of down / grad_A, the columns of up_dx) so that the
// grid is one full wave: every multiprocessor holds up to four blocks (as many as its shared
// memory allows), each streaming a long run of tiles.
Plan make_plan(LowRankOp op, const LowRankParams& p, int num_sms) {
  Plan pl;
  pl.rp = cdiv(p.segment_rank, 16) * 16;
  pl.n_pad = cdiv(p.n, kTile) * kTile;
  pl.d_pad = cdiv(p.d, kTile) * kTile;
  const int64_t tiles_long = op == LowRankOp::kGradA ? cdiv(p.n, kTile) : cdiv(p.d, kTile);
  const int64_t tiles_other = op == LowRankOp::kDown    ? cdiv(p.n, kTile) * p.segments
                              : op == LowRankOp::kGradA ? cdiv(p.d, kTile) * p.segments
                                                        : cdiv(p.n, kTile);
  const size_t per_sm = p.smem_per_sm > 0 ? p.smem_per_sm : size_t(100) * 1024;
  const int64_t blocks_per_sm = std::max<int64_t>(
      1, std::min<int64_t>(4, static_cast<int64_t>(per_sm / (smem_bytes(op, p, int(pl.rp)) + 1024))));
  const int64_t target = blocks_per_sm * static_cast<int64_t>(num_sms > 0 ? num_sms : 1);
  int64_t s = target / (tiles_other > 0 ? tiles_other : 1);
  s = std::max<int64_t>(1, std::min<int64_t>({s, tiles_long, 65535}));
  pl.per_split = std::max<int64_t>(1, cdiv(tiles_long, s));
  pl.splits = std::max<int64_t>(1, cdiv(tiles_long, pl.per_split));
  return pl;
}

size_t smem_bytes(LowRankOp op, const LowRankParams& p, int rp) {
  switch (op) {
    case LowRankOp::kDown: return down_smem(rp, p.x_prev != nullptr);
    case LowRankOp::kGradA: return grad_a_smem(rp, p.x_prev != nullptr);
    case LowRankOp::kUpDx: return up_dx_smem(rp, p.segments);
  }
  return 0;
}

Common make_common(const LowRankParams& p, const Plan& pl) {
  Common c;
  c.n = p.n;
  c.d = p.d;
  c.sr = p.segment_rank;
  c.R = p.segments * p.segment_rank;
  c.segments = p.segments;
  c.per_split = pl.per_split;
  c.dropout = p.p > 0.f;
  c.threshold = dropout_threshold(p.p);
  c.scale = c.dropout ? 1.f / (1.f - p.p) : 1.f;
  c.seed = p.seed;
  return c;
}

bool aligned(const void* ptr, uintptr_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Allows `Kernel` the largest dynamic shared memory any supported problem needs. The attribute
// belongs to the device, so it is set once per device (a bit each for devices 0..63; others set
// it on every launch) instead of costing a driver call per launch.
template <auto Kernel>
cudaError_t allow_smem() {
  static std::atomic<uint64_t> done{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t(1) << device : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(kMaxSmemBytes));
  if (err == cudaSuccess && bit != 0) done.fetch_or(bit, std::memory_order_release);
  return err;
}

// down or grad_A (`Kernel`, which reads x [+ x_prev] and `operand`: A or dz): the main kernel
// over a grid of tiles x splits x segments, then the reduction of its partials. `other` is the
// output's non-rank dimension (n or d) and `pad` that rounded up to the tile.
template <auto Kernel, typename T>
cudaError_t launch_over_x(const LowRankParams& p, const Plan& pl, const Common& c,
                          const T* operand, bool rank_cols, int64_t other, int64_t pad,
                          size_t smem, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(cdiv(other, kTile)), static_cast<unsigned>(pl.splits),
                  static_cast<unsigned>(p.segments));
  const cudaError_t err = allow_smem<Kernel>();
  if (err != cudaSuccess) return err;
  Kernel<<<grid, kThreads, smem, stream>>>(static_cast<const T*>(p.x),
                                           static_cast<const T*>(p.x_prev), operand, p.workspace,
                                           c, pad);
  reduce_splits_kernel<T><<<1024, 256, 0, stream>>>(p.workspace, static_cast<T*>(p.out), c,
                                                    rank_cols, other, pl.splits, pad,
                                                    static_cast<int>(pl.rp));
  return cudaSuccess;
}

template <typename T, bool VEC, int NF>
cudaError_t launch_op(LowRankOp op, const LowRankParams& p, const Plan& pl, const Common& c,
                      cudaStream_t stream) {
  const T* A = static_cast<const T*>(p.A);
  const T* dz = static_cast<const T*>(p.dz);
  const size_t smem = smem_bytes(op, p, 16 * NF);
  cudaError_t err = cudaSuccess;
  switch (op) {
    case LowRankOp::kDown:
      err = launch_over_x<down_kernel<T, VEC, NF>>(p, pl, c, A, /*rank_cols=*/true, p.n,
                                                   pl.n_pad, smem, stream);
      break;
    case LowRankOp::kGradA:
      err = launch_over_x<grad_a_kernel<T, VEC, NF>>(p, pl, c, dz, /*rank_cols=*/false, p.d,
                                                     pl.d_pad, smem, stream);
      break;
    case LowRankOp::kUpDx: {
      const dim3 grid(static_cast<unsigned>(cdiv(p.n, kTile)), static_cast<unsigned>(pl.splits));
      if ((err = allow_smem<up_dx_kernel<T, VEC, NF>>()) != cudaSuccess) return err;
      up_dx_kernel<T, VEC, NF><<<grid, kThreads, smem, stream>>>(dz, A, static_cast<T*>(p.out), c);
      break;
    }
  }
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

template <typename T, bool VEC>
cudaError_t launch_rank(LowRankOp op, const LowRankParams& p, const Plan& pl, const Common& c,
                        cudaStream_t stream) {
  switch (pl.rp / 16) {
    case 1: return launch_op<T, VEC, 1>(op, p, pl, c, stream);
    case 2: return launch_op<T, VEC, 2>(op, p, pl, c, stream);
    case 3: return launch_op<T, VEC, 3>(op, p, pl, c, stream);
    default: return launch_op<T, VEC, 4>(op, p, pl, c, stream);
  }
}

template <typename T>
cudaError_t launch_typed(LowRankOp op, const LowRankParams& p, int num_sms, cudaStream_t stream) {
  const Plan pl = make_plan(op, p, num_sms);
  const Common c = make_common(p, pl);
  // Fast path: 16-byte copies of x / x_prev / A / out, 4-byte copies of dz element pairs.
  const bool vec = p.d % 8 == 0 && aligned(p.x, 16) && aligned(p.x_prev, 16) &&
                   aligned(p.A, 16) && aligned(p.out, 16) &&
                   (op == LowRankOp::kDown ||
                    (c.R % 2 == 0 && c.sr % 2 == 0 && aligned(p.dz, 4)));
  return vec ? launch_rank<T, true>(op, p, pl, c, stream)
             : launch_rank<T, false>(op, p, pl, c, stream);
}

}  // namespace

bool lowrank_supported(DType dtype, int64_t segment_rank, int64_t segments, bool with_prev,
                       int device_major) {
  if (segment_rank < 1 || segment_rank > kFusedMaxRank || segments < 1 || segments > 65535)
    return false;
  // Tensor-core fragments of both 16-bit types and asynchronous copies: compute capability 8.0+.
  if ((dtype != DType::kFloat16 && dtype != DType::kBFloat16) || device_major < 8) return false;
  const int rp = static_cast<int>(cdiv(segment_rank, 16) * 16);
  return std::max({down_smem(rp, with_prev), grad_a_smem(rp, with_prev), up_dx_smem(rp, segments)}) <=
         kMaxSmemBytes;
}
size_t lowrank_workspace_floats(LowRankOp op, const LowRankParams& params, int num_sms) {
  const Plan pl = make_plan(op, params, num_sms);
  switch (op) {
    case LowRankOp::kDown:
      return static_cast<size_t>(pl.splits * params.segments * pl.n_pad * pl.rp);
    case LowRankOp::kGradA:
      return static_cast<size_t>(pl.splits * params.segments * pl.rp * pl.d_pad);
    case LowRankOp::kUpDx: return 0;
  }
  return 0;
}

cudaError_t lowrank_launch(LowRankOp op, const LowRankParams& params, DType dtype, int num_sms,
                           cudaStream_t stream) {
  if (params.n <= 0 || params.d <= 0 || params.segments < 1 || params.segments > 65535 ||
      params.segment_rank < 1 || params.segment_rank > kFusedMaxRank)
    return cudaErrorInvalidValue;
  if (op != LowRankOp::kUpDx && params.workspace == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat16: return launch_typed<__half>(op, params, num_sms, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(op, params, num_sms, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kernels
}  // namespace reslora
