"""Which layers of a model a ResLoRAConfig adapts, which it trains in full (modules_to_save) and
which biases it trains: PEFT's matching rules, so that one config picks the same layers here and
in PEFT."""

from __future__ import annotations

import re
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

from .config import DEFAULT_TARGETS, TASK_HEADS, ResLoRAConfig


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _output_head_names(model: nn.Module) -> set:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {name for name, m in model.named_modules() if head is not None and m is head}


def _named(name: str, names: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in names)


def _layer_index(name: str, layers_pattern) -> Optional[int]:
    """The first numbered path segment after a layers_pattern name (any name if None), as PEFT."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def modules_to_save(model: nn.Module, config: ResLoRAConfig) -> List[str]:
    """Paths of the modules trained in full: the config's modules_to_save (each must name at least
    one module) and the task type's head (classifier / score / qa_outputs, where present)."""
    out: List[str] = []
    names = [n for n, _ in model.named_modules() if n]
    for entry in config.modules_to_save or []:
        hits = [n for n in names if n == entry or n.endswith("." + entry)]
        if not hits:
            raise ValueError(f"reslora: modules_to_save entry {entry!r} names no module of {type(model).__name__}")
        out += hits
    heads = TASK_HEADS.get(config.task_type, ())
    found = [n for n in names if any(n == e or n.endswith("." + e) for e in heads)]
    if heads and not found:
        warnings.warn(
            f"reslora: task_type {config.task_type!r} trains the model's head in full, but "
            f"{type(model).__name__} has no module named {' or '.join(map(repr, heads))}: "
            "name the head in modules_to_save (or is this the right model class?)",
            stacklevel=4,
        )
    out += found
    # a module inside another one to save is saved with it
    out = sorted(set(out), key=names.index)
    return [n for n in out if not any(n.startswith(o + ".") for o in out)]


def targets(model: nn.Module, config: ResLoRAConfig, saved: Sequence[str] = ()) -> List[str]:
    """Paths of the layers to adapt: target_modules (names or suffixes, a regex with a full
    match, or 'all-linear': every linear layer but the output head), less exclude_modules and the
    modules trained in full, limited to layers_to_transform."""
    tm = config.target_modules
    if tm is None:
        mtype = getattr(getattr(model, "config", None), "model_type", None)
        if mtype not in DEFAULT_TARGETS:
            raise ValueError(
                f"reslora: target_modules must be given for model type {mtype!r} (defaults exist "
                f"for {sorted(DEFAULT_TARGETS)})"
            )
        tm = DEFAULT_TARGETS[mtype]
    ex = config.exclude_modules
    heads = _output_head_names(model)
    names = []
    for name, m in model.named_modules():
        if not name:
            continue
        if any(name == s or name.startswith(s + ".") for s in saved):
            continue
        if ex is not None and (re.fullmatch(ex, name) if isinstance(ex, str) else _named(name, ex)):
            continue
        if tm == "all-linear":
            hit = is_linear(m) and name not in heads
        elif isinstance(tm, str):
            hit = re.fullmatch(tm, name) is not None
        else:
            hit = _named(name, tm)
            lt = config.layers_to_transform
            if hit and lt is not None:
                idx = _layer_index(name, config.layers_pattern)
                hit = idx is not None and (idx == lt if isinstance(lt, int) else idx in lt)
        if hit and not is_linear(m):
            raise ValueError(
                f"reslora: target_modules {tm!r} names {name!r}, a {type(m).__name__}; reslora "
                "adapts nn.Linear and GPT-2 Conv1D layers: name those (or use 'all-linear')"
            )
        if hit:
            names.append(name)
    if not names:
        raise ValueError(
            f"reslora: target_modules {tm!r} match no nn.Linear or Conv1D layer of "
            f"{type(model).__name__}"
            + (f" (after exclude_modules {ex!r})" if ex is not None else "")
            + (f" (after modules_to_save {list(saved)!r}, which train in full)" if saved else "")
            + (
                f" in layers_to_transform {config.layers_to_transform!r}"
                if config.layers_to_transform is not None
                else ""
            )
            + (f" of layers_pattern {config.layers_pattern!r}" if config.layers_pattern is not None else "")
            + (
                "; a string is a regular expression that must match a whole module path (PEFT's "
                "rule), such as r'.*\\.q_proj'; a list names modules or path suffixes"
                if isinstance(config.target_modules, str) and config.target_modules != "all-linear"
                else ""
            )
        )
    return names


def _pattern_value(patterns: Dict[str, float], name: str, default):
    # PEFT's rule: the first key that matches the end of the path, at a dot boundary.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def rank_and_alpha(config: ResLoRAConfig, name: str) -> Tuple[int, float]:
    return (
        _pattern_value(config.rank_pattern, name, config.r),
        float(_pattern_value(config.alpha_pattern, name, config.lora_alpha)),
    )


def trained_biases(model: nn.Module, config: ResLoRAConfig, adapted: Sequence[str]) -> List[str]:
    """Parameter paths, in the wrapped model, of the biases bias="all" / "lora_only" trains
    (PEFT's choice: every parameter called bias, or the adapted layers' own). The modules to save
    train in full anyway, and their frozen originals stay frozen."""
    if config.bias == "none":
        return []
    own = {p + ".base_layer" for p in adapted}
    out = []
    for name, _ in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if leaf != "bias" or ".original_module." in name + "." or ".modules_to_save." in name + ".":
            continue
        if config.bias == "all" or owner in own:
            out.append(name)
    if not out:
        warnings.warn(
            f"reslora: bias={config.bias!r} trains no bias: "
            + ("the model has none" if config.bias == "all" else "none of the adapted layers has one"),
            stacklevel=4,
        )
    return out


def skeleton(path: str):
    """The path with its layer indices replaced (the chain key) and the indices (its order)."""
    parts = path.split(".")
    key = ".".join("*" if p.isdigit() else p for p in parts)
    index = tuple(int(p) for p in parts if p.isdigit())
    return key, index
