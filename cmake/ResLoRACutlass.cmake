# Finds CUTLASS's headers for the Hopper extra-K GEMM (kernels/cuda/extra_k/) and sets
# RESLORA_CUTLASS_INCLUDE_DIR, or leaves it empty (the generic path then serves every GPU).
# RESLORA_CUTLASS_DIR (a CMake or environment variable) names a CUTLASS include folder; else the nvidia-cutlass Python package of
# the build's interpreter (pinned in pyproject.toml / scripts/install_deps.sh) provides them.
set(RESLORA_CUTLASS_DIR "" CACHE PATH "CUTLASS include folder (holding cutlass/ and cute/)")
set(RESLORA_CUTLASS_INCLUDE_DIR "")
set(_dir "${RESLORA_CUTLASS_DIR}")
if(NOT _dir AND DEFINED ENV{RESLORA_CUTLASS_DIR})
  set(_dir "$ENV{RESLORA_CUTLASS_DIR}")
endif()
if(NOT _dir)
  find_package(Python3 QUIET COMPONENTS Interpreter)
  if(Python3_EXECUTABLE)
    execute_process(
      COMMAND "${Python3_EXECUTABLE}" -c
        "import importlib.util as u, os; s = u.find_spec('cutlass_library'); print(os.path.join(list(s.submodule_search_locations)[0], 'source', 'include'))"
      OUTPUT_VARIABLE _dir OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
    if(NOT _rc EQUAL 0)
      set(_dir "")
    endif()
  endif()
endif()
if(_dir AND EXISTS "${_dir}/cutlass/version.h" AND EXISTS "${_dir}/cute/tensor.hpp")
  set(RESLORA_CUTLASS_INCLUDE_DIR "${_dir}")
  file(STRINGS "${_dir}/cutlass/version.h" _v REGEX "#define CUTLASS_(MAJOR|MINOR|PATCH) ")
  string(REGEX REPLACE ".*MAJOR ([0-9]+).*MINOR ([0-9]+).*PATCH ([0-9]+).*" "\\1.\\2.\\3"
    RESLORA_CUTLASS_VERSION "${_v}")
  message(STATUS "reslora: CUTLASS ${RESLORA_CUTLASS_VERSION} at ${_dir}")
elseif(RESLORA_CUTLASS_DIR OR DEFINED ENV{RESLORA_CUTLASS_DIR})
  message(FATAL_ERROR "RESLORA_CUTLASS_DIR must name a folder holding cutlass/version.h and "
    "cute/tensor.hpp, got '${_dir}'")
else()
  message(STATUS "reslora: CUTLASS not found (pip install nvidia-cutlass==4.2.0.0): no extra-K GEMM")
endif()
