// The spec's exact test cases (section 5) through the C++ modules: forwards, gradients, merges.
#include <cmath>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "reslora/modules.h"

using reslora::MergeKind;
using reslora::ResLoRAChain;
using reslora::ResLoRALinear;
using reslora::ResLoRAOptions;
using reslora::Variant;

namespace {

using Rows = std::vector<std::vector<double>>;

torch::Tensor T(const Rows& rows) {
  std::vector<double> flat;
  for (const auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
  return torch::tensor(flat, torch::kFloat64).view({static_cast<int64_t>(rows.size()), -1});
}
torch::Tensor V(const std::vector<double>& v) { return torch::tensor(v, torch::kFloat64); }

void expect_close(const torch::Tensor& got, const torch::Tensor& want, double tol = 1e-9) {
  ASSERT_EQ(got.sizes(), want.sizes());
  EXPECT_TRUE(torch::allclose(got.to(torch::kFloat64), want, 0, tol))
      << "got\n" << got << "\nwant\n" << want;
}

const Rows kA[3] = {{{1, 0}}, {{0, 1}}, {{1, 1}}};
const Rows kB[3] = {{{1}, {1}}, {{2}, {0}}, {{0}, {1}}};
const std::vector<std::vector<double>> kX = {{1, 2}, {3, -1}, {1, 2}};

ResLoRAChain make_chain(Variant v, int64_t pre_num) {
  ResLoRAChain chain("spec");
  for (int i = 0; i < 3; ++i) {
    ResLoRALinear blk(torch::eye(2, torch::kFloat64), torch::Tensor(),
                      ResLoRAOptions(1).variant(v).lora_alpha(2).pre_num(pre_num));
    torch::NoGradGuard g;
    blk->lora_A.copy_(T(kA[i]));
    blk->lora_B.copy_(T(kB[i]));
    chain->push_back(blk);
  }
  return chain;
}

void set_window(const ResLoRALinear& blk, const std::vector<double>& v, bool z) {
  torch::NoGradGuard g;
  auto& ring = z ? blk->z_norms : blk->x_norms;
  ring.zero_();
  ring.narrow(0, 0, v.size()).copy_(torch::tensor(v, torch::kFloat32));
  blk->stats_count.fill_(static_cast<int64_t>(v.size()));
}

std::vector<torch::Tensor> eval_outputs(ResLoRAChain& chain, const std::vector<std::vector<double>>& xs) {
  chain->eval();
  torch::NoGradGuard g;
  std::vector<torch::Tensor> in;
  for (const auto& x : xs) in.push_back(V(x));
  return chain->forward(in);
}

struct Case {
  const char* name;
  Variant variant;
  int64_t pre_num;
  Rows h, dA, dB, dx;
};

class SpecForward : public ::testing::TestWithParam<Case> {};

TEST_P(SpecForward, OutputsAndGradients) {
  const Case& c = GetParam();
  auto chain = make_chain(c.variant, c.pre_num);
  std::vector<torch::Tensor> xs;
  for (const auto& x : kX) xs.push_back(V(x).requires_grad_());
  const auto hs = chain->forward(xs);
  (hs[0].sum() + hs[1].sum() + hs[2].sum()).backward();
  for (int n = 0; n < 3; ++n) {
    expect_close(hs[n], V(c.h[n]));
    expect_close(chain[n]->lora_A.grad(), V(c.dA[n]).view({1, 2}));
    expect_close(chain[n]->lora_B.grad(), V(c.dB[n]).view({2, 1}));
    expect_close(xs[n].grad(), V(c.dx[n]));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Spec, SpecForward,
    ::testing::Values(
        Case{"lora", Variant::kLoRA, 1, {{3, 4}, {-1, -1}, {1, 8}}, {{4, 8}, {12, -4}, {2, 4}},
             {{2, 2}, {-2, -2}, {6, 6}}, {{5, 1}, {1, 5}, {3, 3}}},
        Case{"is", Variant::kIS, 1, {{5, 6}, {7, -1}, {1, 12}}, {{8, 16}, {16, 4}, {8, 2}},
             {{4, 4}, {2, 2}, {10, 10}}, {{9, 5}, {3, 7}, {3, 3}}},
        Case{"bs_pre1", Variant::kBS, 1, {{3, 4}, {5, 5}, {9, 8}}, {{16, 4}, {16, 4}, {2, 4}},
             {{8, 8}, {2, 2}, {6, 6}}, {{5, 1}, {5, 5}, {3, 7}}},
        Case{"bs_all", Variant::kBS, -1, {{3, 4}, {5, 5}, {11, 10}}, {{20, 12}, {16, 4}, {2, 4}},
             {{10, 10}, {2, 2}, {6, 6}}, {{5, 1}, {5, 5}, {7, 7}}},
        Case{"ms_pre1", Variant::kMS, 1, {{3, 4}, {3, -1}, {1, 6}}, {{8, 16}, {18, -6}, {2, 4}},
             {{2, 2}, {0, 0}, {4, 4}}, {{9, 1}, {1, 7}, {3, 3}}},
        Case{"ms_all", Variant::kMS, -1, {{3, 4}, {3, -1}, {1, 8}}, {{10, 20}, {18, -6}, {2, 4}},
             {{2, 2}, {0, 0}, {6, 6}}, {{11, 1}, {1, 7}, {3, 3}}}),
    [](const ::testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

TEST(SpecMerge, IsInput) {
  auto chain = make_chain(Variant::kIS, 1);
  set_window(chain[0], {2, 4}, false);
  set_window(chain[1], {6}, false);
  set_window(chain[2], {1.5, 1.5}, false);
  const auto w = chain->merged_lora(MergeKind::kInput);
  chain->merge_to_lora(MergeKind::kInput);
  const auto W = chain->merged_weights();
  expect_close(W[0], T({{5, 0}, {4, 1}}));
  expect_close(W[1], T({{1, 6}, {0, 1}}));
  expect_close(W[2], T({{1, 0}, {10, 11}}));
  const auto h = eval_outputs(chain, kX);
  expect_close(h[0], V({5, 6}));
  expect_close(h[1], V({-3, -1}));
  expect_close(h[2], V({1, 32}));
  EXPECT_EQ(chain[1]->options().variant(), Variant::kLoRA);
}

TEST(SpecMerge, IsWeight) {
  auto chain = make_chain(Variant::kIS, 1);
  chain->merge_to_lora(MergeKind::kWeight);
  const auto W = chain->merged_weights();
  expect_close(W[2], T({{1, 0}, {3.763834, 4.763834}}), 1e-6);
  expect_close(eval_outputs(chain, kX)[2], V({1, 13.291503}), 1e-6);
  EXPECT_NEAR(std::sqrt(14.0 / 18.0), 0.881917, 1e-6);
}

TEST(SpecMerge, MsInput) {
  for (int64_t pre : {1, -1}) {
    auto chain = make_chain(Variant::kMS, pre);
    set_window(chain[0], {2, 4}, false);
    set_window(chain[1], {6}, false);
    set_window(chain[2], {1.5, 1.5}, false);
    chain->merge_to_lora(MergeKind::kInput);
    expect_close(chain[1]->lora_A, T({{0.5, 1}}));
    const auto h = eval_outputs(chain, kX);
    expect_close(h[0], V({3, 4}));
    expect_close(h[1], V({5, -1}));
    if (pre == 1) {
      expect_close(chain[2]->lora_A, T({{1, 5}}));
      expect_close(h[2], V({1, 24}));
    } else {
      expect_close(chain[2]->lora_A, T({{3, 5}}));
      expect_close(h[2], V({1, 28}));
    }
  }
}

TEST(SpecMerge, MsMid) {
  auto chain = make_chain(Variant::kMS, 1);
  set_window(chain[0], {1, 3}, true);
  set_window(chain[1], {4}, true);
  set_window(chain[2], {0.5}, true);
  chain->merge_to_lora(MergeKind::kMid);
  const double alpha[3] = {0, 0.5, 8};
  for (int n = 0; n < 3; ++n) expect_close(chain[n]->lora_B, (1 + alpha[n]) * T(kB[n]));
  const auto h = eval_outputs(chain, kX);
  expect_close(h[0], V({3, 4}));
  expect_close(h[1], V({-3, -1}));
  expect_close(h[2], V({1, 56}));
}

TEST(SpecMerge, BsExact) {
  for (int64_t pre : {1, -1}) {
    auto chain = make_chain(Variant::kBS, pre);
    std::vector<torch::Tensor> in;
    for (const auto& x : kX) in.push_back(V(x));
    const auto train = chain->forward(in);
    chain->merge_to_lora();
    const auto W = chain->merged_weights();
    expect_close(W[0], T({{3, 0}, {2, 1}}));
    expect_close(W[1], T({{3, 4}, {2, 1}}));
    expect_close(W[2], pre == 1 ? T({{1, 4}, {2, 3}}) : T({{3, 4}, {4, 3}}));
    EXPECT_EQ(chain[2]->lora_A.size(0), pre == 1 ? 2 : 3);
    const auto h = eval_outputs(chain, kX);
    for (int n = 0; n < 3; ++n) expect_close(h[n], train[n].detach(), 1e-12);
  }
}

TEST(SpecMerge, ProportionalInputsAreExact) {
  const std::vector<std::vector<double>> prop = {{1, 2}, {0.5, 1}, {0.25, 0.5}};
  struct P { Variant v; MergeKind m; Rows h; };
  for (const P& p : {P{Variant::kIS, MergeKind::kInput, {{5, 6}, {12.5, 1}, {0.25, 5}}},
                     P{Variant::kMS, MergeKind::kInput, {{3, 4}, {8.5, 1}, {0.25, 4}}},
                     P{Variant::kMS, MergeKind::kMid, {}}}) {
    auto chain = make_chain(p.v, 1);
    std::vector<torch::Tensor> in;
    for (const auto& x : prop) in.push_back(V(x));
    const auto train = chain->forward(in);  // fills the windows
    for (size_t n = 0; n < p.h.size(); ++n) expect_close(train[n], V(p.h[n]));
    chain->merge_to_lora(p.m);
    if (p.m == MergeKind::kMid) {
      const double alpha[3] = {0, 1, 4.0 / 3.0};
      for (int n = 0; n < 3; ++n) expect_close(chain[n]->lora_B, (1 + alpha[n]) * T(kB[n]));
    }
    const auto h = eval_outputs(chain, prop);
    for (int n = 0; n < 3; ++n) expect_close(h[n], train[n].detach());
  }
}

TEST(SpecMerge, NonProportionalInputsShowMergeError) {
  for (auto m : {MergeKind::kInput, MergeKind::kWeight}) {
    auto chain = make_chain(Variant::kIS, 1);
    std::vector<torch::Tensor> in;
    for (const auto& x : kX) in.push_back(V(x));
    const auto train = chain->forward(in);
    chain->merge_to_lora(m);
    const auto h = eval_outputs(chain, kX);
    double err = 0;
    for (int n = 0; n < 3; ++n) err = std::max(err, (h[n] - train[n].detach()).abs().max().item<double>());
    EXPECT_GT(err, 1e-3);
  }
}

}  // namespace
