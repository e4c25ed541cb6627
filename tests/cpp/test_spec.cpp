// The spec's exact test cases (section 5) through the C++ modules: forwards, gradients, merges.
// The cases live in tests/data/spec_cases.txt, which the Python tests read too.
#include <cmath>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "reslora/modules.h"

using reslora::ResLoRAChain;
using reslora::ResLoRALinear;
using reslora::ResLoRAOptions;

namespace {

// case -> field -> values (as written)
using Cases = std::map<std::string, std::map<std::string, std::vector<std::string>>>;

const Cases& cases() {
  static const Cases all = [] {
    Cases out;
    std::ifstream in(RESLORA_SPEC_CASES);
    EXPECT_TRUE(in.good()) << "cannot read " << RESLORA_SPEC_CASES;
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty() || line[0] == '#') continue;
      std::istringstream ls(line);
      std::string name, field, v;
      ls >> name >> field;
      auto& values = out[name][field];
      while (ls >> v) values.push_back(v);
    }
    return out;
  }();
  return all;
}

std::vector<std::string> case_names(const std::string& prefix, const std::string& with_field) {
  std::vector<std::string> out;
  for (const auto& [name, fields] : cases())
    if (name.rfind(prefix, 0) == 0 && fields.count(with_field)) out.push_back(name);
  return out;
}

bool has(const std::string& c, const std::string& f) { return cases().at(c).count(f) > 0; }
const std::vector<std::string>& words(const std::string& c, const std::string& f) {
  return cases().at(c).at(f);
}
std::vector<double> numbers(const std::string& c, const std::string& f) {
  std::vector<double> out;
  for (const auto& w : words(c, f)) out.push_back(std::stod(w));
  return out;
}
// Values of a field as `blocks` tensors of shape `shape` each.
std::vector<torch::Tensor> per_block(const std::string& c, const std::string& f,
                                     std::vector<int64_t> shape, int blocks = 3) {
  const auto v = numbers(c, f);
  const auto all = torch::tensor(v, torch::kFloat64);
  std::vector<torch::Tensor> out;
  const int64_t each = static_cast<int64_t>(v.size()) / blocks;
  for (int n = 0; n < blocks; ++n) out.push_back(all.narrow(0, n * each, each).view(shape));
  return out;
}

void expect_close(const torch::Tensor& got, const torch::Tensor& want, double tol) {
  ASSERT_EQ(got.sizes(), want.sizes());
  EXPECT_TRUE(torch::allclose(got.to(torch::kFloat64), want, 0, tol)) << "got\n"
                                                                      << got << "\nwant\n"
                                                                      << want;
}

ResLoRAChain make_chain(const std::string& c) {
  const auto variant = reslora::parse_variant(words(c, "variant")[0]);
  const int64_t pre_num = std::stoll(words(c, "pre_num")[0]);
  const auto A = per_block("setup", "A", {1, 2});
  const auto B = per_block("setup", "B", {2, 1});
  ResLoRAChain chain("spec");
  for (int i = 0; i < 3; ++i) {
    ResLoRALinear blk(torch::eye(2, torch::kFloat64), torch::Tensor(),
                      ResLoRAOptions(1).variant(variant).lora_alpha(2).pre_num(pre_num));
    torch::NoGradGuard g;
    blk->lora_A.copy_(A[i]);
    blk->lora_B.copy_(B[i]);
    chain->push_back(blk);
  }
  return chain;
}

std::vector<torch::Tensor> inputs(const std::string& field) {
  return per_block("setup", field, {2});
}

class SpecForward : public ::testing::TestWithParam<std::string> {};

TEST_P(SpecForward, OutputsAndGradients) {
  const std::string& c = GetParam();
  auto chain = make_chain(c);
  std::vector<torch::Tensor> xs;
  for (const auto& x : inputs("x")) xs.push_back(x.clone().requires_grad_());
  const auto hs = chain->forward(xs);
  (hs[0].sum() + hs[1].sum() + hs[2].sum()).backward();
  const auto h = per_block(c, "h", {2}), dA = per_block(c, "dA", {1, 2});
  const auto dB = per_block(c, "dB", {2, 1}), dx = per_block(c, "dx", {2});
  for (int n = 0; n < 3; ++n) {
    expect_close(hs[n], h[n], 1e-9);
    expect_close(chain[n]->lora_A.grad(), dA[n], 1e-9);
    expect_close(chain[n]->lora_B.grad(), dB[n], 1e-9);
    expect_close(xs[n].grad(), dx[n], 1e-9);
  }
}

