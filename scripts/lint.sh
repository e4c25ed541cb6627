#!/usr/bin/env bash
# Lint: ruff (check and format) on the Python sources, clang-format on the C++ / CUDA sources.
# Installs the pinned tools when they are missing; offline without them, it says so and skips.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RUFF_VERSION=$(grep "^ruff==" tests/constraints.txt | cut -d= -f3)  # pinned with the test environment
CLANG_FORMAT_VERSION=$(grep "^clang-format==" tests/constraints.txt | cut -d= -f3)

need=()
[ "$(ruff --version 2>/dev/null)" = "ruff $RUFF_VERSION" ] || need+=("ruff==$RUFF_VERSION")
clang-format --version 2>/dev/null | grep -q "version $CLANG_FORMAT_VERSION" || need+=("clang-format==$CLANG_FORMAT_VERSION")
if [ ${#need[@]} -gt 0 ]; then
  echo "[lint] installing ${need[*]}"
  if ! "$PY" -m pip install -q --retries 0 --timeout 15 "${need[@]}"; then
    echo "[lint] ${need[*]} unavailable (offline?): lint skipped"
    exit 0
  fi
fi

PY_SOURCES=(python tests bench examples scripts setup.py)
mapfile -t CPP_SOURCES < <(git ls-files -- 'csrc/*' 'tests/cpp/*' 'examples/cpp/*' 'bench/*' | grep -E '\.(cpp|h|cu|cuh)$')
status=0
ruff check "${PY_SOURCES[@]}" || status=1
ruff format --check "${PY_SOURCES[@]}" || status=1
clang-format --dry-run --Werror "${CPP_SOURCES[@]}" || status=1
if [ $status -ne 0 ]; then
  echo "[lint] failed: 'ruff check --fix', 'ruff format' and 'clang-format -i' fix most of it" >&2
  exit 1
fi
echo "[lint] ruff and clang-format clean (${#CPP_SOURCES[@]} C++ / CUDA files)"
