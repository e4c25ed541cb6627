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
for mod in pytest numpy expecttest setuptools; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if ! command -v cmake >/dev/null; then missing+=("cmake"); fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "[deps] installing ${missing[*]}"
  "$PY" -m pip install -q "${missing[@]}"
fi
"$PY" -c "import torch; print('[deps] torch', torch.__version__, 'CUDA', torch.version.cuda)"
