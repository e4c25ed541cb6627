// The C++ modules on random shapes against a plain LibTorch float64 reference, training from
// C++, statistics, CUDA against CPU, and the messages of bad input.
#include <cmath>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "reslora/modules.h"
#include "reslora/ops.h"
#include "reslora/rules.h"
#include "reslora/version.h"

using reslora::MergeKind;
using reslora::ResLoRAChain;
using reslora::ResLoRALinear;
using reslora::ResLoRAOptions;
using reslora::Variant;

namespace {

// Plain LibTorch reference of one chain pass (dropout 0), with its own leaf copies of A and B.
struct Reference {
  std::vector<torch::Tensor> W, b, A, B;
  std::vector<torch::Tensor> forward(const std::vector<torch::Tensor>& xs, Variant v, int64_t pre,
                                     double s) {
    std::vector<torch::Tensor> hs, zs;
    for (size_t n = 0; n < xs.size(); ++n) {
      const int64_t k_max = reslora::reach(static_cast<int64_t>(n), pre);
      torch::Tensor base = torch::matmul(xs[n], W[n].t()) + b[n];
      torch::Tensor z_own = torch::matmul(xs[n], A[n].t());
      torch::Tensor lora;
      switch (v) {
        case Variant::kLoRA:
          lora = torch::matmul(z_own, B[n].t());
          break;
        case Variant::kIS: {
          const auto& xp = n == 0 ? xs[n] : xs[n - 1];
          lora = torch::matmul(torch::matmul(xs[n] + xp, A[n].t()), B[n].t());
          break;
        }
        case Variant::kBS:
          lora = torch::matmul(z_own, B[n].t());
          for (int64_t k = 1; k <= k_max; ++k)
            lora = lora + torch::matmul(torch::matmul(xs[n], A[n - k].t()), B[n - k].t());
          break;
        case Variant::kMS: {
          torch::Tensor z = z_own;
          for (int64_t k = 1; k <= k_max; ++k) z = z + zs[n - k];
          lora = torch::matmul(z, B[n].t());
          break;
        }
      }
      zs.push_back(z_own);
      hs.push_back(base + s * lora);
    }
    return hs;
  }
};

struct RandomCase {
  Variant variant;
  int64_t pre_num;
};

class RandomShapes : public ::testing::TestWithParam<RandomCase> {};

TEST_P(RandomShapes, MatchReferenceFloat64) {
  const auto [variant, pre] = GetParam();
  torch::manual_seed(static_cast<int>(variant) * 10 + pre + 3);
  const int64_t d_in = 1 + torch::randint(1, 24, {1}).item<int64_t>();
  const int64_t d_out = 1 + torch::randint(1, 24, {1}).item<int64_t>();
  const int64_t r = torch::randint(1, 6, {1}).item<int64_t>();
  const int64_t n_blocks = 4;
  const auto f64 = torch::kFloat64;
  ResLoRAChain chain("random");
  Reference ref;
  for (int64_t i = 0; i < n_blocks; ++i) {
    const auto W = torch::randn({d_out, d_in}, f64), b = torch::randn({d_out}, f64);
    ResLoRALinear blk(W, b, ResLoRAOptions(r).variant(variant).lora_alpha(3.0).pre_num(pre));
    torch::NoGradGuard g;
    blk->lora_B.normal_();
    chain->push_back(blk);
    ref.W.push_back(W);
    ref.b.push_back(b);
    ref.A.push_back(blk->lora_A.detach().clone().requires_grad_());
    ref.B.push_back(blk->lora_B.detach().clone().requires_grad_());
  }
  std::vector<torch::Tensor> xs, xr;
  for (int64_t i = 0; i < n_blocks; ++i) {
    xs.push_back(torch::randn({2, 3, d_in}, f64).requires_grad_());
    xr.push_back(xs.back().detach().clone().requires_grad_());
  }
  const auto hs = chain->forward(xs);
  const auto hr = ref.forward(xr, variant, pre, 3.0 / r);
  torch::Tensor loss = torch::zeros({}, f64), loss_r = torch::zeros({}, f64);
  for (int64_t i = 0; i < n_blocks; ++i) {
    const auto w = torch::randn_like(hr[i]);
    loss = loss + (hs[i] * w).sum();
    loss_r = loss_r + (hr[i] * w).sum();
    ASSERT_TRUE(torch::allclose(hs[i], hr[i], 1e-10, 1e-10)) << "output of block " << i;
  }
  loss.backward();
  loss_r.backward();
  for (int64_t i = 0; i < n_blocks; ++i) {
    EXPECT_TRUE(torch::allclose(chain[i]->lora_A.grad(), ref.A[i].grad(), 1e-10, 1e-10))
        << "dA " << i;
    EXPECT_TRUE(torch::allclose(chain[i]->lora_B.grad(), ref.B[i].grad(), 1e-10, 1e-10))
        << "dB " << i;
    EXPECT_TRUE(torch::allclose(xs[i].grad(), xr[i].grad(), 1e-10, 1e-10)) << "dx " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, RandomShapes,
                         ::testing::Values(RandomCase{Variant::kLoRA, 1},
                                           RandomCase{Variant::kIS, 1}, RandomCase{Variant::kBS, 1},
                                           RandomCase{Variant::kBS, 2},
                                           RandomCase{Variant::kBS, -1},
                                           RandomCase{Variant::kMS, 1},
                                           RandomCase{Variant::kMS, -1}),
                         [](const ::testing::TestParamInfo<RandomCase>& info) {
                           const int64_t p = info.param.pre_num;
                           return reslora::to_string(info.param.variant) + "_pre" +
                                  (p < 0 ? std::string("all") : std::to_string(p));
                         });

TEST(Rules, OnlyMsReachingEveryEarlierBlockCarriesARunningSum) {
  EXPECT_TRUE(reslora::shortcut_running_sum(Variant::kMS, -1));
  EXPECT_FALSE(reslora::shortcut_running_sum(Variant::kMS, 1));
  EXPECT_FALSE(reslora::shortcut_running_sum(Variant::kMS, 2));
  EXPECT_FALSE(reslora::shortcut_running_sum(Variant::kBS, -1));
  EXPECT_FALSE(reslora::shortcut_running_sum(Variant::kIS, -1));
}

TEST(Modules, TrainsFromCpp) {
  torch::manual_seed(0);
  ResLoRAChain chain("train");
  for (int i = 0; i < 3; ++i) {
    chain->push_back(ResLoRALinear(torch::randn({8, 8}) * 0.3, torch::zeros({8}),
                                   ResLoRAOptions(4).variant(Variant::kMS).dropout(0.1)));
  }
  torch::optim::Adam opt(chain->parameters(), torch::optim::AdamOptions(1e-2));
  const auto x = torch::randn({16, 8});
  const auto target = torch::randn({16, 8});
  double first = 0, last = 0;
  for (int step = 0; step < 60; ++step) {
    opt.zero_grad();
    torch::Tensor h = x;
    for (size_t n = 0; n < chain->size(); ++n) h = chain->forward(n, h);
    const auto loss = torch::mse_loss(h, target);
    loss.backward();
    opt.step();
    (step == 0 ? first : last) = loss.item<double>();
  }
  EXPECT_LT(last, 0.8 * first);
  // Base weights stay frozen: they are buffers, not parameters.
  for (const auto& p : chain->named_parameters())
    EXPECT_NE(p.key().find("lora_"), std::string::npos);
  EXPECT_EQ(chain[0]->stats_count.item<int64_t>(), 60);
}

TEST(Modules, DropoutIsReproducibleFromTheGenerator) {
  ResLoRALinear blk(torch::randn({6, 6}), torch::Tensor(), ResLoRAOptions(3).dropout(0.5));
  torch::NoGradGuard g;
  blk->lora_B.normal_();
  const auto x = torch::randn({4, 6});
  torch::manual_seed(5);
  const auto a = blk->forward(x);
  torch::manual_seed(5);
  const auto b = blk->forward(x);
  EXPECT_TRUE(torch::equal(a, b));
  const auto c = blk->forward(x);
  EXPECT_FALSE(torch::equal(a, c));
  blk->eval();
  EXPECT_TRUE(torch::equal(blk->forward(x), blk->forward(x)));
}

TEST(Modules, StatisticsWindow) {
  ResLoRALinear blk(torch::eye(2), torch::Tensor(),
                    ResLoRAOptions(1).variant(Variant::kIS).stats_window(2));
  blk->forward(torch::tensor({{3.0f, 4.0f}}));  // ||x|| = 5
  blk->forward(torch::tensor({{6.0f, 8.0f}}));  // 10
  blk->forward(torch::tensor({{0.0f, 1.0f}}));  // 1, replaces the oldest (5)
  EXPECT_NEAR(blk->x_norm_mean().item<double>(), 5.5, 1e-6);
  blk->eval();
  blk->forward(torch::tensor({{100.0f, 0.0f}}));  // eval forwards are not recorded
  EXPECT_EQ(blk->stats_count.item<int64_t>(), 3);
  ResLoRALinear bs(torch::eye(2), torch::Tensor(), ResLoRAOptions(1).variant(Variant::kBS));
  bs->forward(torch::ones({1, 2}));  // exact merges need no statistics: none are recorded
  EXPECT_EQ(bs->stats_count.item<int64_t>(), 0);
}

// The fit merge is exact where each block's input is a linear function of the next one's
// (x_{n-1} = x_n T): the shortcut's term A x_{n-1} = (A T) x_n is then a prediction from x_n.
TEST(Modules, FitMergeIsExactForLinearlyRelatedInputs) {
  for (const auto& [variant, pre_num] : std::vector<std::pair<Variant, int64_t>>{
           {Variant::kIS, 1}, {Variant::kMS, 1}, {Variant::kMS, -1}}) {
    torch::manual_seed(3);
    const int64_t d = 6, n_blocks = 4;
    ResLoRAChain chain("fit");
    for (int64_t i = 0; i < n_blocks; ++i) {
      chain->push_back(ResLoRALinear(torch::randn({d, d}), torch::randn({d}),
                                     ResLoRAOptions(2).variant(variant).pre_num(pre_num)));
      torch::NoGradGuard g;
      chain[i]->lora_B.normal_();
    }
    chain->train();
    const auto T = torch::randn({d, d}) * 0.5;
    auto inputs = [&](int64_t tokens) {
      std::vector<torch::Tensor> xs(n_blocks);
      xs[n_blocks - 1] = torch::randn({tokens, d});
      for (int64_t i = n_blocks - 2; i >= 0; --i) xs[i] = xs[i + 1].mm(T);
      return xs;
    };
    chain->forward(inputs(64));  // a training forward: the statistics of the input merge
    chain->eval();
    const auto calib = inputs(256);
    chain->calibrate(calib);
    const auto held_out = inputs(32);
    const auto before = chain->forward(held_out);
    const auto input_pairs = chain->merged_lora(MergeKind::kInput);
    chain->merge_to_lora(MergeKind::kFit, 1e-9);
    const auto after = chain->forward(held_out);
    double fit_err = 0, input_err = 0;
    for (int64_t i = 0; i < n_blocks; ++i) {
      fit_err =
          std::max(fit_err, ((after[i] - before[i]).norm() / before[i].norm()).item<double>());
      const auto& blk = chain[i];
      const auto y_input =
          held_out[i].mm(blk->weight.t()) + blk->bias +
          blk->scaling() * held_out[i].mm(input_pairs[i].A.t()).mm(input_pairs[i].B.t());
      input_err =
          std::max(input_err, ((y_input - before[i]).norm() / before[i].norm()).item<double>());
    }
    EXPECT_LT(fit_err, 1e-4) << reslora::to_string(variant) << " pre_num " << pre_num;
    EXPECT_GT(input_err, 100 * fit_err) << reslora::to_string(variant);
  }
  ResLoRAChain empty("nofit");
  empty->push_back(ResLoRALinear(torch::randn({4, 4}), torch::Tensor(),
                                 ResLoRAOptions(2).variant(Variant::kIS)));
  empty->push_back(ResLoRALinear(torch::randn({4, 4}), torch::Tensor(),
                                 ResLoRAOptions(2).variant(Variant::kIS)));
  try {
    empty->merged_lora(MergeKind::kFit);
    FAIL() << "a fit merge without calibration must throw";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("merge 'fit' needs the calibration statistics of block 1"),
              std::string::npos)
        << e.what();
  }
}

// merge_chain(only = n) gives block n's pair of the whole chain's merge, for every merge, and
// names the bad index.
TEST(Modules, MergeOfOneBlockEqualsItsPairInTheChain) {
  torch::manual_seed(5);
  const int64_t d = 5, r = 2, n_blocks = 4;
  std::vector<reslora::MergeBlock> blocks;
  for (int64_t i = 0; i < n_blocks; ++i) {
    reslora::MergeBlock b;
    b.weight = torch::randn({d, d}, torch::kFloat64);
    b.A = torch::randn({r, d}, torch::kFloat64);
    b.B = torch::randn({d, r}, torch::kFloat64);
    b.x_norm_mean = torch::rand({}, torch::kFloat64) + 0.5;
    b.z_norm_mean = torch::rand({}, torch::kFloat64) + 0.5;
    const auto x = torch::randn({40, d}, torch::kFloat64);
    b.xx = x.t().mm(x);
    b.zx = torch::randn({r, 40}, torch::kFloat64).mm(x);
    b.tokens = 40;
    blocks.push_back(b);
  }
  for (const auto& [variant, merge] :
       std::vector<std::pair<Variant, MergeKind>>{{Variant::kIS, MergeKind::kFit},
                                                  {Variant::kIS, MergeKind::kWeight},
                                                  {Variant::kMS, MergeKind::kFit},
                                                  {Variant::kMS, MergeKind::kMid},
                                                  {Variant::kBS, MergeKind::kExact}}) {
    for (int64_t pre_num : {int64_t(1), int64_t(-1)}) {
      const auto all = reslora::merge_chain(blocks, variant, merge, pre_num, 1.5, 1e-3);
      for (int64_t n = 0; n < n_blocks; ++n) {
        const auto one = reslora::merge_chain(blocks, variant, merge, pre_num, 1.5, 1e-3, n);
        ASSERT_EQ(one.size(), 1u);
        EXPECT_TRUE(torch::equal(one[0].A, all[n].A)) << reslora::to_string(merge) << " " << n;
        EXPECT_TRUE(torch::equal(one[0].B, all[n].B)) << reslora::to_string(merge) << " " << n;
      }
    }
  }
  try {
    reslora::merge_chain(blocks, Variant::kIS, MergeKind::kFit, 1, 1.5, 1e-3, n_blocks);
    FAIL() << "an index past the chain must throw";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("merge_chain's only must be -1 (every block) or a block "
                                         "index in [0, 4), got 4"),
              std::string::npos)
        << e.what();
  }
}

