// Backend-generic bodies of the ops. Each backend supplies its dropout kernels and, optionally,
// fused low-rank kernels (a KernelSet); the large products go through ATen (cuBLAS on CUDA,
// shape-only on Meta), so one body serves CPU, CUDA and Meta and the shapes cannot drift apart.
//
// From an op to the kernel that runs (CUDA, fp16 / bf16; the other backends stop at the KernelSet):
//   reslora::lora_linear (schema: lora_ops.cpp; autograd: autograd/lora_autograd.cpp)
//     -> Backend<K>::linear -> lora_linear_impl (below)
//        z: down_z -> K.down = fused_down_cuda (cuda/lora_kernel.cpp)
//           -> kernels::lowrank_down (kernels/cuda/lowrank/launch.cu) -> down_kernel (down.cuh)
//        y: lora_up_impl -> K.linear_out = fused_linear_out_cuda: on Hopper one GEMM
//           y = [x | s z (| 1)] [W | B (| b)]^T (kernels::extra_k_gemm, extra_k/mainloop.cuh);
//           else K.up_out (small outputs: lowrank_up_out -> up_out_kernel, up.cuh) or cuBLAS,
//           then the base GEMM accumulates onto it (cuBLAS)
//   reslora::_lora_linear_backward -> Backend<K>::linear_backward -> lora_linear_backward_impl
//        dz, dB: cuBLAS; without dropout, on Hopper, dx = [dy | dz] [W ; A] in one GEMM
//           (K.grad_x = fused_grad_x_cuda -> extra_k_gemm) and grad_A by lowrank_grad_A (or,
//           for is, with x_prev's gradient by lowrank_grad_A_up_dx); else down_grads ->
//           K.grad_A_up_dx = fused_grad_A_up_dx_cuda
//           -> lowrank_grad_A_up_dx -> grad_a_up_dx_kernel (grad_a.cuh), or, for several dropout
//           segments (bs), lowrank_grad_A and lowrank_up_dx; then dx += dy W (cuBLAS)
// Where a fused kernel does not take a problem (dtype, rank, device) it returns false and the
// generic composition in the same function runs (the dropout kernel plus ATen products).
#pragma once

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "../kernels/dropout_hash.h"
#include "lora_checks.h"

