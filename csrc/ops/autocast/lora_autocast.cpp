// Autocast for the block op: under torch.autocast (e.g. the HF Trainer's bf16 / fp16 on an fp32
// model) every floating input is cast to the autocast dtype, as aten::linear does, instead of
// failing the dtype checks.
#include <vector>

#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "reslora/ops.h"

namespace reslora {
namespace {

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> lora_linear_autocast(
    const at::Tensor& x, const std::optional<at::Tensor>& x_prev, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
    const std::optional<at::Tensor>& z_shortcut, double scaling, double dropout,
    const std::optional<at::Tensor>& seed, int64_t seed_offset, int64_t block_rank,
    const std::optional<at::Tensor>& x_norms, const std::optional<at::Tensor>& z_norms,
    const std::optional<at::Tensor>& stats_count, std::optional<at::TensorList> A_shortcut,
    std::optional<at::TensorList> B_shortcut) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const auto dt = at::autocast::get_autocast_dtype(kDevice);
  const auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dt, t, kDevice); };
  const auto cast_opt = [&](const std::optional<at::Tensor>& t) {
    return at::autocast::cached_cast(dt, t, kDevice);
  };
  const auto cast_list = [&](std::optional<at::TensorList> ts) {
    std::vector<at::Tensor> out;
    for (const at::Tensor& t : ts.value_or(at::TensorList())) out.push_back(cast(t));
    return out;
  };
  // the float32 statistics rings stay as they are
  return lora_linear(cast(x), cast_opt(x_prev), cast(weight), cast_opt(bias), cast(A), cast(B),
                     cast_opt(z_shortcut), scaling, dropout, seed, seed_offset, block_rank, x_norms,
                     z_norms, stats_count, at::TensorList(cast_list(A_shortcut)),
                     at::TensorList(cast_list(B_shortcut)));
}

}  // namespace

TORCH_LIBRARY_IMPL(reslora, AutocastCPU, m) {
  m.impl("lora_linear", &lora_linear_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(reslora, AutocastCUDA, m) {
  m.impl("lora_linear", &lora_linear_autocast<c10::DeviceType::CUDA>);
}

}  // namespace reslora
