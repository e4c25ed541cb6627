"""Builds reslora with CMake (the one build system) against the installed torch.

    pip install --no-build-isolation .        # or -e . for development

Environment: RESLORA_BUILD_TESTS=1 also builds the C++ tests (ctest --test-dir build/cmake);
RESLORA_BUILD_DIR overrides the CMake build folder (default build/cmake); RESLORA_CUDA=ON|OFF|AUTO;
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default 8.0 and 9.0); MAX_JOBS caps parallel jobs.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
_SIBLINGS = ("libreslora.so", "build_info.json")


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        try:
            import torch.utils
        except ImportError as e:  # pragma: no cover - reported to the user as is
            raise RuntimeError(
                "reslora builds against an installed torch (>= 2.4): install torch first, then "
                "`pip install --no-build-isolation .`"
            ) from e
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        extdir = target.parent
        if self.inplace or getattr(self, "editable_mode", False):
            # In-place / editable: everything (libreslora, _C, the build record) in the source
            # package, where the editable install imports it from.
            extdir = Path(self.get_finalized_command("build_py").get_package_dir("reslora")).resolve()
        build_dir = Path(os.environ.get("RESLORA_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        tests = os.environ.get("RESLORA_BUILD_TESTS", "0") not in ("0", "", "OFF", "off")
        # The libraries are built in the build tree's own folder and copied to where the package
        # needs them (the source package for an editable install, the wheel's folder otherwise):
        # the editable install, a wheel and the C++ tests share one configuration and one build.
        out_dir = build_dir / "reslora"
        args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('RESLORA_BUILD_TYPE', 'Release')}",
            f"-DRESLORA_BUILD_TESTS={'ON' if tests else 'OFF'}",
            f"-DRESLORA_CUDA={os.environ.get('RESLORA_CUDA', 'AUTO')}",
        ]
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            args.append("-GNinja")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args])
        subprocess.check_call(["cmake", "--build", str(build_dir), "--parallel", jobs])
        extdir.mkdir(parents=True, exist_ok=True)
        for name in (target.name, *_SIBLINGS):
            # by a rename, so that a process that has the old library loaded keeps it intact
            tmp = extdir / f".{name}.tmp"
            shutil.copy2(out_dir / name, tmp)
            os.replace(tmp, extdir / name)
        if extdir / target.name != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(extdir / target.name, target)


def torch_requirement():
    """The torch the package is built against, as the loader checks it (same release): a build
    only loads next to that torch. Without an importable torch (an sdist, say): >= 2.4."""
    try:
        import torch
    except ImportError:
        return "torch>=2.4"
    return f"torch=={torch.__version__.split('+')[0]}"


# Name, version, description, license and the optional dependency groups are in pyproject.toml.
setup(
    package_dir={"": "python"},
    packages=["reslora"],
    ext_modules=[CMakeExtension("reslora._C")],
    cmdclass={"build_ext": CMakeBuild},
    # safetensors: the checkpoint and adapter files; transformers / peft only where used.
    install_requires=[torch_requirement(), "safetensors"],
    package_data={"reslora": list(_SIBLINGS)},
    zip_safe=False,
)
