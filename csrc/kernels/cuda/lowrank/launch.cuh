// The host side of the low-rank kernels: one launch as a Problem (the op, its sizes and options),
// its plan (the split of the long dimension that fills the GPU) and the kernel parameters.
// launch.cu makes Problems from the public entries and launches their kernels.
#pragma once

#include <algorithm>
#include <cstdint>

#include "tiles.cuh"

namespace reslora {
namespace kernels {
namespace lowrank {

struct Problem {
  LowRankOp op = LowRankOp::kDown;
  LowRankShape shape;
  float p = 0.f;      // dropout probability
  float alpha = 1.f;  // factor on the result (up_out: the LoRA scaling)
  DropoutSeed seed;
  bool with_prev = false;  // x_prev given
  bool vec = false;        // 16-byte copies of the full-size operands, 4-byte of the rank ones
  bool wide_rank = false;  // 16-byte copies of the rank operand too
};

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned(const void* ptr, uintptr_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

struct Plan {
  int64_t splits = 1, per_split = 1, rp = 16, n_pad = 0, d_pad = 0;
};

// The most blocks of one kernel a multiprocessor runs at once that the grids are sized for.
constexpr int kMaxBlocksPerSm = 8;

// Splits the long dimension (the reduced one of down / grad_A, the columns of up) so that the
// grid is one full wave: every multiprocessor holds `blocks_per_sm` blocks, each streaming a long
// run of tiles.
inline Plan make_plan(LowRankOp op, const LowRankShape& p, int num_sms, int blocks_per_sm) {
  Plan pl;
  pl.rp = cdiv(p.segment_rank, 16) * 16;
  pl.n_pad = cdiv(p.n, kTile) * kTile;
  pl.d_pad = cdiv(p.d, kTile) * kTile;
  const bool over_rows = op == LowRankOp::kGradA || op == LowRankOp::kGradAUpDx;
  const int64_t tiles_long = over_rows ? cdiv(p.n, kTile) : cdiv(p.d, kTile);
  const int64_t tiles_other = op == LowRankOp::kDown ? cdiv(p.n, kTile) * p.segments
                              : over_rows            ? cdiv(p.d, kTile) * p.segments
                                                     : cdiv(p.n, kTile);  // the up ops
  const int64_t target = std::max(1, blocks_per_sm) * static_cast<int64_t>(std::max(1, num_sms));
  int64_t s = target / (tiles_other > 0 ? tiles_other : 1);
  s = std::max<int64_t>(1, std::min<int64_t>({s, tiles_long, 65535}));
  pl.per_split = std::max<int64_t>(1, cdiv(tiles_long, s));
  pl.splits = std::max<int64_t>(1, cdiv(tiles_long, pl.per_split));
  return pl;
}

inline size_t smem_bytes(LowRankOp op, int64_t segments, bool with_prev, int rp) {
  switch (op) {
    case LowRankOp::kDown:
      return down_smem(rp, with_prev);
    case LowRankOp::kGradA:
      return grad_a_smem(rp, with_prev);
    case LowRankOp::kGradAUpDx:
      return grad_a_up_smem(rp, with_prev);
    case LowRankOp::kUpDx:
      return up_smem(rp, segments, false);
    case LowRankOp::kUpOut:
      return up_smem(rp, segments, true);
  }
  return 0;
}

inline Common make_common(const Problem& pb, const Plan& pl) {
  Common c;
  c.n = pb.shape.n;
  c.d = pb.shape.d;
  c.sr = pb.shape.segment_rank;
  c.R = pb.shape.segments * pb.shape.segment_rank;
  c.segments = pb.shape.segments;
  c.per_split = pl.per_split;
  c.dropout = pb.p > 0.f;
  c.threshold = dropout_threshold(pb.p);
  c.scale = pb.alpha * (c.dropout ? 1.f / (1.f - pb.p) : 1.f);
  c.seed = pb.seed;
  c.wide_rank = pb.wide_rank;
  return c;
}

}  // namespace lowrank
}  // namespace kernels
}  // namespace reslora
