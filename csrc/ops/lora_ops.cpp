// Schemas of the reslora ops and their C++ entry points (through the dispatcher).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

#include <ATen/ATen.h>

#include "reslora/ops.h"
#include "reslora/rules.h"

namespace reslora {

TORCH_LIBRARY(reslora, m) {
  // The ops pass torch.library.opcheck (schema, fake / Meta kernels, autograd registration, AOT
  // dispatch): they carry pt2_compliant_tag, so torch.compile and torch.export trust them.
  const std::vector<at::Tag> pt2{at::Tag::pt2_compliant_tag};
  // Arguments named by role: x the block's input [..., d_in]; x_prev the previous block's input
  // (the is shortcut, summed with x before dropout); A [R, d_in] and B [d_out, R]; z_shortcut
  // [..., R] the earlier blocks' mid activations (the ms shortcut, added to z); block_rank the rank
  // of one block: A's R rows are R / block_rank blocks' A concatenated (the bs shortcut), each
  // with a dropout mask of its own; seed the pass's dropout seed (draw_seed) and seed_offset the
  // block's stream of it (its position in the chain).
  //
  // z = drop(x [+ x_prev]) A^T, [..., R] in x's dtype (float32 accumulation for float16 /
  // bfloat16); the masks are regenerated in backward from (seed, seed_offset, block, element).
  m.def(
      "lora_down(Tensor x, Tensor? x_prev, Tensor A, float dropout, Tensor? seed, int seed_offset, "
      "int block_rank) -> Tensor",
      pt2);
  // y = x W^T + bias + scaling * z B^T. weight [d_out, d_in] and bias [d_out] are frozen (no
  // gradient); z: [..., R]; returns [..., d_out].
  m.def(
      "lora_up(Tensor x, Tensor weight, Tensor? bias, Tensor z, Tensor B, float scaling) -> Tensor",
      pt2);
  // (grad_x, grad_A) of lora_down; grad_x is also x_prev's gradient, empty unless compute_grad_x.
  // Not differentiable again (double backward is refused).
  m.def(
      "_lora_down_backward(Tensor grad_z, Tensor x, Tensor? x_prev, Tensor A, float dropout, "
      "Tensor? seed, int seed_offset, int block_rank, bool compute_grad_x) -> (Tensor, Tensor)",
      pt2);
  // (grad_x, grad_z, grad_B) of lora_up from one read of grad_y; grad_x empty unless asked.
  // Not differentiable again.
  m.def(
      "_lora_up_backward(Tensor grad_y, Tensor weight, Tensor z, Tensor B, float scaling, "
      "bool compute_grad_x) -> (Tensor, Tensor, Tensor)",
      pt2);
  // One ResLoRA block under one autograd node (what the layers call for every variant):
  // z = drop(x [+ x_prev]) A^T, y = x W^T + bias + scaling (z + z_shortcut) B^T. Returns (y, z).
  // With x_norms, z_norms and stats_count (all three or none) it also records the norm
  // statistics of x and of the block's own z (its first block_rank columns) as record_stats_
  // does, so an is / ms block in training is one op. A_shortcut / B_shortcut: the bs shortcut's
  // earlier blocks' A [block_rank, d_in] and B [d_out, block_rank], nearest first, joined to A
  // and B as further segments (gradients reach each of them).
  m.def(
      "lora_linear(Tensor x, Tensor? x_prev, Tensor weight, Tensor? bias, Tensor A, Tensor B, "
      "Tensor? z_shortcut, float scaling, float dropout, Tensor? seed, int seed_offset, "
      "int block_rank, Tensor(a!)? x_norms=None, Tensor(b!)? z_norms=None, "
      "Tensor(c!)? stats_count=None, Tensor[]? A_shortcut=None, Tensor[]? B_shortcut=None) -> "
      "(Tensor, Tensor)",
      pt2);
  // (grad_x, grad_x_prev, grad_A, grad_B, grad_z_shortcut) of lora_linear; grad_z: the gradient
  // that reached the returned z (from later ms blocks) or none. Unrequested results are empty.
  // Not differentiable again.
  m.def(
      "_lora_linear_backward(Tensor grad_y, Tensor? grad_z, Tensor x, Tensor? x_prev, "
      "Tensor weight, Tensor A, Tensor B, Tensor z, Tensor? z_shortcut, float scaling, "
      "float dropout, Tensor? seed, int seed_offset, int block_rank, bool compute_grad_x) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)",
      pt2);
  // Writes ||x||_F, ||z||_F into slot count % len of the float32 rings; count += 1. On device.
  m.def(
      "record_stats_(Tensor(a!) x_norms, Tensor(b!) z_norms, Tensor(c!) count, Tensor x, "
      "Tensor z) -> ()",
      pt2);
  // Mean of the filled slots of a ring written by record_stats_ (0 when none), float32 0-d.
  m.def("stats_mean(Tensor ring, Tensor count) -> Tensor", pt2);
  // The dropout seed of a pass: int64 [1] on like's device, drawn from that device's default
  // generator (no host synchronisation; a fresh value on every CUDA-graph replay).
  m.def("draw_seed(Tensor like) -> Tensor", pt2);
}

namespace {
// Seeds below 2^62, as the kernels' 64-bit mixers expect any value.
constexpr int64_t kSeedBound = int64_t(1) << 62;

// Composite: traced, it is aten::randint, which compilers treat as the random op it is (never
// merged with another draw, kept out of recomputation, on the device's generator).
at::Tensor draw_seed_impl(const at::Tensor& like) {
  return at::randint(0, kSeedBound, {1}, like.options().dtype(at::kLong));
}
}  // namespace

TORCH_LIBRARY_IMPL(reslora, CompositeImplicitAutograd, m) { m.impl("draw_seed", &draw_seed_impl); }

namespace {
template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
}  // namespace

at::Tensor lora_down(const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
                     const at::Tensor& A, double dropout, const std::optional<at::Tensor>& seed,
                     int64_t seed_offset, int64_t block_rank) {
  static auto op = handle<decltype(lora_down)>("reslora::lora_down");
  return op.call(x, x_prev, A, dropout, seed, seed_offset, block_rank);
}

at::Tensor lora_up(const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const at::Tensor& z, const at::Tensor& B,
                   double scaling) {
  static auto op = handle<decltype(lora_up)>("reslora::lora_up");
  return op.call(x, weight, bias, z, B, scaling);
}

std::tuple<at::Tensor, at::Tensor> lora_down_backward(const at::Tensor& grad_z, const at::Tensor& x,
                                                      const std::optional<at::Tensor>& x_prev,
                                                      const at::Tensor& A, double dropout,
                                                      const std::optional<at::Tensor>& seed,
                                                      int64_t seed_offset, int64_t block_rank,
                                                      bool compute_grad_x) {
  static auto op = handle<decltype(lora_down_backward)>("reslora::_lora_down_backward");
  return op.call(grad_z, x, x_prev, A, dropout, seed, seed_offset, block_rank, compute_grad_x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_up_backward(const at::Tensor& grad_y,
                                                                const at::Tensor& weight,
                                                                const at::Tensor& z,
                                                                const at::Tensor& B, double scaling,
                                                                bool compute_grad_x) {
  static auto op = handle<decltype(lora_up_backward)>("reslora::_lora_up_backward");
  return op.call(grad_y, weight, z, B, scaling, compute_grad_x);
}

std::tuple<at::Tensor, at::Tensor> lora_linear(
    const at::Tensor& x, const std::optional<at::Tensor>& x_prev, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
    const std::optional<at::Tensor>& z_shortcut, double scaling, double dropout,
    const std::optional<at::Tensor>& seed, int64_t seed_offset, int64_t block_rank,
    const std::optional<at::Tensor>& x_norms, const std::optional<at::Tensor>& z_norms,
    const std::optional<at::Tensor>& stats_count, std::optional<at::TensorList> A_shortcut,
    std::optional<at::TensorList> B_shortcut) {
  static auto op = handle<decltype(lora_linear)>("reslora::lora_linear");
  return op.call(x, x_prev, weight, bias, A, B, z_shortcut, scaling, dropout, seed, seed_offset,
                 block_rank, x_norms, z_norms, stats_count, A_shortcut, B_shortcut);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_z, const at::Tensor& x,
    const std::optional<at::Tensor>& x_prev, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& z, const std::optional<at::Tensor>& z_shortcut,
    double scaling, double dropout, const std::optional<at::Tensor>& seed, int64_t seed_offset,
    int64_t block_rank, bool compute_grad_x) {
  static auto op = handle<decltype(lora_linear_backward)>("reslora::_lora_linear_backward");
  return op.call(grad_y, grad_z, x, x_prev, weight, A, B, z, z_shortcut, scaling, dropout, seed,
                 seed_offset, block_rank, compute_grad_x);
}

void record_stats_(at::Tensor& x_norms, at::Tensor& z_norms, at::Tensor& count, const at::Tensor& x,
                   const at::Tensor& z) {
  static auto op =
      handle<void(at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "reslora::record_stats_");
  op.call(x_norms, z_norms, count, x, z);
}

at::Tensor stats_mean(const at::Tensor& ring, const at::Tensor& count) {
  static auto op = handle<decltype(stats_mean)>("reslora::stats_mean");
  return op.call(ring, count);
}

}  // namespace reslora
