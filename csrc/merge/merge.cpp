#include "reslora/merge.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace reslora {

Variant parse_variant(const std::string& name) {
  if (name == "lora") return Variant::kLoRA;
  if (name == "is") return Variant::kIS;
  if (name == "bs") return Variant::kBS;
  if (name == "ms") return Variant::kMS;
  TORCH_CHECK_VALUE(false, "reslora: variant must be one of 'lora', 'is', 'bs', 'ms', got '", name,
                    "'");
}

std::string to_string(Variant v) {
  switch (v) {
    case Variant::kLoRA:
      return "lora";
    case Variant::kIS:
      return "is";
    case Variant::kBS:
      return "bs";
    case Variant::kMS:
      return "ms";
  }
  return "?";
}

MergeKind parse_merge(const std::string& name) {
  if (name == "exact") return MergeKind::kExact;
  if (name == "input") return MergeKind::kInput;
  if (name == "weight") return MergeKind::kWeight;
  if (name == "mid") return MergeKind::kMid;
  if (name == "fit") return MergeKind::kFit;
  TORCH_CHECK_VALUE(false,
                    "reslora: merge must be one of 'exact', 'input', 'weight', 'mid', 'fit', got '",
                    name, "'");
}

std::string to_string(MergeKind m) {
  switch (m) {
    case MergeKind::kExact:
      return "exact";
    case MergeKind::kInput:
      return "input";
    case MergeKind::kWeight:
      return "weight";
    case MergeKind::kMid:
      return "mid";
    case MergeKind::kFit:
      return "fit";
  }
  return "?";
}

std::vector<MergeKind> merges_for(Variant v) {
  switch (v) {
    case Variant::kIS:
      return {MergeKind::kInput, MergeKind::kWeight, MergeKind::kFit};
    case Variant::kMS:
      return {MergeKind::kInput, MergeKind::kMid, MergeKind::kFit};
    default:
      return {MergeKind::kExact};
  }
}

void check_merge(Variant variant, MergeKind merge) {
  const auto ok = merges_for(variant);
  if (std::find(ok.begin(), ok.end(), merge) != ok.end()) return;
  std::string names;
  for (auto m : ok) names += (names.empty() ? "'" : ", '") + to_string(m) + "'";
  TORCH_CHECK_VALUE(false, "reslora: merge '", to_string(merge), "' does not apply to variant '",
                    to_string(variant), "'; expected one of ", names);
}

namespace {

// num / den, taken as 1 where either is 0 (spec section 4). Stays on the device.
at::Tensor ratio(const at::Tensor& num, const at::Tensor& den) {
  const at::Tensor zero = (num == 0).logical_or(den == 0);
  return at::where(zero, at::ones_like(num), num / at::where(zero, at::ones_like(den), den));
}

// The fit merge's increment M = (zx + lambda M0)(xx + lambda I)^-1 of block n, in float64.
at::Tensor fit_increment(const MergeBlock& b, int64_t n, const at::Tensor& M0, double ridge) {
  const int64_t d = b.A.size(1), r = b.A.size(0);
  TORCH_CHECK_VALUE(b.xx.defined() && b.zx.defined() && b.tokens > 0,
                    "reslora: merge 'fit' needs the "
                    "calibration statistics of block ",
                    n,
                    " (merge_to_lora(merge='fit', inputs=...) "
                    "gathers them in Python, ResLoRAChain::calibrate in C++), got none");
  TORCH_CHECK_VALUE(b.xx.dim() == 2 && b.xx.size(0) == d && b.xx.size(1) == d,
                    "reslora: merge 'fit': "
                    "block ",
                    n, " needs xx of shape [", d, ", ", d, "], got ", b.xx.sizes());
  TORCH_CHECK_VALUE(b.zx.dim() == 2 && b.zx.size(0) == r && b.zx.size(1) == d,
                    "reslora: merge 'fit': "
                    "block ",
                    n, " needs zx of shape [", r, ", ", d, "], got ", b.zx.sizes());
  TORCH_CHECK_VALUE(ridge > 0, "reslora: ridge must be > 0 (relative to tr(xx) / d_in), got ",
                    ridge);
  const at::Tensor xx = b.xx.to(at::kDouble);
  const double lambda = ridge * xx.diagonal().sum().item<double>() / static_cast<double>(d);
  const at::Tensor eye = at::eye(d, xx.options());
  const at::Tensor lhs = xx + (lambda > 0 ? lambda : ridge) * eye;
  const at::Tensor rhs = (b.zx.to(at::kDouble) + lambda * M0.to(at::kDouble)).t();  // [d, r]
  const at::Tensor L = at::linalg_cholesky(lhs);
  return at::cholesky_solve(rhs, L).t().to(b.A.dtype());  // [r, d]
}

}  // namespace

