// The torch-free dropout kernel, built with nvcc alone, against the host version of its mask.
#include <cmath>
#include <cstdint>
#include <vector>

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "kernels/cuda/dropout_add.cuh"
#include "kernels/dropout_hash.h"

namespace {

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

TEST(DropoutHash, KeepRateAndDeterminism) {
  const uint64_t key = reslora::kernels::dropout_key(7, 0);
  int kept = 0;
  const int n = 200000;
  const uint32_t thr = reslora::kernels::dropout_threshold(0.3f);
  for (int i = 0; i < n; ++i) kept += reslora::kernels::dropout_keep(key, i, thr);
  EXPECT_NEAR(kept / double(n), 0.7, 0.01);
  EXPECT_NE(reslora::kernels::dropout_key(7, 0), reslora::kernels::dropout_key(7, 1));
  EXPECT_NE(reslora::kernels::dropout_key(7, 0), reslora::kernels::dropout_key(8, 0));
  EXPECT_EQ(reslora::kernels::dropout_key(7, 3), reslora::kernels::dropout_key(7, 3));
}

TEST(DropoutAddCuda, MatchesHostMask) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const int64_t n = 100003;  // not a multiple of the block size
  std::vector<float> x(n), xp(n), out(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::sin(0.1f * i);
    xp[i] = std::cos(0.07f * i);
  }
  float *dx, *dxp, *dout;
  ASSERT_EQ(cudaMalloc(&dx, n * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dxp, n * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dout, n * 4), cudaSuccess);
  cudaMemcpy(dx, x.data(), n * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dxp, xp.data(), n * 4, cudaMemcpyHostToDevice);
  int64_t* dseed = nullptr;  // the pass seed, on the device as the ops pass it
  const int64_t seed = 99;
  ASSERT_EQ(cudaMalloc(&dseed, sizeof(int64_t)), cudaSuccess);
  cudaMemcpy(dseed, &seed, sizeof(int64_t), cudaMemcpyHostToDevice);
  reslora::kernels::DropoutAddParams p;
  p.x = dx;
  p.x_prev = dxp;
  p.out = dout;
  p.numel = n;
  p.p = 0.25f;
  p.seed.ptr = dseed;
  p.seed.offset = 3;
  p.segment = 2;
  ASSERT_EQ(reslora::kernels::dropout_add(p, reslora::kernels::DType::kFloat32, nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaMemcpy(out.data(), dout, n * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  const uint64_t key = reslora::kernels::dropout_key(reslora::kernels::stream_seed(seed, 3), 2);
  for (int64_t i = 0; i < n; ++i) {
    const float want =
        reslora::kernels::dropout_keep(key, i, reslora::kernels::dropout_threshold(0.25f))
            ? (x[i] + xp[i]) / 0.75f
            : 0.f;
    ASSERT_NEAR(out[i], want, 1e-5f) << "at " << i;
  }
  cudaFree(dx);
  cudaFree(dxp);
  cudaFree(dout);
  cudaFree(dseed);
}

}  // namespace
