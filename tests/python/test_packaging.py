"""What a packager checks: a complete sdist, relative RUNPATHs in the Python module, the
declared requirements (the torch the loader accepts), a license, and a C++ library that
configures against LibTorch alone."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import reslora

ROOT = Path(__file__).resolve().parents[2]
PKG = Path(reslora.__file__).resolve().parent


def test_sdist_holds_everything_a_build_needs(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True)
    (sdist,) = tmp_path.glob("reslora-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for need in ["CMakeLists.txt", "LICENSE", "cmake/ResLoRATorch.cmake", "cmake/ResLoRACuda.cmake",
                 "cmake/resloraConfig.cmake.in", "csrc/ops/lora_ops.cpp", "csrc/ops/lora_impl.h",
                 "csrc/kernels/cuda/lora_fused.cu", "csrc/include/reslora/rules.h",
                 "csrc/python/bindings.cpp", "tests/data/spec_cases.txt", "tests/cpp/CMakeLists.txt",
                 "python/reslora/layers.py", "setup.py", "pyproject.toml"]:
        assert need in names, f"the sdist lacks {need}"
    assert not any(n.endswith(".so") for n in names)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_the_python_module_has_relative_runpaths_only():
    libs = list(PKG.glob("_C*.so"))
    assert len(libs) == 1
    for lib in libs:
        out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
        paths = [p for m in re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library (?:runpath|rpath): \[(.*)\]", out)
                 for p in m.split(":")]
        assert paths, f"{lib.name} has no RUNPATH"
        assert all(p.startswith("$ORIGIN") for p in paths), f"{lib.name}: {paths}"


def test_requirements_and_license_are_declared():
    meta = importlib.metadata.metadata("reslora")
    requires = importlib.metadata.requires("reslora") or []
    assert f"torch=={torch.__version__.split('+')[0]}" in requires  # what the loader accepts
    assert any(r.startswith("safetensors") for r in requires)
    assert meta.get("License") == "MIT" or "MIT" in (meta.get("License-Expression") or "")
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_cpp_library_configures_against_libtorch_without_python(tmp_path):
    import torch.utils

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    proc = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-DRESLORA_BUILD_PYTHON=OFF",
         "-DRESLORA_CUDA=OFF", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
         "-DPython3_EXECUTABLE=/nonexistent/python3"],
        capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "reslora: torch" in proc.stdout
