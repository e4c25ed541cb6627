// Times the torch-free fused low-rank kernels alone (CUDA events, median of repeats) next to
// plain store and load loops over the same bytes, which give the ceilings the kernels are
// compared with. The inputs are zeros: the times depend on the shapes, not the values. `make
// build` builds it with the tests (build/cmake/lowrank_bench [n d r]); by hand:
//   nvcc -std=c++17 -O3 -arch=sm_90 -Icsrc bench/cuda/lowrank_bench.cu \
//        csrc/kernels/cuda/lowrank/*.cu -o /tmp/lowrank_bench && /tmp/lowrank_bench [n d r]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/lowrank.cuh"
#include "timing.cuh"

using namespace reslora::kernels;

// Ceilings: 16-byte stores / loads over a contiguous buffer, grid-stride.
__global__ void store_linear(uint4* p, size_t n16) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n16;
       i += size_t(gridDim.x) * blockDim.x)
    p[i] = make_uint4(i, 0, 0, 0);
}
__global__ void load_linear(const uint4* p, size_t n16, unsigned* sink) {
  unsigned acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n16;
       i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = __ldg(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) *sink = acc;
}
// The up kernels' order of writes: blocks of `rows` rows x a split of the columns, tiles of
// `cols` columns in turn; STYLE 0: 16-byte stores, a warp covering whole 128-byte runs;
// STYLE 1: 4-byte stores in the mma C-fragment pattern (8 rows x 16 bytes per instruction).
template <int STYLE>
__global__ void store_tiles(__nv_bfloat16* out, int64_t n, int64_t d, int rows, int cols,
                            int64_t cols_per_split) {
  const int64_t r0 = int64_t(blockIdx.x) * rows;
  const int64_t c_begin = int64_t(blockIdx.y) * cols_per_split;
  const int64_t c_end = c_begin + cols_per_split < d ? c_begin + cols_per_split : d;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, nwarps = blockDim.x / 32;
  for (int64_t c0 = c_begin; c0 < c_end; c0 += cols) {
    if (STYLE == 0) {
      const int units = rows * cols / 8;
      for (int u = tid; u < units; u += blockDim.x) {
        const int64_t r = r0 + u / (cols / 8), c = c0 + (u % (cols / 8)) * 8;
        *reinterpret_cast<uint4*>(out + r * d + c) = make_uint4(r, c, 0, 0);
      }
    } else {
      for (int rr = warp * 16; rr < rows; rr += nwarps * 16)
        for (int nt = 0; nt < cols / 8; ++nt)
          for (int h = 0; h < 2; ++h) {
            const int64_t r = r0 + rr + lane / 4 + 8 * h, c = c0 + nt * 8 + 2 * (lane % 4);
            *reinterpret_cast<unsigned*>(out + r * d + c) = unsigned(r ^ c);
          }
    }
  }
}

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 8192;
  const int64_t d = argc > 2 ? std::atoll(argv[2]) : 4096;
  const int64_t r = argc > 3 ? std::atoll(argv[3]) : 16;
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  const size_t bytes = size_t(n) * d * 2;
  void *x, *x2, *out, *A, *dz, *sink;
  float* ws;
  CHECK(cudaMalloc(&x, bytes));
  CHECK(cudaMalloc(&out, bytes));
  CHECK(cudaMalloc(&x2, bytes));
  CHECK(cudaMalloc(&A, size_t(4) * r * d * 2));
  CHECK(cudaMalloc(&dz, size_t(n) * 4 * r * 2));
  CHECK(cudaMalloc(&ws, size_t(256) << 20));
  CHECK(cudaMalloc(&sink, 4));
  CHECK(cudaMemset(x, 0, bytes));
  CHECK(cudaMemset(A, 0, size_t(4) * r * d * 2));
  CHECK(cudaMemset(dz, 0, size_t(n) * 4 * r * 2));
  std::printf("%s, %d SMs; n %lld d %lld r %lld; one [n, d] bf16 tensor is %.1f MB\n", prop.name,
              sms, (long long)n, (long long)d, (long long)r, bytes / 1e6);
  const auto report = [&](const char* what, float us, double moved) {
    std::printf("%-44s %8.1f us  %6.2f TB/s\n", what, us, moved / us / 1e6);
  };
  report("store, linear 16 B",
         median_us([&] { store_linear<<<sms * 8, 256>>>(static_cast<uint4*>(out), bytes / 16); }),
         bytes);
  report("load, linear 16 B", median_us([&] {
           load_linear<<<sms * 8, 256>>>(static_cast<const uint4*>(x), bytes / 16,
                                         static_cast<unsigned*>(sink));
         }),
         bytes);
  const int shapes[][3] = {{64, 64, 4}, {64, 64, 1}, {64, 256, 4}, {128, 128, 4}, {16, 512, 1}};
  for (const auto& s : shapes) {
    const int rows = s[0], cols = s[1], splits = s[2];
    const dim3 grid(unsigned(n / rows), unsigned(splits));
    char name[96];
    std::snprintf(name, sizeof name, "store tiles %dx%d, %d splits, 16 B", rows, cols, splits);
    report(name, median_us([&] {
             store_tiles<0>
                 <<<grid, 128>>>(static_cast<__nv_bfloat16*>(out), n, d, rows, cols, d / splits);
           }),
           bytes);
    std::snprintf(name, sizeof name, "store tiles %dx%d, %d splits, C fragments", rows, cols,
                  splits);
    report(name, median_us([&] {
             store_tiles<1>
                 <<<grid, 128>>>(static_cast<__nv_bfloat16*>(out), n, d, rows, cols, d / splits);
           }),
           bytes);
  }
  CHECK(cudaGetLastError());
  int64_t* seed = nullptr;  // the pass seed lives on the device, as the ops pass it
  const int64_t seed_value = 1;
  CHECK(cudaMalloc(&seed, sizeof(int64_t)));
  CHECK(cudaMemcpy(seed, &seed_value, sizeof(int64_t), cudaMemcpyHostToDevice));
  for (float p : {0.f, 0.05f}) {
    const LowRankShape shape{n, d, 1, r};
    const LowRankDropout drop{p, DropoutSeed{seed, 0}};
    const DownArgs down{x, nullptr, A, dz, ws, shape, drop};
    const GradAArgs grad{x, nullptr, dz, A, ws, shape, drop};
    const UpDxArgs up_dx{dz, A, out, shape, drop};
    const UpOutArgs up_out{dz, A, out, shape, 1.f};
    const GradAUpDxArgs fused{grad, A, x2, nullptr};
    const DType bf16 = DType::kBFloat16;
    const struct {
      const char* name;
      bool dropout_too;
      std::function<cudaError_t()> launch;
    } ops[] = {
        {"down", true, [&] { return lowrank_down(down, bf16, sms, nullptr); }},
        {"grad_A", true, [&] { return lowrank_grad_A(grad, bf16, sms, nullptr); }},
        {"up_dx", true, [&] { return lowrank_up_dx(up_dx, bf16, sms, nullptr); }},
        {"up_out", false, [&] { return lowrank_up_out(up_out, bf16, sms, nullptr); }},
        {"grad_A + up_dx in one pass", true,
         [&] { return lowrank_grad_A_up_dx(fused, bf16, sms, nullptr); }},
    };
    for (const auto& o : ops) {
      if (!o.dropout_too && p > 0.f) continue;
      char name[96];
      std::snprintf(name, sizeof name, "%s, dropout %.2f", o.name, p);
      report(name, median_us([&] { CHECK(o.launch()); }), bytes);
    }
  }
  return 0;
}
