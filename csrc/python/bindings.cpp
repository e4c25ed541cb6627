// pybind11 bindings for what is not an op: merges, build information. The ops themselves are
// reached through torch.ops.reslora.* (registered when this module loads libreslora).
#include <optional>
#include <vector>

#include <torch/extension.h>

#include "reslora/merge.h"
#include "reslora/modules.h"
#include "reslora/rules.h"
#include "reslora/version.h"

namespace py = pybind11;

namespace {

std::vector<std::pair<at::Tensor, at::Tensor>> merge_chain_py(
    const std::vector<std::optional<at::Tensor>>& weights, const std::vector<at::Tensor>& As,
    const std::vector<at::Tensor>& Bs, const std::vector<std::optional<at::Tensor>>& x_means,
    const std::vector<std::optional<at::Tensor>>& z_means, const std::string& variant,
    const std::string& merge, int64_t pre_num, double scaling,
    const std::vector<std::optional<at::Tensor>>& xx,
    const std::vector<std::optional<at::Tensor>>& zx, const std::vector<int64_t>& tokens,
    double ridge, int64_t only) {
  const size_t n = As.size();
  TORCH_CHECK(Bs.size() == n && weights.size() == n && x_means.size() == n && z_means.size() == n,
              "reslora.merge_chain: weights, As, Bs, x_means and z_means must have one entry per "
              "block (",
              n, "), got ", weights.size(), ", ", As.size(), ", ", Bs.size(), ", ", x_means.size(),
              ", ", z_means.size());
  TORCH_CHECK((xx.empty() && zx.empty() && tokens.empty()) ||
                  (xx.size() == n && zx.size() == n && tokens.size() == n),
              "reslora.merge_chain: xx, zx and tokens must be empty or have one entry per block (",
              n, "), got ", xx.size(), ", ", zx.size(), ", ", tokens.size());
  std::vector<reslora::MergeBlock> blocks;
  for (size_t i = 0; i < n; ++i) {
    reslora::MergeBlock b{weights[i].value_or(at::Tensor()), As[i], Bs[i],
                          x_means[i].value_or(at::Tensor()), z_means[i].value_or(at::Tensor())};
    if (!xx.empty()) {
      b.xx = xx[i].value_or(at::Tensor());
      b.zx = zx[i].value_or(at::Tensor());
      b.tokens = tokens[i];
    }
    blocks.push_back(b);
  }
  torch::NoGradGuard no_grad;
  std::vector<std::pair<at::Tensor, at::Tensor>> out;
  for (auto& p : reslora::merge_chain(blocks, reslora::parse_variant(variant),
                                      reslora::parse_merge(merge), pre_num, scaling, ridge, only)) {
    out.emplace_back(p.A, p.B);
  }
  return out;
}

// An option from Python: the type is checked here (bool is not an int, a string not a number),
// the value by reslora::validate; both with the one wording of reslora::option_error.
int64_t int_option(const char* name, const py::handle& v) {
  if (!PyLong_Check(v.ptr()) || PyBool_Check(v.ptr()))
    throw py::value_error(reslora::option_error(name, py::repr(v).cast<std::string>()));
  return v.cast<int64_t>();
}
double float_option(const char* name, const py::handle& v) {
  if (!(PyLong_Check(v.ptr()) || PyFloat_Check(v.ptr())) || PyBool_Check(v.ptr()))
    throw py::value_error(reslora::option_error(name, py::repr(v).cast<std::string>()));
  return v.cast<double>();
}

reslora::ResLoRAOptions options_from_py(const py::handle& variant, const py::handle& r,
                                        const py::handle& lora_alpha, const py::handle& dropout,
                                        const py::handle& pre_num, const py::handle& stats_window) {
  if (!PyUnicode_Check(variant.ptr()))
    throw py::value_error(reslora::option_error("variant", py::repr(variant).cast<std::string>()));
  const std::string v = variant.cast<std::string>();
  if (v != "lora" && v != "is" && v != "bs" && v != "ms")
    throw py::value_error(reslora::option_error("variant", py::repr(variant).cast<std::string>()));
  auto o = reslora::ResLoRAOptions(int_option("r", r))
               .variant(reslora::parse_variant(v))
               .lora_alpha(float_option("lora_alpha", lora_alpha))
               .dropout(float_option("lora_dropout", dropout))
               .pre_num(int_option("pre_num", pre_num))
               .stats_window(int_option("stats_window", stats_window));
  reslora::validate(o);
  return o;
}

// One training or eval pass of a C++ chain (reslora::ResLoRAChain) built from the given tensors,
// run after torch.manual_seed(manual_seed): the outputs, and with grad_outputs the gradients of
// sum(<y_n, g_n>) w.r.t. A_n and B_n. The Python layers are checked against it (same seeds, same
// masks, same numbers).
// A C++ modules' chain of these weights, A and B (no biases).
reslora::ResLoRAChain make_chain(const std::string& variant, int64_t pre_num, int64_t r,
                                 double lora_alpha, double dropout,
                                 const std::vector<at::Tensor>& weights,
                                 const std::vector<at::Tensor>& As,
                                 const std::vector<at::Tensor>& Bs) {
  reslora::ResLoRAChain chain("cpp");
  TORCH_CHECK_VALUE(As.size() == weights.size() && Bs.size() == weights.size(),
                    "reslora: weights, As and Bs must have one entry per block (", weights.size(),
                    "), got ", weights.size(), ", ", As.size(), ", ", Bs.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    reslora::ResLoRALinear blk(weights[i], at::Tensor(),
                               reslora::ResLoRAOptions(r)
                                   .variant(reslora::parse_variant(variant))
                                   .lora_alpha(lora_alpha)
                                   .dropout(dropout)
                                   .pre_num(pre_num));
    TORCH_CHECK_VALUE(As[i].sizes() == blk->lora_A.sizes() && Bs[i].sizes() == blk->lora_B.sizes(),
                      "reslora: block ", i, " needs A ", blk->lora_A.sizes(), " and B ",
                      blk->lora_B.sizes(), " (r = ", r, "), got A ", As[i].sizes(), " and B ",
                      Bs[i].sizes());
    {
      torch::NoGradGuard no_grad;
      blk->lora_A.copy_(As.at(i));
      blk->lora_B.copy_(Bs.at(i));
    }
    chain->push_back(blk);
  }
  return chain;
}

py::tuple chain_forward_cpp(const std::string& variant, int64_t pre_num, int64_t r,
                            double lora_alpha, double dropout, bool training,
                            const std::vector<at::Tensor>& weights,
                            const std::vector<at::Tensor>& As, const std::vector<at::Tensor>& Bs,
                            const std::vector<at::Tensor>& xs,
                            const std::vector<at::Tensor>& grad_outputs, int64_t manual_seed) {
  auto chain = make_chain(variant, pre_num, r, lora_alpha, dropout, weights, As, Bs);
  chain->train(training);
  torch::manual_seed(static_cast<uint64_t>(manual_seed));
  const auto ys = chain->forward(xs);
  std::vector<at::Tensor> gA, gB;
  if (!grad_outputs.empty()) {
    at::Tensor loss = at::zeros({}, ys[0].options());
    for (size_t i = 0; i < ys.size(); ++i) loss = loss + (ys[i] * grad_outputs.at(i)).sum();
    {
      py::gil_scoped_release no_gil;  // the autograd engine must run without the GIL
      loss.backward();
    }
    for (size_t i = 0; i < chain->size(); ++i) {
      gA.push_back(chain[i]->lora_A.grad());
      gB.push_back(chain[i]->lora_B.grad());
    }
  }
  return py::make_tuple(ys, gA, gB);
}

// The C++ modules' fit merge on these tensors: one training pass on train_xs (the merge
// statistics), calibrate on calib_xs, then merged_lora(fit): the pairs (A', B').
std::vector<std::pair<at::Tensor, at::Tensor>> chain_fit_cpp(
    const std::string& variant, int64_t pre_num, int64_t r, double lora_alpha,
    const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& As,
    const std::vector<at::Tensor>& Bs, const std::vector<at::Tensor>& train_xs,
    const std::vector<at::Tensor>& calib_xs, double ridge) {
  auto chain = make_chain(variant, pre_num, r, lora_alpha, 0.0, weights, As, Bs);
  chain->train(true);
  {
    torch::NoGradGuard no_grad;
    chain->forward(train_xs);
  }
  chain->eval();
  chain->calibrate(calib_xs);
  std::vector<std::pair<at::Tensor, at::Tensor>> out;
  for (auto& p : chain->merged_lora(reslora::MergeKind::kFit, ridge)) out.emplace_back(p.A, p.B);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "reslora C++ core: rules, merges and build information (ops: torch.ops.reslora)";
  // The core's argument errors (c10::ValueError) reach Python as ValueError.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    }
  });
  m.def("merge_chain", &merge_chain_py, py::arg("weights"), py::arg("As"), py::arg("Bs"),
        py::arg("x_means"), py::arg("z_means"), py::arg("variant"), py::arg("merge"),
        py::arg("pre_num"), py::arg("scaling"),
        py::arg("xx") = std::vector<std::optional<at::Tensor>>{},
        py::arg("zx") = std::vector<std::optional<at::Tensor>>{},
        py::arg("tokens") = std::vector<int64_t>{}, py::arg("ridge") = reslora::kDefaultRidge,
        py::arg("only") = -1,
        "Plain LoRA pairs (A', B') of a chain by the spec's merge, in chain order (fit: with the "
        "calibration sums xx, zx and token counts, and the relative ridge); only >= 0: the pair "
        "of that block alone.");
  m.attr("DEFAULT_RIDGE") = reslora::kDefaultRidge;
  m.def(
      "merges_for",
      [](const std::string& variant) {
        std::vector<std::string> out;
        for (auto k : reslora::merges_for(reslora::parse_variant(variant)))
          out.push_back(reslora::to_string(k));
        return out;
      },
      py::arg("variant"), "The merges that fit a variant; the first is its default.");
  m.def(
      "check_merge",
      [](const std::string& variant, const std::string& merge) {
        reslora::check_merge(reslora::parse_variant(variant), reslora::parse_merge(merge));
      },
      py::arg("variant"), py::arg("merge"));
  m.def(
      "validate_options",
      [](const py::handle& variant, const py::handle& r, const py::handle& lora_alpha,
         const py::handle& lora_dropout, const py::handle& pre_num,
         const py::handle& stats_window) {
        options_from_py(variant, r, lora_alpha, lora_dropout, pre_num, stats_window);
      },
      py::arg("variant"), py::arg("r"), py::arg("lora_alpha"), py::arg("lora_dropout"),
      py::arg("pre_num"), py::arg("stats_window"),
      "Raises ValueError naming the option, the expected and the received value.");
  m.def(
      "option_warning",
      [](const py::handle& variant, const py::handle& r, const py::handle& lora_alpha,
         const py::handle& lora_dropout, const py::handle& pre_num,
         const py::handle& stats_window) {
        return reslora::option_warning(
            options_from_py(variant, r, lora_alpha, lora_dropout, pre_num, stats_window));
      },
      py::arg("variant"), py::arg("r"), py::arg("lora_alpha"), py::arg("lora_dropout"),
      py::arg("pre_num"), py::arg("stats_window"),
      "What to warn about for legal options that are likely a mistake; empty when none.");
  m.def(
      "check_link",
      [](const std::string& chain, int64_t position, const std::string& head_variant,
         int64_t head_r, double head_alpha, int64_t head_pre_num, int64_t head_d_out,
         int64_t head_d_in, const std::string& variant, int64_t r, double alpha, int64_t pre_num,
         int64_t d_out, int64_t d_in) {
        const auto h = reslora::ResLoRAOptions(head_r)
                           .variant(reslora::parse_variant(head_variant))
                           .lora_alpha(head_alpha)
                           .pre_num(head_pre_num);
        const auto o = reslora::ResLoRAOptions(r)
                           .variant(reslora::parse_variant(variant))
                           .lora_alpha(alpha)
                           .pre_num(pre_num);
        reslora::check_link(chain, position, h, head_d_out, head_d_in, o, d_out, d_in);
      },
      "Raises ValueError unless the block may follow the chain's head at `position`.");
  m.def("merged_twice_error", &reslora::merged_twice_error, py::arg("subject"),
        "The error message for merge_to_lora() on something already merged.");
  m.def(
      "shortcut_reach",
      [](const std::string& variant, int64_t position, int64_t pre_num) {
        return reslora::shortcut_reach(reslora::parse_variant(variant), position, pre_num);
      },
      py::arg("variant"), py::arg("position"), py::arg("pre_num"),
      "How many predecessors block `position` reads in a pass.");
  m.def(
      "shortcut_running_sum",
      [](const std::string& variant, int64_t pre_num) {
        return reslora::shortcut_running_sum(reslora::parse_variant(variant), pre_num);
      },
      py::arg("variant"), py::arg("pre_num"),
      "Whether a chain's blocks carry their mid activations as a running sum (ms, pre_num -1).");
  m.def("_chain_forward_cpp", &chain_forward_cpp, py::arg("variant"), py::arg("pre_num"),
        py::arg("r"), py::arg("lora_alpha"), py::arg("dropout"), py::arg("training"),
        py::arg("weights"), py::arg("As"), py::arg("Bs"), py::arg("xs"), py::arg("grad_outputs"),
        py::arg("manual_seed"),
        "A pass of the C++ modules' chain on these tensors: (outputs, grad_A, grad_B).");
  m.def("_chain_fit_cpp", &chain_fit_cpp, py::arg("variant"), py::arg("pre_num"), py::arg("r"),
        py::arg("lora_alpha"), py::arg("weights"), py::arg("As"), py::arg("Bs"),
        py::arg("train_xs"), py::arg("calib_xs"), py::arg("ridge"),
        "The C++ modules' fit merge of a chain on these tensors: the pairs (A', B').");
  m.def("variants", [] {
    std::vector<std::string> out;
    for (auto v : {reslora::Variant::kLoRA, reslora::Variant::kIS, reslora::Variant::kBS,
                   reslora::Variant::kMS})
      out.push_back(reslora::to_string(v));
    return out;
  });
  m.def("build_info", [] {
    const auto b = reslora::build_info();
    py::dict d;
    d["version"] = b.version;
    d["torch_version"] = b.torch_version;
    d["cuda_version"] = b.cuda_version;
    d["cuda_kernels"] = b.cuda_kernels;
    d["extra_k_gemm"] = b.extra_k_gemm;
    return d;
  });
}
