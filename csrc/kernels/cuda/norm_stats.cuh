// Torch-free CUDA launcher for the norm statistics of the is / ms merges: one pass over x and z
// writes ||x||_2 and ||z||_2 into slot count % ring_len of two float32 rings and increments
// count, all on the device (no value comes back to the host). Two launches: per-block partial
// sums of squares, then one block that adds them in a fixed order, so results are
// deterministic.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "dropout_add.cuh"  // DType

namespace reslora {
namespace kernels {

struct NormStatsParams {
  const void* x = nullptr;  // [nx], contiguous
  int64_t nx = 0;
  const void* z = nullptr;  // [nz], contiguous, the dtype of x
  int64_t nz = 0;
  float* ring_x = nullptr;  // [ring_len]
  float* ring_z = nullptr;  // [ring_len]
  int64_t ring_len = 0;
  int64_t* count = nullptr;     // one element: the slot is count % ring_len; incremented
  double* workspace = nullptr;  // norm_stats_workspace_doubles(blocks)
  int blocks = 0;               // norm_stats_blocks(...)
};

// Blocks of the partial-sum launch for inputs of nx and nz elements on a device with num_sms
// multiprocessors.
int norm_stats_blocks(int64_t nx, int64_t nz, int num_sms);
size_t norm_stats_workspace_doubles(int blocks);

// Launches on `stream`; returns the launch status.
cudaError_t norm_stats_launch(const NormStatsParams& params, DType dtype, cudaStream_t stream);

}  // namespace kernels
}  // namespace reslora
