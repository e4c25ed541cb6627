// The extra-K GEMMs of one dtype (__nv_bfloat16 as cutlass::bfloat16_t), both weight layouts.
#include "gemm.cuh"

namespace reslora {
namespace kernels {
namespace extra_k {

cudaError_t run_bf16(const ExtraKGemmArgs& args, cudaStream_t stream) {
  return run_typed<cutlass::bfloat16_t>(args, stream);
}

}  // namespace extra_k
}  // namespace kernels
}  // namespace reslora
