"""Loads the compiled core (libreslora + reslora._C) and explains a failure to load."""

import json
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent


def _build_record():
    try:
        return json.loads((_HERE / "build_info.json").read_text())
    except (OSError, ValueError):
        return None


def load():
    """Imports reslora._C, which registers torch.ops.reslora.*; raises ImportError with the
    torch / CUDA versions the build was made for and the ones found when it cannot load."""
    try:
        from . import _C  # loading it registers the ops
    except (ImportError, OSError) as e:
        built = _build_record()
        found = f"torch {torch.__version__} (CUDA {torch.version.cuda})"
        if built is None:
            hint = "no build record was found: was the package built (pip install --no-build-isolation .)?"
        else:
            hint = f"it was built for torch {built.get('torch_version')} (CUDA {built.get('cuda_version') or 'none'})"
        raise ImportError(
            f"reslora: the compiled core failed to load: {e}. Found {found}; {hint}. "
            "Rebuild reslora against the installed torch."
        ) from e
    info = dict(_C.build_info())
    if info["torch_version"].split("+")[0] != torch.__version__.split("+")[0]:
        raise ImportError(
            f"reslora: the compiled core was built for torch {info['torch_version']} "
            f"(CUDA {info['cuda_version'] or 'none'}) but torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}) is installed. Rebuild reslora against the installed torch."
        )
    return _C
