#include "lora_fused.cuh"

#include <algorithm>

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

// Keep flags of the eight elements at flat indices flat .. flat + 7.
template <bool VEC>
__device__ __forceinline__ uint32_t keep8(uint64_t key, uint64_t flat, uint32_t threshold) {
  uint32_t keep = 0;
  if (VEC) {  // flat % 8 == 0: two hashes cover the eight elements
    const uint64_t b0 = dropout_group_bits(key, flat >> 2);
    const uint64_t b1 = dropout_group_bits(key, (flat >> 2) + 1);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      keep |= uint32_t(dropout_keep_bits(b0, k, threshold)) << k;
      keep |= uint32_t(dropout_keep_bits(b1, k, threshold)) << (k + 4);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) keep |= uint32_t(dropout_keep(key, flat + k, threshold)) << k;
  }
  return keep;
}

// (x [+ x_prev]) * keep / (1 - p), rounded to T, into 8 elements of shared memory: the same
// values the unfused path feeds to its GEMM.
template <typename T, bool VEC>
__device__ __forceinline__ void mask_store(uint4 rx, uint4 rp, bool has_prev, bool dropout,
                                           uint64_t key, uint64_t flat, uint32_t threshold,
                                           float scale, T* dst) {
  const T* ex = reinterpret_cast<const T*>(&rx);
  const T* ep = reinterpret_cast<const T*>(&rp);
  const uint32_t keep = dropout ? keep8<VEC>(key, flat, threshold) : 0xFFu;
  uint4 o;
  T* eo = reinterpret_cast<T*>(&o);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    float v = Cvt<T>::f(ex[k]);
    if (has_prev) v += Cvt<T>::f(ep[k]);
    if (dropout) v = (keep >> k) & 1u ? v * scale : 0.f;
    eo[k] = Cvt<T>::t(v);
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

// z partial sums: ws[split][seg][n_pad][RP] over the column tiles of this split.
template <typename T, bool VEC, int NF>
__global__ void __launch_bounds__(kThreads)
    down_kernel(const T* __restrict__ x, const T* __restrict__ xp, const T* __restrict__ A,
                float* __restrict__ ws, Common c, int64_t n_pad) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int RP = 16 * NF;
  __shared__ __align__(128) T xs[kTile * kLd];
  __shared__ __align__(128) T as[RP * kLd];
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  const int64_t split = blockIdx.y, seg = blockIdx.z;
  const int64_t tiles = (c.d + kTile - 1) / kTile;
  const int64_t t_begin = split * c.per_split;
  const int64_t t_end = t_begin + c.per_split < tiles ? t_begin + c.per_split : tiles;
  const uint64_t key = dropout_key(c.seed, seg);
  const T* A_seg = A + seg * c.sr * c.d;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.f);

  uint4 rx[kUnits], rp[kUnits], ra[NF];
  auto load = [&](int64_t t) {
    const int64_t c0 = t * kTile;
#pragma unroll
    for (int j = 0; j < kUnits; ++j) {
      const int u = tid + kThreads * j;
      rx[j] = load8<T, VEC>(x, row0 + (u >> 3), c.n, c0 + (u & 7) * 8, c.d);
      rp[j] = xp != nullptr ? load8<T, VEC>(xp, row0 + (u >> 3), c.n, c0 + (u & 7) * 8, c.d)
                            : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < NF; ++j) {
      const int u = tid + kThreads * j;
      ra[j] = load8<T, VEC>(A_seg, u >> 3, c.sr, c0 + (u & 7) * 8, c.d);
    }
  };
  if (t_begin < t_end) load(t_begin);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t c0 = t * kTile;
#pragma unroll
    for (int j = 0; j < kUnits; ++j) {
      const int u = tid + kThreads * j;
      const int row = u >> 3, cu = (u & 7) * 8;
      mask_store<T, VEC>(rx[j], rp[j], xp != nullptr, c.dropout, key,
                         uint64_t((row0 + row) * c.d + c0 + cu), c.threshold, c.scale,
                         xs + row * kLd + cu);
    }
