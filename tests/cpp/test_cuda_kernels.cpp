// The torch-free kernels, built with nvcc alone: the dropout kernel against the host version of
// its mask, the extra-K GEMM against a float64 product of the same rounded inputs.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "kernels/cuda/dropout_add.cuh"
#include "kernels/cuda/extra_k_gemm.cuh"
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

int device_major() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  return major;
}

// 16-bit storage of a float in the dtype, and back.
uint16_t to_bits(float v, reslora::kernels::DType t) {
  uint16_t b;
  if (t == reslora::kernels::DType::kBFloat16) {
    const __nv_bfloat16 h = __float2bfloat16(v);
    std::memcpy(&b, &h, 2);
  } else {
    const __half h = __float2half(v);
    std::memcpy(&b, &h, 2);
  }
  return b;
}
float from_bits(uint16_t b, reslora::kernels::DType t) {
  if (t == reslora::kernels::DType::kBFloat16) {
    __nv_bfloat16 h;
    std::memcpy(&h, &b, 2);
    return __bfloat162float(h);
  }
  __half h;
  std::memcpy(&h, &b, 2);
  return __half2float(h);
}

struct DeviceBuf {
  void* p = nullptr;
  explicit DeviceBuf(size_t bytes) { cudaMalloc(&p, bytes); }
  ~DeviceBuf() { cudaFree(p); }
};

// out = x w(^T) + z v(^T) for one problem; fills `bits` with the output and, with `check`,
// returns the worst error over the tolerance (<= 1 passes).
struct ExtraKSchedule {
  reslora::kernels::ExtraKTile tile = reslora::kernels::ExtraKTile::k128x256;
  reslora::kernels::ExtraKRaster raster = reslora::kernels::ExtraKRaster::kHeuristic;
  int swizzle = 1;
};

double extra_k_case(int64_t m, int64_t n, int64_t k, int64_t r, reslora::kernels::WeightLayout lay,
                    reslora::kernels::DType t, ExtraKSchedule sched, std::vector<uint16_t>* bits,
                    bool check = true) {
  using reslora::kernels::WeightLayout;
  std::mt19937 gen(static_cast<uint32_t>(m * 131 + n * 7 + k + r));
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  auto make = [&](int64_t count, std::vector<uint16_t>& h, std::vector<double>& f) {
    h.resize(count);
    f.resize(count);
    for (int64_t i = 0; i < count; ++i) {
      h[i] = to_bits(u(gen), t);
      f[i] = from_bits(h[i], t);
    }
  };
  std::vector<uint16_t> hx, hw, hz, hv;
  std::vector<double> fx, fw, fz, fv;
  make(m * k, hx, fx);
  make(n * k, hw, fw);
  make(m * r, hz, fz);
  make(n * r, hv, fv);
  DeviceBuf dx(hx.size() * 2), dw(hw.size() * 2), dz(hz.size() * 2), dv(hv.size() * 2),
      dout(m * n * 2);
  cudaMemcpy(dx.p, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dw.p, hw.data(), hw.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dz.p, hz.data(), hz.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dv.p, hv.data(), hv.size() * 2, cudaMemcpyHostToDevice);
  reslora::kernels::ExtraKGemmArgs a;
  a.x = dx.p;
  a.w = dw.p;
  a.z = dz.p;
  a.v = dv.p;
  a.out = dout.p;
  a.m = m;
  a.n = n;
  a.k = k;
  a.r = r;
  a.layout = lay;
  a.tile = sched.tile;
  a.raster = sched.raster;
  a.swizzle = sched.swizzle;
  EXPECT_TRUE(reslora::kernels::extra_k_gemm_supported(a, t, 9));
  EXPECT_EQ(reslora::kernels::extra_k_gemm(a, t, nullptr), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  bits->resize(m * n);
  cudaMemcpy(bits->data(), dout.p, m * n * 2, cudaMemcpyDeviceToHost);
  const bool nk = lay == WeightLayout::kNK;
  double worst = 0;
  for (int64_t i = 0; check && i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double want = 0, scale = 0;
      for (int64_t q = 0; q < k; ++q) {
        const double p = fx[i * k + q] * (nk ? fw[j * k + q] : fw[q * n + j]);
        want += p;
        scale += std::fabs(p);
      }
      for (int64_t q = 0; q < r; ++q) {
        const double p = fz[i * r + q] * (nk ? fv[j * r + q] : fv[q * n + j]);
        want += p;
        scale += std::fabs(p);
      }
      // The output's rounding (2^-8 of bf16, 2^-11 of fp16, relative) and fp32 accumulation.
      const double eps = t == reslora::kernels::DType::kBFloat16 ? 1.0 / 256 : 1.0 / 2048;
      const double tol = eps * std::fabs(want) + 1e-5 * scale + 1e-6;
      worst = std::max(worst, std::fabs(from_bits((*bits)[i * n + j], t) - want) / tol);
    }
  }
  return worst;
}

