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

ctest:
	ctest --test-dir $(BUILD_DIR) --output-on-failure

pytest:
	$(PYTHON) -m pytest tests/python -q -rs

demo: deps build
	$(PYTHON) examples/demo.py

clean:
	rm -rf build python/reslora/*.so python/reslora/build_info.json
