// Norm statistics for the is / ms merges, made of ATen calls: they run on the tensors' device,
// never read a value back to the host, and trace under torch.compile. The CUDA backend replaces
// record_stats_ by one fused pass (ops/cuda/stats_kernel.cpp) and falls back to this one.
#include "stats.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace reslora {
namespace detail {

static void check_ring(const at::Tensor& ring, const char* name, const char* op = "record_stats_") {
  TORCH_CHECK(ring.dim() == 1 && ring.size(0) >= 1 && at::isFloatingType(ring.scalar_type()),
              "reslora::", op, ": ", name,
              " must be a 1-D floating tensor (float32 recommended) with at least one slot, got ",
              ring.scalar_type(), " of shape ", ring.sizes());
}

static void check_count(const at::Tensor& count, const at::Tensor& ring, const char* op) {
  TORCH_CHECK(count.numel() == 1 && count.scalar_type() == at::kLong, "reslora::", op,
              ": count must be an int64 tensor with one element, got ", count.scalar_type(),
              " of shape ", count.sizes());
  TORCH_CHECK(count.device() == ring.device(), "reslora::", op,
              ": count must be on the device of the ring (", ring.device(), "), got ",
              count.device());
}

void check_record_stats(const at::Tensor& x_norms, const at::Tensor& z_norms,
                        const at::Tensor& count, const char* op) {
  check_ring(x_norms, "x_norms", op);
  check_ring(z_norms, "z_norms", op);
  TORCH_CHECK(z_norms.size(0) == x_norms.size(0), "reslora::", op,
              ": z_norms must have the length of x_norms (", x_norms.size(0), "), got ",
              z_norms.size(0));
  check_count(count, x_norms, op);
}

void record_stats_generic(at::Tensor& x_norms, at::Tensor& z_norms, at::Tensor& count,
                          const at::Tensor& x, const at::Tensor& z) {
  check_record_stats(x_norms, z_norms, count);
  const at::Tensor slot = count.reshape({1}).remainder(x_norms.size(0));
  // Statistics carry no gradient.
  const auto norm = [](const at::Tensor& t) {
    const auto dt = t.scalar_type();
    const auto acc = (dt == at::kHalf || dt == at::kBFloat16) ? at::kFloat : dt;
    return at::linalg_vector_norm(t.detach(), 2, std::nullopt, false, acc)
        .reshape({1})
        .to(at::kFloat);
  };
  x_norms.index_copy_(0, slot, norm(x).to(x_norms.device(), x_norms.scalar_type()));
  z_norms.index_copy_(0, slot, norm(z).to(z_norms.device(), z_norms.scalar_type()));
  count.add_(1);
}

static at::Tensor stats_mean_impl(const at::Tensor& ring, const at::Tensor& count) {
  check_ring(ring, "ring", "stats_mean");
  check_count(count, ring, "stats_mean");
  const at::Tensor filled = count.reshape({}).clamp(0, ring.size(0));
  const at::Tensor used = at::arange(ring.size(0), count.options()).lt(filled);
  return at::where(used, ring.to(at::kFloat), 0).sum() / filled.clamp_min(1).to(at::kFloat);
}

}  // namespace detail

// Every backend (Meta included) runs the ATen composition unless it registers its own kernel.
TORCH_LIBRARY_IMPL(reslora, CompositeExplicitAutograd, m) {
  m.impl("record_stats_", &detail::record_stats_generic);
}

TORCH_LIBRARY_IMPL(reslora, CompositeImplicitAutograd, m) {
  m.impl("stats_mean", &detail::stats_mean_impl);
}

}  // namespace reslora
