// Torch-free CUDA launcher: out (=|+=) (x [+ x_prev]) * keep(seed, offset, segment, i) / (1 - p).
// The generic path (fp32 / fp64, ranks the fused kernels of lowrank.cuh do not take) uses it for
// the masked input and the masked input gradient.
// Takes raw pointers and a stream so it builds with nvcc alone (no ATen), and is tested that way.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../dropout_hash.h"

namespace reslora {
namespace kernels {

struct DropoutAddParams {
  const void* x = nullptr;       // [numel], contiguous
  const void* x_prev = nullptr;  // [numel] or nullptr
  void* out = nullptr;           // [numel]
  bool accumulate = false;       // out += result instead of out = result
  int64_t numel = 0;
  float p = 0.f;     // drop probability in [0, 1)
  DropoutSeed seed;  // the pass seed on the device (see dropout_hash.h)
  uint64_t segment = 0;
};

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Launches on `stream`; returns the launch status (cudaSuccess when fine).
cudaError_t dropout_add(const DropoutAddParams& params, DType dtype, cudaStream_t stream);

}  // namespace kernels
}  // namespace reslora
