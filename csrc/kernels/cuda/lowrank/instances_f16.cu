// The low-rank kernels of one dtype (__half).
#include "dispatch.cuh"

namespace reslora {
namespace kernels {
namespace lowrank {

template cudaError_t run_typed<__half>(const Problem&, int, cudaStream_t);

}  // namespace lowrank
}  // namespace kernels
}  // namespace reslora
