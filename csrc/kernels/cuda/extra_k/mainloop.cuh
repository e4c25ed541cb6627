// The extra-K mainloop: CUTLASS's Hopper TMA warp-specialised mainloop (Base) whose producer
// loads the K tiles of a second operand pair after those of the first. The consumer (Base::mma)
// is unchanged: it multiplies whatever tiles arrive, so the second product lands in the same
// accumulator. The problem's K given to the kernel is the padded total, (k tiles of x + k tiles
// of z) * tile K; each descriptor keeps its operand's real extent, so TMA fills the partial tiles
// at either end with zeros.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>

namespace reslora {
namespace kernels {
namespace extra_k {

// Name: a tag type naming the output tile (TileName128x256, ...). It changes nothing in the
// code; it puts the tile into the kernel's symbol, so that a profile says which tile ran.
template <class Base, class Name>
struct ExtraKMainloop : Base {
  using typename Base::DispatchPolicy;
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;
  using typename Base::InternalElementA;
  using typename Base::InternalElementB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using typename Base::TensorStorage;
  using typename Base::TileShape;

  struct Arguments {
    ElementA const* ptr_A;  // x  (M, K)
    StrideA dA;
    ElementB const* ptr_B;  // w  (N, K) in CUTLASS's view of B
    StrideB dB;
    ElementA const* ptr_Z;  // z  (M, R)
    StrideA dZ;
    ElementB const* ptr_V;  // v  (N, R)
    StrideB dV;
    int k;  // the real K of x / w
    int r;  // the real K of z / v
  };

  struct Params : Base::Params {
    typename Base::Params::TMA_A tma_load_z;
    typename Base::Params::TMA_B tma_load_v;
    int k_tiles_main;
    int r;
  };

  static constexpr int kTileK = cute::size<2>(TileShape{});

  static int k_tiles(int k) { return (k + kTileK - 1) / kTileK; }
  // The problem K the kernel is given: both K ranges, each rounded up to whole tiles.
  static int padded_k(int k, int r) { return (k_tiles(k) + k_tiles(r)) * kTileK; }

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args,
                                        void* workspace) {
    using namespace cute;
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    (void)K;
    typename Base::Arguments main{args.ptr_A, args.dA, args.ptr_B, args.dB};
    Params p{
        Base::to_underlying_arguments(make_shape(M, N, args.k, L), main, workspace), {}, {}, 0, 0};
    auto z = make_tensor(reinterpret_cast<InternalElementA const*>(args.ptr_Z),
                         make_layout(make_shape(M, args.r, L), args.dZ));
    auto v = make_tensor(reinterpret_cast<InternalElementB const*>(args.ptr_V),
                         make_layout(make_shape(N, args.r, L), args.dV));
    p.tma_load_z = make_tma_copy_A_sm90(GmemTiledCopyA{}, z, SmemLayoutA{}(_, _, Int<0>{}),
                                        TileShape{}, typename DispatchPolicy::ClusterShape{});
    p.tma_load_v = make_tma_copy_B_sm90(GmemTiledCopyB{}, v, SmemLayoutB{}(_, _, Int<0>{}),
                                        TileShape{}, typename DispatchPolicy::ClusterShape{});
    p.k_tiles_main = k_tiles(args.k);
    p.r = args.r;
    return p;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    using namespace cute;
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    if (K != padded_k(args.k, args.r) || args.k <= 0 || args.r <= 0) return false;
    typename Base::Arguments main{args.ptr_A, args.dA, args.ptr_B, args.dB};
    typename Base::Arguments extra{args.ptr_Z, args.dZ, args.ptr_V, args.dV};
    return Base::can_implement(make_shape(M, N, args.k, L), main) &&
           Base::can_implement(make_shape(M, N, args.r, L), extra);
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& p) {
    Base::prefetch_tma_descriptors(p);
    cute::prefetch_tma_descriptor(p.tma_load_z.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_load_v.get_tma_descriptor());
  }

  // The tiled views of the kernel's contract (their k mode spans both ranges: the kernel counts
  // the K tiles from it) followed by those of z and v.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& shape, Params const& p) const {
    using namespace cute;
    using X = Underscore;
    auto [M, N, K, L] = shape;
    Tensor mA = p.tma_load_a.get_tma_tensor(make_shape(M, K, L));
    Tensor mB = p.tma_load_b.get_tma_tensor(make_shape(N, K, L));
    Tensor mZ = p.tma_load_z.get_tma_tensor(make_shape(M, p.r, L));
    Tensor mV = p.tma_load_v.get_tma_tensor(make_shape(N, p.r, L));
    return make_tuple(local_tile(mA, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{}),
                      local_tile(mB, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{}),
                      local_tile(mZ, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{}),
                      local_tile(mV, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{}));
  }

  // Producer: the tiles of x / w for k < k_tiles_main, then those of z / v, into one pipeline.
  template <class LoadInputs, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& p, MainloopPipeline pipeline,
                           PipelineState smem_pipe_write, LoadInputs const& in,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count,
                           int /*thread_idx*/, uint32_t block_rank_in_cluster,
                           TensorStorage& shared_tensors) {
    using namespace cute;
    if (!cute::elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});

    constexpr uint32_t cluster_x = get<0>(typename DispatchPolicy::ClusterShape());
    const uint2 local = {block_rank_in_cluster % cluster_x, block_rank_in_cluster / cluster_x};
    auto [m, n, k_unused, l] = blk_coord;
    (void)k_unused;

    auto tma_a = p.tma_load_a.get_slice(local.y);
    auto tma_b = p.tma_load_b.get_slice(local.x);
    auto tma_z = p.tma_load_z.get_slice(local.y);
    auto tma_v = p.tma_load_v.get_slice(local.x);
    Tensor tAgA = tma_a.partition_S(get<0>(in)(_, _, m, _, l));
    Tensor tBgB = tma_b.partition_S(get<1>(in)(_, _, n, _, l));
    Tensor tZgZ = tma_z.partition_S(get<2>(in)(_, _, m, _, l));
    Tensor tVgV = tma_v.partition_S(get<3>(in)(_, _, n, _, l));
    Tensor tAsA = tma_a.partition_D(sA);
    Tensor tBsB = tma_b.partition_D(sB);

    uint16_t mcast_a = 0, mcast_b = 0;
    if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>) {
      auto layout = Layout<typename DispatchPolicy::ClusterShape>{};
      for (int i = 0; i < size<1>(layout); ++i)
        mcast_a |= uint16_t(1) << layout(local.x, i, Int<0>{});
    }
    if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
      auto layout = Layout<typename DispatchPolicy::ClusterShape>{};
      for (int i = 0; i < size<0>(layout); ++i)
        mcast_b |= uint16_t(1) << layout(i, local.y, Int<0>{});
    }

    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      const int kt = *k_tile_iter;
      if (kt < p.k_tiles_main) {
        copy(p.tma_load_a.with(*barrier, mcast_a), tAgA(_, _, _, kt), tAsA(_, _, _, stage));
        copy(p.tma_load_b.with(*barrier, mcast_b), tBgB(_, _, _, kt), tBsB(_, _, _, stage));
      } else {
        const int kz = kt - p.k_tiles_main;
        copy(p.tma_load_z.with(*barrier, mcast_a), tZgZ(_, _, _, kz), tAsA(_, _, _, stage));
        copy(p.tma_load_v.with(*barrier, mcast_b), tVgV(_, _, _, kz), tBsB(_, _, _, stage));
      }
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }
};

}  // namespace extra_k
}  // namespace kernels
}  // namespace reslora