INSTANTIATE_TEST_SUITE_P(Spec, SpecForward, ::testing::ValuesIn(case_names("", "dx")),
                         [](const auto& info) { return info.param; });

void set_window(const ResLoRALinear& blk, const std::vector<double>& v, bool z) {
  torch::NoGradGuard g;
  auto& ring = z ? blk->z_norms : blk->x_norms;
  ring.zero_();
  ring.narrow(0, 0, static_cast<int64_t>(v.size())).copy_(torch::tensor(v, torch::kFloat32));
  blk->stats_count.fill_(static_cast<int64_t>(v.size()));
}

std::vector<torch::Tensor> eval_outputs(ResLoRAChain& chain, const std::vector<torch::Tensor>& xs) {
  chain->eval();
  torch::NoGradGuard g;
  return chain->forward(xs);
}

class SpecMerge : public ::testing::TestWithParam<std::string> {};

TEST_P(SpecMerge, MergedChain) {
  const std::string& c = GetParam();
  const double tol = has(c, "tol") ? numbers(c, "tol")[0] : 1e-9;
  auto chain = make_chain(c);
  for (int n = 0; n < 3; ++n) {
    for (const char* kind : {"x", "z"}) {
      const std::string f = std::string(kind) + "_window_" + std::to_string(n);
      if (has(c, f)) set_window(chain[n], numbers(c, f), kind[0] == 'z');
    }
  }
  const auto xs = inputs(has(c, "train") ? words(c, "train")[0] : "x");
  std::vector<torch::Tensor> train;
  if (has(c, "train")) {
    for (const auto& h : chain->forward(xs)) train.push_back(h.detach());  // fills the windows
    if (has(c, "h_train")) {
      const auto want = per_block(c, "h_train", {2});
      for (int n = 0; n < 3; ++n) expect_close(train[n], want[n], tol);
    }
  }
  std::vector<torch::Tensor> B0;
  for (int n = 0; n < 3; ++n) B0.push_back(chain[n]->lora_B.detach().clone());
  chain->merge_to_lora(reslora::parse_merge(words(c, "merge")[0]));
  for (int n = 0; n < 3; ++n) EXPECT_EQ(chain[n]->options().variant(), reslora::Variant::kLoRA);
  const auto W = chain->merged_weights();
  if (has(c, "W")) {
    const auto want = per_block(c, "W", {2, 2});
    for (int n = 0; n < 3; ++n) expect_close(W[n], want[n], tol);
  }
  if (has(c, "W2")) expect_close(W[2], per_block(c, "W2", {2, 2}, 1)[0], tol);
  if (has(c, "A1")) expect_close(chain[1]->lora_A, per_block(c, "A1", {1, 2}, 1)[0], tol);
  if (has(c, "A2")) expect_close(chain[2]->lora_A, per_block(c, "A2", {1, 2}, 1)[0], tol);
  if (has(c, "alpha")) {
    const auto alpha = numbers(c, "alpha");
    for (int n = 0; n < 3; ++n) expect_close(chain[n]->lora_B, (1 + alpha[n]) * B0[n], tol);
  }
  if (has(c, "rank2")) EXPECT_EQ(chain[2]->lora_A.size(0), std::stoll(words(c, "rank2")[0]));
  const auto h = eval_outputs(chain, xs);
  if (has(c, "h")) {
    const auto want = per_block(c, "h", {2});
    for (int n = 0; n < 3; ++n) expect_close(h[n], want[n], tol);
  }
  if (has(c, "h2")) expect_close(h[2], per_block(c, "h2", {2}, 1)[0], tol);
  if (has(c, "exact"))
    for (int n = 0; n < 3; ++n) expect_close(h[n], train[n], tol);
  if (has(c, "error")) {
    double err = 0;
    for (int n = 0; n < 3; ++n) err = std::max(err, (h[n] - train[n]).abs().max().item<double>());
    EXPECT_GT(err, 1e-3);
  }
}

INSTANTIATE_TEST_SUITE_P(Spec, SpecMerge, ::testing::ValuesIn(case_names("merge_", "merge")),
                         [](const auto& info) { return info.param; });

TEST(SpecData, HasEveryCase) {
  EXPECT_EQ(case_names("", "dx").size(), 6u);
  EXPECT_EQ(case_names("merge_", "merge").size(), 14u);
}

}  // namespace