namespace reslora {
namespace detail {

// Returns (x [+ x_prev]) * keep / (1 - p) for segment `segment`, shape [N, d] contiguous.
// Called only with p > 0. x_prev may be null.
using DropoutSumFn = at::Tensor (*)(const at::Tensor& x, const at::Tensor* x_prev, double p,
                                    const kernels::DropoutSeed& seed, int64_t segment);

// acc += drop(t). acc and t share shape [N, d] and acc is contiguous. Called only with p > 0.
using MaskedAccumulateFn = void (*)(at::Tensor& acc, const at::Tensor& t, double p,
                                    const kernels::DropoutSeed& seed, int64_t segment);

// Optional fused kernels of a backend for the low-rank path. Each returns false when it does not
// take the problem (dtype, rank, device); the generic composition of ATen products and the
// dropout kernel above then runs. x2 / xp2 are [N, d] (xp2 may be undefined), dz is [N, R].
//   down:   *z = drop_k(x2 [+ xp2]) A_k^T per segment k             ([N, R])
//   grad_A: *grad_A = dz_k^T drop_k(x2 [+ xp2]) per segment k       ([R, d])
//   up_dx:  *out = sum_k drop_k(dz_k A_k)                            ([N, d], a fresh tensor)
//   up_out: *y = scaling z2 B^T                                       ([N, d_out], a fresh tensor)
//   grad_A_up_dx: grad_A and up_dx together (one segment), the mask made once for both; with
//           grad_x_copy non-null it also writes a second copy of up_dx there
using FusedDownFn = bool (*)(const at::Tensor& x2, const at::Tensor& xp2, const at::Tensor& A,
                             double p, const kernels::DropoutSeed& seed, int64_t segment_rank,
                             at::Tensor* z);
using FusedGradAFn = bool (*)(const at::Tensor& dz, const at::Tensor& x2, const at::Tensor& xp2,
                              const at::Tensor& A, double p, const kernels::DropoutSeed& seed,
                              int64_t segment_rank, at::Tensor* grad_A);
using FusedUpDxFn = bool (*)(const at::Tensor& dz, const at::Tensor& A, double p,
                             const kernels::DropoutSeed& seed, int64_t segment_rank,
                             at::Tensor* out);
using FusedUpOutFn = bool (*)(const at::Tensor& z2, const at::Tensor& B, double scaling,
                              at::Tensor* y);
using FusedGradAUpDxFn = bool (*)(const at::Tensor& dz, const at::Tensor& x2, const at::Tensor& xp2,
                                  const at::Tensor& A, double p, const kernels::DropoutSeed& seed,
                                  int64_t segment_rank, at::Tensor* grad_A, at::Tensor* grad_x,
                                  at::Tensor* grad_x_copy);

// One GEMM with the low-rank product inside its K loop (the output written once, never read
// back); false when the backend has none for the problem.
//   linear_out: *y = x2 W^T + b + scaling zt2 B^T      ([N, d_out]; bias may be undefined)
//   grad_x:     *dx = dy W + dz A                       ([N, d_in]; the no-dropout input gradient)
using FusedLinearOutFn = bool (*)(const at::Tensor& x2, const at::Tensor& weight,
                                  const at::Tensor& bias, const at::Tensor& zt2,
                                  const at::Tensor& B, double scaling, at::Tensor* y);
using FusedGradXFn = bool (*)(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dz,
                              const at::Tensor& A, at::Tensor* dx);

// A backend's dropout kernel: out (=|+=) drop(xc [+ xpc]) over contiguous tensors of one shape.
using DropoutApplyFn = void (*)(const at::Tensor& xc, const at::Tensor* xpc, at::Tensor& out,
                                bool accumulate, double p, const kernels::DropoutSeed& seed,
                                int64_t segment);

// The two dropout entries of a KernelSet made from a backend's dropout kernel.
template <DropoutApplyFn Apply>
at::Tensor dropout_sum_with(const at::Tensor& x, const at::Tensor* x_prev, double p,
                            const kernels::DropoutSeed& seed, int64_t segment) {
  const at::Tensor xc = x.contiguous();
  const at::Tensor xpc = x_prev != nullptr ? x_prev->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  Apply(xc, xpc.defined() ? &xpc : nullptr, out, false, p, seed, segment);
  return out;
}
template <DropoutApplyFn Apply>
void masked_accumulate_with(at::Tensor& acc, const at::Tensor& t, double p,
                            const kernels::DropoutSeed& seed, int64_t segment) {
  const at::Tensor tc = t.contiguous();
  Apply(tc, nullptr, acc, true, p, seed, segment);
}

struct KernelSet {
  DropoutSumFn dropout_sum;
  MaskedAccumulateFn masked_accumulate;
  FusedDownFn down;
  FusedGradAFn grad_A;
  FusedUpDxFn up_dx;
  FusedUpOutFn up_out;
  FusedGradAUpDxFn grad_A_up_dx;
  FusedLinearOutFn linear_out;
  FusedGradXFn grad_x;
};

// The kernel set of a backend with dropout kernels only: every product takes the generic path.
constexpr KernelSet dropout_only(DropoutSumFn sum, MaskedAccumulateFn accumulate) {
  return KernelSet{sum, accumulate, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
}

inline std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

// scaling * a b as one GEMM (alpha = scaling; beta = 0, so the fresh output is never read).
inline at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double scaling) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  return at::addmm_out(out, out, a, b, /*beta=*/0, /*alpha=*/scaling);
}

// z = drop_k(x2 [+ xp2]) A_k^T for every segment k: [N, R].
inline at::Tensor down_z(const at::Tensor& x2, const at::Tensor& xp2, const at::Tensor& A,
                         double dropout, const kernels::DropoutSeed& seed, int64_t segment_rank,
                         const KernelSet& k) {
  at::Tensor z;
  if (k.down != nullptr && k.down(x2, xp2, A, dropout, seed, segment_rank, &z)) return z;
  if (dropout == 0.0) {
    // No mask: every segment sees the same input, so one GEMM covers all of them.
    return at::mm(xp2.defined() ? x2 + xp2 : x2, A.t());
  }
  z = at::empty({x2.size(0), A.size(0)}, x2.options());
  for (int64_t s = 0; s < A.size(0) / segment_rank; ++s) {
    const at::Tensor u = k.dropout_sum(x2, xp2.defined() ? &xp2 : nullptr, dropout, seed, s);
    z.narrow(1, s * segment_rank, segment_rank)
        .copy_(at::mm(u, A.narrow(0, s * segment_rank, segment_rank).t()));
  }
  return z;
}

// grad_A of z = drop(x2 [+ xp2]) A^T for upstream dz ([N, R]). The dropout masks are regenerated
// from the seed, never stored.
inline at::Tensor down_grad_A(const at::Tensor& dz, const at::Tensor& x2, const at::Tensor& xp2,
                              const at::Tensor& A, double dropout, const kernels::DropoutSeed& seed,
                              int64_t segment_rank, const KernelSet& k) {
  at::Tensor grad_A;
  if (k.grad_A != nullptr && k.grad_A(dz, x2, xp2, A, dropout, seed, segment_rank, &grad_A))
    return grad_A;
  if (dropout == 0.0) return at::mm(dz.t(), xp2.defined() ? x2 + xp2 : x2);
  grad_A = at::empty_like(A, at::MemoryFormat::Contiguous);
  for (int64_t s = 0; s < A.size(0) / segment_rank; ++s) {
    const at::Tensor u = k.dropout_sum(x2, xp2.defined() ? &xp2 : nullptr, dropout, seed, s);
    grad_A.narrow(0, s * segment_rank, segment_rank)
        .copy_(at::mm(dz.narrow(1, s * segment_rank, segment_rank).t(), u));
  }
  return grad_A;
}

// The input gradient of the low-rank path, sum_k drop_k(dz_k A_k), as a fresh [N, d] tensor.
inline at::Tensor down_grad_x(const at::Tensor& dz, const at::Tensor& A, double dropout,
                              const kernels::DropoutSeed& seed, int64_t segment_rank,
                              const KernelSet& k) {
  at::Tensor out;
  if (k.up_dx != nullptr && k.up_dx(dz, A, dropout, seed, segment_rank, &out)) return out;
  if (dropout == 0.0) return at::mm(dz, A);
  out = at::zeros({dz.size(0), A.size(1)}, dz.options());
  for (int64_t s = 0; s < A.size(0) / segment_rank; ++s) {
    k.masked_accumulate(out,
                        at::mm(dz.narrow(1, s * segment_rank, segment_rank),
                               A.narrow(0, s * segment_rank, segment_rank)),
                        dropout, seed, s);
  }
  return out;
}

// grad_A and, when asked for, the low-rank input gradient ([N, d]) and a second copy of it
// (`copy`: the is variant's dx, which the base GEMM then accumulates onto); what is not asked for
// is undefined. In one pass over x when the backend fuses them, else as down_grad_A and
// down_grad_x.
struct DownGrads {
  at::Tensor grad_A, grad_x, grad_x_copy;
};
inline DownGrads down_grads(const at::Tensor& dz, const at::Tensor& x2, const at::Tensor& xp2,
                            const at::Tensor& A, double dropout, const kernels::DropoutSeed& seed,
                            int64_t segment_rank, bool compute_grad_x, bool copy,
                            const KernelSet& k) {
  DownGrads g;
  if (compute_grad_x && k.grad_A_up_dx != nullptr &&
      k.grad_A_up_dx(dz, x2, xp2, A, dropout, seed, segment_rank, &g.grad_A, &g.grad_x,
                     copy ? &g.grad_x_copy : nullptr))
    return g;
  g.grad_A = down_grad_A(dz, x2, xp2, A, dropout, seed, segment_rank, k);
  if (compute_grad_x) {
    g.grad_x = down_grad_x(dz, A, dropout, seed, segment_rank, k);
    if (copy) g.grad_x_copy = g.grad_x.clone();
  }
  return g;
}

inline at::Tensor lora_down_impl(const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
                                 const at::Tensor& A, double dropout,
                                 const kernels::DropoutSeed& seed, int64_t segment_rank,
                                 const KernelSet& k) {
  check_down("lora_down", x, x_prev, A, dropout, segment_rank);
  const int64_t d_in = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, d_in});
  const at::Tensor xp2 = x_prev.has_value() ? x_prev->reshape({-1, d_in}) : at::Tensor();
  return down_z(x2, xp2, A, dropout, seed, segment_rank, k).view(with_last(x.sizes(), A.size(0)));
}