#pragma unroll
    for (int j = 0; j < NF; ++j) {
      const int u = tid + kThreads * j;
      *reinterpret_cast<uint4*>(as + (u >> 3) * kLd + (u & 7) * 8) = ra[j];
    }
    __syncthreads();
    if (t + 1 < t_end) load(t + 1);  // in flight while the tensor cores work on this tile
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
    __syncthreads();
  }
  float* out = ws + ((split * c.segments + seg) * n_pad + row0 + warp * 16) * RP;
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
  constexpr int kDz = kTile * RP / kThreads;  // dz elements per thread per tile
  __shared__ __align__(128) T xs[kTile * kLd];
  __shared__ __align__(128) T ds[kTile * kLdz];
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int64_t col0 = int64_t(blockIdx.x) * kTile;
  const int64_t split = blockIdx.y, seg = blockIdx.z;
  const int64_t tiles = (c.n + kTile - 1) / kTile;
  const int64_t t_begin = split * c.per_split;
  const int64_t t_end = t_begin + c.per_split < tiles ? t_begin + c.per_split : tiles;
  const uint64_t key = dropout_key(c.seed, seg);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.f);

  uint4 rx[kUnits], rp[kUnits];
  T rd[kDz];
  auto load = [&](int64_t t) {
    const int64_t r0 = t * kTile;
#pragma unroll
    for (int j = 0; j < kUnits; ++j) {
      const int u = tid + kThreads * j;
      rx[j] = load8<T, VEC>(x, r0 + (u >> 3), c.n, col0 + (u & 7) * 8, c.d);
      rp[j] = xp != nullptr ? load8<T, VEC>(xp, r0 + (u >> 3), c.n, col0 + (u & 7) * 8, c.d)
                            : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < kDz; ++j) {
      const int e = tid + kThreads * j;
      const int64_t row = r0 + e / RP;
      const int r = e % RP;
      rd[j] = row < c.n && r < c.sr ? dz[row * c.R + seg * c.sr + r] : Cvt<T>::t(0.f);
    }
  };
  if (t_begin < t_end) load(t_begin);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t r0 = t * kTile;
#pragma unroll
    for (int j = 0; j < kUnits; ++j) {
      const int u = tid + kThreads * j;
      const int row = u >> 3, cu = (u & 7) * 8;
      mask_store<T, VEC>(rx[j], rp[j], xp != nullptr, c.dropout, key,
                         uint64_t((r0 + row) * c.d + col0 + cu), c.threshold, c.scale,
                         xs + row * kLd + cu);
    }
#pragma unroll
    for (int j = 0; j < kDz; ++j) {
      const int e = tid + kThreads * j;
      ds[(e / RP) * kLdz + e % RP] = rd[j];
    }
    __syncthreads();
    if (t + 1 < t_end) load(t + 1);
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
    __syncthreads();
  }
  float* out = ws + (split * c.segments + seg) * RP * d_pad + col0 + warp * 16;
#pragma unroll
  for (int f = 0; f < NF; ++f)
    wmma::store_matrix_sync(out + f * 16 * d_pad, acc[f], d_pad, wmma::mem_row_major);
#endif
}

// out (= out2) = sum_k drop_k(dz[:, seg k] A_k) for one 64 x 64 tile.
template <typename T, bool VEC, int NF>
__global__ void __launch_bounds__(kThreads)
    up_dx_kernel(const T* __restrict__ dz, const T* __restrict__ A, T* __restrict__ out,
                 T* __restrict__ out2, Common c) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int RP = 16 * NF;
  constexpr int kLdz = RP + 8;
  constexpr int kLdt = kTile + 4;
  __shared__ __align__(128) T ds[kTile * kLdz];
  __shared__ __align__(128) T as[RP * kLd];
  __shared__ __align__(128) float ts[kTile * kLdt];
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  const int64_t col0 = int64_t(blockIdx.y) * kTile;
  float sum[kUnits][8];
#pragma unroll
  for (int j = 0; j < kUnits; ++j)
