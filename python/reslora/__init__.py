"""reslora: ResLoRA (LoRA plus residual shortcuts between the LoRA blocks of successive layers)
as PyTorch custom ops (torch.ops.reslora.*) with C++/CUDA kernels."""

from ._lib import load as _load

_C = _load()

from .block import ResLoRALinear  # noqa: E402
from .chain import ResLoRAChain  # noqa: E402
from .checkpointing import checkpoint  # noqa: E402
from .config import ResLoRAConfig  # noqa: E402
from .merging import merge_chain  # noqa: E402
from .model import ResLoRAModel, get_reslora_model  # noqa: E402
from .reference import reference_model  # noqa: E402

__version__ = _C.build_info()["version"]


def build_info():
    """What the compiled core was built with: version, torch_version, cuda_version, cuda_kernels,
    extra_k_gemm (the Hopper GEMM with the low-rank product inside it)."""
    return dict(_C.build_info())


__all__ = [
    "ResLoRAConfig",
    "ResLoRAModel",
    "get_reslora_model",
    "reference_model",
    "ResLoRAChain",
    "ResLoRALinear",
    "merge_chain",
    "checkpoint",
    "build_info",
]