inline std::tuple<at::Tensor, at::Tensor> lora_down_backward_impl(
    const at::Tensor& grad_z, const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
    const at::Tensor& A, double dropout, const kernels::DropoutSeed& seed, int64_t segment_rank,
    bool compute_grad_x, const KernelSet& k) {
  check_down("_lora_down_backward", x, x_prev, A, dropout, segment_rank);
  const int64_t d_in = x.size(-1);
  const int64_t R = A.size(0);
  TORCH_CHECK(grad_z.sizes() == at::IntArrayRef(with_last(x.sizes(), R)),
              "reslora::_lora_down_backward: grad_z must have shape ",
              at::IntArrayRef(with_last(x.sizes(), R)), ", got ", grad_z.sizes());
  check_same("_lora_down_backward", "grad_z", grad_z, x);
  const at::Tensor x2 = x.reshape({-1, d_in});
  const at::Tensor xp2 = x_prev.has_value() ? x_prev->reshape({-1, d_in}) : at::Tensor();
  const at::Tensor dz = grad_z.reshape({-1, R});
  DownGrads g = down_grads(dz, x2, xp2, A, dropout, seed, segment_rank, compute_grad_x,
                           /*copy=*/false, k);
  return {compute_grad_x ? g.grad_x.view(x.sizes()) : at::empty({0}, x.options()), g.grad_A};
}