TEST(Ops, BlockOpEqualsDownThenUpWithGradients) {
  torch::manual_seed(4);
  const auto f64 = torch::kFloat64;
  for (double p : {0.0, 0.3}) {
    auto x = torch::randn({3, 5, 12}, f64).requires_grad_();
    auto xp = torch::randn({3, 5, 12}, f64).requires_grad_();
    auto A = torch::randn({6, 12}, f64).requires_grad_();
    auto B = torch::randn({7, 6}, f64).requires_grad_();
    auto ze = torch::randn({3, 5, 6}, f64).requires_grad_();
    const auto W = torch::randn({7, 12}, f64), b = torch::randn({7}, f64);
    const auto seed = torch::tensor({int64_t(17)});
    auto [y, z] = reslora::lora_linear(x, xp, W, b, A, B, ze, 1.25, p, seed, 2, 3);
    const auto z_ref = reslora::lora_down(x, xp, A, p, seed, 2, 3);
    const auto y_ref = reslora::lora_up(x, W, b, z_ref + ze, B, 1.25);
    EXPECT_TRUE(torch::allclose(z, z_ref));
    EXPECT_TRUE(torch::allclose(y, y_ref));
    const std::vector<torch::Tensor> leaves{x, xp, A, B, ze};
    const auto g = torch::autograd::grad({y.sum() + z.pow(2).sum()}, leaves);
    const auto g_ref = torch::autograd::grad({y_ref.sum() + z_ref.pow(2).sum()}, leaves);
    for (size_t i = 0; i < leaves.size(); ++i) {
      EXPECT_TRUE(torch::allclose(g[i], g_ref[i], 1e-10, 1e-10)) << "input " << i << ", p " << p;
    }
  }
}

