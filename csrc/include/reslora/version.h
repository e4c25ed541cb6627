// What this build of reslora was compiled against.
#pragma once

#include <string>

namespace reslora {

struct BuildInfo {
  std::string version;        // reslora's own version
  std::string torch_version;  // the torch it was built against
  std::string cuda_version;   // nvcc's version when CUDA sources were compiled, else ""
  bool cuda_kernels;          // the CUDA backend of the ops is registered
  bool extra_k_gemm;          // with the Hopper GEMM that holds the low-rank product (CUTLASS)
};

BuildInfo build_info();

}  // namespace reslora
