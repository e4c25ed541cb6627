"""Continuing a PEFT LoRA adapter as ResLoRA: the adapter's A, B and scaling, its targets, biases
and modules to save are taken over by a ResLoRAModel of the variant the given config names."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Dict, Tuple

import torch
from torch import nn

from .config import ResLoRAConfig

_TAKEN = ("r", "lora_alpha", "use_rslora", "target_modules", "modules_to_save", "bias", "task_type")


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def is_peft_adapter_dir(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, "adapter_config.json"))


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _peft_lora_config(peft_model):
    if len(peft_model.peft_config) != 1:
        raise ValueError(
            f"reslora: a PEFT model continued as ResLoRA must hold one adapter, got {sorted(peft_model.peft_config)}"
        )
    ((name, cfg),) = peft_model.peft_config.items()
    peft_type = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    if peft_type != "LORA" or getattr(cfg, "use_dora", False):
        kind = "DoRA" if peft_type == "LORA" else peft_type
        raise ValueError(f"reslora: only a plain PEFT LoRA adapter can be continued as ResLoRA, got a {kind} adapter")
    return name, cfg


def from_peft_model(peft_model, config: ResLoRAConfig):
    """A ResLoRAModel that continues peft_model's LoRA adapter: the PEFT layers are taken out of
    the model (their base layers put back) and the adapter's values loaded into ResLoRA blocks."""
    from .model import ResLoRAModel

    if not isinstance(config, ResLoRAConfig):
        raise TypeError(f"reslora: config must be a ResLoRAConfig, got {type(config).__name__}")
    adapter, pcfg = _peft_lora_config(peft_model)
    base = peft_model.get_base_model()
    pairs: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]] = {}
    saved: Dict[str, Tuple[dict, dict]] = {}
    for path, module in list(base.named_modules()):
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer") and adapter in module.lora_A:
            pairs[path] = (
                module.lora_A[adapter].weight.detach().clone(),
                module.lora_B[adapter].weight.detach().clone(),
                float(module.scaling[adapter]),
            )
            _replace(base, path, module.get_base_layer())
        elif type(module).__name__ == "ModulesToSaveWrapper":
            trained = module.modules_to_save[adapter].state_dict()
            saved[path] = (module.original_module.state_dict(), trained)
            _replace(base, path, module.original_module)
    if not pairs:
        raise ValueError("reslora: the PEFT model has no LoRA layers to continue")
    ranks = {p: a.shape[0] for p, (a, _, _) in pairs.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    rslora = bool(getattr(pcfg, "use_rslora", False))

    def alpha_of(path):  # the lora_alpha that gives the adapter's scaling at the block's rank
        scale, rank = pairs[path][2], ranks[path]
        return scale * (rank**0.5 if rslora else rank)

    alpha = alpha_of(next(p for p in pairs if ranks[p] == r))
    task = getattr(pcfg, "task_type", None)
    taken = dict(
        r=r,
        lora_alpha=alpha,
        use_rslora=rslora,
        target_modules=sorted(pairs),
        modules_to_save=sorted(saved) or None,
        bias=getattr(pcfg, "bias", "none"),
        task_type=str(getattr(task, "value", task)) if task is not None else None,
        rank_pattern={p: k for p, k in ranks.items() if k != r},
        alpha_pattern={p: alpha_of(p) for p in pairs if abs(alpha_of(p) - alpha) > 1e-9 * alpha},
    )
    defaults = ResLoRAConfig()
    differ = [f for f in _TAKEN if getattr(config, f) != getattr(defaults, f) and getattr(config, f) != taken[f]]
    if differ:
        warnings.warn(
            f"reslora: continuing a PEFT adapter takes {', '.join(differ)} from the adapter; the "
            "config's values for them are not used",
            stacklevel=3,
        )
    model = ResLoRAModel(base, dataclasses.replace(config, **taken))
    with torch.no_grad():
        for path, blk in model.blocks.items():
            a, b, _ = pairs[path]
            blk.lora_A.copy_(a)
            blk.lora_B.copy_(b)
        for path, (original, trained) in saved.items():
            wrapper = model.saved_modules[path]
            wrapper.original_module.load_state_dict(original)
            wrapper.modules_to_save.load_state_dict(trained)
    if config.variant != "lora":
        warnings.warn(
            f"reslora: the PEFT adapter's A and B start a {config.variant!r} model, whose shortcuts "
            "add to every block after the first from the first forward on: its outputs differ from "
            "the adapter's until training adapts them (variant='lora' keeps them equal)",
            stacklevel=3,
        )
    return model


def from_peft_adapter_dir(model: nn.Module, path, config: ResLoRAConfig):
    """from_peft_model for a PEFT adapter directory (adapter_config.json and its weights)."""
    if config is None:
        raise ValueError(
            f"reslora: {str(path)!r} holds a PEFT adapter, not a ResLoRA checkpoint: give the "
            "ResLoRAConfig to continue it with, from_pretrained(model, path, config=ResLoRAConfig(variant=...))"
        )
    import peft

    return from_peft_model(peft.PeftModel.from_pretrained(model, str(path), is_trainable=True), config)
