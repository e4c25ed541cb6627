"""What a packager checks: a complete sdist, relative RUNPATHs in the Python module, the
declared requirements (the torch the loader accepts), a license, a wheel that installs into a
fresh venv and works there, and a C++ library that builds and passes ctest against LibTorch
alone."""

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
    subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (sdist,) = tmp_path.glob("reslora-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for need in [
        "CMakeLists.txt",
        "LICENSE",
        "cmake/ResLoRATorch.cmake",
        "cmake/ResLoRACuda.cmake",
        "cmake/ResLoRACutlass.cmake",
        "cmake/resloraConfig.cmake.in",
        "csrc/ops/lora_ops.cpp",
        "csrc/ops/lora_impl.h",
        "csrc/kernels/cuda/lowrank/launch.cu",
        "csrc/kernels/cuda/lowrank/dispatch.cuh",
        "csrc/kernels/cuda/extra_k/mainloop.cuh",
        "csrc/kernels/cuda/extra_k/instances_bf16_128x256.cu",
        "csrc/kernels/cuda/extra_k/instances_f16_128x128.cu",
        "bench/cuda/extra_k_bench.cu",
        "bench/cuda/timing.cuh",
        "csrc/include/reslora/rules.h",
        "csrc/python/bindings.cpp",
        "tests/data/spec_cases.txt",
        "tests/cpp/CMakeLists.txt",
        "python/reslora/layers.py",
        "setup.py",
        "pyproject.toml",
    ]:
        assert need in names, f"the sdist lacks {need}"
    assert not any(n.endswith(".so") for n in names)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_the_python_module_has_relative_runpaths_only():
    libs = list(PKG.glob("_C*.so"))
    assert len(libs) == 1
    for lib in libs:
        out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
        paths = [
            p
            for m in re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library (?:runpath|rpath): \[(.*)\]", out)
            for p in m.split(":")
        ]
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
def test_cpp_library_builds_and_passes_ctest_against_libtorch_without_python(tmp_path):
    import torch.utils

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    proc = subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(tmp_path),
            "-DRESLORA_BUILD_PYTHON=OFF",
            "-DRESLORA_CUDA=OFF",
            "-DRESLORA_BUILD_TESTS=ON",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            "-DPython3_EXECUTABLE=/nonexistent/python3",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "reslora: torch" in proc.stdout
    # built and tested there too: the library, the C++ tests and ctest, still without Python
    for cmd in (
        ["cmake", "--build", str(tmp_path), "--parallel", str(os.cpu_count() or 2)],
        ["ctest", "--test-dir", str(tmp_path), "--output-on-failure"],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "100% tests passed" in proc.stdout


WHEEL_SCRIPT = """
import os, sys, torch, reslora
from torch import nn
assert reslora.__file__.startswith(sys.prefix), reslora.__file__  # the wheel's, not the checkout's
model = reslora.get_reslora_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)),
                                  reslora.ResLoRAConfig(variant="ms", r=2, target_modules=["0", "1"]))
model.train()
model(torch.randn(4, 8)).sum().backward()
model.save_pretrained(sys.argv[1])
back = reslora.ResLoRAModel.from_pretrained(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), sys.argv[1])
print("ok", sorted(os.listdir(sys.argv[1])), len(back.blocks))
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_a_wheel_installs_into_a_fresh_venv_and_works_there(tmp_path):
    # pip wheel as a packager runs it, the build folder removed before the wheel is used: the
    # installed modules find each other and torch by relative RUNPATHs alone
    build = tmp_path / "build"
    env = dict(os.environ, RESLORA_BUILD_DIR=str(build), RESLORA_CUDA="OFF", RESLORA_BUILD_TESTS="0")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("reslora-*.whl")
    shutil.rmtree(build)
    # A fresh venv that sees torch and safetensors where they are installed (a plain directory
    # on its path, so no other package there, such as an editable reslora, is picked up)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    import safetensors

    (site,) = (venv / "lib").glob("python*/site-packages")
    dirs = {str(Path(m.__file__).resolve().parents[1]) for m in (torch, safetensors)}
    (site / "installed_packages.pth").write_text("\n".join(sorted(dirs)) + "\n")
    py = str(venv / "bin" / "python")
    proc = subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [py, "-c", WHEEL_SCRIPT, str(tmp_path / "saved")], capture_output=True, text=True, cwd=str(tmp_path), env=clean
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok ['reslora_config.json', 'reslora_model.safetensors'] 2"), proc.stdout
