// C++ torch::nn::Modules for LibTorch users: a ResLoRA linear block and a chain that links
// blocks of one projection type in layer order.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "reslora/merge.h"
#include "reslora/rules.h"

namespace reslora {

struct ChainState;

// One adapted linear layer: y = x W^T + b + s * (shortcut-augmented LoRA term).
// Buffers: weight [d_out, d_in], bias [d_out] (if any), x_norms / z_norms [stats_window],
// stats_count [1]. Parameters: lora_A [r, d_in], lora_B [d_out, r].
class ResLoRALinearImpl : public torch::nn::Module {
 public:
  ResLoRALinearImpl(const torch::Tensor& weight, const torch::Tensor& bias, ResLoRAOptions options);

  torch::Tensor forward(const torch::Tensor& x);

  const ResLoRAOptions& options() const { return options_; }
  double scaling() const { return options_.lora_alpha() / static_cast<double>(options_.r()); }
  int64_t in_features() const { return weight.size(1); }
  int64_t out_features() const { return weight.size(0); }
  // Position in its chain (0 when unlinked).
  int64_t position() const { return position_; }
  // Mean ||x||_F and ||z||_F over the statistics window (0-d float32 tensors, on the device).
  torch::Tensor x_norm_mean() const;
  torch::Tensor z_norm_mean() const;
  // Replaces A and B by a plain LoRA pair (rank may change) and turns the block into plain LoRA.
  void load_lora(const torch::Tensor& A, const torch::Tensor& B);

  torch::Tensor weight, bias, lora_A, lora_B, x_norms, z_norms, stats_count;

 private:
  friend class ResLoRAChainImpl;
  ResLoRAOptions options_;
  std::weak_ptr<ChainState> state_;  // non-owning link to the chain (its blocks and current pass)
  int64_t position_ = 0;
};
TORCH_MODULE(ResLoRALinear);

// Links blocks in order. The chain owns its blocks; blocks hold only a weak reference to the
// chain's links. What a pass produces (inputs, mid activations, the dropout seed) belongs to that
// pass: the head (block 0) starts a new one, the last block releases it, and a block never reads
// another pass's tensors.
class ResLoRAChainImpl : public torch::nn::Module {
 public:
  explicit ResLoRAChainImpl(std::string name = "chain");

  // Appends a block; for is / bs / ms its shapes and options must equal the head's.
  void push_back(const ResLoRALinear& block);
  size_t size() const { return blocks_.size(); }
  ResLoRALinear operator[](size_t i) const { return blocks_.at(i); }

  // Runs block `index` on x within the current pass.
  torch::Tensor forward(int64_t index, const torch::Tensor& x);
  // Runs every block in order on its own input, as one pass.
  std::vector<torch::Tensor> forward(const std::vector<torch::Tensor>& xs);
  // Ends the current pass, releasing what it holds.
  void reset();

  // Adds the per-block inputs xs of one pass (eval mode: no dropout) to the fit merge's
  // calibration sums (is, ms): xx_n += x_n^T x_n and zx_n += p_n^T x_n over the tokens, p_n
  // being the shortcut's rank-r term. Accumulated in float32; reset by merge_to_lora.
  void calibrate(const std::vector<torch::Tensor>& xs);

  // The plain LoRA pairs of the spec's merge; `merge` defaults to the variant's first. fit uses
  // the sums of calibrate() and the relative ridge.
  std::vector<LoRAPair> merged_lora(MergeKind merge, double ridge = kDefaultRidge) const;
  std::vector<LoRAPair> merged_lora() const;
  // Applies merged_lora in place: every block becomes a plain LoRA block.
  void merge_to_lora(MergeKind merge, double ridge = kDefaultRidge);
  void merge_to_lora();
  // W + s B' A' per block for the pairs of merged_lora() (the variant's default merge): the
  // dense weights of the merged chain.
  std::vector<torch::Tensor> merged_weights() const;

 private:
  std::string name_;
  std::shared_ptr<ChainState> state_;
  std::vector<ResLoRALinear> blocks_;
  std::vector<torch::Tensor> fit_xx_, fit_zx_;  // calibrate()'s sums, per block
  int64_t fit_tokens_ = 0;
  bool merged_ = false;  // merge_to_lora() ran: the blocks are plain LoRA
};
TORCH_MODULE(ResLoRAChain);

}  // namespace reslora
