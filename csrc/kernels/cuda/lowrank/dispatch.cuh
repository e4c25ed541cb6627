// run_typed: a Problem's kernels for one dtype, its vector path and rank picked, then launched
// with role-named kernel arguments made from the op's public ones. Included by instances_*.cu,
// each of which instantiates it for one dtype.
#pragma once

#include <atomic>

#include "down.cuh"
#include "grad_a.cuh"
#include "launch.cuh"
#include "up.cuh"

namespace reslora {
namespace kernels {
namespace lowrank {

// The sum over splits of the fp32 partials of down or grad_A, in a fixed order, rounded to T.
// The output has `other` (n for down, d for grad_A) rows or columns besides the R rank ones;
// rank_cols: the output is [n, R] (down) and a split's partials are [segments][pad][rp],
// otherwise it is [R, d] (grad_A) and they are [segments][rp][pad], pad being other rounded up
// to the tile.
template <typename T>
__global__ void reduce_splits_kernel(const float* __restrict__ ws, T* __restrict__ out, Common c,
                                     bool rank_cols, int64_t other, int64_t splits, int64_t pad,
                                     int rp) {
  const int64_t cols = rank_cols ? c.R : other;
  const int64_t total = c.R * other;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t row = i / cols, col = i % cols;
    const int64_t rank = rank_cols ? col : row, o = rank_cols ? row : col;
    const int64_t seg = rank / c.sr, r = rank % c.sr;
    const int64_t inner = rank_cols ? o * rp + r : r * pad + o;
    float s = 0.f;
    for (int64_t k = 0; k < splits; ++k) s += ws[(k * c.segments + seg) * pad * rp + inner];
    out[i] = Cvt<T>::t(s);
  }
}

// Allows `Kernel` the largest dynamic shared memory any supported problem needs. The attribute
// belongs to the device, so it is set once per device (a bit each for devices 0..63; others set
// it on every launch) instead of costing a driver call per launch.
template <auto Kernel>
cudaError_t allow_smem() {
  static std::atomic<uint64_t> done{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t(1) << device : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(kMaxSmemBytes));
  if (err == cudaSuccess && bit != 0) done.fetch_or(bit, std::memory_order_release);
  return err;
}

// Blocks of `Kernel` with `smem` bytes of shared memory that one multiprocessor runs at once
// (registers and shared memory both count), capped at kMaxBlocksPerSm. The last answer is kept,
// keyed by smem, so a run of launches of one shape asks the runtime once.
template <auto Kernel>
int blocks_per_sm(size_t smem) {
  static std::atomic<uint64_t> last{0};  // (smem + 1) << 8 | blocks
  const uint64_t seen = last.load(std::memory_order_relaxed);
  if ((seen >> 8) == smem + 1) return static_cast<int>(seen & 0xff);
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, kThreads, smem) !=
          cudaSuccess ||
      blocks < 1) {
    (void)cudaGetLastError();
    blocks = 1;
  }
  blocks = std::min(blocks, kMaxBlocksPerSm);
  last.store(((uint64_t(smem) + 1) << 8) | uint64_t(blocks), std::memory_order_relaxed);
  return blocks;
}

// Launches `Kernel` with `args` over its grid, then, for the reductions, the sum of its partials
// into `reduced`:
// - the reductions over x, over a grid of tiles x splits x segments: z (down_kernel; partials
//   over columns, reduced into [n, R]) and dA (grad_a_kernel, or grad_a_up_dx_kernel, which also
//   writes the low-rank dx of its one segment; partials over rows, reduced into [R, d]);
// - the up kernels, over a grid of 64-row tiles x splits of the columns (reduced is null).
template <auto Kernel, typename Args, typename T>
cudaError_t launch(const Problem& pb, const Args& args, float* partials, T* reduced, int num_sms,
                   size_t smem, cudaStream_t stream) {
  cudaError_t err = allow_smem<Kernel>();
  if (err != cudaSuccess) return err;
  const Plan pl = make_plan(pb.op, pb.shape, num_sms, blocks_per_sm<Kernel>(smem));
  const Common c = make_common(pb, pl);
  const bool up = pb.op == LowRankOp::kUpDx || pb.op == LowRankOp::kUpOut;
  const bool row_tiles = pb.op == LowRankOp::kDown || up;  // grid.x over rows, not columns
  const int64_t other = row_tiles ? pb.shape.n : pb.shape.d;
  const int64_t pad = row_tiles ? pl.n_pad : pl.d_pad;
  const dim3 grid(static_cast<unsigned>(cdiv(other, kTile)), static_cast<unsigned>(pl.splits),
                  static_cast<unsigned>(up ? 1 : pb.shape.segments));
  Kernel<<<grid, kThreads, smem, stream>>>(args, c, pad);
  if (!up) {
    // One thread per output element up to 1024 blocks (grid-stride past that): at small sizes a
    // grid of idle blocks would cost more than the sums.
    const int64_t outputs = c.R * other;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(1024, cdiv(outputs, 256)));
    reduce_splits_kernel<T><<<blocks, 256, 0, stream>>>(partials, reduced, c,
                                                        /*rank_cols=*/row_tiles, other, pl.splits,
                                                        pad, static_cast<int>(pl.rp));
  }
  return cudaGetLastError();
}