#pragma unroll
    for (int k = 0; k < 8; ++k) sum[j][k] = 0.f;

  for (int64_t seg = 0; seg < c.segments; ++seg) {
    for (int e = tid; e < kTile * RP; e += kThreads) {
      const int64_t row = row0 + e / RP;
      const int r = e % RP;
      ds[(e / RP) * kLdz + r] =
          row < c.n && r < c.sr ? dz[row * c.R + seg * c.sr + r] : Cvt<T>::t(0.f);
    }
    for (int u = tid; u < RP * 8; u += kThreads) {
      *reinterpret_cast<uint4*>(as + (u >> 3) * kLd + (u & 7) * 8) =
          load8<T, VEC>(A + seg * c.sr * c.d, u >> 3, c.sr, col0 + (u & 7) * 8, c.d);
    }
    __syncthreads();
#pragma unroll
    for (int m = 0; m < kTile / 16; ++m) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < NF; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, ds + warp * 16 * kLdz + kk * 16, kLdz);
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
      const float s = c.dropout ? c.scale : 1.f;
#pragma unroll
      for (int k = 0; k < 8; ++k)
        if ((keep >> k) & 1u) sum[j][k] += ts[row * kLdt + cu + k] * s;
    }
    // The next segment rewrites ds / as only after every warp passed the barrier above, and
    // ts only after the next barrier, by which time every thread has read it.
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
    for (int k = 0; k < 8; ++k) eo[k] = Cvt<T>::t(sum[j][k]);
    T* p = out + row * c.d + col;
    T* p2 = out2 != nullptr ? out2 + row * c.d + col : nullptr;
    if (VEC) {
      *reinterpret_cast<uint4*>(p) = o;
      if (p2 != nullptr) *reinterpret_cast<uint4*>(p2) = o;
    } else {
      for (int k = 0; k < 8 && col + k < c.d; ++k) {
        p[k] = eo[k];
        if (p2 != nullptr) p2[k] = eo[k];
      }
    }
  }
#endif
}

// z[row][seg * sr + r] = sum over splits of ws[split][seg][row][r].
template <typename T>
__global__ void reduce_down_kernel(const float* __restrict__ ws, T* __restrict__ z, Common c,
                                   int64_t splits, int64_t n_pad, int rp) {
  const int64_t total = c.n * c.R;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t row = i / c.R, col = i % c.R;
    const int64_t seg = col / c.sr, r = col % c.sr;
    float s = 0.f;
    for (int64_t k = 0; k < splits; ++k) s += ws[((k * c.segments + seg) * n_pad + row) * rp + r];
    z[i] = Cvt<T>::t(s);
  }
}

