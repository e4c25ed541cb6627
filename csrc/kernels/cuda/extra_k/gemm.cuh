// The extra-K GEMM of one dtype and weight layout: CUTLASS 3 kernel types and the launch.
// Included by the per-dtype instance files only (compiled for sm_90a).
#pragma once

#include <atomic>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "../extra_k_gemm.cuh"
#include "mainloop.cuh"

namespace reslora {
namespace kernels {
namespace extra_k {

template <WeightLayout L>
struct LayoutOf;
// kNK: B is (N, K) with K contiguous, which CUTLASS calls column-major B (K x N).
template <>
struct LayoutOf<WeightLayout::kNK> {
  using type = cutlass::layout::ColumnMajor;
};
// kKN: B is (K, N) with N contiguous: row-major B.
template <>
struct LayoutOf<WeightLayout::kKN> {
  using type = cutlass::layout::RowMajor;
};

// The packed stride of an (a, b, 1) operand whose unit-stride mode is the static one of S.
template <class S>
S packed(int a, int b) {
  S s{};
  if constexpr (cute::is_static_v<cute::remove_cvref_t<decltype(cute::get<0>(s))>>) {
    cute::get<1>(s) = static_cast<int64_t>(a);
  } else {
    cute::get<0>(s) = static_cast<int64_t>(b);
  }
  cute::get<2>(s) = static_cast<int64_t>(a) * b;
  return s;
}

// The tags that name each tile in the kernel's symbol (see ExtraKMainloop).
struct TileName128x256;
struct TileName128x128;

template <ExtraKTile Tile>
struct TileOf {
  using type = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using name = TileName128x256;
};
template <>
struct TileOf<ExtraKTile::k128x128> {
  using type = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using name = TileName128x128;
};

inline cutlass::gemm::kernel::detail::RasterOrderOptions raster_of(ExtraKRaster r) {
  using O = cutlass::gemm::kernel::detail::RasterOrderOptions;
  return r == ExtraKRaster::kAlongM ? O::AlongM
                                    : (r == ExtraKRaster::kAlongN ? O::AlongN : O::Heuristic);
}

template <class T, WeightLayout L, ExtraKTile Tile>
struct Gemm {
  using LayoutX = cutlass::layout::RowMajor;
  using LayoutW = typename LayoutOf<L>::type;
  using LayoutOut = cutlass::layout::RowMajor;
  static constexpr int kAlign = 8;  // 16 bytes of fp16 / bf16
  using TileShape = typename TileOf<Tile>::type;
  using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutOut, kAlign, T,
      LayoutOut, kAlign, cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;

  using BaseMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, LayoutX, kAlign, T, LayoutW, kAlign,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Mainloop = ExtraKMainloop<BaseMainloop, typename TileOf<Tile>::name>;

  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideX = typename Kernel::StrideA;
  using StrideW = typename Kernel::StrideB;
  using StrideOut = typename Kernel::StrideD;

  static typename Kernel::Arguments arguments(const ExtraKGemmArgs& a) {
    const int M = static_cast<int>(a.m), N = static_cast<int>(a.n), K = static_cast<int>(a.k),
              R = static_cast<int>(a.r);
    typename Kernel::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = {M, N, Mainloop::padded_k(K, R), 1};
    args.mainloop = {static_cast<const T*>(a.x),
                     packed<StrideX>(M, K),
                     static_cast<const T*>(a.w),
                     packed<StrideW>(N, K),
                     static_cast<const T*>(a.z),
                     packed<StrideX>(M, R),
                     static_cast<const T*>(a.v),
                     packed<StrideW>(N, R),
                     K,
                     R};
    args.epilogue.thread.alpha = 1.f;
    args.epilogue.thread.beta = 0.f;
    args.epilogue.ptr_C = nullptr;
    args.epilogue.ptr_D = static_cast<T*>(a.out);
    args.epilogue.dD = packed<StrideOut>(M, N);
    args.scheduler.raster_order = raster_of(a.raster);
    args.scheduler.max_swizzle_size = a.swizzle;
    return args;
  }

  // Once per device: the kernel's dynamic shared memory limit raised and the multiprocessor
  // count read, so that a launch costs the host only the TMA descriptors and the launch itself.
  static cudaError_t device_sm_count(int* sm_count) {
    constexpr int kDevices = 64;
    static std::atomic<int> cached[kDevices];
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    if (dev < kDevices && (*sm_count = cached[dev].load(std::memory_order_acquire)) > 0)
      return cudaSuccess;
    err = cudaFuncSetAttribute(cutlass::device_kernel<Kernel>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(Kernel::SharedStorageSize));
    if (err != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(sm_count, cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return err;
    if (dev < kDevices) cached[dev].store(*sm_count, std::memory_order_release);
    return cudaSuccess;
  }

  static cudaError_t run(const ExtraKGemmArgs& a, cudaStream_t stream) {
    typename Kernel::Arguments args = arguments(a);
    if (Device::can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
    // The persistent scheduler without split-K needs no workspace.
    if (Device::get_workspace_size(args) != 0) return cudaErrorInvalidValue;
    cudaError_t err = device_sm_count(&args.hw_info.sm_count);
    if (err != cudaSuccess) return err;
    typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);
    if (Device::run(params, stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
    return cudaGetLastError();
  }
};

// Both layouts of one dtype and tile; instances_<dtype>_<tile>.cu instantiates it.
template <class T, ExtraKTile Tile>
cudaError_t run_tile(const ExtraKGemmArgs& a, cudaStream_t stream) {
  return a.layout == WeightLayout::kNK ? Gemm<T, WeightLayout::kNK, Tile>::run(a, stream)
                                       : Gemm<T, WeightLayout::kKN, Tile>::run(a, stream);
}

}  // namespace extra_k
}  // namespace kernels
}  // namespace reslora
