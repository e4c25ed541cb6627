// Meta kernels: the same bodies as the real backends with a shape-only dropout, so fake tensors
// (torch.compile, torch.export, opcheck) get the real shapes, dtypes and argument errors.
#include <torch/library.h>

#include "lora_impl.h"

namespace reslora {
namespace {

// Fake tensors have no data: the dropout writes nothing, and every shape comes from the bodies.
struct MetaKernels : detail::GenericOnly {
  static void dropout_apply(const at::Tensor&, const at::Tensor*, at::Tensor&, bool, double,
                            const kernels::DropoutSeed&, int64_t) {}
};

}  // namespace

TORCH_LIBRARY_IMPL(reslora, Meta, m) { detail::LoraOps<MetaKernels>::register_kernels(m); }

}  // namespace reslora