std::vector<LoRAPair> merge_chain(const std::vector<MergeBlock>& blocks, Variant variant,
                                  MergeKind merge, int64_t pre_num, double scaling, double ridge,
                                  int64_t only) {
  check_merge(variant, merge);
  TORCH_CHECK(pre_num >= -1, "reslora: pre_num must be -1 (all) or >= 0, got ", pre_num);
  const int64_t n_blocks = static_cast<int64_t>(blocks.size());
  TORCH_CHECK_VALUE(only >= -1 && only < n_blocks,
                    "reslora: merge_chain's only must be -1 (every block) or a block index in [0, ",
                    n_blocks, "), got ", only);
  for (int64_t n = 0; n < n_blocks; ++n) {
    const auto& b = blocks[n];
    TORCH_CHECK(b.A.defined() && b.B.defined() && b.A.dim() == 2 && b.B.dim() == 2 &&
                    b.B.size(1) == b.A.size(0),
                "reslora: merge block ", n, " needs A [r, d_in] and B [d_out, r], got A ",
                b.A.defined() ? b.A.sizes() : at::IntArrayRef{}, " and B ",
                b.B.defined() ? b.B.sizes() : at::IntArrayRef{});
    if (n > 0 && variant != Variant::kLoRA) {
      TORCH_CHECK(b.A.sizes() == blocks[0].A.sizes() && b.B.sizes() == blocks[0].B.sizes(),
                  "reslora: block ", n, " of a '", to_string(variant),
                  "' chain must have the shapes of block 0 (A ", blocks[0].A.sizes(), ", B ",
                  blocks[0].B.sizes(), "), got A ", b.A.sizes(), ", B ", b.B.sizes());
    }
  }
  const auto stat = [&](int64_t n, bool z) -> at::Tensor {
    const at::Tensor& t = z ? blocks[n].z_norm_mean : blocks[n].x_norm_mean;
    TORCH_CHECK(t.defined(), "reslora: merge '", to_string(merge), "' needs the ", z ? "z" : "x",
                "-norm statistics of block ", n, ", got none");
    return t.to(blocks[n].B.options()).reshape({});
  };

  std::vector<LoRAPair> out;
  out.reserve(blocks.size());
  std::vector<at::Tensor> frob;  // ||W_j + s B_j A_j||_F for the is / weight merge
  if (variant == Variant::kIS && merge == MergeKind::kWeight) {
    for (size_t j = 0; j < blocks.size(); ++j) {
      const auto& b = blocks[j];
      TORCH_CHECK(b.weight.defined(), "reslora: merge 'weight' needs each block's base weight");
      TORCH_CHECK_VALUE(
          b.weight.dim() == 2 && b.weight.size(0) == b.B.size(0) && b.weight.size(1) == b.A.size(1),
          "reslora: merge block ", j, ": the base weight must have shape [d_out, d_in] = [",
          b.B.size(0), ", ", b.A.size(1), "], got ", b.weight.sizes());
      frob.push_back(
          at::linalg_matrix_norm(b.weight.to(b.B.dtype()) + scaling * at::mm(b.B, b.A), "fro"));
    }
  }
  for (int64_t n = only < 0 ? 0 : only; n < (only < 0 ? n_blocks : only + 1); ++n) {
    const auto& b = blocks[n];
    const int64_t k_max = reach(n, pre_num);
    switch (variant) {
      case Variant::kLoRA:
        out.push_back({b.A.clone(), b.B.clone()});
        break;
      case Variant::kBS: {
        std::vector<at::Tensor> As, Bs;
        for (int64_t k = 0; k <= k_max; ++k) {
          As.push_back(blocks[n - k].A);
          Bs.push_back(blocks[n - k].B);
        }
        out.push_back({at::cat(As, 0), at::cat(Bs, 1)});
        break;
      }
      case Variant::kIS: {
        at::Tensor alpha;
        if (merge == MergeKind::kFit) {
          // the head's shortcut adds its own input (exact: A' = 2 A)
          if (n == 0) {
            out.push_back({b.A * 2, b.B.clone()});
          } else {
            const at::Tensor M0 = b.A * ratio(stat(n - 1, false), stat(n, false));
            out.push_back({b.A + fit_increment(b, n, M0, ridge), b.B.clone()});
          }
          break;
        }
        if (merge == MergeKind::kInput) {
          alpha = n == 0 ? at::ones({}, b.B.options()) : ratio(stat(n - 1, false), stat(n, false));
        } else {
          alpha = n < 2 ? at::ones({}, b.B.options()) : ratio(frob[n - 2], frob[n - 1]);
        }
        out.push_back({b.A.clone(), b.B * (1 + alpha)});
        break;
      }
      case Variant::kMS: {
        if (merge == MergeKind::kFit) {
          if (k_max == 0) {
            out.push_back({b.A.clone(), b.B.clone()});
          } else {
            at::Tensor M0 = at::zeros_like(b.A);
            for (int64_t k = 1; k <= k_max; ++k) {
              M0.add_(blocks[n - k].A * ratio(stat(n - k, false), stat(n, false)));
            }
            out.push_back({b.A + fit_increment(b, n, M0, ridge), b.B.clone()});
          }
          break;
        }
        if (merge == MergeKind::kInput) {
          at::Tensor A = b.A.clone();
          for (int64_t k = 1; k <= k_max; ++k) {
            A.add_(blocks[n - k].A * ratio(stat(n - k, false), stat(n, false)));
          }
          out.push_back({A, b.B.clone()});
        } else {
          at::Tensor alpha = at::zeros({}, b.B.options());
          for (int64_t k = 1; k <= k_max; ++k)
            alpha = alpha + ratio(stat(n - k, true), stat(n, true));
          out.push_back({b.A.clone(), b.B * (1 + alpha)});
        }
        break;
      }
    }
  }
  return out;
}

}  // namespace reslora