TEST(Modules, TrainsInBFloat16) {
  torch::manual_seed(2);
  ResLoRAChain chain("bf16");
  for (int i = 0; i < 3; ++i) {
    chain->push_back(ResLoRALinear(torch::randn({16, 16}, torch::kBFloat16) * 0.3, torch::Tensor(),
                                   ResLoRAOptions(4).variant(Variant::kIS).dropout(0.1)));
  }
  EXPECT_EQ(chain[0]->lora_A.scalar_type(), torch::kBFloat16);
  torch::optim::SGD opt(chain->parameters(), torch::optim::SGDOptions(0.05));
  const auto x = torch::randn({32, 16}, torch::kBFloat16);
  const auto target = torch::randn({32, 16}, torch::kBFloat16);
  double first = 0, last = 0;
  for (int step = 0; step < 40; ++step) {
    torch::Tensor h = x;
    for (size_t n = 0; n < chain->size(); ++n) h = chain->forward(n, h);
    const auto loss = torch::mse_loss(h.to(torch::kFloat), target.to(torch::kFloat));
    opt.zero_grad();
    loss.backward();
    opt.step();
    (step == 0 ? first : last) = loss.item<double>();
  }
  EXPECT_TRUE(std::isfinite(last));
  EXPECT_LT(last, first);
  EXPECT_EQ(chain[1]->x_norms.scalar_type(), torch::kFloat);  // statistics stay float32
}

