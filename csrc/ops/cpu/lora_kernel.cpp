// CPU kernels of the reslora ops: the counter-based dropout in a parallel loop, the rest in ATen.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../../kernels/dropout_hash.h"
#include "../lora_impl.h"

namespace reslora {
namespace {

at::Tensor dropout_sum_cpu(const at::Tensor& x, const at::Tensor* x_prev, double p, int64_t seed,
                           int64_t segment) {
  const at::Tensor xc = x.contiguous();
  const at::Tensor xpc = x_prev != nullptr ? x_prev->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  const int64_t n = xc.numel();
  const float pf = static_cast<float>(p);
  const uint32_t threshold = kernels::dropout_threshold(pf);
  const uint64_t key =
      kernels::dropout_key(static_cast<uint64_t>(seed), static_cast<uint64_t>(segment));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "dropout_sum_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Same arithmetic as the CUDA kernel: p rounded to float, scale in the accumulation type.
    const acc_t scale = acc_t(1) / (acc_t(1) - static_cast<acc_t>(pf));
    const scalar_t* xs = xc.const_data_ptr<scalar_t>();
    const scalar_t* ps = xpc.defined() ? xpc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* os = out.mutable_data_ptr<scalar_t>();
    const int64_t groups = (n + 3) / 4;
    at::parallel_for(0, groups, 1 << 12, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const uint64_t bits = kernels::dropout_group_bits(key, static_cast<uint64_t>(g));
        for (int64_t lane = 0; lane < 4 && 4 * g + lane < n; ++lane) {
          const int64_t i = 4 * g + lane;
          acc_t v = static_cast<acc_t>(xs[i]);
          if (ps != nullptr) v += static_cast<acc_t>(ps[i]);
          os[i] = static_cast<scalar_t>(
              kernels::dropout_keep_bits(bits, lane, threshold) ? v * scale : acc_t(0));
        }
      }
    });
  });
  return out;
}

at::Tensor lora_down_cpu(const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
                         const at::Tensor& A, double dropout, int64_t seed, int64_t segment_rank) {
  return detail::lora_down_impl(x, x_prev, A, dropout, seed, segment_rank, &dropout_sum_cpu);
}

std::tuple<at::Tensor, at::Tensor> lora_down_backward_cpu(
    const at::Tensor& grad_z, const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
    const at::Tensor& A, double dropout, int64_t seed, int64_t segment_rank, bool compute_grad_x) {
  return detail::lora_down_backward_impl(grad_z, x, x_prev, A, dropout, seed, segment_rank,
                                         compute_grad_x, &dropout_sum_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(reslora, CPU, m) {
  m.impl("lora_down", &lora_down_cpu);
  m.impl("_lora_down_backward", &lora_down_backward_cpu);
  m.impl("lora_up", &detail::lora_up_impl);
  m.impl("_lora_up_backward", &detail::lora_up_backward_impl);
}

}  // namespace reslora
