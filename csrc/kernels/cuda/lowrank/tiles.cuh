// The device pieces the low-rank kernels share: tile constants, conversions, asynchronous
// copies, tensor-core fragments, the tile pipeline, the dropout masks of a tile, and the pieces of
// the up products (up.cuh, and grad_a.cuh's fused dx). Included by the kernel families.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../../dropout_hash.h"
#include "../lowrank.cuh"

namespace reslora {
namespace kernels {
namespace lowrank {

constexpr int kTile = 64;       // rows and columns of a tile
constexpr int kLd = kTile + 8;  // padded leading dimension of 16-bit tiles in shared memory
constexpr int kThreads = 128;   // four warps
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

// Stores eight elements at dst, of which the first `left` exist. VEC: one 16-byte store (left
// >= 8 then).
template <typename T, bool VEC>
__device__ __forceinline__ void store8(T* dst, uint4 v, int64_t left) {
  if (VEC) {
    *reinterpret_cast<uint4*>(dst) = v;
  } else {
    const T* e = reinterpret_cast<const T*>(&v);
    for (int k = 0; k < 8 && k < left; ++k) dst[k] = e[k];
  }
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

struct Common {
  int64_t n, d, sr, R, segments, per_split;
  bool dropout;
  bool wide_rank;  // R, sr multiples of 8 and the [n, R] operand (dz, z) 16-byte aligned:
                   // 16-byte rank copies
  uint32_t threshold;
  float scale;
  DropoutSeed seed;  // read on the device where a mask is made
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

// Rows [0, RP) (zero from `rows` on) x columns [c0, c0 + 64) of a [rows, d] matrix into a
// [RP][kLd] stage.
template <typename T, bool VEC, int RP>
__device__ __forceinline__ void copy_rows(T* dst, const T* src, int64_t rows, int64_t c0, int64_t d,
                                          int tid) {
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

// Rows [r0, r0 + 64) (zero from `rows` on), columns seg * sr .. + sr of a [rows, R] matrix (dz,
// or B in the forward) into a [64][RP + 8] stage. VEC (R, sr even, 4-byte aligned): asynchronous
// copies of element pairs, or of 8 elements when c.wide_rank; columns sr .. RP stay as zeroed at
// start.
template <typename T, bool VEC, int RP>
__device__ __forceinline__ void copy_dz(T* dst, const T* dz, int64_t r0, int64_t rows,
                                        const Common& c, int64_t seg, int tid) {
  constexpr int kLdz = RP + 8;
  if (VEC && c.wide_rank) {
    for (int e = tid; e < kTile * RP / 8; e += kThreads) {
      const int row = e / (RP / 8), col = 8 * (e % (RP / 8));
      if (col >= c.sr) continue;
      const bool ok = r0 + row < rows;
      cp_async16(dst + row * kLdz + col, ok ? dz + (r0 + row) * c.R + seg * c.sr + col : dz, ok);
    }
  } else if (VEC) {
    for (int e = tid; e < kTile * RP / 2; e += kThreads) {
      const int row = e / (RP / 2), col = 2 * (e % (RP / 2));
      if (col >= c.sr) continue;
      const bool ok = r0 + row < rows;
      cp_async4(dst + row * kLdz + col, ok ? dz + (r0 + row) * c.R + seg * c.sr + col : dz, ok);
    }
  } else {
    for (int e = tid; e < kTile * RP; e += kThreads) {
      const int row = e / RP, col = e % RP;
      dst[row * kLdz + col] =
          r0 + row < rows && col < c.sr ? dz[(r0 + row) * c.R + seg * c.sr + col] : Cvt<T>::t(0.f);
    }
  }
}

// Shared memory of each kernel (bytes), for the launch and the support check.
constexpr size_t down_smem(int rp, bool prev) {
  return 2 * size_t(kStages) * (size_t(kTile) * kTile * (prev ? 2 : 1) + size_t(rp) * kTile);
}
constexpr size_t grad_a_smem(int rp, bool prev) {
  return 2 * size_t(kStages) * (size_t(kTile) * kTile * (prev ? 2 : 1) + size_t(kTile) * (rp + 8));
}
constexpr size_t grad_a_up_smem(int rp, bool prev) {
  return grad_a_smem(rp, prev) + 2 * (size_t(rp) * kLd + size_t(kTile) * kLd);
}
constexpr size_t up_smem(int rp, int64_t segments, bool bt) {
  return 2 * (size_t(kTile) * (32 + 8) +
              size_t(segments) *
                  (size_t(kTile) * (rp + 8) +
                   size_t(kStages) * (bt ? size_t(kTile) * (rp + 8) : size_t(rp) * kLd)));
}

// --- Raw tensor-core fragments (mma.sync m16n8k16, fp32 accumulators), whose register layout is
// fixed by the PTX ISA, so the kernels can address (and mask) their elements.
// A (16 x 16, row-major): a[0] = (row g, cols 2t, 2t+1), a[1] = (g + 8, 2t), a[2] = (g, 2t + 8),
// a[3] = (g + 8, 2t + 8); B (16 x 8): b[0] = (rows 2t, 2t+1, col g), b[1] = (2t + 8, g);
// C: c[0..1] = (row g, cols 2t, 2t+1), c[2..3] = (g + 8, 2t, 2t+1); g = lane / 4, t = lane % 4.
#define RESLORA_MMA_16816(TYPE)                                               \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE         \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n" \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])               \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <typename T>
struct Mma {
  __device__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same_v<T, __half>) {
      RESLORA_MMA_16816("f16");
    } else {
      RESLORA_MMA_16816("bf16");
    }
  }
};
#undef RESLORA_MMA_16816

// Four 8 x 8 matrices of 16-bit elements from shared memory; lane l gives the row address of
// matrix l / 8, row l % 8. TRANS: each matrix transposed on the way.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  if (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
  }
}

// The pipeline of both reductions over x and of the up kernels: tiles [t_begin, t_end) stream
// through kStages shared-memory stages. copy(t, stage) starts the asynchronous copies of tile t;
// use(t, stage) consumes a landed tile while the next kStages - 1 are in flight.
template <typename Copy, typename Use>
__device__ __forceinline__ void stream_tiles(int64_t t_begin, int64_t t_end, Copy copy, Use use) {
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
    // The stage refilled here was read in the previous iteration, before the barrier.
    issue(t + kStages - 1, (stage + kStages - 1) % kStages);
    use(t, stage);
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

// A [rows][64] stage of 16-bit elements with its 16-byte chunks swizzled (chunk ^ row % 8), so
// that eight consecutive rows of one chunk column, as ldmatrix reads them, hit distinct banks.
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * kTile + ((chunk ^ (row & 7)) << 3);
}

// Rows [r0, r0 + ROWS) x columns [c0, c0 + 64) of a [rows, d] matrix (zero outside) into a
// swizzled [ROWS][64] stage. VEC: asynchronous 16-byte copies; otherwise element loads.
template <typename T, bool VEC, int ROWS>
__device__ __forceinline__ void copy_swz(T* dst, const T* src, int64_t r0, int64_t rows, int64_t c0,
                                         int64_t d, int tid) {
#pragma unroll
  for (int j = 0; j < (ROWS * 8 + kThreads - 1) / kThreads; ++j) {
    const int u = tid + kThreads * j;
    if (ROWS * 8 % kThreads != 0 && u >= ROWS * 8) break;
    const int row = u >> 3, ch = u & 7;
    T* s = dst + swz(row, ch);
    if (VEC) {
      const bool ok = r0 + row < rows && c0 + ch * 8 < d;
      cp_async16(s, ok ? src + (r0 + row) * d + c0 + ch * 8 : src, ok);
    } else {
      *reinterpret_cast<uint4*>(s) = load8<T, false>(src, r0 + row, rows, c0 + ch * 8, d);
    }
  }
}

// The pair masks (0xffff over each kept element) of the eight elements at flat .. flat + 7 of
// the [n, d] input, one word per element pair. VEC: flat % 8 == 0, so each word is one hash pair.
template <bool VEC>
__device__ __forceinline__ void chunk_masks(uint64_t key, uint64_t flat, uint32_t threshold,
                                            uint32_t (&m)[4]) {
  if (VEC) {
    // The four pairs start at a multiple of 4, so they share one block of 2^32 pairs: one block
    // key and 32-bit pair indices (bit-identical to dropout_pair_bits).
    const uint64_t pair = flat >> 1;
    const uint32_t block_key = dropout_block_key(key, pair), low = static_cast<uint32_t>(pair);
#pragma unroll
    for (int q = 0; q < 4; ++q) m[q] = dropout_pair_mask(mix32((low + q) ^ block_key), threshold);
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q)
      m[q] = (dropout_keep(key, flat + 2 * q, threshold) ? 0x0000ffffU : 0U) |
             (dropout_keep(key, flat + 2 * q + 1, threshold) ? 0xffff0000U : 0U);
  }
}

// Eight elements of x plus eight of x_prev, each sum rounded to T.
template <typename T>
__device__ __forceinline__ uint4 add_chunk(uint4 a, uint4 b) {
  const T* ea = reinterpret_cast<const T*>(&a);
  const T* eb = reinterpret_cast<const T*>(&b);
  uint4 o;
  T* eo = reinterpret_cast<T*>(&o);
#pragma unroll
  for (int k = 0; k < 8; ++k) eo[k] = Cvt<T>::t(Cvt<T>::f(ea[k]) + Cvt<T>::f(eb[k]));
  return o;
}

__device__ __forceinline__ uint4 and_chunk(uint4 v, const uint32_t (&m)[4]) {
  return make_uint4(v.x & m[0], v.y & m[1], v.z & m[2], v.w & m[3]);
}

// A landed swizzled [64][64] stage of x (origin r0, c0 in the [n, d] input), in place:
// drop(x [+ x_prev]) rounded to T. The 1 / (1 - p) is applied to the fp32 products instead.
template <typename T, bool VEC>
__device__ __forceinline__ void mask_stage(T* xs, const T* ps, bool prev, int64_t r0, int64_t c0,
                                           const Common& c, uint64_t key, int tid) {
#pragma unroll
  for (int j = 0; j < kUnits; ++j) {
    const int u = tid + kThreads * j;
    const int row = u >> 3, ch = u & 7;
    uint4* px = reinterpret_cast<uint4*>(xs + swz(row, ch));
    uint4 v = *px;
    if (prev) v = add_chunk<T>(v, *reinterpret_cast<const uint4*>(ps + swz(row, ch)));
    if (c.dropout) {
      uint32_t m[4];
      chunk_masks<VEC>(key, uint64_t((r0 + row) * c.d + c0 + ch * 8), c.threshold, m);
      v = and_chunk(v, m);
    }
    *px = v;
  }
}

// --- Pieces of the two up products (up_kernel, grad_a_up_kernel). Each warp owns 16 rows; the
// columns go in halves of 32 so that one half's fragments are live at a time.

// acc = this warp's 16 rows of dz (a [64][16 NF + 8] stage) times columns half * 32 .. + 32 of
// M: A rows ([16 NF][kLd] stage, [k][n]) or, BT, B rows ([64][16 NF + 8] stage, [n][k]).
template <typename T, int NF, bool BT>
__device__ __forceinline__ void mma_up_half(float (&acc)[4][4], const T* dseg, const T* mseg,
                                            int half, int lane, int warp) {
  constexpr int kLdz = 16 * NF + 8;
  const int j = lane / 8, i8 = lane % 8;
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < NF; ++kk) {
    uint32_t a[4];
    ldmatrix_x4<false>(a, dseg + (warp * 16 + lane % 16) * kLdz + kk * 16 + (lane / 16) * 8);
#pragma unroll
    for (int np = 0; np < 2; ++np) {  // two 8-column tiles per load
      uint32_t b[4];
      if (BT) {  // M^T rows are B rows: [n][k], no transpose
        ldmatrix_x4<false>(
            b, mseg + (half * 32 + np * 16 + (j / 2) * 8 + i8) * kLdz + kk * 16 + (j % 2) * 8);
      } else {  // A rows are [k][n]
        ldmatrix_x4<true>(
            b, mseg + (kk * 16 + (j % 2) * 8 + i8) * kLd + half * 32 + np * 16 + (j / 2) * 8);
      }
      Mma<T>::run(acc[2 * np], a, b[0], b[1]);
      Mma<T>::run(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// scale * v (a warp's 16 x 32 fragments) rounded to T into staging rows: `rows` is the warp's
// first row at the half's first column, `ld` the staging row length in elements (even).
template <typename T>
__device__ __forceinline__ void stage_half(T* rows, int ld, const float (&v)[4][4], float scale,
                                           int lane) {
  const int g = lane / 4, t4 = lane % 4;
  uint32_t* st = reinterpret_cast<uint32_t*>(rows);
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      T pair[2] = {Cvt<T>::t(scale * v[nt][2 * h]), Cvt<T>::t(scale * v[nt][2 * h + 1])};
      st[((g + 8 * h) * ld) / 2 + nt * 4 + t4] = *reinterpret_cast<const uint32_t*>(pair);
    }
}

// Two elements (row, col) and (row, col + 1) of a [rows, d] output, rounded to T (odd shapes).
template <typename T>
__device__ __forceinline__ void store_pair(T* out, int64_t row, int64_t col, const Common& c,
                                           float v0, float v1) {
  if (row >= c.n || col >= c.d) return;
  T* p = out + row * c.d + col;
  p[0] = Cvt<T>::t(v0);
  if (col + 1 < c.d) p[1] = Cvt<T>::t(v1);
}

// Keep flags (bit 0: flat, bit 1: flat + 1) of two neighbouring elements of one row.
template <bool VEC>
__device__ __forceinline__ uint32_t keep2(uint64_t key, uint64_t flat, uint32_t threshold) {
  if (VEC) {  // flat is even: one pair hash
    const uint32_t bits = dropout_pair_bits(key, flat >> 1);
    return uint32_t(dropout_keep_lane(bits, 0, threshold)) |
           (uint32_t(dropout_keep_lane(bits, 1, threshold)) << 1);
  }
  return uint32_t(dropout_keep(key, flat, threshold)) |
         (uint32_t(dropout_keep(key, flat + 1, threshold)) << 1);
}

}  // namespace lowrank
}  // namespace kernels
}  // namespace reslora