template <typename F>
void expect_error(F f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing: " << needle;
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message: " << e.what() << "\nexpected to contain: " << needle;
  }
}

TEST(Modules, LikelyMistakesAreWarnedNotRefused) {
  // Legal options that are likely a mistake: one wording for every front end (the Python config
  // warns with it too); the modules are built all the same.
  EXPECT_EQ(reslora::option_warning(ResLoRAOptions(4).variant(Variant::kIS).pre_num(3)),
            "reslora: pre_num = 3 is ignored by the 'is' variant (is always reads the previous "
            "block's input); pre_num sets how many earlier blocks a 'bs' or 'ms' shortcut reaches");
  EXPECT_EQ(
      reslora::option_warning(ResLoRAOptions(4).variant(Variant::kMS).pre_num(0)),
      "reslora: pre_num = 0 links no earlier block, so a 'ms' model trains as plain LoRA; use "
      "variant='lora' for that, or pre_num >= 1 (-1 for every earlier block)");
  EXPECT_EQ(reslora::option_warning(ResLoRAOptions(4).variant(Variant::kMS).pre_num(-1)), "");
  EXPECT_EQ(reslora::option_warning(ResLoRAOptions(4).variant(Variant::kIS)), "");
  ResLoRALinear block(torch::randn({4, 4}), torch::Tensor(),
                      ResLoRAOptions(2).variant(Variant::kBS).pre_num(0));
  EXPECT_EQ(block->lora_A.size(0), 2);
}

