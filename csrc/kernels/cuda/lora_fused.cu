#include "lora_fused.cuh"

#include <algorithm>
#include <atomic>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../dropout_hash.h"

namespace reslora {
namespace kernels {
namespace {

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
  bool wide_rank;   // R, sr multiples of 8 and dz (z, B) 16-byte aligned: 16-byte rank copies
  void* out2_copy;  // grad_a_up: where a second copy of out2 goes, or nullptr
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

// z partial sums: ws[split][seg][n_pad][RP] over the column tiles of this split. Each warp owns
// 16 rows. A landed tile of x [+ x_prev] is summed and masked in place (skipped without dropout
// and x_prev), then read by ldmatrix straight from its stage.
template <typename T, bool VEC, int NF>
__global__ void __launch_bounds__(kThreads, 5)
    down_kernel(const T* __restrict__ x, const T* __restrict__ xp, const T* __restrict__ /*dz*/,
                const T* __restrict__ A, float* __restrict__ ws, T* __restrict__ /*out2*/, Common c,
                int64_t n_pad) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
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

// --- Pieces of the two dA kernels (grad_a_kernel, grad_a_up_kernel). Each warp owns 16 of the
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

// dA partial sums ws[split][seg][RP][d_pad] over the row tiles of this split; each warp owns 16
// columns. A landed tile of x [+ x_prev] is summed and masked in place (skipped without dropout
// and x_prev), then read transposed by ldmatrix.
// UP (one segment): the same pass also writes the low-rank input gradient out2 = drop(dz A),
// the other backward product that shares the mask of x. Per tile of 64 rows x the block's 64
// columns the tensor cores write dz A (times 1 / (1 - p)) into a staging tile; one pass makes
// each element pair's mask once, masks x [+ x_prev] in place and the staged tile on its way to
// memory (16-byte stores); then dA accumulates over the masked x.
template <typename T, bool VEC, int NF, bool UP>
__device__ __forceinline__ void grad_a_body(const T* __restrict__ x, const T* __restrict__ xp,
                                            const T* __restrict__ dz, const T* __restrict__ A,
                                            float* __restrict__ ws, T* __restrict__ out2,
                                            const Common& c, int64_t d_pad) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
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
              if (c.out2_copy != nullptr)
                store8<T, VEC>(static_cast<T*>(c.out2_copy) + grow * c.d + gcol, o, c.d - gcol);
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
    grad_a_kernel(const T* __restrict__ x, const T* __restrict__ xp, const T* __restrict__ dz,
                  const T* __restrict__ A, float* __restrict__ ws, T* __restrict__ out2, Common c,
                  int64_t d_pad) {
  grad_a_body<T, VEC, NF, false>(x, xp, dz, A, ws, out2, c, d_pad);
}
template <typename T, bool VEC, int NF>
__global__ void __launch_bounds__(kThreads)
    grad_a_up_kernel(const T* __restrict__ x, const T* __restrict__ xp, const T* __restrict__ dz,
                     const T* __restrict__ A, float* __restrict__ ws, T* __restrict__ out2,
                     Common c, int64_t d_pad) {
  grad_a_body<T, VEC, NF, true>(x, xp, dz, A, ws, out2, c, d_pad);
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

// out = alpha / (1 - p) * sum_k drop_k(dz[:, seg k] M_k) for 64 rows and the 64-column tiles of
// this split, M_k being the segment's rows of A ([R, d], up_dx) or, BT, its columns of B
// transposed (B [d, R]; the forward's s z B^T, one segment, no dropout). The block keeps its dz
// rows in shared memory and streams tiles of M; each warp owns 16 rows, masks its fp32 results
// in registers and stores them from there.
template <typename T, bool VEC, int NF, bool BT>
__global__ void __launch_bounds__(kThreads)
    up_kernel(const T* __restrict__ /*x*/, const T* __restrict__ /*xp*/, const T* __restrict__ dz,
              const T* __restrict__ M, float* __restrict__ /*ws*/, T* __restrict__ out, Common c,
              int64_t /*pad*/) {
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

// The most blocks of one kernel a multiprocessor runs at once that the grids are sized for.
constexpr int kMaxBlocksPerSm = 8;

// Splits the long dimension (the reduced one of down / grad_A, the columns of up) so that the
// grid is one full wave: every multiprocessor holds `blocks_per_sm` blocks, each streaming a long
// run of tiles.
Plan make_plan(LowRankOp op, const LowRankParams& p, int num_sms, int blocks_per_sm) {
  Plan pl;
  pl.rp = cdiv(p.segment_rank, 16) * 16;
  pl.n_pad = cdiv(p.n, kTile) * kTile;
  pl.d_pad = cdiv(p.d, kTile) * kTile;
  const bool over_rows = op == LowRankOp::kGradA || op == LowRankOp::kGradAUpDx;
  const int64_t tiles_long = over_rows ? cdiv(p.n, kTile) : cdiv(p.d, kTile);
  const int64_t tiles_other = op == LowRankOp::kDown ? cdiv(p.n, kTile) * p.segments
                              : over_rows            ? cdiv(p.d, kTile) * p.segments
                                                     : cdiv(p.n, kTile);  // the up ops
  const int64_t target = std::max(1, blocks_per_sm) * static_cast<int64_t>(std::max(1, num_sms));
  int64_t s = target / (tiles_other > 0 ? tiles_other : 1);
  s = std::max<int64_t>(1, std::min<int64_t>({s, tiles_long, 65535}));
  pl.per_split = std::max<int64_t>(1, cdiv(tiles_long, s));
  pl.splits = std::max<int64_t>(1, cdiv(tiles_long, pl.per_split));
  return pl;
}

size_t smem_bytes(LowRankOp op, const LowRankParams& p, int rp) {
  switch (op) {
    case LowRankOp::kDown:
      return down_smem(rp, p.x_prev != nullptr);
    case LowRankOp::kGradA:
      return grad_a_smem(rp, p.x_prev != nullptr);
    case LowRankOp::kGradAUpDx:
      return grad_a_up_smem(rp, p.x_prev != nullptr);
    case LowRankOp::kUpDx:
      return up_smem(rp, p.segments, false);
    case LowRankOp::kUpOut:
      return up_smem(rp, p.segments, true);
  }
  return 0;
}

bool aligned(const void* ptr, uintptr_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
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
  c.scale = p.alpha * (c.dropout ? 1.f / (1.f - p.p) : 1.f);
  c.seed = p.seed;
  c.wide_rank = c.R % 8 == 0 && c.sr % 8 == 0 && aligned(p.dz, 16);
  c.out2_copy = p.out2_copy;
  return c;
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

// Blocks of `Kernel` with `smem` bytes of shared memory that one multiprocessor runs at once
// (registers and shared memory both count), capped at kMaxBlocksPerSm. The last answer is kept,
// keyed by smem, so a run of launches of one shape asks the runtime once.
template <auto Kernel>
int blocks_per_sm(size_t smem) {
  static std::atomic<uint64_t> last{0};  // (smem + 1) << 8 | blocks
  const uint64_t seen = last.load(std::memory_order_relaxed);
  if ((seen >> 8) == smem + 1) return static_cast<int>(seen & 0xff);
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, kThreads, smem) !=
          cudaSuccess ||
      blocks < 1) {
    (void)cudaGetLastError();
    blocks = 1;
  }
  blocks = std::min(blocks, kMaxBlocksPerSm);
  last.store(((uint64_t(smem) + 1) << 8) | uint64_t(blocks), std::memory_order_relaxed);
  return blocks;
}

// Before a launch of `Kernel`: its shared-memory limit, its plan for this problem (sized by its
// occupancy with `smem` bytes) and the kernel parameters.
template <auto Kernel>
cudaError_t prepare(LowRankOp op, const LowRankParams& p, int num_sms, size_t smem, Plan* pl,
                    Common* c) {
  const cudaError_t err = allow_smem<Kernel>();
  if (err != cudaSuccess) return err;
  *pl = make_plan(op, p, num_sms, blocks_per_sm<Kernel>(smem));
  *c = make_common(p, *pl);
  return cudaSuccess;
}

// Launches `Kernel` for `op`. Every kernel takes one parameter list and uses its own part:
// - the reductions over x, over a grid of tiles x splits x segments, followed by the reduction
//   of their partials: z (down_kernel; partials over columns, reduced into [n, R]) and dA
//   (grad_a_kernel, or grad_a_up_kernel, which also writes the low-rank dx of its one segment;
//   partials over rows, reduced into [R, d]);
// - the up kernels, over a grid of 64-row tiles x splits of the columns.
template <auto Kernel, typename T>
cudaError_t launch(LowRankOp op, const LowRankParams& p, int num_sms, size_t smem,
                   cudaStream_t stream) {
  Plan pl;
  Common c;
  const cudaError_t err = prepare<Kernel>(op, p, num_sms, smem, &pl, &c);
  if (err != cudaSuccess) return err;
  const bool up = op == LowRankOp::kUpDx || op == LowRankOp::kUpOut;
  const bool row_tiles = op == LowRankOp::kDown || up;  // grid.x over rows, not columns
  const int64_t other = row_tiles ? p.n : p.d, pad = row_tiles ? pl.n_pad : pl.d_pad;
  const dim3 grid(static_cast<unsigned>(cdiv(other, kTile)), static_cast<unsigned>(pl.splits),
                  static_cast<unsigned>(up ? 1 : p.segments));
  Kernel<<<grid, kThreads, smem, stream>>>(
      static_cast<const T*>(p.x), static_cast<const T*>(p.x_prev), static_cast<const T*>(p.dz),
      static_cast<const T*>(p.A), p.workspace, static_cast<T*>(up ? p.out : p.out2), c, pad);
  if (!up) {
    // One thread per output element up to 1024 blocks (grid-stride past that): at small sizes a
    // grid of idle blocks would cost more than the sums.
    const int64_t outputs = c.R * other;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(1024, cdiv(outputs, 256)));
    reduce_splits_kernel<T><<<blocks, 256, 0, stream>>>(p.workspace, static_cast<T*>(p.out), c,
                                                        /*rank_cols=*/row_tiles, other, pl.splits,
                                                        pad, static_cast<int>(pl.rp));
  }
  return cudaSuccess;
}

template <typename T, bool VEC, int NF>
cudaError_t launch_op(LowRankOp op, const LowRankParams& p, int num_sms, cudaStream_t stream) {
  const size_t smem = smem_bytes(op, p, 16 * NF);
  cudaError_t err = cudaSuccess;
  switch (op) {
    case LowRankOp::kDown:
      err = launch<down_kernel<T, VEC, NF>, T>(op, p, num_sms, smem, stream);
      break;
    case LowRankOp::kGradA:
      err = launch<grad_a_kernel<T, VEC, NF>, T>(op, p, num_sms, smem, stream);
      break;
    case LowRankOp::kGradAUpDx:
      err = launch<grad_a_up_kernel<T, VEC, NF>, T>(op, p, num_sms, smem, stream);
      break;
    case LowRankOp::kUpDx:
      err = launch<up_kernel<T, VEC, NF, false>, T>(op, p, num_sms, smem, stream);
      break;
    case LowRankOp::kUpOut:
      err = launch<up_kernel<T, VEC, NF, true>, T>(op, p, num_sms, smem, stream);
      break;
  }
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

template <typename T, bool VEC>
cudaError_t launch_rank(LowRankOp op, const LowRankParams& p, int num_sms, cudaStream_t stream) {
  switch (cdiv(p.segment_rank, 16)) {
    case 1:
      return launch_op<T, VEC, 1>(op, p, num_sms, stream);
    case 2:
      return launch_op<T, VEC, 2>(op, p, num_sms, stream);
    case 3:
      return launch_op<T, VEC, 3>(op, p, num_sms, stream);
    default:
      return launch_op<T, VEC, 4>(op, p, num_sms, stream);
  }
}

template <typename T>
cudaError_t launch_typed(LowRankOp op, const LowRankParams& p, int num_sms, cudaStream_t stream) {
  const int64_t R = p.segments * p.segment_rank;
  // Fast path: 16-byte copies of x / x_prev / A / out, 4-byte copies of dz element pairs (of z
  // and B rows for up_out).
  const bool vec =
      p.d % 8 == 0 && aligned(p.x, 16) && aligned(p.x_prev, 16) && aligned(p.A, 16) &&
      aligned(p.out, 16) && aligned(p.out2, 16) && aligned(p.out2_copy, 16) &&
      (op == LowRankOp::kDown || (R % 2 == 0 && p.segment_rank % 2 == 0 && aligned(p.dz, 4)));
  return vec ? launch_rank<T, true>(op, p, num_sms, stream)
             : launch_rank<T, false>(op, p, num_sms, stream);
}

}  // namespace

bool lowrank_supported(DType dtype, int64_t segment_rank, int64_t segments, bool with_prev,
                       int device_major) {
  if (segment_rank < 1 || segment_rank > kFusedMaxRank || segments < 1 || segments > 65535)
    return false;
  // Tensor-core fragments of both 16-bit types and asynchronous copies: compute capability 8.0+.
  if ((dtype != DType::kFloat16 && dtype != DType::kBFloat16) || device_major < 8) return false;
  const int rp = static_cast<int>(cdiv(segment_rank, 16) * 16);
  return std::max({down_smem(rp, with_prev), grad_a_smem(rp, with_prev),
                   up_smem(rp, segments, false), up_smem(rp, segments, true),
                   segments == 1 ? grad_a_up_smem(rp, with_prev) : size_t(0)}) <= kMaxSmemBytes;
}
size_t lowrank_workspace_floats(LowRankOp op, const LowRankParams& params, int num_sms) {
  // Sized for the most splits any kernel's occupancy can ask for.
  const Plan pl = make_plan(op, params, num_sms, kMaxBlocksPerSm);
  switch (op) {
    case LowRankOp::kDown:
      return static_cast<size_t>(pl.splits * params.segments * pl.n_pad * pl.rp);
    case LowRankOp::kGradA:
    case LowRankOp::kGradAUpDx:
      return static_cast<size_t>(pl.splits * params.segments * pl.rp * pl.d_pad);
    case LowRankOp::kUpDx:
    case LowRankOp::kUpOut:
      return 0;
  }
  return 0;
}

cudaError_t lowrank_launch(LowRankOp op, const LowRankParams& params, DType dtype, int num_sms,
                           cudaStream_t stream) {
  if (params.n <= 0 || params.d <= 0 || params.segments < 1 || params.segments > 65535 ||
      params.segment_rank < 1 || params.segment_rank > kFusedMaxRank)
    return cudaErrorInvalidValue;
  const bool up = op == LowRankOp::kUpDx || op == LowRankOp::kUpOut;
  if (!up && params.workspace == nullptr) return cudaErrorInvalidValue;
  if (op == LowRankOp::kUpOut && (params.segments != 1 || params.p != 0.f))
    return cudaErrorInvalidValue;
  if (op == LowRankOp::kGradAUpDx && (params.segments != 1 || params.out2 == nullptr))
    return cudaErrorInvalidValue;
  if (op != LowRankOp::kGradAUpDx && params.out2_copy != nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat16:
      return launch_typed<__half>(op, params, num_sms, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(op, params, num_sms, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace kernels
}  // namespace reslora
