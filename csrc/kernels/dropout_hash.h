// Counter-based dropout mask shared by the CPU and CUDA kernels.
//
// The mask of element `index` (the flat row-major index into the logical [N, d_in] input) in
// dropout segment `segment` depends only on (seed, segment, index), so backward regenerates the
// exact mask of forward from the seed instead of storing a full-size tensor, and the CPU and CUDA
// kernels produce bit-identical masks. No ATen here: nvcc compiles this alone.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RESLORA_HD __host__ __device__ __forceinline__
#else
#define RESLORA_HD inline
#endif

namespace reslora {
namespace kernels {

// splitmix64 finaliser: a bijective 64-bit mixer with full avalanche.
RESLORA_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Per-(seed, segment) key, computed once per launch.
RESLORA_HD uint64_t dropout_key(uint64_t seed, uint64_t segment) {
  return mix64(seed ^ mix64(segment + 0x9e3779b97f4a7c15ULL));
}

// One 64-bit hash serves four consecutive elements (16 random bits each), so the kernels spend
// a quarter of the integer work of a hash per element. Element `index` keeps its value when its
// 16 bits are >= threshold = floor(p * 65536), i.e. with probability 1 - p (to 2^-16).
RESLORA_HD uint32_t dropout_threshold(float p) {
  return static_cast<uint32_t>(p * 65536.0f);
}

RESLORA_HD uint64_t dropout_group_bits(uint64_t key, uint64_t group) {
  return mix64(key + group * 0x9e3779b97f4a7c15ULL);
}

RESLORA_HD bool dropout_keep_bits(uint64_t bits, uint64_t lane, uint32_t threshold) {
  return static_cast<uint32_t>((bits >> (16 * lane)) & 0xFFFFu) >= threshold;
}

// True when element `index` is kept (probability 1 - p).
RESLORA_HD bool dropout_keep(uint64_t key, uint64_t index, uint32_t threshold) {
  return dropout_keep_bits(dropout_group_bits(key, index >> 2), index & 3, threshold);
}

}  // namespace kernels
}  // namespace reslora
