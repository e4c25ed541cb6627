// The public entries of the low-rank kernels (lowrank.cuh): each checks its arguments, makes the
// Problem (sizes, options, whether the 16-byte paths apply) and hands it to run_typed of its
// dtype (dispatch.cuh, instances_*.cu).
#include <initializer_list>

#include "launch.cuh"

namespace reslora {
namespace kernels {
namespace {

using lowrank::aligned;
using lowrank::cdiv;
using lowrank::Problem;

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

cudaError_t run(const Problem& pb, DType dtype, int num_sms, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return lowrank::run_typed<__half>(pb, num_sms, stream);
    case DType::kBFloat16:
      return lowrank::run_typed<__nv_bfloat16>(pb, num_sms, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

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
  Problem pb = problem_of(LowRankOp::kDown, a.shape, a.dropout, a.x_prev);
  pb.down = &a;
  set_paths(&pb, {a.x, a.x_prev, a.A, a.z}, nullptr);
  return run(pb, dtype, num_sms, stream);
}

cudaError_t lowrank_grad_A(const GradAArgs& a, DType dtype, int num_sms, cudaStream_t stream) {
  if (!shape_ok(a.shape) || a.workspace == nullptr) return cudaErrorInvalidValue;
  Problem pb = problem_of(LowRankOp::kGradA, a.shape, a.dropout, a.x_prev);
  pb.grad_A = &a;
  set_paths(&pb, {a.x, a.x_prev, a.grad_A}, a.dz);
  return run(pb, dtype, num_sms, stream);
}

cudaError_t lowrank_grad_A_up_dx(const GradAUpDxArgs& a, DType dtype, int num_sms,
                                 cudaStream_t stream) {
  const GradAArgs& g = a.grad;
  if (!shape_ok(g.shape) || g.workspace == nullptr || g.shape.segments != 1 || a.grad_x == nullptr)
    return cudaErrorInvalidValue;
  Problem pb = problem_of(LowRankOp::kGradAUpDx, g.shape, g.dropout, g.x_prev);
  pb.grad_A_up_dx = &a;
  set_paths(&pb, {g.x, g.x_prev, g.grad_A, a.A, a.grad_x, a.grad_x_copy}, g.dz);
  return run(pb, dtype, num_sms, stream);
}

cudaError_t lowrank_up_dx(const UpDxArgs& a, DType dtype, int num_sms, cudaStream_t stream) {
  if (!shape_ok(a.shape)) return cudaErrorInvalidValue;
  Problem pb = problem_of(LowRankOp::kUpDx, a.shape, a.dropout, nullptr);
  pb.up_dx = &a;
  set_paths(&pb, {a.A, a.grad_x}, a.dz);
  return run(pb, dtype, num_sms, stream);
}

cudaError_t lowrank_up_out(const UpOutArgs& a, DType dtype, int num_sms, cudaStream_t stream) {
  if (!shape_ok(a.shape) || a.shape.segments != 1) return cudaErrorInvalidValue;
  Problem pb = problem_of(LowRankOp::kUpOut, a.shape, LowRankDropout{}, nullptr);
  pb.alpha = a.scaling;
  pb.up_out = &a;
  set_paths(&pb, {a.B, a.y}, a.z);
  return run(pb, dtype, num_sms, stream);
}

}  // namespace kernels
}  // namespace reslora