TEST(Modules, BadInputMessages) {
  expect_error([] { ResLoRALinear(torch::eye(4), torch::Tensor(), ResLoRAOptions(0)); },
               "reslora: r must be an int >= 1, got 0");
  expect_error(
      [] { ResLoRALinear(torch::eye(4), torch::Tensor(), ResLoRAOptions(2).dropout(1.0)); },
      "reslora: lora_dropout must be a number in [0, 1) that keeps at least 2^-15 of the inputs "
      "(the mask's resolution), got 1.0");
  expect_error(
      [] { ResLoRALinear(torch::eye(4), torch::Tensor(), ResLoRAOptions(2).lora_alpha(INFINITY)); },
      "reslora: lora_alpha must be a finite number > 0 (scaling = lora_alpha / r), got inf");
  expect_error([] { ResLoRALinear(torch::eye(4), torch::zeros({3}), ResLoRAOptions(2)); },
               "bias must have shape [d_out] = [4], got [3]");
  expect_error([] { reslora::parse_variant("xs"); },
               "variant must be one of 'lora', 'is', 'bs', 'ms', got 'xs'");
  {
    ResLoRAChain chain("q_proj");
    chain->push_back(
        ResLoRALinear(torch::eye(4), torch::Tensor(), ResLoRAOptions(2).variant(Variant::kIS)));
    expect_error(
        [&] {
          chain->push_back(ResLoRALinear(torch::zeros({8, 4}), torch::Tensor(),
                                         ResLoRAOptions(2).variant(Variant::kIS)));
        },
        "block 1 must have the head's shape [d_out, d_in] = [4, 4] for the 'is' shortcut, got [8, "
        "4]");
    expect_error([&] { chain->merge_to_lora(MergeKind::kMid); },
                 "merge 'mid' does not apply to variant 'is'; expected one of 'input', 'weight'");
    chain->merge_to_lora(MergeKind::kInput);
    expect_error([&] { chain->merge_to_lora(MergeKind::kInput); },
                 "chain 'q_proj' is already merged; merge_to_lora() would apply the merge twice");
  }
  {
    ResLoRAChain chain("v_proj");
    for (int i = 0; i < 2; ++i)
      chain->push_back(
          ResLoRALinear(torch::eye(4), torch::Tensor(), ResLoRAOptions(2).variant(Variant::kMS)));
    expect_error(
        [&] { chain->forward(1, torch::randn({2, 4})); },
        "block 1 of chain 'v_proj' needs the mid activation of block 0 from this forward pass");
    chain->forward(0, torch::randn({2, 4}));
    chain->forward(1, torch::randn({2, 4}));  // fine once the head ran
    expect_error([&] { chain->forward(2, torch::randn({2, 4})); },
                 "index must be in [0, 2), got 2");
  }
  ResLoRALinear blk(torch::eye(4, torch::kFloat64), torch::Tensor(), ResLoRAOptions(2));
  expect_error([&] { blk->forward(torch::randn({2, 4})); },
               "x must have the dtype of weight (Double; cast the input or the layer, or run under "
               "autocast), got Float");
  expect_error([&] { blk->load_lora(torch::zeros({2, 5}), torch::zeros({4, 2})); },
               "reslora: A must have shape [r, d_in] = [2, 4], got [2, 5]");
  expect_error([&] { blk->load_lora(torch::zeros({2, 4}), torch::zeros({4, 3})); },
               "reslora: B must have shape [d_out, r] = [4, 2], got [4, 3]");
  expect_error(
      [] { ResLoRALinear(torch::eye(4), torch::Tensor(), ResLoRAOptions(2).lora_alpha(0)); },
      "reslora: lora_alpha must be a finite number > 0 (scaling = lora_alpha / r), got 0.0");
  expect_error([&] { blk->forward(torch::randn({2, 5}, torch::kFloat64)); },
               "x must have d_in = 4 features in its last dimension (weight is [d_out, d_in] = [4, "
               "4]), got x of shape [2, 5]");
}

