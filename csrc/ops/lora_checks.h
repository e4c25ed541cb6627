// Argument checks shared by every backend of the ops (Meta included, so fake tensors fail the
// same way). Messages name the op, the argument, the expected and the received value.
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <utility>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../kernels/dropout_hash.h"
#include "stats.h"

namespace reslora {
namespace detail {

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "reslora::", op, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
              dt);
}

inline void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "reslora::", op, ": ", name,
              " must have the dtype of x (", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "reslora::", op, ": ", name,
              " must be on the device of x (", x.device(), "), got ", t.device());
}

inline void check_dropout(const char* op, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "reslora::", op, ": dropout must be in [0, 1), got ", p);
  TORCH_CHECK(p <= kernels::kMaxDropout, "reslora::", op,
              ": dropout must keep at least 2^-15 of the inputs (p <= 1 - 2^-15, the mask's "
              "resolution), got ",
              p);
}

// x and the block's frozen weight must agree on d_in, dtype and device, checked before A so that
// an input of the wrong width, dtype or device is reported as such.
inline void check_x_width(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1, "reslora::", op,
              ": x must have at least 1 dimension [..., d_in], got a 0-D tensor");
  TORCH_CHECK(weight.dim() != 2 || x.size(-1) == weight.size(1), "reslora::", op,
              ": x must have d_in = ", weight.size(1),
              " features in its last dimension (weight is ", "[d_out, d_in] = ", weight.sizes(),
              "), got x of shape ", x.sizes());
  // the frozen weight is the layer's: an input of another dtype or device is the input's fault
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "reslora::", op,
              ": x must have the dtype of weight (", weight.scalar_type(),
              "; cast the input or the layer, or run under autocast), got ", x.scalar_type());
  TORCH_CHECK(x.device() == weight.device(), "reslora::", op,
              ": x must be on the device of weight (", weight.device(), "), got ", x.device());
}

// B's rank must be A's, checked before z so that a mismatch names A and B.
inline void check_rank(const char* op, const at::Tensor& A, const at::Tensor& B) {
  TORCH_CHECK(A.dim() != 2 || B.dim() != 2 || B.size(1) == A.size(0), "reslora::", op,
              ": B must have A's rank: B is [d_out, r] with r = A.size(0) = ", A.size(0),
              ", got B ", B.sizes(), " and A ", A.sizes());
}

inline void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "reslora::", op,
              ": x must have at least 1 dimension [..., d_in], got a 0-D tensor");
  check_float_dtype(op, "x", x);
}

inline void check_down(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
                       const at::Tensor& A, double dropout, int64_t block_rank) {
  check_x(op, x);
  const int64_t d_in = x.size(-1);
  TORCH_CHECK(A.dim() == 2, "reslora::", op, ": A must be a 2-D tensor [r, d_in] = [r, ", d_in,
              "], got a ", A.dim(), "-D tensor of shape ", A.sizes());
  TORCH_CHECK(A.size(1) == d_in, "reslora::", op, ": A must have shape [r, d_in] = [", A.size(0),
              ", ", d_in, "], got ", A.sizes());
  TORCH_CHECK(A.size(0) >= 1, "reslora::", op, ": A must have r >= 1 rows, got shape ", A.sizes());
  TORCH_CHECK(block_rank >= 1 && A.size(0) % block_rank == 0, "reslora::", op,
              ": block_rank must be >= 1 and divide the rows of A (", A.size(0), "), got ",
              block_rank);
  check_same(op, "A", A, x);
  if (x_prev.has_value()) {
    TORCH_CHECK(x_prev->sizes() == x.sizes(), "reslora::", op, ": x_prev must have the shape of x ",
                x.sizes(), ", got ", x_prev->sizes());
    check_same(op, "x_prev", *x_prev, x);
  }
  check_dropout(op, dropout);
}