// dA[seg * sr + r][col] = sum over splits of ws[split][seg][r][col].
template <typename T>
__global__ void reduce_grad_a_kernel(const float* __restrict__ ws, T* __restrict__ dA, Common c,
                                     int64_t splits, int64_t d_pad, int rp) {
  const int64_t total = c.R * c.d;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t row = i / c.d, col = i % c.d;
    const int64_t seg = row / c.sr, r = row % c.sr;
    float s = 0.f;
    for (int64_t k = 0; k < splits; ++k) s += ws[((k * c.segments + seg) * rp + r) * d_pad + col];
    dA[i] = Cvt<T>::t(s);
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Plan {
  int64_t splits = 1, per_split = 1, rp = 16, n_pad = 0, d_pad = 0;
};

// Splits the reduced dimension so that about six blocks per multiprocessor are in flight.
Plan make_plan(LowRankOp op, const LowRankParams& p, int num_sms) {
  Plan pl;
  pl.rp = cdiv(p.segment_rank, 16) * 16;
  pl.n_pad = cdiv(p.n, kTile) * kTile;
  pl.d_pad = cdiv(p.d, kTile) * kTile;
  const int64_t tiles_long = op == LowRankOp::kDown ? cdiv(p.d, kTile) : cdiv(p.n, kTile);
  const int64_t tiles_other = (op == LowRankOp::kDown ? cdiv(p.n, kTile) : cdiv(p.d, kTile)) *
                              p.segments;
  const int64_t target = 6 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1);
  int64_t s = cdiv(target, tiles_other > 0 ? tiles_other : 1);
  s = std::max<int64_t>(1, std::min<int64_t>({s, tiles_long, 65535}));
  pl.per_split = std::max<int64_t>(1, cdiv(tiles_long, s));
  pl.splits = std::max<int64_t>(1, cdiv(tiles_long, pl.per_split));
  return pl;
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

bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, bool VEC, int NF>
void launch_op(LowRankOp op, const LowRankParams& p, const Plan& pl, const Common& c,
               cudaStream_t stream) {
  const T* x = static_cast<const T*>(p.x);
  const T* xp = static_cast<const T*>(p.x_prev);
  const T* A = static_cast<const T*>(p.A);
  const T* dz = static_cast<const T*>(p.dz);
  const int reduce_blocks = 1024;
  switch (op) {
    case LowRankOp::kDown: {
      const dim3 grid(static_cast<unsigned>(cdiv(p.n, kTile)), static_cast<unsigned>(pl.splits),
                      static_cast<unsigned>(p.segments));
      down_kernel<T, VEC, NF><<<grid, kThreads, 0, stream>>>(x, xp, A, p.workspace, c, pl.n_pad);
      reduce_down_kernel<T><<<reduce_blocks, 256, 0, stream>>>(
          p.workspace, static_cast<T*>(p.out), c, pl.splits, pl.n_pad, static_cast<int>(pl.rp));
      break;
    }
    case LowRankOp::kGradA: {
      const dim3 grid(static_cast<unsigned>(cdiv(p.d, kTile)), static_cast<unsigned>(pl.splits),
                      static_cast<unsigned>(p.segments));
      grad_a_kernel<T, VEC, NF><<<grid, kThreads, 0, stream>>>(x, xp, dz, p.workspace, c, pl.d_pad);
      reduce_grad_a_kernel<T><<<reduce_blocks, 256, 0, stream>>>(
          p.workspace, static_cast<T*>(p.out), c, pl.splits, pl.d_pad, static_cast<int>(pl.rp));
      break;
    }
    case LowRankOp::kUpDx: {
      const dim3 grid(static_cast<unsigned>(cdiv(p.n, kTile)), static_cast<unsigned>(cdiv(p.d, kTile)));
      up_dx_kernel<T, VEC, NF><<<grid, kThreads, 0, stream>>>(
          dz, A, static_cast<T*>(p.out), static_cast<T*>(p.out2), c);
      break;
    }
  }
}

template <typename T, bool VEC>
void launch_rank(LowRankOp op, const LowRankParams& p, const Plan& pl, const Common& c,
                 cudaStream_t stream) {
  switch (pl.rp / 16) {
    case 1: launch_op<T, VEC, 1>(op, p, pl, c, stream); break;
    case 2: launch_op<T, VEC, 2>(op, p, pl, c, stream); break;
    case 3: launch_op<T, VEC, 3>(op, p, pl, c, stream); break;
    default: launch_op<T, VEC, 4>(op, p, pl, c, stream); break;
  }
}

template <typename T>
cudaError_t launch_typed(LowRankOp op, const LowRankParams& p, int num_sms, cudaStream_t stream) {
  const Plan pl = make_plan(op, p, num_sms);
  const Common c = make_common(p, pl);
  const bool vec = p.d % 8 == 0 && aligned16(p.x) && aligned16(p.x_prev) && aligned16(p.A) &&
                   aligned16(p.out) && aligned16(p.out2);
  if (vec) {
    launch_rank<T, true>(op, p, pl, c, stream);
  } else {
    launch_rank<T, false>(op, p, pl, c, stream);
  }
  return cudaGetLastError();
}

}  // namespace

bool lowrank_supported(DType dtype, int64_t segment_rank, int device_major) {
  if (segment_rank < 1 || segment_rank > kFusedMaxRank) return false;
  // Tensor-core fragments of both 16-bit types: compute capability 8.0 and newer.
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && device_major >= 8;
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
