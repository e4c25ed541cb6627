// Compile-time switches over a runtime value (flash-attention's static_switch.h idiom): each
// runs the lambda in __VA_ARGS__ with NAME a constant of the branch taken, so one call site
// instantiates every variant of a kernel and picks one at run time.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define RESLORA_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                      \
    if (COND) {                              \
      constexpr bool NAME = true;            \
      return __VA_ARGS__();                  \
    }                                        \
    constexpr bool NAME = false;             \
    return __VA_ARGS__();                    \
  }()

// DTYPE a reslora::kernels::DType: T is __half or __nv_bfloat16; other dtypes return
// cudaErrorInvalidValue (the fused kernels take 16-bit floats only).
#define RESLORA_HALF_SWITCH(DTYPE, T, ...)         \
  [&] {                                            \
    switch (DTYPE) {                               \
      case ::reslora::kernels::DType::kFloat16: {  \
        using T = __half;                          \
        return __VA_ARGS__();                      \
      }                                            \
      case ::reslora::kernels::DType::kBFloat16: { \
        using T = __nv_bfloat16;                   \
        return __VA_ARGS__();                      \
      }                                            \
      default:                                     \
        return cudaErrorInvalidValue;              \
    }                                              \
  }()

// FRAGS (1..4): the rank rounded up to 16, in 16-wide mma fragments; larger values take 4.
#define RESLORA_FRAGS_SWITCH(FRAGS, NAME, ...) \
  [&] {                                        \
    switch (FRAGS) {                           \
      case 1: {                                \
        constexpr int NAME = 1;                \
        return __VA_ARGS__();                  \
      }                                        \
      case 2: {                                \
        constexpr int NAME = 2;                \
        return __VA_ARGS__();                  \
      }                                        \
      case 3: {                                \
        constexpr int NAME = 3;                \
        return __VA_ARGS__();                  \
      }                                        \
      default: {                               \
        constexpr int NAME = 4;                \
        return __VA_ARGS__();                  \
      }                                        \
    }                                          \
  }()
