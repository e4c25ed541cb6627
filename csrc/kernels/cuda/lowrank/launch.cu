// The public entries of the low-rank kernels (lowrank.cuh): each checks its arguments, makes the
// Problem (sizes, options, whether the 16-byte paths apply), picks the kernel of its dtype, load
// path and rank with the static switches and launches it (launch, below).
#include <atomic>
#include <initializer_list>

#include "../static_switch.h"
#include "down.cuh"
#include "grad_a.cuh"
#include "launch.cuh"
#include "up.cuh"

namespace reslora {
namespace kernels {
namespace lowrank {
namespace {

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
template <auto Kernel, int NF, typename Args, typename T>
cudaError_t launch(const Problem& pb, const Args& args, float* partials, T* reduced, int num_sms,
                   cudaStream_t stream) {
  const size_t smem = smem_bytes(pb.op, pb.shape.segments, pb.with_prev, 16 * NF);
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

// The kernel of the problem's dtype (T), load path (VEC) and rank in 16-wide fragments (NF):
// `launch_with` is called with those as compile-time constants.
#define RESLORA_LOWRANK_SWITCH(pb, dtype, ...)                                         \
  RESLORA_HALF_SWITCH(dtype, T, [&] {                                                  \
    return RESLORA_BOOL_SWITCH((pb).vec, VEC, [&] {                                    \
      return RESLORA_FRAGS_SWITCH(cdiv((pb).shape.segment_rank, 16), NF, __VA_ARGS__); \
    });                                                                                \
  })

bool shape_ok(const LowRankShape& s) {
  return s.n > 0 && s.d > 0 && s.segments >= 1 && s.segments <= 65535 && s.segment_rank >= 1 &&
         s.segment_rank <= kFusedMaxRank;
}

// The 16-byte paths: d a multiple of 8 and the full-size operands 16-byte aligned; the rank
// operand ([n, R]: dz or z) in element pairs (4-byte aligned, R and the segment rank even),
// and in 16-byte runs of 8 where R, the segment rank and its pointer allow (wide_rank).
void set_paths(Problem* pb, std::initializer_list<const void*> full, const void* rank_operand) {
  const LowRankShape& s = pb->shape;
  const int64_t R = s.segments * s.segment_rank;
  bool vec = s.d % 8 == 0;
  for (const void* p : full) vec = vec && aligned(p, 16);
  if (rank_operand != nullptr)
    vec = vec && R % 2 == 0 && s.segment_rank % 2 == 0 && aligned(rank_operand, 4);
  pb->vec = vec;
  pb->wide_rank = R % 8 == 0 && s.segment_rank % 8 == 0 && aligned(rank_operand, 16);
}

// The Problem of an op: its sizes and dropout, and whether x_prev is given.
Problem problem_of(LowRankOp op, const LowRankShape& shape, const LowRankDropout& dropout,
                   const void* x_prev) {
  Problem pb;
  pb.op = op;
  pb.shape = shape;
  pb.p = dropout.p;
  pb.seed = dropout.seed;
  pb.with_prev = x_prev != nullptr;
  return pb;
}

}  // namespace
}  // namespace lowrank

using lowrank::cdiv;
using lowrank::in;
using lowrank::launch;
using lowrank::out;
using lowrank::shape_ok;

bool lowrank_supported(DType dtype, int64_t segment_rank, int64_t segments, bool with_prev,
                       int device_major) {
  if (segment_rank < 1 || segment_rank > kFusedMaxRank || segments < 1 || segments > 65535)
    return false;
  // Tensor-core fragments of both 16-bit types and asynchronous copies: compute capability 8.0+.
  if ((dtype != DType::kFloat16 && dtype != DType::kBFloat16) || device_major < 8) return false;
  const int rp = static_cast<int>(cdiv(segment_rank, 16) * 16);
  return std::max({lowrank::down_smem(rp, with_prev), lowrank::grad_a_smem(rp, with_prev),
                   lowrank::up_smem(rp, segments, false), lowrank::up_smem(rp, segments, true),
                   segments == 1 ? lowrank::grad_a_up_smem(rp, with_prev) : size_t(0)}) <=
         kMaxSmemBytes;
}

size_t lowrank_workspace_floats(LowRankOp op, const LowRankShape& shape, int num_sms) {
  // Sized for the most splits any kernel's occupancy can ask for.
  const lowrank::Plan pl = lowrank::make_plan(op, shape, num_sms, lowrank::kMaxBlocksPerSm);
  switch (op) {
    case LowRankOp::kDown:
      return static_cast<size_t>(pl.splits * shape.segments * pl.n_pad * pl.rp);
    case LowRankOp::kGradA:
    case LowRankOp::kGradAUpDx:
      return static_cast<size_t>(pl.splits * shape.segments * pl.rp * pl.d_pad);
    case LowRankOp::kUpDx:
    case LowRankOp::kUpOut:
      return 0;
  }
  return 0;
}

cudaError_t lowrank_down(const DownArgs& a, DType dtype, int num_sms, cudaStream_t stream) {
  if (!shape_ok(a.shape) || a.workspace == nullptr) return cudaErrorInvalidValue;
  lowrank::Problem pb = lowrank::problem_of(LowRankOp::kDown, a.shape, a.dropout, a.x_prev);
  lowrank::set_paths(&pb, {a.x, a.x_prev, a.A, a.z}, nullptr);
  return RESLORA_LOWRANK_SWITCH(pb, dtype, [&] {
    const lowrank::DownKernelArgs<T> k{in<T>(a.x), in<T>(a.x_prev), in<T>(a.A), a.workspace};
    return launch<lowrank::down_kernel<T, VEC, NF>, NF>(pb, k, a.workspace, out<T>(a.z), num_sms,
                                                        stream);
  });
}

cudaError_t lowrank_grad_A(const GradAArgs& a, DType dtype, int num_sms, cudaStream_t stream) {
  if (!shape_ok(a.shape) || a.workspace == nullptr) return cudaErrorInvalidValue;
  lowrank::Problem pb = lowrank::problem_of(LowRankOp::kGradA, a.shape, a.dropout, a.x_prev);
  lowrank::set_paths(&pb, {a.x, a.x_prev, a.grad_A}, a.dz);
  return RESLORA_LOWRANK_SWITCH(pb, dtype, [&] {
    const lowrank::GradAKernelArgs<T> k{in<T>(a.x), in<T>(a.x_prev), in<T>(a.dz), a.workspace,
                                        nullptr,    nullptr,         nullptr};
    return launch<lowrank::grad_a_kernel<T, VEC, NF>, NF>(pb, k, a.workspace, out<T>(a.grad_A),
                                                          num_sms, stream);
  });
}

cudaError_t lowrank_grad_A_up_dx(const GradAUpDxArgs& a, DType dtype, int num_sms,
                                 cudaStream_t stream) {
  const GradAArgs& g = a.grad;
  if (!shape_ok(g.shape) || g.workspace == nullptr || g.shape.segments != 1 || a.grad_x == nullptr)
    return cudaErrorInvalidValue;
  lowrank::Problem pb = lowrank::problem_of(LowRankOp::kGradAUpDx, g.shape, g.dropout, g.x_prev);
  lowrank::set_paths(&pb, {g.x, g.x_prev, g.grad_A, a.A, a.grad_x, a.grad_x_copy}, g.dz);
  return RESLORA_LOWRANK_SWITCH(pb, dtype, [&] {
    const lowrank::GradAKernelArgs<T> k{in<T>(g.x),           in<T>(g.x_prev), in<T>(g.dz),
                                        g.workspace,          in<T>(a.A),      out<T>(a.grad_x),
                                        out<T>(a.grad_x_copy)};
    return launch<lowrank::grad_a_up_dx_kernel<T, VEC, NF>, NF>(pb, k, g.workspace,
                                                                out<T>(g.grad_A), num_sms, stream);
  });
}

cudaError_t lowrank_up_dx(const UpDxArgs& a, DType dtype, int num_sms, cudaStream_t stream) {
  if (!shape_ok(a.shape)) return cudaErrorInvalidValue;
  lowrank::Problem pb = lowrank::problem_of(LowRankOp::kUpDx, a.shape, a.dropout, nullptr);
  lowrank::set_paths(&pb, {a.A, a.grad_x}, a.dz);
  return RESLORA_LOWRANK_SWITCH(pb, dtype, [&] {
    const lowrank::UpDxKernelArgs<T> k{in<T>(a.dz), in<T>(a.A), out<T>(a.grad_x)};
    return launch<lowrank::up_dx_kernel<T, VEC, NF>, NF>(pb, k, nullptr, static_cast<T*>(nullptr),
                                                         num_sms, stream);
  });
}

cudaError_t lowrank_up_out(const UpOutArgs& a, DType dtype, int num_sms, cudaStream_t stream) {
  if (!shape_ok(a.shape) || a.shape.segments != 1) return cudaErrorInvalidValue;
  lowrank::Problem pb = lowrank::problem_of(LowRankOp::kUpOut, a.shape, LowRankDropout{}, nullptr);
  pb.alpha = a.scaling;
  lowrank::set_paths(&pb, {a.B, a.y}, a.z);
  return RESLORA_LOWRANK_SWITCH(pb, dtype, [&] {
    const lowrank::UpOutKernelArgs<T> k{in<T>(a.z), in<T>(a.B), out<T>(a.y)};
    return launch<lowrank::up_out_kernel<T, VEC, NF>, NF>(pb, k, nullptr, static_cast<T*>(nullptr),
                                                          num_sms, stream);
  });
}

}  // namespace kernels
}  // namespace reslora
