// CPU kernels of the reslora ops: the counter-based dropout in a parallel loop, the rest in ATen.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../../kernels/dropout_hash.h"
#include "../lora_impl.h"

namespace reslora {
namespace {

// The CPU backend: its dropout kernel; every product is ATen's.
struct CpuKernels : detail::GenericOnly {
  // out (=|+=) drop(x [+ x_prev]). All contiguous, same shape.
  static void dropout_apply(const at::Tensor& xc, const at::Tensor* xpc, at::Tensor& out,
                            bool accumulate, double p, const kernels::DropoutSeed& seed,
                            int64_t segment);
};

void CpuKernels::dropout_apply(const at::Tensor& xc, const at::Tensor* xpc, at::Tensor& out,
                               bool accumulate, double p, const kernels::DropoutSeed& seed,
                               int64_t segment) {
  const int64_t n = xc.numel();
  const float pf = static_cast<float>(p);
  const uint32_t threshold = kernels::dropout_threshold(pf);
  const uint64_t key = kernels::dropout_key(seed, static_cast<uint64_t>(segment));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, xc.scalar_type(), "dropout_apply_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        // Same arithmetic as the CUDA kernel: p rounded to float, scale in the accumulation type.
        const acc_t scale = acc_t(1) / (acc_t(1) - static_cast<acc_t>(pf));
        const scalar_t* xs = xc.const_data_ptr<scalar_t>();
        const scalar_t* ps = xpc != nullptr ? xpc->const_data_ptr<scalar_t>() : nullptr;
        scalar_t* os = out.mutable_data_ptr<scalar_t>();
        const int64_t pairs = (n + 1) / 2;
        at::parallel_for(0, pairs, 1 << 12, [&](int64_t begin, int64_t end) {
          for (int64_t g = begin; g < end; ++g) {
            const uint32_t bits = kernels::dropout_pair_bits(key, static_cast<uint64_t>(g));
            for (int64_t lane = 0; lane < 2 && 2 * g + lane < n; ++lane) {
              const int64_t i = 2 * g + lane;
              acc_t v = static_cast<acc_t>(xs[i]);
              if (ps != nullptr) v += static_cast<acc_t>(ps[i]);
              const acc_t m =
                  kernels::dropout_keep_lane(bits, lane, threshold) ? v * scale : acc_t(0);
              os[i] = static_cast<scalar_t>(accumulate ? static_cast<acc_t>(os[i]) + m : m);
            }
          }
        });
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(reslora, CPU, m) { detail::LoraOps<CpuKernels>::register_kernels(m); }

}  // namespace reslora