inline at::Tensor lora_up_impl(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& z,
                               const at::Tensor& B, double scaling, const KernelSet& k) {
  check_up("lora_up", x, weight, bias, z, B, scaling);
  const at::Tensor x2 = x.reshape({-1, x.size(-1)});
  const at::Tensor z2 = z.reshape({-1, B.size(1)});
  at::Tensor y;
  if (k.linear_out != nullptr &&
      k.linear_out(x2, weight, bias.has_value() ? *bias : at::Tensor(), z2, B, scaling, &y))
    return y.view(with_last(x.sizes(), weight.size(0)));
  // The low-rank term (and bias) first, then the base GEMM accumulates onto it (beta = 1): the
  // full-size output is written by the small product and read once by the large one, whose
  // epilogue hides that read behind its arithmetic.
  if (bias.has_value()) {
    y = at::addmm(*bias, z2, B.t(), /*beta=*/1, /*alpha=*/scaling);
  } else if (k.up_out == nullptr || !k.up_out(z2, B, scaling, &y)) {
    y = scaled_mm(z2, B.t(), scaling);
  }
  y.addmm_(x2, weight.t());
  return y.view(with_last(x.sizes(), weight.size(0)));
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_up_backward_impl(
    const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& z, const at::Tensor& B,
    double scaling, bool compute_grad_x) {
  const char* op = "_lora_up_backward";
  TORCH_CHECK(grad_y.dim() >= 1, "reslora::", op, ": grad_y must have at least 1 dimension");
  check_float_dtype(op, "grad_y", grad_y);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == grad_y.size(-1), "reslora::", op,
              ": weight must have shape [d_out, d_in] with d_out = ", grad_y.size(-1), ", got ",
              weight.sizes());
  TORCH_CHECK(B.dim() == 2 && B.size(0) == grad_y.size(-1), "reslora::", op,
              ": B must have shape [d_out, r] with d_out = ", grad_y.size(-1), ", got ", B.sizes());
  TORCH_CHECK(z.sizes() == at::IntArrayRef(with_last(grad_y.sizes(), B.size(1))), "reslora::", op,
              ": z must have shape ", at::IntArrayRef(with_last(grad_y.sizes(), B.size(1))),
              ", got ", z.sizes());
  check_same(op, "weight", weight, grad_y);
  check_same(op, "z", z, grad_y);
  check_same(op, "B", B, grad_y);
  TORCH_CHECK(std::isfinite(scaling), "reslora::", op, ": scaling must be finite, got ", scaling);
  const int64_t d_out = weight.size(0);
  const at::Tensor g = grad_y.reshape({-1, d_out});
  const at::Tensor z2 = z.reshape({-1, B.size(1)});
  at::Tensor grad_x = compute_grad_x
                          ? at::mm(g, weight).view(with_last(grad_y.sizes(), weight.size(1)))
                          : at::empty({0}, grad_y.options());
  at::Tensor grad_z = scaled_mm(g, B, scaling).view(z.sizes());
  at::Tensor grad_B = scaled_mm(g.t(), z2, scaling);
  return {grad_x, grad_z, grad_B};
}

