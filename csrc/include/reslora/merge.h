// Merges that remove the shortcuts (spec section 4): a chain of ResLoRA blocks becomes plain
// LoRA pairs (A', B') with the same scaling. Computed on the tensors' device.
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace reslora {

enum class Variant { kLoRA, kIS, kBS, kMS };
enum class MergeKind { kExact, kInput, kWeight, kMid };

// "lora" | "is" | "bs" | "ms"; throws naming the argument and the accepted values otherwise.
Variant parse_variant(const std::string& name);
std::string to_string(Variant v);
// "exact" | "input" | "weight" | "mid".
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
};

struct LoRAPair {
  at::Tensor A;  // [r', d_in]
  at::Tensor B;  // [d_out, r']
};

// The plain LoRA pairs of a chain. pre_num: previous blocks a shortcut reaches (-1 = all).
// bs / exact gives rank (k + 1) r at block n (k = min(pre_num, n)); every other merge keeps r.
std::vector<LoRAPair> merge_chain(const std::vector<MergeBlock>& blocks, Variant variant,
                                  MergeKind merge, int64_t pre_num, double scaling);

// Number of predecessors block `index` reaches for `pre_num` (-1 = all).
inline int64_t reach(int64_t index, int64_t pre_num) {
  return pre_num < 0 ? index : std::min(index, pre_num);
}

}  // namespace reslora
