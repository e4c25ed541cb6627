// Times the Hopper extra-K GEMM alone (CUDA events, median of repeats) on the Llama step's and
// the 4096 and 4096 x 11008 chains' products, bf16, for every schedule it is built with: the
// two output tiles, the three raster orders and tile groups of 1, 2, 4 and 8. Prints, per
// product, the schedule the op picks (extra_k_gemm_tile, heuristic raster, groups of 1) and the
// fastest three, in us and TFLOP/s of the base product 2 M N K, and the host's time to issue one
// launch. The inputs are uniform in [-0.1, 0.1) (zeros would draw less power and run faster than
// real data). `make build` builds it with the tests (build/cmake/extra_k_bench [tokens rank]); it
// needs an sm_90 build with CUTLASS to run. bench/gemm_extra_k.py times cuBLAS on the same
// products.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/extra_k_gemm.cuh"
#include "timing.cuh"

using namespace reslora::kernels;

namespace {

__global__ void fill_uniform(__nv_bfloat16* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 0x9E3779B1u ^ seed;
    h ^= h >> 15;
    h *= 0x2C1B3C6Du;
    h ^= h >> 12;
    p[i] = __float2bfloat16((h & 0xFFFF) / 65536.f * 0.2f - 0.1f);
  }
}

// Host microseconds to issue one launch: 200 launches queued back to back.
float issue_us(const ExtraKGemmArgs& a) {
  CHECK(cudaDeviceSynchronize());
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 200; ++i) CHECK(extra_k_gemm(a, DType::kBFloat16, nullptr));
  const auto t1 = std::chrono::steady_clock::now();
  CHECK(cudaDeviceSynchronize());
  return std::chrono::duration<float, std::micro>(t1 - t0).count() / 200;
}

float median_us(const ExtraKGemmArgs& a) {
  return ::median_us([&] { CHECK(extra_k_gemm(a, DType::kBFloat16, nullptr)); });
}

const char* tile_name(ExtraKTile t) {
  return t == ExtraKTile::k128x256 ? "128x256"
                                   : (t == ExtraKTile::k128x128 ? "128x128" : "256x128");
}
const char* raster_name(ExtraKRaster r) {
  return r == ExtraKRaster::kAlongM ? "along M"
                                    : (r == ExtraKRaster::kAlongN ? "along N" : "heur.");
}

struct Product {
  const char* name;
  int64_t n, k;
  WeightLayout layout;
};

struct Timed {
  ExtraKTile tile;
  ExtraKRaster raster;
  int swizzle;
  float us;
};

}  // namespace

