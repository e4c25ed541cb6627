// The backend-independent record_stats_ (ATen calls), for backends that fall back to it.
#pragma once

#include <ATen/core/Tensor.h>

namespace reslora {
namespace detail {

// Argument checks of the statistics (the rings and the counter), shared by every backend and by
// lora_linear, which records them too; errors name `op`.
void check_record_stats(const at::Tensor& x_norms, const at::Tensor& z_norms,
                        const at::Tensor& count, const char* op = "record_stats_");

void record_stats_generic(at::Tensor& x_norms, at::Tensor& z_norms, at::Tensor& count,
                          const at::Tensor& x, const at::Tensor& z);

}  // namespace detail
}  // namespace reslora
