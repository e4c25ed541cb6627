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

// Uniform in [0, 1) with 24 random bits, exactly representable in float.
RESLORA_HD float dropout_uniform(uint64_t key, uint64_t index) {
  const uint64_t h = mix64(key + index * 0x9e3779b97f4a7c15ULL);
  return static_cast<float>(h >> 40) * (1.0f / 16777216.0f);
}

// True when element `index` is kept (probability 1 - p).
RESLORA_HD bool dropout_keep(uint64_t key, uint64_t index, float p) {
  return dropout_uniform(key, index) >= p;
}

}  // namespace kernels
}  // namespace reslora
