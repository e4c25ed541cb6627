// The ops' bodies, one for every backend: a backend is a traits struct K of static functions
// (its dropout kernel and, optionally, fused low-rank kernels), and LoraOps<K> registers these
// bodies for its dispatch key directly. The large products go through ATen (cuBLAS on CUDA,
// shape-only on Meta), so CPU, CUDA and Meta share one body and the shapes cannot drift apart.
//
// From the op to the kernel that runs (CUDA, fp16 / bf16):
//   reslora::lora_linear -> autograd (autograd/lora_autograd.cpp) -> LoraOps<CudaKernels>::linear
//   -> down_z<K> -> CudaKernels::down (cuda/lora_kernel.cpp) -> kernels::lowrank_down
//   (kernels/cuda/lowrank/launch.cu) -> launch<down_kernel>; the forward's y: up_y<K> ->
//   CudaKernels::linear_out -> kernels::extra_k_gemm (Hopper), else up_out or cuBLAS.
// A fused entry that does not take a problem (dtype, rank, device) returns false, and the generic
// composition in the same function runs (the backend's dropout kernel plus ATen products).
#pragma once

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "../kernels/dropout_hash.h"
#include "lora_checks.h"
#include "reslora/ops.h"

namespace reslora {
namespace detail {

// The fused entries of a backend that has none: every product takes the generic path. A backend
// derives from it, defines dropout_apply and overrides the entries it has:
//   dropout_apply(xc, xpc, out, accumulate, p, seed, segment): out (=|+=) drop(xc [+ xpc]) over
//       contiguous tensors of one shape; called only with p > 0.
//   down:         *z = drop_k(x2 [+ xp2]) A_k^T per dropout segment k                ([N, R])
//   grad_A:       *grad_A = dz_k^T drop_k(x2 [+ xp2]) per segment k                  ([R, d])
//   up_dx:        *out = sum_k drop_k(dz_k A_k)                         ([N, d], a fresh tensor)
//   up_out:       *y = scaling z2 B^T                                   ([N, d_out], fresh)
//   grad_A_up_dx: grad_A and up_dx together (one segment), the mask made once for both; with
//                 grad_x_copy non-null it also writes a second copy of up_dx there
//   linear_out:   *y = x2 W^T + b + scaling zt2 B^T as one GEMM (the output written once)
//   grad_x:       *dx = dy W + dz A as one GEMM (the no-dropout input gradient)
// A dropout segment is block_rank rows of A with a mask of its own (the blocks a bs block reads).
struct GenericOnly {
  static bool down(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                   const kernels::DropoutSeed&, int64_t, at::Tensor*) {
    return false;
  }
  static bool grad_A(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     double, const kernels::DropoutSeed&, int64_t, at::Tensor*) {
    return false;
  }
  static bool up_dx(const at::Tensor&, const at::Tensor&, double, const kernels::DropoutSeed&,
                    int64_t, at::Tensor*) {
    return false;
  }
  static bool up_out(const at::Tensor&, const at::Tensor&, double, at::Tensor*) { return false; }
  static bool grad_A_up_dx(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, double, const kernels::DropoutSeed&, int64_t,
                           at::Tensor*, at::Tensor*, at::Tensor*) {
    return false;
  }
  static bool linear_out(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, double, at::Tensor*) {
    return false;
  }
  static bool grad_x(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     at::Tensor*) {
    return false;
  }
};

// A and B of the whole low-rank product: the block's own, then the bs shortcut's earlier blocks'
// (rows of A, columns of B), as one product of the summed rank.
inline std::pair<at::Tensor, at::Tensor> joined_ranks(const char* op, const at::Tensor& A,
                                                      const at::Tensor& B,
                                                      at::TensorList A_shortcut,
                                                      at::TensorList B_shortcut,
                                                      int64_t block_rank) {
  check_shortcut_lists(op, A, B, A_shortcut, B_shortcut, block_rank);
  if (A_shortcut.empty()) return {A, B};
  std::vector<at::Tensor> As{A}, Bs{B};
  As.insert(As.end(), A_shortcut.begin(), A_shortcut.end());
  Bs.insert(Bs.end(), B_shortcut.begin(), B_shortcut.end());
  return {at::cat(As, 0), at::cat(Bs, 1)};
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

// drop(x2 [+ xp2]) of dropout segment `segment` as a fresh contiguous tensor (p > 0).
template <class K>
at::Tensor dropped(const at::Tensor& x2, const at::Tensor& xp2, double p,
                   const kernels::DropoutSeed& seed, int64_t segment) {
  const at::Tensor xc = x2.contiguous();
  const at::Tensor xpc = xp2.defined() ? xp2.contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  K::dropout_apply(xc, xpc.defined() ? &xpc : nullptr, out, false, p, seed, segment);
  return out;
}

// z = drop_k(x2 [+ xp2]) A_k^T for every dropout segment k: [N, R].
template <class K>
at::Tensor down_z(const at::Tensor& x2, const at::Tensor& xp2, const at::Tensor& A, double dropout,
                  const kernels::DropoutSeed& seed, int64_t block_rank) {
  at::Tensor z;
  if (K::down(x2, xp2, A, dropout, seed, block_rank, &z)) return z;
  if (dropout == 0.0) {
    // No mask: every segment sees the same input, so one GEMM covers all of them.
    return at::mm(xp2.defined() ? x2 + xp2 : x2, A.t());
  }
  if (A.size(0) == block_rank) return at::mm(dropped<K>(x2, xp2, dropout, seed, 0), A.t());
  z = at::empty({x2.size(0), A.size(0)}, x2.options());
  for (int64_t s = 0; s < A.size(0) / block_rank; ++s) {
    z.narrow(1, s * block_rank, block_rank)
        .copy_(at::mm(dropped<K>(x2, xp2, dropout, seed, s),
                      A.narrow(0, s * block_rank, block_rank).t()));
  }
  return z;
}

// y = x2 W^T + b + scaling zt2 B^T: one GEMM where the backend has it; else the low-rank term
// (and bias) first and the base GEMM accumulating onto it (beta = 1): the full-size output is
// written by the small product and read once by the large one, whose epilogue hides that read.
template <class K>
at::Tensor up_y(const at::Tensor& x2, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, const at::Tensor& zt2, const at::Tensor& B,
                double scaling) {
  at::Tensor y;
  if (K::linear_out(x2, weight, bias.has_value() ? *bias : at::Tensor(), zt2, B, scaling, &y))
    return y;
  if (bias.has_value()) {
    y = at::addmm(*bias, zt2, B.t(), /*beta=*/1, /*alpha=*/scaling);
  } else if (!K::up_out(zt2, B, scaling, &y)) {
    y = scaled_mm(zt2, B.t(), scaling);
  }
  return y.addmm_(x2, weight.t());
}

// grad_A and, when asked for, the low-rank input gradient sum_k drop_k(dz_k A_k) ([N, d]) and a
// second copy of it (`copy`: the is variant's dx, which the base GEMM then accumulates onto);
// what is not asked for is undefined. In one pass over x when the backend fuses them. The dropout
// masks are regenerated from the seed, never stored.
struct DownGrads {
  at::Tensor grad_A, grad_x, grad_x_copy;
};
template <class K>
DownGrads down_grads(const at::Tensor& dz, const at::Tensor& x2, const at::Tensor& xp2,
                     const at::Tensor& A, double dropout, const kernels::DropoutSeed& seed,
                     int64_t block_rank, bool compute_grad_x, bool copy) {
  DownGrads g;
  if (compute_grad_x && K::grad_A_up_dx(dz, x2, xp2, A, dropout, seed, block_rank, &g.grad_A,
                                        &g.grad_x, copy ? &g.grad_x_copy : nullptr))
    return g;
  const int64_t segments = A.size(0) / block_rank;
  if (!K::grad_A(dz, x2, xp2, A, dropout, seed, block_rank, &g.grad_A)) {
    if (dropout == 0.0) {
      g.grad_A = at::mm(dz.t(), xp2.defined() ? x2 + xp2 : x2);
    } else if (segments == 1) {
      g.grad_A = at::mm(dz.t(), dropped<K>(x2, xp2, dropout, seed, 0));
    } else {
      g.grad_A = at::empty_like(A, at::MemoryFormat::Contiguous);
      for (int64_t s = 0; s < segments; ++s) {
        g.grad_A.narrow(0, s * block_rank, block_rank)
            .copy_(at::mm(dz.narrow(1, s * block_rank, block_rank).t(),
                          dropped<K>(x2, xp2, dropout, seed, s)));
      }
    }
  }
  if (!compute_grad_x) return g;
  if (!K::up_dx(dz, A, dropout, seed, block_rank, &g.grad_x)) {
    if (dropout == 0.0) {
      g.grad_x = at::mm(dz, A);
    } else if (segments == 1) {
      const at::Tensor part = at::mm(dz, A);
      g.grad_x = at::empty_like(part);
      K::dropout_apply(part, nullptr, g.grad_x, false, dropout, seed, 0);
    } else {
      g.grad_x = at::zeros({dz.size(0), A.size(1)}, dz.options());
      for (int64_t s = 0; s < segments; ++s) {
        const at::Tensor part = at::mm(dz.narrow(1, s * block_rank, block_rank),
                                       A.narrow(0, s * block_rank, block_rank));
        K::dropout_apply(part, nullptr, g.grad_x, true, dropout, seed, s);
      }
    }
  }
  if (copy) g.grad_x_copy = g.grad_x.clone();
  return g;
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

// (grad_x, grad_z, grad_B) of lora_up from one read of grad_y: no backend-specific work.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_up_backward(
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

// The ops of one backend K, registered for its dispatch key by register_kernels (CPU, CUDA and
// Meta each call it once): the schema's arguments in, checks first, then the bodies above.
template <class K>
struct LoraOps {
  static at::Tensor down(const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
                         const at::Tensor& A, double dropout, const std::optional<at::Tensor>& seed,
                         int64_t seed_offset, int64_t block_rank) {
    check_down("lora_down", x, x_prev, A, dropout, block_rank);
    const auto s = seed_arg("lora_down", seed, seed_offset, x, dropout);
    const int64_t d_in = x.size(-1);
    const at::Tensor xp2 = x_prev.has_value() ? x_prev->reshape({-1, d_in}) : at::Tensor();
    return down_z<K>(x.reshape({-1, d_in}), xp2, A, dropout, s, block_rank)
        .view(with_last(x.sizes(), A.size(0)));
  }

  static std::tuple<at::Tensor, at::Tensor> down_backward(
      const at::Tensor& grad_z, const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
      const at::Tensor& A, double dropout, const std::optional<at::Tensor>& seed,
      int64_t seed_offset, int64_t block_rank, bool compute_grad_x) {
    const char* op = "_lora_down_backward";
    check_down(op, x, x_prev, A, dropout, block_rank);
    const auto s = seed_arg(op, seed, seed_offset, x, dropout);
    const int64_t d_in = x.size(-1), R = A.size(0);
    TORCH_CHECK(grad_z.sizes() == at::IntArrayRef(with_last(x.sizes(), R)), "reslora::", op,
                ": grad_z must have shape ", at::IntArrayRef(with_last(x.sizes(), R)), ", got ",
                grad_z.sizes());
    check_same(op, "grad_z", grad_z, x);
    const at::Tensor xp2 = x_prev.has_value() ? x_prev->reshape({-1, d_in}) : at::Tensor();
    DownGrads g = down_grads<K>(grad_z.reshape({-1, R}), x.reshape({-1, d_in}), xp2, A, dropout, s,
                                block_rank, compute_grad_x, /*copy=*/false);
    return {compute_grad_x ? g.grad_x.view(x.sizes()) : at::empty({0}, x.options()), g.grad_A};
  }

  static at::Tensor up(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& z,
                       const at::Tensor& B, double scaling) {
    check_up("lora_up", x, weight, bias, z, B, scaling);
    return up_y<K>(x.reshape({-1, x.size(-1)}), weight, bias, z.reshape({-1, B.size(1)}), B,
                   scaling)
        .view(with_last(x.sizes(), weight.size(0)));
  }

  // One ResLoRA block: z = drop(x [+ x_prev]) A^T; y = x W^T + b + s (z + z_shortcut) B^T, A and
  // B the block's own joined with the bs shortcut's (A_shortcut, B_shortcut). Returns (y, z); z
  // is the block's mid activation (its first block_rank columns its own), which ms chains pass on
  // as later blocks' z_shortcut.
  static std::tuple<at::Tensor, at::Tensor> linear(
      const at::Tensor& x, const std::optional<at::Tensor>& x_prev, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& A_own, const at::Tensor& B_own,
      const std::optional<at::Tensor>& z_shortcut, double scaling, double dropout,
      const std::optional<at::Tensor>& seed, int64_t seed_offset, int64_t block_rank,
      const std::optional<at::Tensor>& x_norms, const std::optional<at::Tensor>& z_norms,
      const std::optional<at::Tensor>& stats_count, std::optional<at::TensorList> A_shortcut,
      std::optional<at::TensorList> B_shortcut) {
    const char* op = "lora_linear";
    const auto [A, B] = joined_ranks(op, A_own, B_own, A_shortcut.value_or(at::TensorList()),
                                     B_shortcut.value_or(at::TensorList()), block_rank);
    check_x_width(op, x, weight);
    check_rank(op, A, B);
    check_down(op, x, x_prev, A, dropout, block_rank);
    const bool stats = check_stats_args(op, x_norms, z_norms, stats_count);
    const auto s = seed_arg(op, seed, seed_offset, x, dropout);
    const int64_t d_in = x.size(-1), R = A.size(0);
    const at::Tensor x2 = x.reshape({-1, d_in});
    const at::Tensor xp2 = x_prev.has_value() ? x_prev->reshape({-1, d_in}) : at::Tensor();
    const at::Tensor z =
        down_z<K>(x2, xp2, A, dropout, s, block_rank).view(with_last(x.sizes(), R));
    if (z_shortcut.has_value()) {
      TORCH_CHECK(z_shortcut->sizes() == z.sizes(), "reslora::", op,
                  ": z_shortcut must have shape ", z.sizes(), ", got ", z_shortcut->sizes());
      check_same(op, "z_shortcut", *z_shortcut, x);
    }
    const at::Tensor zt = z_shortcut.has_value() ? z + *z_shortcut : z;
    check_up(op, x, weight, bias, zt, B, scaling);
    const at::Tensor y = up_y<K>(x2, weight, bias, zt.reshape({-1, R}), B, scaling);
    if (stats) {
      // Through the dispatcher: the backend's record_stats_ (one fused pass on CUDA).
      at::Tensor xn = *x_norms, zn = *z_norms, count = *stats_count;
      record_stats_(xn, zn, count, x, R == block_rank ? z : z.narrow(-1, 0, block_rank));
    }
    return {y.view(with_last(x.sizes(), weight.size(0))), z};
  }

  // (grad_x, grad_x_prev, grad_A, grad_B, grad_z_shortcut) of lora_linear. The low-rank part of
  // dx is computed first (one pass that writes it, masks regenerated) and the base GEMM dx += dy W
  // accumulates onto it (beta = 1), so no full-size temporary is summed afterwards. Tensors not
  // asked for come back empty.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward(
      const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_z, const at::Tensor& x,
      const std::optional<at::Tensor>& x_prev, const at::Tensor& weight, const at::Tensor& A,
      const at::Tensor& B, const at::Tensor& z, const std::optional<at::Tensor>& z_shortcut,
      double scaling, double dropout, const std::optional<at::Tensor>& seed, int64_t seed_offset,
      int64_t block_rank, bool compute_grad_x) {
    const char* op = "_lora_linear_backward";
    check_x_width(op, x, weight);
    check_rank(op, A, B);
    check_down(op, x, x_prev, A, dropout, block_rank);
    check_up(op, x, weight, std::nullopt, z, B, scaling);
    const auto seed_value = seed_arg(op, seed, seed_offset, x, dropout);
    if (grad_z.has_value() && grad_z->defined()) {
      TORCH_CHECK(grad_z->sizes() == z.sizes(), "reslora::", op,
                  ": grad_z must have the shape of z ", z.sizes(), ", got ", grad_z->sizes());
      check_same(op, "grad_z", *grad_z, x);
    }
    const int64_t d_in = x.size(-1), d_out = weight.size(0), R = A.size(0);
    TORCH_CHECK(grad_y.sizes() == at::IntArrayRef(with_last(x.sizes(), d_out)), "reslora::", op,
                ": grad_y must have shape ", at::IntArrayRef(with_last(x.sizes(), d_out)), ", got ",
                grad_y.sizes());
    check_same(op, "grad_y", grad_y, x);
    const at::Tensor g = grad_y.reshape({-1, d_out});
    const at::Tensor x2 = x.reshape({-1, d_in});
    const at::Tensor xp2 = x_prev.has_value() ? x_prev->reshape({-1, d_in}) : at::Tensor();
    const at::Tensor z2 = z.reshape({-1, R});
    const at::Tensor zt2 = z_shortcut.has_value() ? z2 + z_shortcut->reshape({-1, R}) : z2;
    at::Tensor dzt = scaled_mm(g, B, scaling);  // gradient of z + z_shortcut
    at::Tensor grad_B = scaled_mm(g.t(), zt2, scaling);
    // z_shortcut gets the gradient of the sum; z also gets grad_z from its own downstream use
    // (ms). With z_shortcut the sum dz is a new tensor, so grad_z_shortcut is never modified.
    at::Tensor grad_zs = z_shortcut.has_value() ? dzt.view(z.sizes()) : at::empty({0}, x.options());
    at::Tensor dz = dzt;
    if (grad_z.has_value() && grad_z->defined()) {
      const at::Tensor gz = grad_z->reshape({-1, R});
      dz = z_shortcut.has_value() ? dzt + gz : dzt.add_(gz);
    }
    // is: x_prev gets the low-rank part alone and x that plus dy W; the low-rank pass writes the
    // part twice (to x_prev's gradient and to dx), which costs less than the copy of C that an
    // out-of-place GEMM onto it makes. Without dropout dx = dy W + dz A is one GEMM where the
    // backend has it (the low-rank product inside its K loop), and only x_prev's gradient (is) is
    // written by the low-rank pass.
    at::Tensor dx_fused;
    const bool fused_dx =
        compute_grad_x && dropout == 0.0 && K::grad_x(g, weight, dz, A, &dx_fused);
    DownGrads low = down_grads<K>(dz, x2, xp2, A, dropout, seed_value, block_rank,
                                  compute_grad_x && (!fused_dx || xp2.defined()),
                                  /*copy=*/compute_grad_x && !fused_dx && xp2.defined());
    at::Tensor dx, dxp;
    if (fused_dx) {
      dx = dx_fused;
      if (xp2.defined()) dxp = low.grad_x;
    } else if (compute_grad_x) {
      dx = xp2.defined() ? low.grad_x_copy : low.grad_x;
      dx.addmm_(g, weight);
      if (xp2.defined()) dxp = low.grad_x;
    }
    const auto empty = [&] { return at::empty({0}, x.options()); };  // outputs must not alias
    return {compute_grad_x ? dx.view(x.sizes()) : empty(),
            compute_grad_x && xp2.defined() ? dxp.view(x.sizes()) : empty(), low.grad_A, grad_B,
            grad_zs};
  }

  static void register_kernels(torch::Library& m) {
    m.impl("lora_down", &down);
    m.impl("_lora_down_backward", &down_backward);
    m.impl("lora_up", &up);
    m.impl("_lora_up_backward", &lora_up_backward);
    m.impl("lora_linear", &linear);
    m.impl("_lora_linear_backward", &linear_backward);
  }
};

}  // namespace detail
}  // namespace reslora
