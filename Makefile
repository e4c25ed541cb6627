# make test: installs what is missing, lints, builds (CMake through setup.py), builds and runs the C++
# example against the installed library, runs ctest and pytest.
# make demo: the main job (see README).
PYTHON ?= python3
BUILD_DIR ?= build/cmake
export PYTHON

.PHONY: test deps lint build ctest pytest cpp-example demo study clean

test: deps lint build cpp-example ctest pytest

deps:
	bash scripts/install_deps.sh

# ruff (check, format) and clang-format, pinned; installed when missing, skipped offline.
lint:
	bash scripts/lint.sh

build:
	RESLORA_BUILD_TESTS=1 RESLORA_BUILD_DIR=$(BUILD_DIR) $(PYTHON) -m pip install --no-build-isolation --no-deps -e .
	@$(PYTHON) -c "import reslora; print('[build] reslora', reslora.build_info())"
	@if command -v nvcc >/dev/null 2>&1; then \
	  test -f $(BUILD_DIR)/libreslora_cuda_kernels.a || { echo "[build] nvcc is present but the CUDA sources were not compiled" >&2; exit 1; }; \
	  echo "[build] CUDA sources compiled with $$(nvcc --version | tail -1)"; fi

ctest:
	ctest --test-dir $(BUILD_DIR) --output-on-failure

pytest:
	$(PYTHON) -m pytest tests/python -q -rs $(PYTEST_ARGS)

# A C++ program built with CMake against the installed library (find_package(reslora)).
cpp-example:
	rm -rf build/install build/example
	cmake --install $(BUILD_DIR) --prefix build/install >/dev/null
	cmake -S examples/cpp -B build/example -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$(CURDIR)/build/install;$$($(PYTHON) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build build/example
	./build/example/train_chain

# The demo builds the package alone (no test suites; CUDA sources only for a CUDA torch).
demo: deps
	RESLORA_BUILD_TESTS=0 RESLORA_BUILD_DIR=build/demo-cmake $(PYTHON) -m pip install --no-build-isolation --no-deps -e .
	$(PYTHON) examples/demo.py

# What ResLoRA buys, measured (bench/study.py): a CUDA GPU makes it take minutes.
study: deps build
	$(PYTHON) bench/study.py --out bench/results/study

clean:
	rm -rf build python/reslora/*.so python/reslora/build_info.json