template <typename T>
const T* in(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
T* out(void* p) {
  return static_cast<T*>(p);
}

template <typename T, bool VEC, int NF>
cudaError_t launch_op(const Problem& pb, int num_sms, cudaStream_t stream) {
  const size_t smem = smem_bytes(pb.op, pb.shape.segments, pb.with_prev, 16 * NF);
  switch (pb.op) {
    case LowRankOp::kDown: {
      const DownArgs& a = *pb.down;
      const DownKernelArgs<T> k{in<T>(a.x), in<T>(a.x_prev), in<T>(a.A), a.workspace};
      return launch<down_kernel<T, VEC, NF>>(pb, k, a.workspace, out<T>(a.z), num_sms, smem,
                                             stream);
    }
    case LowRankOp::kGradA: {
      const GradAArgs& a = *pb.grad_A;
      const GradAKernelArgs<T> k{in<T>(a.x), in<T>(a.x_prev), in<T>(a.dz), a.workspace,
                                 nullptr,    nullptr,         nullptr};
      return launch<grad_a_kernel<T, VEC, NF>>(pb, k, a.workspace, out<T>(a.grad_A), num_sms, smem,
                                               stream);
    }
    case LowRankOp::kGradAUpDx: {
      const GradAUpDxArgs& a = *pb.grad_A_up_dx;
      const GradAArgs& g = a.grad;
      const GradAKernelArgs<T> k{in<T>(g.x), in<T>(g.x_prev),  in<T>(g.dz),          g.workspace,
                                 in<T>(a.A), out<T>(a.grad_x), out<T>(a.grad_x_copy)};
      return launch<grad_a_up_dx_kernel<T, VEC, NF>>(pb, k, g.workspace, out<T>(g.grad_A), num_sms,
                                                     smem, stream);
    }
    case LowRankOp::kUpDx: {
      const UpDxArgs& a = *pb.up_dx;
      const UpDxKernelArgs<T> k{in<T>(a.dz), in<T>(a.A), out<T>(a.grad_x)};
      return launch<up_dx_kernel<T, VEC, NF>>(pb, k, nullptr, static_cast<T*>(nullptr), num_sms,
                                              smem, stream);
    }
    case LowRankOp::kUpOut: {
      const UpOutArgs& a = *pb.up_out;
      const UpOutKernelArgs<T> k{in<T>(a.z), in<T>(a.B), out<T>(a.y)};
      return launch<up_out_kernel<T, VEC, NF>>(pb, k, nullptr, static_cast<T*>(nullptr), num_sms,
                                               smem, stream);
    }
  }
  return cudaErrorInvalidValue;
}

template <typename T, bool VEC>
cudaError_t launch_rank(const Problem& pb, int num_sms, cudaStream_t stream) {
  switch (cdiv(pb.shape.segment_rank, 16)) {
    case 1:
      return launch_op<T, VEC, 1>(pb, num_sms, stream);
    case 2:
      return launch_op<T, VEC, 2>(pb, num_sms, stream);
    case 3:
      return launch_op<T, VEC, 3>(pb, num_sms, stream);
    default:
      return launch_op<T, VEC, 4>(pb, num_sms, stream);
  }
}

template <typename T>
cudaError_t run_typed(const Problem& pb, int num_sms, cudaStream_t stream) {
  return pb.vec ? launch_rank<T, true>(pb, num_sms, stream)
                : launch_rank<T, false>(pb, num_sms, stream);
}

}  // namespace lowrank
}  // namespace kernels
}  // namespace reslora