TEST(ExtraKGemmCuda, MatchesFloat64Product) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  using reslora::kernels::DType;
  using reslora::kernels::WeightLayout;
  if (!reslora::kernels::extra_k_gemm_built() || device_major() != 9)
    GTEST_SKIP() << "the extra-K GEMM runs on compute capability 9.0 builds with CUTLASS";
  struct Case {
    int64_t m, n, k, r;
  };
  // Tile-exact, ragged in every dimension (K not a multiple of the 64-wide K tile, M and N not of
  // the 128 x 256 tile), one element wide, and ranks over one K tile.
  const Case cases[] = {{256, 256, 128, 16},
                        {300, 264, 200, 16},
                        {8, 8, 8, 8},
                        {520, 264, 1032, 72},
                        {129, 8, 64, 128}};
  // Both tiles; the wide one also along M and along N with tiles grouped in fours (the schedule
  // changes which CTA computes a tile, never its sum).
  using reslora::kernels::ExtraKRaster;
  using reslora::kernels::ExtraKTile;
  const ExtraKSchedule schedules[] = {{ExtraKTile::k128x256, ExtraKRaster::kHeuristic, 1},
                                      {ExtraKTile::k128x128, ExtraKRaster::kHeuristic, 1},
                                      {ExtraKTile::k128x256, ExtraKRaster::kAlongM, 4},
                                      {ExtraKTile::k128x128, ExtraKRaster::kAlongN, 2}};
  for (DType t : {DType::kBFloat16, DType::kFloat16}) {
    for (WeightLayout lay : {WeightLayout::kNK, WeightLayout::kKN}) {
      for (const ExtraKSchedule& sc : schedules) {
        for (const Case& c : cases) {
          std::vector<uint16_t> first, second;
          EXPECT_LE(extra_k_case(c.m, c.n, c.k, c.r, lay, t, sc, &first), 1.0)
              << c.m << "x" << c.n << "x" << c.k << " r " << c.r << " layout " << int(lay)
              << " dtype " << int(t) << " tile " << int(sc.tile) << " raster " << int(sc.raster)
              << " swizzle " << sc.swizzle;
          extra_k_case(c.m, c.n, c.k, c.r, lay, t, sc, &second, /*check=*/false);
          EXPECT_EQ(first, second) << "not deterministic";
        }
      }
    }
  }
}

TEST(ExtraKGemmCuda, RefusesWhatItDoesNotTake) {
  using reslora::kernels::DType;
  reslora::kernels::ExtraKGemmArgs a;
  alignas(16) static char buf[64];
  a.x = a.w = a.z = a.v = buf;
  a.out = buf;
  a.m = 4;
  a.n = 8;
  a.k = 8;
  a.r = 8;
  EXPECT_EQ(reslora::kernels::extra_k_gemm_supported(a, DType::kBFloat16, 9),
            reslora::kernels::extra_k_gemm_built());
  EXPECT_FALSE(reslora::kernels::extra_k_gemm_supported(a, DType::kBFloat16, 8));  // sm_80
  EXPECT_FALSE(reslora::kernels::extra_k_gemm_supported(a, DType::kFloat32, 9));
  a.r = 4;  // rows of z are 8 bytes: not a TMA stride
  EXPECT_FALSE(reslora::kernels::extra_k_gemm_supported(a, DType::kBFloat16, 9));
  EXPECT_EQ(reslora::kernels::extra_k_gemm(a, DType::kBFloat16, nullptr), cudaErrorInvalidValue);
  a.r = 8;
  a.z = buf + 2;  // misaligned
  EXPECT_FALSE(reslora::kernels::extra_k_gemm_supported(a, DType::kBFloat16, 9));
  a.z = buf;
  a.swizzle = 3;  // CUTLASS groups tiles by powers of two
  EXPECT_FALSE(reslora::kernels::extra_k_gemm_supported(a, DType::kBFloat16, 9));
  a.swizzle = 1;
  a.m = 0;
  EXPECT_FALSE(reslora::kernels::extra_k_gemm_supported(a, DType::kBFloat16, 9));
}

TEST(ExtraKGemmCuda, TileRule) {
  using reslora::kernels::ExtraKTile;
  // The H200's 132 multiprocessors: the Llama step's q / o output (8192 x 2048, 512 wide tiles)
  // keeps the wide tile; k / v (8192 x 256, 64 wide tiles) takes the narrow one; 16 tokens x
  // 4096 (16 wide tiles) is not worth the kernel.
  EXPECT_EQ(reslora::kernels::extra_k_gemm_tiles(8192, 2048), 512);
  EXPECT_EQ(reslora::kernels::extra_k_gemm_tiles(8192, 256, ExtraKTile::k128x128), 128);
  EXPECT_EQ(reslora::kernels::extra_k_gemm_tiles(129, 257), 4);
  EXPECT_EQ(reslora::kernels::extra_k_gemm_tile(8192, 2048, 132), ExtraKTile::k128x256);
  EXPECT_EQ(reslora::kernels::extra_k_gemm_tile(8192, 256, 132), ExtraKTile::k128x128);
  EXPECT_TRUE(reslora::kernels::extra_k_gemm_pays(8192, 256, 132));
  EXPECT_FALSE(reslora::kernels::extra_k_gemm_pays(16, 4096, 132));
}

}  // namespace