// One ResLoRA block: z = drop(x [+ x_prev]) A^T; y = x W^T + b + s (z + z_extra) B^T. Returns
// (y, z); z is the block's own mid activation, which ms chains pass on as later z_extra.
inline std::tuple<at::Tensor, at::Tensor> lora_linear_impl(
    const at::Tensor& x, const std::optional<at::Tensor>& x_prev, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
    const std::optional<at::Tensor>& z_extra, double scaling, double dropout,
    const kernels::DropoutSeed& seed, int64_t segment_rank, const KernelSet& k) {
  check_x_width("lora_linear", x, weight);
  check_rank("lora_linear", A, B);
  at::Tensor z = lora_down_impl(x, x_prev, A, dropout, seed, segment_rank, k);
  if (z_extra.has_value()) {
    TORCH_CHECK(z_extra->sizes() == z.sizes(), "reslora::lora_linear: z_extra must have shape ",
                z.sizes(), ", got ", z_extra->sizes());
    check_same("lora_linear", "z_extra", *z_extra, x);
  }
  const at::Tensor y =
      lora_up_impl(x, weight, bias, z_extra.has_value() ? z + *z_extra : z, B, scaling, k);
  return {y, z};
}

using LinearGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (grad_x, grad_x_prev, grad_A, grad_B, grad_z_extra) of lora_linear. The low-rank part of dx is
// computed first (one pass that writes it, masks regenerated) and the base GEMM dx += dy W
// accumulates onto it (beta = 1), so no full-size temporary is summed afterwards. Tensors not
// asked for come back empty.
inline LinearGrads lora_linear_backward_impl(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_z, const at::Tensor& x,
    const std::optional<at::Tensor>& x_prev, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& z, const std::optional<at::Tensor>& z_extra,
    double scaling, double dropout, const kernels::DropoutSeed& seed, int64_t segment_rank,
    bool compute_grad_x, const KernelSet& k) {
  const char* op = "_lora_linear_backward";
  check_x_width(op, x, weight);
  check_rank(op, A, B);
  check_down(op, x, x_prev, A, dropout, segment_rank);
  check_up(op, x, weight, std::nullopt, z, B, scaling);
  if (grad_z.has_value() && grad_z->defined()) {
    TORCH_CHECK(grad_z->sizes() == z.sizes(), "reslora::", op, ": grad_z must have the shape of z ",
                z.sizes(), ", got ", grad_z->sizes());
    check_same(op, "grad_z", *grad_z, x);
  }
  const int64_t d_in = x.size(-1);
  const int64_t d_out = weight.size(0);
  const int64_t R = A.size(0);
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef(with_last(x.sizes(), d_out)), "reslora::", op,
              ": grad_y must have shape ", at::IntArrayRef(with_last(x.sizes(), d_out)), ", got ",
              grad_y.sizes());
  check_same(op, "grad_y", grad_y, x);
  const at::Tensor g = grad_y.reshape({-1, d_out});
  const at::Tensor x2 = x.reshape({-1, d_in});
  const at::Tensor xp2 = x_prev.has_value() ? x_prev->reshape({-1, d_in}) : at::Tensor();
  const at::Tensor z2 = z.reshape({-1, R});
  const at::Tensor zt2 = z_extra.has_value() ? z2 + z_extra->reshape({-1, R}) : z2;
  at::Tensor dzt = scaled_mm(g, B, scaling);  // gradient of z + z_extra
  at::Tensor grad_B = scaled_mm(g.t(), zt2, scaling);
  // z_extra gets the gradient of the sum; z also gets grad_z from its own downstream use (ms).
  // With z_extra the sum dz is a new tensor, so the returned grad_z_extra is never modified.
  at::Tensor grad_z_extra = z_extra.has_value() ? dzt.view(z.sizes()) : at::empty({0}, x.options());
  at::Tensor dz = dzt;
  if (grad_z.has_value() && grad_z->defined()) {
    const at::Tensor gz = grad_z->reshape({-1, R});
    dz = z_extra.has_value() ? dzt + gz : dzt.add_(gz);
  }
  // is: x_prev gets the low-rank part alone and x that plus dy W; the low-rank pass writes the
  // part twice (to x_prev's gradient and to dx), which costs less than the copy of C that an
  // out-of-place GEMM onto it makes.
  // Without dropout dx = dy W + dz A is one GEMM where the backend has it (the low-rank product
  // inside its K loop), and only x_prev's gradient (is) is written by the low-rank pass.
  at::Tensor dx_fused;
  const bool fused_dx = compute_grad_x && dropout == 0.0 && k.grad_x != nullptr &&
                        k.grad_x(g, weight, dz, A, &dx_fused);
  DownGrads low = down_grads(dz, x2, xp2, A, dropout, seed, segment_rank,
                             compute_grad_x && (!fused_dx || xp2.defined()),
                             /*copy=*/compute_grad_x && !fused_dx && xp2.defined(), k);
  at::Tensor grad_A = low.grad_A, dx, dxp;
  if (fused_dx) {
    dx = dx_fused;
    if (xp2.defined()) dxp = low.grad_x;
  } else if (compute_grad_x) {
    // The base GEMM accumulates onto the low-rank part (beta = 1): no full-size sum afterwards.
    dx = xp2.defined() ? low.grad_x_copy : low.grad_x;
    dx.addmm_(g, weight);
    if (xp2.defined()) dxp = low.grad_x;
  }
  const auto empty = [&] { return at::empty({0}, x.options()); };  // outputs must not alias
  return {compute_grad_x ? dx.view(x.sizes()) : empty(),
          compute_grad_x && xp2.defined() ? dxp.view(x.sizes()) : empty(), grad_A, grad_B,
          grad_z_extra};
}

