"""What reslora needs of the tensors and layers other libraries make: quantized base weights
(torchao NF4, bitsandbytes 4-bit, torchao's affine tensors), FSDP2's sharded parameters (DTensor)
and torch.distributed's process group. Each rule is written here once; the block, the merges and
the saves call it."""

from __future__ import annotations

import copy
from typing import Tuple

import torch
from torch import nn


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def gathered(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An earlier block's A or B as this block computes with it. Under FSDP2 (fully_shard per
    layer) an earlier layer's parameters are sharded again after its forward: they are gathered
    here (a small all-gather of r x d values), and in backward their gradient is averaged and
    scattered back over the ranks (reduce-scatter), as FSDP does for the layer's own use."""
    if is_dtensor(p) and not is_dtensor(like):
        from torch.distributed.tensor import Partial

        p = p.full_tensor(grad_placements=[Partial("avg")] * p.device_mesh.ndim)
    return p if p.dtype == like.dtype else p.to(like.dtype)


def full(t: torch.Tensor) -> torch.Tensor:
    """A parameter as one plain tensor (gathered from its shards under FSDP2; collective)."""
    return t.full_tensor() if is_dtensor(t) else t


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a quantized layer computes in: bitsandbytes' compute_dtype, its bias's, else
    float32."""
    dt = getattr(layer, "compute_dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    bias = getattr(layer, "bias", None)
    return bias.dtype if isinstance(bias, torch.Tensor) and bias.is_floating_point() else torch.float32


def dequantize(layer: nn.Module) -> torch.Tensor:
    w = layer.weight
    if hasattr(w, "get_original_weight"):  # torchao NF4Tensor
        return w.get_original_weight()
    if type(w).__name__ == "Params4bit" and getattr(w, "quant_state", None) is not None:  # bitsandbytes
        import bitsandbytes as bnb

        data, state = bnb_standard_layout(w)
        return bnb.functional.dequantize_4bit(data, state).to(compute_dtype(layer))
    if getattr(type(w), "dequantize", torch.Tensor.dequantize) is not torch.Tensor.dequantize:
        # torchao's affine quantized tensors, among others
        return w.dequantize()
    raise ValueError(
        f"reslora: cannot dequantize a base weight of type {type(w).__name__}: the is 'weight' "
        "merge and merge_and_unload() need it dense (the other merges and the PEFT export do not)"
    )


def bnb_standard_layout(w) -> Tuple[torch.Tensor, object]:
    """A bitsandbytes 4-bit weight's data and quant state in the layout dequantize_4bit reads.

    bitsandbytes >= 0.49 repacks a Linear4bit's weight in place for its CPU kernel at the first
    eval-mode forward without grad, on CPUs with AVX512-BF16 (quant_state.packing_format_for_cpu);
    dequantize_4bit does not read that layout and returns values unrelated to the weight. The
    standard layout is rebuilt here on copies, so the layer keeps the layout its kernel uses."""
    state = w.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return w.data, state
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack
    except ImportError as e:
        raise RuntimeError(
            "reslora: this bitsandbytes 4-bit weight is in bitsandbytes' CPU-packed layout "
            "(quant_state.packing_format_for_cpu=True) and this bitsandbytes has no inverse of it; "
            "call the layer's state_dict() (which restores the standard layout) or move it to CUDA first"
        ) from e
    return unpack(w.data.clone(), copy.deepcopy(state))


def requantize(layer: nn.Module, dense: torch.Tensor) -> nn.Parameter:
    w = layer.weight
    if hasattr(w, "get_original_weight") and hasattr(type(w), "from_tensor"):  # torchao NF4Tensor
        q = type(w).from_tensor(dense.to(w.dtype), w.block_size, w.scaler_block_size)
        return nn.Parameter(q, requires_grad=False)
    if type(w).__name__ == "Params4bit":  # bitsandbytes: quantized again on its device
        import bitsandbytes as bnb

        q = bnb.nn.Params4bit(
            dense.to("cpu"),
            requires_grad=False,
            quant_type=w.quant_type,
            blocksize=w.blocksize,
            compress_statistics=w.compress_statistics,
        )
        return q.to(w.device)
    raise ValueError(
        f"reslora: cannot quantize a merged weight back into {type(w).__name__}: fold the adapter "
        "into a dense copy of the model instead (or serve the exported PEFT adapter)"
    )


def is_distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
