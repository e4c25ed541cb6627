// The rules every front end follows (the C++ modules and, through reslora._C and the ops, the
// Python layers): option validation, how blocks link into a chain, which predecessors a block
// reads, and where a pass's dropout randomness comes from. Written once, here.
#pragma once

#include <string>

#include <ATen/core/Tensor.h>
#include <torch/arg.h>

#include "reslora/merge.h"

namespace reslora {

struct ResLoRAOptions {
  explicit ResLoRAOptions(int64_t r) : r_(r) {}
  TORCH_ARG(Variant, variant) = Variant::kLoRA;
  TORCH_ARG(int64_t, r);
  TORCH_ARG(double, lora_alpha) = 16.0;    // scaling s = lora_alpha / r
  TORCH_ARG(double, dropout) = 0.0;        // on the LoRA input only; off in eval mode
  TORCH_ARG(int64_t, pre_num) = 1;         // bs / ms: previous blocks reached, -1 = all
  TORCH_ARG(int64_t, stats_window) = 100;  // training forwards kept for the is / ms merges
};

// What each option must be, in words ("an int >= 1", ...): the one wording of every message
// about that option, whichever front end received the value.
std::string option_rule(const std::string& option);
// "reslora: <option> must be <rule>, got <received>".
std::string option_error(const std::string& option, const std::string& received);

// Throws naming the option, the expected and the received value.
void validate(const ResLoRAOptions& options);

// For legal options that are likely a mistake, what to say (a warning); empty when none: a
// pre_num the variant ignores (lora, is), and pre_num = 0 for bs / ms, which links no earlier
// block and so trains plain LoRA.
std::string option_warning(const ResLoRAOptions& options);

// Throws unless a block with `block` options and shape [d_out, d_in] may follow the head of
// chain `chain` as its block `position`: the same variant; for the shortcut variants also the
// head's shape, r, lora_alpha and pre_num.
void check_link(const std::string& chain, int64_t position, const ResLoRAOptions& head,
                int64_t head_d_out, int64_t head_d_in, const ResLoRAOptions& block, int64_t d_out,
                int64_t d_in);

// The error for merge_to_lora() on what is already merged (`subject`: "chain 'q_proj'", "the
// model"): a second merge would apply the merge twice.
std::string merged_twice_error(const std::string& subject);

// How many predecessors block `position` of a chain reads in a pass: none for lora, one for is
// (a head reads its own input instead), reach(position, pre_num) for bs (their A and B) and ms
// (their mid activations).
int64_t shortcut_reach(Variant variant, int64_t position, int64_t pre_num);

// Whether the blocks of a chain carry their mid activations as a running sum (block n records
// the sum of blocks 0..n, and block n + 1 reads it as its whole shortcut): ms reaching every
// earlier block (pre_num -1), where summing them anew would cost block n its n - 1 adds.
bool shortcut_running_sum(Variant variant, int64_t pre_num);

// The dropout seed of a pass: an int64 tensor of one element drawn from the default generator of
// like's device (torch.manual_seed makes it reproducible), left on that device. Block n of a
// chain uses it with seed_offset = n, so one draw serves a whole chain pass. Also the op
// reslora::draw_seed.
at::Tensor draw_seed(const at::Tensor& like);

}  // namespace reslora