// The dropout seed of an op call from its schema arguments: with dropout > 0 an int64 tensor of
// one element on x's device (from reslora::draw_seed) and a stream offset >= 0. Fake and Meta
// tensors have no data; their kernels never read it.
inline kernels::DropoutSeed seed_arg(const char* op, const std::optional<at::Tensor>& seed,
                                     int64_t seed_offset, const at::Tensor& x, double dropout) {
  TORCH_CHECK(seed_offset >= 0, "reslora::", op, ": seed_offset must be >= 0, got ", seed_offset);
  kernels::DropoutSeed out;
  out.offset = static_cast<uint64_t>(seed_offset);
  if (!seed.has_value() || !seed->defined()) {
    TORCH_CHECK(dropout == 0.0, "reslora::", op,
                ": seed must be given when dropout > 0 (an int64 tensor of one element on x's "
                "device, from reslora::draw_seed), got none with dropout = ",
                dropout);
    return out;
  }
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, "reslora::", op,
              ": seed must be an int64 tensor of one element, got ", seed->scalar_type(),
              " of shape ", seed->sizes());
  TORCH_CHECK(seed->device() == x.device(), "reslora::", op, ": seed must be on the device of x (",
              x.device(), "), got ", seed->device());
  if (dropout > 0.0 && !seed->is_meta()) out.ptr = seed->const_data_ptr<int64_t>();
  return out;
}