int main(int argc, char** argv) {
  const int64_t m = argc > 1 ? std::atoll(argv[1]) : 8192;
  const int64_t r = argc > 2 ? std::atoll(argv[2]) : 16;
  int dev = 0, sms = 0, major = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  if (!extra_k_gemm_built() || major != 9) {
    std::printf("the extra-K GEMM runs on compute capability 9.0 builds with CUTLASS\n");
    return 0;
  }
  // Forward: y = [x | s z] [W | s B]^T (kNK); input gradient: dx = [dy | dz] [W ; A] (kKN).
  const Product products[] = {
      {"fwd q / o 2048 x 2048", 2048, 2048, WeightLayout::kNK},
      {"fwd k / v 256 x 2048", 256, 2048, WeightLayout::kNK},
      {"fwd gate / up 5632 x 2048", 5632, 2048, WeightLayout::kNK},
      {"fwd down 2048 x 5632", 2048, 5632, WeightLayout::kNK},
      {"fwd 4096 x 4096", 4096, 4096, WeightLayout::kNK},
      {"dx q / o", 2048, 2048, WeightLayout::kKN},
      {"dx k / v", 2048, 256, WeightLayout::kKN},
      {"dx gate / up", 2048, 5632, WeightLayout::kKN},
      {"dx down", 5632, 2048, WeightLayout::kKN},
      {"dx 4096 x 4096", 4096, 4096, WeightLayout::kKN},
      {"fwd MLP up 11008 x 4096", 11008, 4096, WeightLayout::kNK},
      {"fwd MLP down 4096 x 11008", 4096, 11008, WeightLayout::kNK},
      {"dx MLP up", 4096, 11008, WeightLayout::kKN},
      {"dx MLP down", 11008, 4096, WeightLayout::kKN},
  };
  int64_t big = 0, wide = 8192;  // the largest operand; the widest N (the rows of v)
  for (const Product& p : products) {
    big = std::max({big, m * p.k, p.n * p.k, m * p.n});
    wide = std::max(wide, p.n);
  }
  void *x, *w, *z, *v, *out;
  CHECK(cudaMalloc(&x, big * 2));
  CHECK(cudaMalloc(&w, big * 2));
  CHECK(cudaMalloc(&out, big * 2));
  CHECK(cudaMalloc(&z, std::max<int64_t>(m, 8192) * r * 2));
  CHECK(cudaMalloc(&v, wide * r * 2));
  uint32_t seed = 1;
  for (void* p : {x, w}) fill_uniform<<<1024, 256>>>(static_cast<__nv_bfloat16*>(p), big, seed++);
  fill_uniform<<<1024, 256>>>(static_cast<__nv_bfloat16*>(z), std::max<int64_t>(m, 8192) * r, 3);
  fill_uniform<<<1024, 256>>>(static_cast<__nv_bfloat16*>(v), wide * r, 4);
  CHECK(cudaGetLastError());

  std::printf("%lld tokens, r = %lld, bf16, %d multiprocessors; median of 30, us (TFLOP/s)\n\n",
              static_cast<long long>(m), static_cast<long long>(r), sms);
  std::printf("| product | op's schedule | us | host us | fastest | us | 2nd | us | 3rd | us |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Product& p : products) {
    ExtraKGemmArgs a;
    a.x = x;
    a.w = w;
    a.z = z;
    a.v = v;
    a.out = out;
    a.m = m;
    a.n = p.n;
    a.k = p.k;
    a.r = r;
    a.layout = p.layout;
    const double flop = 2.0 * m * p.n * p.k;
    auto cell = [&](const Timed& t) {
      return std::string(tile_name(t.tile)) + ", " + raster_name(t.raster) + ", " +
             std::to_string(t.swizzle);
    };
    auto us = [&](const Timed& t) {
      char b[64];
      std::snprintf(b, sizeof b, "%.1f (%.0f)", t.us, flop / t.us * 1e-6);
      return std::string(b);
    };
    a.tile = extra_k_gemm_tile(m, p.n, sms);
    const Timed picked{a.tile, a.raster, a.swizzle, median_us(a)};
    const float host = issue_us(a);
    std::vector<Timed> all;
    for (ExtraKTile tile : {ExtraKTile::k128x256, ExtraKTile::k128x128})
      for (ExtraKRaster ra :
           {ExtraKRaster::kHeuristic, ExtraKRaster::kAlongM, ExtraKRaster::kAlongN})
        for (int sw : {1, 2, 4, 8}) {
          a.tile = tile;
          a.raster = ra;
          a.swizzle = sw;
          all.push_back({tile, ra, sw, median_us(a)});
        }
    std::sort(all.begin(), all.end(), [](const Timed& l, const Timed& rr) { return l.us < rr.us; });
    std::printf("| %s | %s | %s | %.1f | %s | %s | %s | %s | %s | %s |\n", p.name,
                cell(picked).c_str(), us(picked).c_str(), host, cell(all[0]).c_str(),
                us(all[0]).c_str(), cell(all[1]).c_str(), us(all[1]).c_str(), cell(all[2]).c_str(),
                us(all[2]).c_str());
  }
  for (void* p : {x, w, z, v, out}) CHECK(cudaFree(p));
  return 0;
}