inline void check_up(const char* op, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& z,
                     const at::Tensor& B, double scaling) {
  check_x(op, x);
  const int64_t d_in = x.size(-1);
  TORCH_CHECK(weight.dim() == 2, "reslora::", op, ": weight must be a 2-D tensor [d_out, d_in]",
              ", got a ", weight.dim(), "-D tensor of shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == d_in, "reslora::", op, ": weight must have shape [d_out, d_in] = [",
              weight.size(0), ", ", d_in, "], got ", weight.sizes());
  const int64_t d_out = weight.size(0);
  TORCH_CHECK(B.dim() == 2, "reslora::", op, ": B must be a 2-D tensor [d_out, r] = [", d_out,
              ", r], got a ", B.dim(), "-D tensor of shape ", B.sizes());
  TORCH_CHECK(B.size(0) == d_out, "reslora::", op, ": B must have shape [d_out, r] = [", d_out,
              ", ", B.size(1), "], got ", B.sizes());
  std::vector<int64_t> z_shape(x.sizes().begin(), x.sizes().end());
  z_shape.back() = B.size(1);
  TORCH_CHECK(z.sizes() == at::IntArrayRef(z_shape), "reslora::", op,
              ": z must have shape [..., r] = ", at::IntArrayRef(z_shape), ", got ", z.sizes());
  check_same(op, "weight", weight, x);
  check_same(op, "z", z, x);
  check_same(op, "B", B, x);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d_out, "reslora::", op,
                ": bias must have shape [d_out] = [", d_out, "], got ", bias->sizes());
    check_same(op, "bias", *bias, x);
  }
  TORCH_CHECK(std::isfinite(scaling), "reslora::", op, ": scaling must be finite, got ", scaling);
}

// The statistics arguments of lora_linear: all three (then checked as record_stats_ checks
// them) or none. Returns whether they were given.
inline bool check_stats_args(const char* op, const std::optional<at::Tensor>& x_norms,
                             const std::optional<at::Tensor>& z_norms,
                             const std::optional<at::Tensor>& stats_count) {
  std::string given_names;
  int given = 0;
  for (const auto& [name, t] :
       {std::pair<const char*, const std::optional<at::Tensor>*>{"x_norms", &x_norms},
        {"z_norms", &z_norms},
        {"stats_count", &stats_count}}) {
    if (!t->has_value()) continue;
    given_names += (given++ ? " and " : "") + std::string(name);
  }
  TORCH_CHECK(given == 0 || given == 3, "reslora::", op,
              ": x_norms, z_norms and stats_count must be given together or not at all, got ",
              given_names, " alone");
  if (given == 0) return false;
  check_record_stats(*x_norms, *z_norms, *stats_count, op);
  return true;
}

// The bs shortcut's earlier blocks (A_shortcut[j]: [block_rank, d_in], B_shortcut[j]:
// [d_out, block_rank], one pair per earlier block, nearest first), each with the dtype and
// device of A / B. Their products join the block's own as further dropout segments.
inline void check_shortcut_lists(const char* op, const at::Tensor& A, const at::Tensor& B,
                                 at::TensorList A_shortcut, at::TensorList B_shortcut,
                                 int64_t block_rank) {
  TORCH_CHECK(A_shortcut.size() == B_shortcut.size(), "reslora::", op,
              ": A_shortcut and B_shortcut must have one entry per earlier block each, got ",
              A_shortcut.size(), " and ", B_shortcut.size());
  if (A_shortcut.empty()) return;
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2, "reslora::", op, ": A and B must be 2-D, got A ",
              A.sizes(), " and B ", B.sizes());
  for (size_t j = 0; j < A_shortcut.size(); ++j) {
    const at::Tensor& a = A_shortcut[j];
    const at::Tensor& b = B_shortcut[j];
    TORCH_CHECK(a.dim() == 2 && a.size(0) == block_rank && a.size(1) == A.size(1), "reslora::", op,
                ": A_shortcut[", j, "] must have shape [block_rank, d_in] = [", block_rank, ", ",
                A.size(1), "], got ", a.sizes());
    TORCH_CHECK(b.dim() == 2 && b.size(0) == B.size(0) && b.size(1) == block_rank, "reslora::", op,
                ": B_shortcut[", j, "] must have shape [d_out, block_rank] = [", B.size(0), ", ",
                block_rank, "], got ", b.sizes());
    TORCH_CHECK(a.scalar_type() == A.scalar_type() && a.device() == A.device() &&
                    b.scalar_type() == B.scalar_type() && b.device() == B.device(),
                "reslora::", op, ": A_shortcut[", j, "] and B_shortcut[", j,
                "] must have the dtype and device of A and B (", A.scalar_type(), ", ", A.device(),
                "), got ", a.scalar_type(), " on ", a.device(), " and ", b.scalar_type(), " on ",
                b.device());
  }
}

}  // namespace detail
}  // namespace reslora
