"""The PEFT LoRA adapter of a merged ResLoRAModel: adapter_model.safetensors with PEFT's keys and
an adapter_config.json that PEFT (and serving engines) load."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Dict, Optional, Tuple

import torch
from torch import nn

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# PEFT task types by the suffix of the model class, where the config names none: only the
# generative ones, whose heads are part of the base model.
_TASK_TYPES = [
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
]


def task_type(model: nn.Module, configured: Optional[str]) -> Optional[str]:
    if configured is not None:
        return configured
    name = type(model).__name__
    for suffix, task in _TASK_TYPES:
        if name.endswith(suffix):
            return task
    return None


def peft_adapter(owner) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config) of a merged ResLoRAModel. Blocks whose rank or lora_alpha differ
    from the most common one (a bs merge raises the rank; rank_pattern / alpha_pattern) are
    named in rank_pattern / alpha_pattern by their full path. The scaling is written as
    lora_alpha / r (use_rslora off), which gives every block the scaling it trained with."""
    cfg = owner.reslora_config
    blocks = owner.blocks
    tensors: Dict[str, torch.Tensor] = {}
    ranks = {name: blk.r for name, blk in blocks.items()}
    alphas = {name: blk.scaling * blk.r for name, blk in blocks.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas[n] for n in blocks if ranks[n] == r).most_common(1)[0][0]
    conv1d = False
    for name, blk in blocks.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = blk.lora_A.detach()
        tensors[f"base_model.model.{name}.lora_B.weight"] = blk.lora_B.detach()
        conv1d |= blk.transposed
    for path in owner.trained_biases:
        tensors[f"base_model.model.{path}"] = owner.get_base_model().get_parameter(path).detach()
    for name, wrapper in owner.saved_modules.items():
        for k, t in wrapper.modules_to_save.state_dict().items():
            tensors[f"base_model.model.{name}.{k}"] = t.detach()
    if owner.saved_modules:
        warnings.warn(
            f"reslora: the adapter holds the fully trained modules {sorted(owner.saved_modules)} "
            "(modules_to_save): PEFT loads them, but some serving engines (vLLM among them) refuse "
            "LoRA adapters with modules_to_save; serve a merged model (merge_and_unload()) there",
            stacklevel=3,
        )
    base_cfg = getattr(owner.get_base_model(), "config", None)
    config = {
        "peft_type": "LORA",
        "task_type": task_type(owner.get_base_model(), cfg.task_type),
        "base_model_name_or_path": getattr(base_cfg, "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(blocks),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "bias": cfg.bias,
        "fan_in_fan_out": conv1d,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "modules_to_save": sorted(owner.saved_modules) or None,
    }
    return tensors, config
