# Finds Torch. A LibTorch given to CMake (CMAKE_PREFIX_PATH or Torch_DIR pointing at its CMake
# package) is used as is, with no Python involved: what C++ users build against. Otherwise, and
# always for the Python package, Torch is found through the interpreter that will import the
# package, so the library is built against exactly the installed torch. Sets
# RESLORA_TORCH_HAS_CUDA and TORCH_INSTALL_PREFIX.
if(RESLORA_BUILD_PYTHON)
  find_package(Python3 REQUIRED COMPONENTS Interpreter Development.Module)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
    OUTPUT_VARIABLE _torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "reslora's Python package needs PyTorch (>= 2.4) importable by "
      "${Python3_EXECUTABLE}; for the C++ library alone configure with -DRESLORA_BUILD_PYTHON=OFF "
      "and LibTorch on CMAKE_PREFIX_PATH")
  endif()
  list(APPEND CMAKE_PREFIX_PATH "${_torch_prefix}")
endif()
find_package(Torch QUIET)
if(NOT Torch_FOUND)
  message(FATAL_ERROR "reslora needs Torch: put LibTorch's CMake package on CMAKE_PREFIX_PATH "
    "(for a pip-installed torch: python3 -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')")
endif()
get_filename_component(TORCH_INSTALL_PREFIX "${Torch_DIR}/../../.." ABSOLUTE)
if(Torch_VERSION VERSION_LESS 2.4)
  message(FATAL_ERROR "reslora needs torch >= 2.4, found ${Torch_VERSION}")
endif()
set(RESLORA_TORCH_HAS_CUDA OFF)
if(TORCH_CUDA_LIBRARIES)
  set(RESLORA_TORCH_HAS_CUDA ON)
endif()
# Torch's own flags (the C++11 ABI setting among them) apply to everything we compile for C++.
set(CMAKE_CXX_FLAGS "${CMAKE_CXX_FLAGS} ${TORCH_CXX_FLAGS}")
