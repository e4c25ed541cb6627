#include "norm_stats.cuh"

#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace reslora {
namespace kernels {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

// Sum over the block in a fixed order (shuffles within warps, then the warps' sums in order).
template <typename Acc>
__device__ Acc block_sum(Acc v) {
  __shared__ Acc warp_sums[kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  Acc s = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) s += warp_sums[w];
  __syncthreads();  // warp_sums is reused by the next call
  return s;
}

// Squares of one tensor summed by this thread: 16-byte loads when the base is aligned.
template <typename T, typename Acc>
__device__ Acc thread_sumsq(const T* p, int64_t n) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  Acc a = 0;
  int64_t done = 0;
  if (reinterpret_cast<uintptr_t>(p) % 16 == 0) {
    const int64_t nvec = n / kVec;
    for (int64_t i = tid; i < nvec; i += stride) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + i);
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const Acc v = to_acc(e[k]);
        a += v * v;
      }
    }
    done = nvec * kVec;
  }
  for (int64_t i = done + tid; i < n; i += stride) {
    const Acc v = to_acc(p[i]);
    a += v * v;
  }
  return a;
}

// partial[0][block] = sum of x^2 over this block's share, partial[1][block] the same for z.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    sumsq_kernel(const T* __restrict__ x, int64_t nx, const T* __restrict__ z, int64_t nz,
                 double* __restrict__ partial) {
  const Acc sx = block_sum<Acc>(thread_sumsq<T, Acc>(x, nx));
  const Acc sz = block_sum<Acc>(thread_sumsq<T, Acc>(z, nz));
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = static_cast<double>(sx);
    partial[gridDim.x + blockIdx.x] = static_cast<double>(sz);
  }
}

__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const double* __restrict__ partial, int blocks, float* __restrict__ ring_x,
                    float* __restrict__ ring_z, int64_t ring_len, int64_t* __restrict__ count) {
  double sx = 0, sz = 0;
  for (int i = threadIdx.x; i < blocks; i += kThreads) {
    sx += partial[i];
    sz += partial[blocks + i];
  }
  sx = block_sum<double>(sx);
  sz = block_sum<double>(sz);
  if (threadIdx.x == 0) {
    const int64_t c = *count;
    const int64_t slot = ((c % ring_len) + ring_len) % ring_len;
    ring_x[slot] = static_cast<float>(sqrt(sx));
    ring_z[slot] = static_cast<float>(sqrt(sz));
    *count = c + 1;
  }
}

template <typename T, typename Acc>
cudaError_t launch(const NormStatsParams& p, cudaStream_t stream) {
  sumsq_kernel<T, Acc><<<p.blocks, kThreads, 0, stream>>>(
      static_cast<const T*>(p.x), p.nx, static_cast<const T*>(p.z), p.nz, p.workspace);
  finalize_kernel<<<1, kThreads, 0, stream>>>(p.workspace, p.blocks, p.ring_x, p.ring_z, p.ring_len,
                                              p.count);
  return cudaGetLastError();
}

}  // namespace

int norm_stats_blocks(int64_t nx, int64_t nz, int num_sms) {
  const int64_t per_block = int64_t(kThreads) * 32;  // ~32 elements per thread before capping
  const int64_t want = (std::max(nx, nz) + per_block - 1) / per_block;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, 4 * std::max(num_sms, 1))));
}

size_t norm_stats_workspace_doubles(int blocks) { return 2 * static_cast<size_t>(blocks); }

cudaError_t norm_stats_launch(const NormStatsParams& p, DType dtype, cudaStream_t stream) {
  if (p.nx < 0 || p.nz < 0 || p.ring_len < 1 || p.blocks < 1 || p.count == nullptr ||
      p.ring_x == nullptr || p.ring_z == nullptr || p.workspace == nullptr)
    return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat16:
      return launch<__half, float>(p, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16, float>(p, stream);
    case DType::kFloat32:
      return launch<float, float>(p, stream);
    case DType::kFloat64:
      return launch<double, double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kernels
}  // namespace reslora
