# make test: installs what is missing, builds (CMake through setup.py), runs ctest and pytest.
# make demo: the main job (see README).
PYTHON ?= python3
BUILD_DIR ?= build/cmake
export PYTHON

.PHONY: test deps build ctest pytest demo clean

test: deps build ctest pytest

deps:
	bash scripts/install_deps.sh

build:
	RESLORA_BUILD_TESTS=1 RESLORA_BUILD_DIR=$(BUILD_DIR) $(PYTHON) -m pip install --no-build-isolation --no-deps -e .
	@$(PYTHON) -c "import reslora; print('[build] reslora', reslora.build_info())"
	@if command -v nvcc >/dev/null 2>&1; then \
	  test -f $(BUILD_DIR)/libreslora_cuda_kernels.a || { echo "[build] nvcc is present but the CUDA sources were not compiled" >&2; exit 1; }; \
	  echo "[build] CUDA sources compiled with $$(nvcc --version | tail -1)"; fi

ctest:
	ctest --test-dir $(BUILD_DIR) --output-on-failure

pytest:
	$(PYTHON) -m pytest tests/python -q -rs

demo: deps build
	$(PYTHON) examples/demo.py

clean:
	rm -rf build python/reslora/*.so python/reslora/build_info.json
