#include "reslora/version.h"

namespace reslora {

BuildInfo build_info() {
  return BuildInfo{RESLORA_VERSION, RESLORA_TORCH_VERSION, RESLORA_CUDA_VERSION,
                   RESLORA_CUDA_KERNELS != 0, RESLORA_EXTRA_K_GEMM != 0};
}

}  // namespace reslora
