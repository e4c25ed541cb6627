// The extra-K GEMMs of one dtype (__half as cutlass::half_t), both weight layouts.
#include "gemm.cuh"

namespace reslora {
namespace kernels {
namespace extra_k {

cudaError_t run_f16(const ExtraKGemmArgs& args, cudaStream_t stream) {
  return run_typed<cutlass::half_t>(args, stream);
}

}  // namespace extra_k
}  // namespace kernels
}  // namespace reslora
