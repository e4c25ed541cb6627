#include "dropout_add.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../dropout_hash.h"

namespace reslora {
namespace kernels {
namespace {

template <typename T>
struct OpMath {
  using type = float;
  __device__ static float load(T v) { return static_cast<float>(v); }
  __device__ static T store(float v) { return static_cast<T>(v); }
};
template <>
struct OpMath<double> {
  using type = double;
  __device__ static double load(double v) { return v; }
  __device__ static double store(double v) { return v; }
};
template <>
struct OpMath<__half> {
  using type = float;
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
template <>
struct OpMath<__nv_bfloat16> {
  using type = float;
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__global__ void dropout_add_kernel(const T* __restrict__ x, const T* __restrict__ x_prev,
                                   T* __restrict__ out, bool accumulate, int64_t numel,
                                   uint32_t threshold, float p, DropoutSeed seed,
                                   uint64_t segment) {
  using M = OpMath<T>;
  using acc_t = typename M::type;
  const acc_t scale = static_cast<acc_t>(1.0) / (static_cast<acc_t>(1.0) - static_cast<acc_t>(p));
  const uint64_t key = dropout_key(seed, segment);
  const int64_t pairs = (numel + 1) / 2;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  // One thread per pair of elements: one hash for both.
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < pairs;
       g += stride) {
    const uint32_t bits = dropout_pair_bits(key, static_cast<uint64_t>(g));
#pragma unroll
    for (int lane = 0; lane < 2; ++lane) {
      const int64_t i = 2 * g + lane;
      if (i >= numel) break;
      acc_t v = M::load(x[i]);
      if (x_prev != nullptr) v += M::load(x_prev[i]);
      const acc_t m = dropout_keep_lane(bits, lane, threshold) ? v * scale : acc_t(0);
      out[i] = M::store(accumulate ? M::load(out[i]) + m : m);
    }
  }
}

template <typename T>
cudaError_t launch(const DropoutAddParams& prm, cudaStream_t stream) {
  if (prm.numel == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  int64_t blocks = ((prm.numel + 1) / 2 + kThreads - 1) / kThreads;
  if (blocks > 65535LL * 16) blocks = 65535LL * 16;  // grid-stride loop covers the rest
  dropout_add_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(prm.x), static_cast<const T*>(prm.x_prev), static_cast<T*>(prm.out),
      prm.accumulate, prm.numel, dropout_threshold(prm.p), prm.p, prm.seed, prm.segment);
  return cudaGetLastError();
}

}  // namespace

cudaError_t dropout_add(const DropoutAddParams& params, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(params, stream);
    case DType::kFloat64:
      return launch<double>(params, stream);
    case DType::kFloat16:
      return launch<__half>(params, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kernels
}  // namespace reslora
