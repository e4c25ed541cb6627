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
import zipfile
from pathlib import Path

import pytest
import torch

import reslora

ROOT = Path(__file__).resolve().parents[2]
PKG = Path(reslora.__file__).resolve().parent


@pytest.mark.build
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
        "csrc/kernels/cuda/static_switch.h",
        "csrc/kernels/cuda/extra_k/mainloop.cuh",
        "csrc/kernels/cuda/extra_k/instances_bf16_128x256.cu",
        "csrc/kernels/cuda/extra_k/instances_f16_128x128.cu",
        "bench/cuda/extra_k_bench.cu",
        "bench/cuda/timing.cuh",
        "csrc/include/reslora/rules.h",
        "csrc/python/bindings.cpp",
        "tests/data/spec_cases.txt",
        "tests/cpp/CMakeLists.txt",
        "python/reslora/block.py",
        "tests/constraints.txt",
        "setup.py",
        "pyproject.toml",
    ]:
        assert need in names, f"the sdist lacks {need}"
    assert not any(n.endswith(".so") for n in names)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_the_packaged_libraries_have_relative_runpaths_only():
    libs = sorted(PKG.glob("_C*.so")) + sorted(PKG.glob("libreslora.so"))
    assert len(libs) == 2, libs
    for lib in libs:
        paths, _ = runpaths(lib)
        assert paths, f"{lib.name} has no RUNPATH"
        assert all(p.startswith("$ORIGIN") for p in paths), f"{lib.name}: {paths}"


def test_requirements_and_license_are_declared():
    meta = importlib.metadata.metadata("reslora")
    requires = importlib.metadata.requires("reslora") or []
    assert f"torch=={torch.__version__.split('+')[0]}" in requires  # what the loader accepts
    assert any(r.startswith("safetensors") for r in requires)
    assert meta.get("License") == "MIT" or "MIT" in (meta.get("License-Expression") or "")
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    # one version: pyproject.toml's, read by setup.py (the metadata) and CMake (the core)
    declared = re.search(r'^version = "(.*)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert meta["Version"] == declared == reslora.__version__ == reslora.build_info()["version"]


def build_tree():
    """The CMake build tree that the package was built in (make build: build/cmake)."""
    tree = Path(os.environ.get("RESLORA_BUILD_DIR", ROOT / "build" / "cmake"))
    if not (tree / "CMakeCache.txt").exists():
        pytest.skip(f"needs the project's CMake build tree ({tree}): make build")
    return tree


def runpaths(lib: Path):
    out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    return [
        p for m in re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library (?:runpath|rpath): \[(.*)\]", out) for p in m.split(":")
    ], re.findall(r"\(NEEDED\)\s+Shared library: \[(.*)\]", out)


@pytest.mark.build
@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_the_cpp_library_configures_against_libtorch_without_python(tmp_path):
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
    # the library and the C++ tests are targets of that build; the Python module is not
    targets = subprocess.run(
        ["cmake", "--build", str(tmp_path), "--target", "help"], capture_output=True, text=True, env=env
    ).stdout
    for target in ("reslora", "test_modules", "test_spec"):
        assert re.search(rf"(^|\s){target}(:|\s|$)", targets, re.M), targets[-2000:]
    assert "reslora_python" not in targets


@pytest.mark.build
@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_the_cpp_library_and_its_tests_need_no_python():
    # the build tree's library and C++ tests (ctest runs them: make ctest) load torch alone
    tree = build_tree()
    tests = [
        p for p in (tree / "tests" / "cpp").glob("test_*") if p.is_file() and not p.suffix and os.access(p, os.X_OK)
    ]
    binaries = [tree / "reslora" / "libreslora.so", *tests]
    assert len(binaries) >= 3, binaries
    for binary in binaries:
        _, needed = runpaths(binary)
        assert not [n for n in needed if "python" in n], (binary.name, needed)
    _, needed = runpaths(binaries[0])
    assert "libtorch_cpu.so" in needed and "libc10.so" in needed, needed  # LibTorch, linked directly


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


def the_wheel(tmp_path) -> Path:
    """The wheel of this checkout: make wheel's (RESLORA_WHEEL, built from the one build tree),
    else built here with pip wheel as a packager runs it."""
    given = os.environ.get("RESLORA_WHEEL")
    if given:
        assert Path(given).is_file(), f"RESLORA_WHEEL={given} does not exist"
        return Path(given)
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
    shutil.rmtree(build)  # nothing of the build tree is needed by the installed wheel
    (wheel,) = (tmp_path / "dist").glob("reslora-*.whl")
    return wheel


@pytest.mark.build
@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_a_wheel_installs_into_a_fresh_venv_and_works_there(tmp_path):
    # the installed modules find each other and torch by relative RUNPATHs alone
    wheel = the_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "reslora/libreslora.so" in names and "reslora/build_info.json" in names, names
        (c_ext,) = [n for n in names if n.startswith("reslora/_C") and n.endswith(".so")]
        if shutil.which("readelf"):
            for name in ("reslora/libreslora.so", c_ext):
                z.extract(name, tmp_path / "unpacked")
                paths, _ = runpaths(tmp_path / "unpacked" / name)
                assert paths and all(p.startswith("$ORIGIN") for p in paths), (name, paths)
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
