// C++ entry points of the reslora custom ops. Each one calls through the dispatcher, so autograd,
// the CPU / CUDA / Meta kernels and torch.compile all see the same op (torch.ops.reslora.*).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace reslora {

// z = drop(x [+ x_prev]) A^T: the rank-R down-projection with the input shortcut folded in.
// x: [..., d_in]; x_prev: same as x or none; A: [R, d_in] with R a multiple of block_rank.
// Each segment of block_rank rows of A gets its own dropout mask (block-shortcut terms), drawn
// from (seed, segment, element index), so backward regenerates it. Returns [..., R].
at::Tensor lora_down(const at::Tensor& x, const std::optional<at::Tensor>& x_prev,
                     const at::Tensor& A, double dropout, const std::optional<at::Tensor>& seed,
                     int64_t seed_offset, int64_t block_rank);

// y = x W^T + bias + scaling * z B^T. W: [d_out, d_in] frozen; bias: [d_out] frozen or none;
// z: [..., R]; B: [d_out, R]. Returns [..., d_out].
at::Tensor lora_up(const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const at::Tensor& z, const at::Tensor& B,
                   double scaling);

// Backward of lora_down: (grad_x, grad_A). grad_x (also the gradient of x_prev) is an empty
// tensor when compute_grad_x is false.
std::tuple<at::Tensor, at::Tensor> lora_down_backward(const at::Tensor& grad_z, const at::Tensor& x,
                                                      const std::optional<at::Tensor>& x_prev,
                                                      const at::Tensor& A, double dropout,
                                                      const std::optional<at::Tensor>& seed,
                                                      int64_t seed_offset, int64_t block_rank,
                                                      bool compute_grad_x);

// Backward of lora_up: (grad_x, grad_z, grad_B), reading grad_y once for all three.
// grad_x is an empty tensor when compute_grad_x is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_up_backward(const at::Tensor& grad_y,
                                                                const at::Tensor& weight,
                                                                const at::Tensor& z,
                                                                const at::Tensor& B, double scaling,
                                                                bool compute_grad_x);

// One ResLoRA block under a single autograd node: z = drop(x [+ x_prev]) A^T and
// y = x W^T + bias + scaling (z + z_shortcut) B^T. Returns (y, z). z_shortcut ([..., R] or none) is
// the ms shortcut (the sum of earlier blocks' z); gradients reach x, x_prev, A, B and z_shortcut.
// Given x_norms, z_norms and stats_count (all three or none), it also records the norms of x
// and of the block's own z (its first block_rank columns) into them, as record_stats_ does.
// A_shortcut / B_shortcut (the bs shortcut): the earlier blocks' A [block_rank, d_in] and B
// [d_out, block_rank], nearest first, joined to A and B as further dropout segments.
std::tuple<at::Tensor, at::Tensor> lora_linear(
    const at::Tensor& x, const std::optional<at::Tensor>& x_prev, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
    const std::optional<at::Tensor>& z_shortcut, double scaling, double dropout,
    const std::optional<at::Tensor>& seed, int64_t seed_offset, int64_t block_rank,
    const std::optional<at::Tensor>& x_norms = std::nullopt,
    const std::optional<at::Tensor>& z_norms = std::nullopt,
    const std::optional<at::Tensor>& stats_count = std::nullopt,
    std::optional<at::TensorList> A_shortcut = std::nullopt,
    std::optional<at::TensorList> B_shortcut = std::nullopt);

// Backward of lora_linear: (grad_x, grad_x_prev, grad_A, grad_B, grad_z_shortcut).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_z, const at::Tensor& x,
    const std::optional<at::Tensor>& x_prev, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& z, const std::optional<at::Tensor>& z_shortcut,
    double scaling, double dropout, const std::optional<at::Tensor>& seed, int64_t seed_offset,
    int64_t block_rank, bool compute_grad_x);

// Records ||x||_F and ||z||_F (float32) into slot count % window of the ring buffers and
// increments count, all on the tensors' device: no host synchronisation.
void record_stats_(at::Tensor& x_norms, at::Tensor& z_norms, at::Tensor& count, const at::Tensor& x,
                   const at::Tensor& z);

// Mean of the filled part of a ring buffer (0 when empty), as a 0-d float32 tensor.
at::Tensor stats_mean(const at::Tensor& ring, const at::Tensor& count);

}  // namespace reslora
