#include "reslora/rules.h"

#include <cmath>
#include <charconv>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "reslora/ops.h"
#include "kernels/dropout_hash.h"

namespace reslora {

std::string option_rule(const std::string& option) {
  if (option == "r") return "an int >= 1";
  if (option == "lora_alpha") return "a finite number > 0 (scaling = lora_alpha / r)";
  if (option == "lora_dropout")
    return "a number in [0, 1) that keeps at least 2^-15 of the inputs (the mask's resolution)";
  if (option == "pre_num") return "-1 (all) or an int >= 0";
  if (option == "stats_window") return "an int >= 1";
  if (option == "variant") return "one of 'lora', 'is', 'bs', 'ms'";
  TORCH_CHECK_VALUE(false,
                    "reslora: option must be one of r, lora_alpha, lora_dropout, pre_num, "
                    "stats_window, variant, got '",
                    option, "'");
}

std::string option_error(const std::string& option, const std::string& received) {
  return "reslora: " + option + " must be " + option_rule(option) + ", got " + received;
}

namespace {
std::string str(int64_t v) { return std::to_string(v); }
// The shortest text that reads back as v, as Python writes a float (1.0, 0.1, inf, nan), so a
// value is quoted the same whichever front end received it.
std::string str(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v);
  std::string out(buf, res.ptr);
  if (out.find_first_of(".e") == std::string::npos) out += ".0";
  return out;
}
}  // namespace

void validate(const ResLoRAOptions& o) {
  TORCH_CHECK_VALUE(o.r() >= 1, option_error("r", str(o.r())));
  TORCH_CHECK_VALUE(std::isfinite(o.lora_alpha()) && o.lora_alpha() > 0,
                    option_error("lora_alpha", str(o.lora_alpha())));
  TORCH_CHECK_VALUE(o.dropout() >= 0.0 && o.dropout() <= kernels::kMaxDropout,
                    option_error("lora_dropout", str(o.dropout())));
  TORCH_CHECK_VALUE(o.pre_num() >= -1, option_error("pre_num", str(o.pre_num())));
  TORCH_CHECK_VALUE(o.stats_window() >= 1, option_error("stats_window", str(o.stats_window())));
}

std::string option_warning(const ResLoRAOptions& o) {
  const std::string variant = to_string(o.variant());
  if ((o.variant() == Variant::kLoRA || o.variant() == Variant::kIS) && o.pre_num() != 1) {
    return "reslora: pre_num = " + std::to_string(o.pre_num()) + " is ignored by the '" + variant +
           "' variant (" +
           (o.variant() == Variant::kIS ? "is always reads the previous block's input"
                                        : "lora has no shortcut") +
           "); pre_num sets how many earlier blocks a 'bs' or 'ms' shortcut reaches";
  }
  if ((o.variant() == Variant::kBS || o.variant() == Variant::kMS) && o.pre_num() == 0) {
    return "reslora: pre_num = 0 links no earlier block, so a '" + variant +
           "' model trains as plain LoRA; use variant='lora' for that, or pre_num >= 1 (-1 for "
           "every earlier block)";
  }
  return "";
}

void check_link(const std::string& chain, int64_t n, const ResLoRAOptions& h, int64_t head_d_out,
                int64_t head_d_in, const ResLoRAOptions& o, int64_t d_out, int64_t d_in) {
  TORCH_CHECK_VALUE(n >= 0, "reslora: chain '", chain, "': position must be >= 0, got ", n);
  if (n == 0) return;
  TORCH_CHECK_VALUE(o.variant() == h.variant(), "reslora: chain '", chain, "': block ", n,
                    " must have the head's variant '", to_string(h.variant()), "', got '",
                    to_string(o.variant()), "'");
  if (h.variant() == Variant::kLoRA) return;
  TORCH_CHECK_VALUE(d_out == head_d_out && d_in == head_d_in, "reslora: chain '", chain,
                    "': block ", n, " must have the head's shape [d_out, d_in] = [", head_d_out,
                    ", ", head_d_in, "] for the '", to_string(h.variant()), "' shortcut, got [",
                    d_out, ", ", d_in, "]; start a new chain for it");
  TORCH_CHECK_VALUE(
      o.r() == h.r() && o.lora_alpha() == h.lora_alpha() && o.pre_num() == h.pre_num(),
      "reslora: chain '", chain, "': block ", n,
      " must have the head's (r, lora_alpha, pre_num) = (", h.r(), ", ", h.lora_alpha(), ", ",
      h.pre_num(), "), got (", o.r(), ", ", o.lora_alpha(), ", ", o.pre_num(), ")");
}

std::string merged_twice_error(const std::string& subject) {
  return "reslora: " + subject + " is already merged; merge_to_lora() would apply the merge twice";
}

bool shortcut_running_sum(Variant variant, int64_t pre_num) {
  return variant == Variant::kMS && pre_num == -1;
}

int64_t shortcut_reach(Variant variant, int64_t position, int64_t pre_num) {
  TORCH_CHECK_VALUE(position >= 0, "reslora: position must be >= 0, got ", position);
  switch (variant) {
    case Variant::kLoRA:
      return 0;
    case Variant::kIS:
      return position > 0 ? 1 : 0;
    case Variant::kBS:
    case Variant::kMS:
      return reach(position, pre_num);
  }
  return 0;
}

at::Tensor draw_seed(const at::Tensor& like) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("reslora::draw_seed", "")
                       .typed<at::Tensor(const at::Tensor&)>();
  return op.call(like);
}

}  // namespace reslora
