// The extra-K GEMMs of one dtype and tile, both weight layouts.
#include "gemm.cuh"

namespace reslora {
namespace kernels {
namespace extra_k {

cudaError_t run_f16_128x256(const ExtraKGemmArgs& args, cudaStream_t stream) {
  return run_tile<cutlass::half_t, ExtraKTile::k128x256>(args, stream);
}

}  // namespace extra_k
}  // namespace kernels
}  // namespace reslora
