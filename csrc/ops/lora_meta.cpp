// Meta kernels: the same bodies as the real backends with a shape-only dropout, so fake tensors
// (torch.compile, torch.export, opcheck) get the real shapes, dtypes and argument errors.
#include <torch/library.h>

#include "lora_impl.h"

namespace reslora {
namespace {

at::Tensor dropout_sum_meta(const at::Tensor& x, const at::Tensor* /*x_prev*/, double /*p*/,
                            const kernels::DropoutSeed& /*seed*/, int64_t /*segment*/) {
  return at::empty(x.sizes(), x.options());
}

void masked_accumulate_meta(at::Tensor&, const at::Tensor&, double, const kernels::DropoutSeed&,
                            int64_t) {}

constexpr detail::KernelSet kMetaKernels =
    detail::dropout_only(&dropout_sum_meta, &masked_accumulate_meta);

}  // namespace

TORCH_LIBRARY_IMPL(reslora, Meta, m) { detail::Backend<&kMetaKernels>::register_kernels(m); }

}  // namespace reslora
