// The low-rank kernels of one dtype (__nv_bfloat16).
#include "dispatch.cuh"

namespace reslora {
namespace kernels {
namespace lowrank {

template cudaError_t run_typed<__nv_bfloat16>(const Problem&, int, cudaStream_t);

}  // namespace lowrank
}  // namespace kernels
}  // namespace reslora
