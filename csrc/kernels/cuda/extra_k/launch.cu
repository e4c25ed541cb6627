// The extra-K GEMM's entries: what it takes, and the dispatch to the dtype's instance (built for
// sm_90a when CUTLASS was found; without it every problem takes the generic path).
#include <cstdint>

#include "../extra_k_gemm.cuh"

namespace reslora {
namespace kernels {
namespace extra_k {
#if RESLORA_WITH_CUTLASS
cudaError_t run_bf16_128x256(const ExtraKGemmArgs& args, cudaStream_t stream);
cudaError_t run_bf16_128x128(const ExtraKGemmArgs& args, cudaStream_t stream);
cudaError_t run_f16_128x256(const ExtraKGemmArgs& args, cudaStream_t stream);
cudaError_t run_f16_128x128(const ExtraKGemmArgs& args, cudaStream_t stream);
#endif
}  // namespace extra_k

bool extra_k_gemm_built() { return RESLORA_WITH_CUTLASS != 0; }

bool extra_k_gemm_supported(const ExtraKGemmArgs& a, DType dtype, int device_major) {
  if (!extra_k_gemm_built() || device_major != 9) return false;
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return false;
  constexpr int64_t kMax = INT32_MAX;
  for (int64_t s : {a.m, a.n, a.k, a.r})
    if (s <= 0 || s > kMax) return false;
  if (a.k % 8 != 0 || a.n % 8 != 0 || a.r % 8 != 0) return false;
  if (a.swizzle != 1 && a.swizzle != 2 && a.swizzle != 4 && a.swizzle != 8) return false;
  for (const void* p : {a.x, a.w, a.z, a.v, static_cast<const void*>(a.out)})
    if (p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

cudaError_t extra_k_gemm(const ExtraKGemmArgs& args, DType dtype, cudaStream_t stream) {
  // Host-side checks only: the launch queues the kernel and returns.
  if (!extra_k_gemm_supported(args, dtype, 9)) return cudaErrorInvalidValue;
#if RESLORA_WITH_CUTLASS
  const bool wide = args.tile == ExtraKTile::k128x256;
  if (dtype == DType::kBFloat16)
    return wide ? extra_k::run_bf16_128x256(args, stream) : extra_k::run_bf16_128x128(args, stream);
  return wide ? extra_k::run_f16_128x256(args, stream) : extra_k::run_f16_128x128(args, stream);
#else
  (void)stream;
  return cudaErrorInvalidValue;
#endif
}

}  // namespace kernels
}  // namespace reslora
