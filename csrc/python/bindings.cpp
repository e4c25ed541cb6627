// pybind11 bindings for what is not an op: merges, build information. The ops themselves are
// reached through torch.ops.reslora.* (registered when this module loads libreslora).
#include <optional>
#include <vector>

#include <torch/extension.h>

#include "reslora/merge.h"
#include "reslora/version.h"

namespace py = pybind11;

namespace {

std::vector<std::pair<at::Tensor, at::Tensor>> merge_chain_py(
    const std::vector<std::optional<at::Tensor>>& weights, const std::vector<at::Tensor>& As,
    const std::vector<at::Tensor>& Bs, const std::vector<std::optional<at::Tensor>>& x_means,
    const std::vector<std::optional<at::Tensor>>& z_means, const std::string& variant,
    const std::string& merge, int64_t pre_num, double scaling) {
  const size_t n = As.size();
  TORCH_CHECK(Bs.size() == n && weights.size() == n && x_means.size() == n && z_means.size() == n,
              "reslora.merge_chain: weights, As, Bs, x_means and z_means must have one entry per "
              "block (", n, "), got ", weights.size(), ", ", As.size(), ", ", Bs.size(), ", ",
              x_means.size(), ", ", z_means.size());
  std::vector<reslora::MergeBlock> blocks;
  for (size_t i = 0; i < n; ++i) {
    blocks.push_back({weights[i].value_or(at::Tensor()), As[i], Bs[i],
                      x_means[i].value_or(at::Tensor()), z_means[i].value_or(at::Tensor())});
  }
  torch::NoGradGuard no_grad;
  std::vector<std::pair<at::Tensor, at::Tensor>> out;
  for (auto& p : reslora::merge_chain(blocks, reslora::parse_variant(variant),
                                      reslora::parse_merge(merge), pre_num, scaling)) {
    out.emplace_back(p.A, p.B);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "reslora C++ core: merges and build information (ops: torch.ops.reslora)";
  m.def("merge_chain", &merge_chain_py, py::arg("weights"), py::arg("As"), py::arg("Bs"),
        py::arg("x_means"), py::arg("z_means"), py::arg("variant"), py::arg("merge"),
        py::arg("pre_num"), py::arg("scaling"),
        "Plain LoRA pairs (A', B') of a chain by the spec's merge, in chain order.");
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
  m.def("build_info", [] {
    const auto b = reslora::build_info();
    py::dict d;
    d["version"] = b.version;
    d["torch_version"] = b.torch_version;
    d["cuda_version"] = b.cuda_version;
    d["cuda_kernels"] = b.cuda_kernels;
    return d;
  });
}
