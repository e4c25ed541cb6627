// Merges that remove the shortcuts (spec section 4): a chain of ResLoRA blocks becomes plain
// LoRA pairs (A', B') with the same scaling. Computed on the tensors' device.
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace reslora {

enum class Variant { kLoRA, kIS, kBS, kMS };
enum class MergeKind { kExact, kInput, kWeight, kMid, kFit };

// "lora" | "is" | "bs" | "ms"; throws naming the argument and the accepted values otherwise.
Variant parse_variant(const std::string& name);
std::string to_string(Variant v);
// "exact" | "input" | "weight" | "mid" | "fit".
MergeKind parse_merge(const std::string& name);
std::string to_string(MergeKind m);
// The merges that fit a variant, the first one being its default (is: input, weight; ...).
std::vector<MergeKind> merges_for(Variant v);
// Throws unless `merge` fits `variant`.
void check_merge(Variant variant, MergeKind merge);

// What the merge needs of one block, in chain order.
struct MergeBlock {
  at::Tensor weight;       // [d_out, d_in], frozen base weight (is / weight merge)
  at::Tensor A;            // [r, d_in]
  at::Tensor B;            // [d_out, r]
  at::Tensor x_norm_mean;  // 0-d: mean ||x_n||_F over the statistics window (is, ms / input)
  at::Tensor z_norm_mean;  // 0-d: mean ||z_n||_F over the window (ms / mid)
  // The fit merge's calibration sums over tokens (float32, eval mode): xx = sum x_n x_n^T
  // [d_in, d_in] (one tensor may serve several blocks that read the same input) and
  // zx = sum p_n x_n^T [r, d_in], p_n being the rank-r term the shortcut adds to the block's z
  // (is: A_n x_{n-1}; ms: sum_k A_{n-k} x_{n-k}).
  at::Tensor xx;
  at::Tensor zx;
  int64_t tokens = 0;
};

// The fit merge's default ridge, relative: lambda = ridge * tr(xx) / d_in.
constexpr double kDefaultRidge = 1e-4;

struct LoRAPair {
  at::Tensor A;  // [r', d_in]
  at::Tensor B;  // [d_out, r']
};

// The plain LoRA pairs of a chain. pre_num: previous blocks a shortcut reaches (-1 = all).
// bs / exact gives rank (k + 1) r at block n (k = min(pre_num, n)); every other merge keeps r.
// fit (is, ms): the shortcut's term p_n replaced by its least-squares prediction M x_n from
// the block's own input, with a ridge centred on the input merge's prediction M0:
// M = (zx + lambda M0)(xx + lambda I)^-1, A' = A_n + M, B' = B_n. Exact where p_n is a linear
// function of x_n; never worse than input on the calibration data (up to the ridge).
// only >= 0: the pair of that block alone (one entry; the others' sums are not read), which a
// fit in chain order, one position at a time, needs.
std::vector<LoRAPair> merge_chain(const std::vector<MergeBlock>& blocks, Variant variant,
                                  MergeKind merge, int64_t pre_num, double scaling,
                                  double ridge = kDefaultRidge, int64_t only = -1);

// Number of predecessors block `index` reaches for `pre_num` (-1 = all).
inline int64_t reach(int64_t index, int64_t pre_num) {
  return pre_num < 0 ? index : std::min(index, pre_num);
}

}  // namespace reslora