// The kernels of one backend: the bodies above bound to its kernel set, registered for the
// backend's dispatch key in one place so the backends cannot drift apart.
template <const KernelSet* K>
struct Backend {
  static at::Tensor down(const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
                         const at::Tensor& A, double dropout, const std::optional<at::Tensor>& seed,
                         int64_t seed_offset, int64_t segment_rank) {
    return lora_down_impl(x, x_prev, A, dropout,
                          seed_arg("lora_down", seed, seed_offset, x, dropout), segment_rank, *K);
  }
  static std::tuple<at::Tensor, at::Tensor> down_backward(
      const at::Tensor& grad_z, const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
      const at::Tensor& A, double dropout, const std::optional<at::Tensor>& seed,
      int64_t seed_offset, int64_t segment_rank, bool compute_grad_x) {
    return lora_down_backward_impl(grad_z, x, x_prev, A, dropout,
                                   seed_arg("_lora_down_backward", seed, seed_offset, x, dropout),
                                   segment_rank, compute_grad_x, *K);
  }
  static at::Tensor up(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& z,
                       const at::Tensor& B, double scaling) {
    return lora_up_impl(x, weight, bias, z, B, scaling, *K);
  }
  static std::tuple<at::Tensor, at::Tensor> linear(
      const at::Tensor& x, const std::optional<at::Tensor>& x_prev, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
      const std::optional<at::Tensor>& z_extra, double scaling, double dropout,
      const std::optional<at::Tensor>& seed, int64_t seed_offset, int64_t segment_rank) {
    return lora_linear_impl(x, x_prev, weight, bias, A, B, z_extra, scaling, dropout,
                            seed_arg("lora_linear", seed, seed_offset, x, dropout), segment_rank,
                            *K);
  }
  static LinearGrads linear_backward(
      const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_z, const at::Tensor& x,
      const std::optional<at::Tensor>& x_prev, const at::Tensor& weight, const at::Tensor& A,
      const at::Tensor& B, const at::Tensor& z, const std::optional<at::Tensor>& z_extra,
      double scaling, double dropout, const std::optional<at::Tensor>& seed, int64_t seed_offset,
      int64_t segment_rank, bool compute_grad_x) {
    return lora_linear_backward_impl(
        grad_y, grad_z, x, x_prev, weight, A, B, z, z_extra, scaling, dropout,
        seed_arg("_lora_linear_backward", seed, seed_offset, x, dropout), segment_rank,
        compute_grad_x, *K);
  }
  static void register_kernels(torch::Library& m) {
    m.impl("lora_down", &down);
    m.impl("_lora_down_backward", &down_backward);
    m.impl("lora_up", &up);
    m.impl("_lora_up_backward", &lora_up_backward_impl);
    m.impl("lora_linear", &linear);
    m.impl("_lora_linear_backward", &linear_backward);
  }
};

}  // namespace detail
}  // namespace reslora