// Without dropout: each device draws its pass seeds from its own generator, so the masks of one
// manual_seed differ between devices (the same seed value gives the same mask on both, tested
// on the ops).
TEST(Modules, CudaMatchesCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  if (!reslora::build_info().cuda_kernels) GTEST_SKIP() << "reslora built without CUDA kernels";
  for (auto v : {Variant::kLoRA, Variant::kIS, Variant::kBS, Variant::kMS}) {
    torch::manual_seed(1);
    ResLoRAChain cpu("cpu"), gpu("gpu");
    for (int i = 0; i < 3; ++i) {
      const auto W = torch::randn({24, 40}, torch::kFloat64);
      ResLoRALinear a(W, torch::Tensor(), ResLoRAOptions(8).variant(v).pre_num(-1));
      ResLoRALinear b(W.cuda(), torch::Tensor(), ResLoRAOptions(8).variant(v).pre_num(-1));
      torch::NoGradGuard g;
      a->lora_B.normal_();
      b->lora_A.copy_(a->lora_A);
      b->lora_B.copy_(a->lora_B);
      cpu->push_back(a);
      gpu->push_back(b);
    }
    std::vector<torch::Tensor> xc, xg;
    for (int i = 0; i < 3; ++i) {
      xc.push_back(torch::randn({5, 7, 40}, torch::kFloat64).requires_grad_());
      xg.push_back(xc.back().detach().cuda().requires_grad_());
    }
    const auto hc = cpu->forward(xc);
    const auto hg = gpu->forward(xg);
    torch::Tensor lc = torch::zeros({}, torch::kFloat64),
                  lg = torch::zeros({}, torch::kFloat64).cuda();
    for (int i = 0; i < 3; ++i) {
      EXPECT_TRUE(torch::allclose(hg[i].cpu(), hc[i], 1e-9, 1e-9));
      lc = lc + hc[i].pow(2).sum();
      lg = lg + hg[i].pow(2).sum();
    }
    lc.backward();
    lg.backward();
    for (int i = 0; i < 3; ++i) {
      EXPECT_TRUE(torch::allclose(gpu[i]->lora_A.grad().cpu(), cpu[i]->lora_A.grad(), 1e-9, 1e-9));
      EXPECT_TRUE(torch::allclose(gpu[i]->lora_B.grad().cpu(), cpu[i]->lora_B.grad(), 1e-9, 1e-9));
      EXPECT_TRUE(torch::allclose(xg[i].grad().cpu(), xc[i].grad(), 1e-9, 1e-9));
    }
  }
}

}  // namespace
