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

// Where the dropout randomness of one op call comes from: `ptr` points at the pass's seed, an
// int64 drawn on the tensors' device from torch's generator (reslora::draw_seed), and `offset`
// names the stream within the pass (the block's position in its chain). The seed is read where
// the mask is made (by the kernels on the GPU), never copied to the host, so a CUDA graph replay
// or a compiled graph draws a fresh seed each run and no call synchronises. ptr is null when the
// call has no dropout.
struct DropoutSeed {
  const int64_t* ptr = nullptr;
  uint64_t offset = 0;
};

// The seed of stream `offset` of a pass whose seed is `seed`.
RESLORA_HD uint64_t stream_seed(uint64_t seed, uint64_t offset) {
  return mix64(seed ^ mix64(offset + 0x632be59bd9b4e019ULL));
}

// Per-(seed, segment) key, computed once per thread or launch.
RESLORA_HD uint64_t dropout_key(uint64_t seed, uint64_t segment) {
  return mix64(seed ^ mix64(segment + 0x9e3779b97f4a7c15ULL));
}

// The key of segment `segment` of a call's stream; reads the seed (null: no dropout, key 0).
RESLORA_HD uint64_t dropout_key(const DropoutSeed& s, uint64_t segment) {
  if (s.ptr == nullptr) return 0;
  return dropout_key(stream_seed(static_cast<uint64_t>(*s.ptr), s.offset), segment);
}

// One 32-bit hash serves a pair of consecutive elements (15 random bits each, bits 0..14 for the
// even element and 16..30 for the odd one), so a kernel spends half a hash per element, and a
// pair of 16-bit elements can be masked by one AND. Element `index` keeps its value when its 15
// bits are >= threshold = floor(p * 32768), i.e. with probability 1 - p (to 2^-15).
RESLORA_HD uint32_t dropout_threshold(float p) { return static_cast<uint32_t>(p * 32768.0f); }

// The largest dropout probability the mask resolves: its keep rate 1 - p must be at least one
// step of the 15-bit threshold (2^-15), or it would keep (almost) nothing and scale by 1 / (1 - p).
constexpr double kMaxDropout = 1.0 - 1.0 / 32768.0;

// A bijective 32-bit mixer with full avalanche (two multiply-xorshift rounds).
RESLORA_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// The 32-bit key of the block of 2^32 pairs that `pair` lies in. Kernels that mask a run of
// pairs inside one block compute it once and call mix32(low 32 bits of pair ^ block key).
RESLORA_HD uint32_t dropout_block_key(uint64_t key, uint64_t pair) {
  return static_cast<uint32_t>(key) + static_cast<uint32_t>(pair >> 32) * 0x9e3779b9U;
}

// Random bits of element pair `pair` (elements 2 pair and 2 pair + 1). Pairs past 2^32 (inputs
// over 8G elements) get a different 32-bit key for each block of 2^32 pairs.
RESLORA_HD uint32_t dropout_pair_bits(uint64_t key, uint64_t pair) {
  return mix32(static_cast<uint32_t>(pair) ^ dropout_block_key(key, pair));
}

RESLORA_HD bool dropout_keep_lane(uint32_t bits, uint64_t lane, uint32_t threshold) {
  return ((bits >> (16 * lane)) & 0x7fffU) >= threshold;
}

// True when element `index` is kept (probability 1 - p).
RESLORA_HD bool dropout_keep(uint64_t key, uint64_t index, uint32_t threshold) {
  return dropout_keep_lane(dropout_pair_bits(key, index >> 1), index & 1, threshold);
}

}  // namespace kernels
}  // namespace reslora
