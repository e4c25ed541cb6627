"""ResLoRAConfig: what to adapt and how (PEFT-style)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

from . import _lib

_C = _lib.load()

# The C++ core's tables: the variants, and the merges that fit each (the first is its default).
VARIANTS = tuple(_C.variants())
MERGES = {v: tuple(_C.merges_for(v)) for v in VARIANTS}

# Projections adapted when target_modules is not given, by model type (PEFT's usual choice).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
}

# PEFT's task types. The classification ones train their head in full: PEFT adds these module
# names to modules_to_save (those the model has), and so does reslora.
TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
BIAS = ("none", "all", "lora_only")
INITS = (True, False, "gaussian")


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """The LoRA term's factor: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def check_init_options(use_rslora, init_lora_weights) -> None:
    """The rules for use_rslora and init_lora_weights, for the config and the layers alike."""
    if not isinstance(use_rslora, bool):
        raise ValueError(f"reslora: use_rslora must be a bool, got {use_rslora!r}")
    if not any(init_lora_weights is v or (isinstance(v, str) and init_lora_weights == v) for v in INITS):
        raise ValueError(f"reslora: init_lora_weights must be one of {list(INITS)}, got {init_lora_weights!r}")


def _names_or_regex(name: str, value, allow_all_linear: bool) -> Optional[Union[List[str], str]]:
    """target_modules / exclude_modules: a non-empty list of names, a regex string (full match)
    or, for targets, 'all-linear'."""
    expected = "a non-empty list of names, a regex string" + (" or 'all-linear'" if allow_all_linear else "")
    if value is None or (allow_all_linear and value == "all-linear"):
        return value
    if isinstance(value, str):
        if not value:
            raise ValueError(f"reslora: {name} must be {expected}, got the empty string")
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(
                f"reslora: {name} must be {expected}; got the string {value!r}, which is not a "
                f"valid regular expression ({e})"
            ) from None
        return value
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError(f"reslora: {name} must be {expected}, got {value!r}")
    out = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if not out or not all(isinstance(t, str) and t for t in out):
        raise ValueError(f"reslora: {name} must be {expected}, got {value!r}")
    return out


def _pattern(name: str, value, kind, expected: str) -> Dict[str, Union[int, float]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"reslora: {name} must be a dict of module-name patterns to {expected}, got {value!r}")
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"reslora: {name} keys must be non-empty strings, got {key!r}")
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"reslora: {name} key {key!r} is not a valid regular expression ({e})") from None
        if isinstance(v, bool) or not isinstance(v, kind) or v <= 0:
            raise ValueError(f"reslora: {name}[{key!r}] must be {expected}, got {v!r}")
    return dict(value)


@dataclass
class ResLoRAConfig:
    """variant: "lora" | "is" | "bs" | "ms". pre_num: previous blocks a bs / ms shortcut reaches
    (-1 = all; is always uses exactly one). target_modules: list of names (exact module paths or
    suffixes), a regex string (full match), or "all-linear" (every linear layer but the output
    head). merge: is: "input" | "weight"; ms: "input" | "mid"; bs, lora: "exact"; None picks the
    first. stats_window: training forwards whose input norms the is / ms merges average.

    PEFT's LoraConfig options, with its names and meaning: modules_to_save (modules trained in
    full and saved with the adapter, such as a classifier head), exclude_modules,
    layers_to_transform / layers_pattern (with a list of target_modules), rank_pattern /
    alpha_pattern (module-name pattern -> r / lora_alpha; linked blocks of the shortcut variants
    must share one), task_type (written to the exported adapter; SEQ_CLS / TOKEN_CLS /
    QUESTION_ANS add the model's head to modules_to_save), bias ("none" | "all" | "lora_only":
    which biases train), use_rslora (scaling lora_alpha / sqrt(r)), init_lora_weights (True:
    B = 0 and A kaiming-uniform; "gaussian": A ~ N(0, 1/r); False: B random too, so the adapter
    starts non-zero)."""

    variant: str = "is"
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    pre_num: int = 1
    target_modules: Optional[Union[List[str], str]] = None
    merge: Optional[str] = None
    stats_window: int = 100
    modules_to_save: Optional[List[str]] = None
    exclude_modules: Optional[Union[List[str], str]] = None
    layers_to_transform: Optional[Union[List[int], int]] = None
    layers_pattern: Optional[Union[List[str], str]] = None
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    task_type: Optional[str] = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True

    @property
    def base_model_name_or_path(self):
        # What peft.get_peft_model reads first of a PEFT config: say what to call instead.
        raise AttributeError(
            "reslora: a ResLoRAConfig is not a PEFT config, so peft.get_peft_model cannot use it: "
            "wrap the model with reslora.get_reslora_model(model, config) (after merge_to_lora(), "
            "its save_pretrained writes an adapter that PEFT loads)"
        )

    def __post_init__(self):
        _C.validate_options(self.variant, self.r, self.lora_alpha, self.lora_dropout, self.pre_num, self.stats_window)
        warning = _C.option_warning(
            self.variant, self.r, self.lora_alpha, self.lora_dropout, self.pre_num, self.stats_window
        )
        if warning:
            warnings.warn(warning, stacklevel=3)
        allowed = MERGES[self.variant]
        if self.merge is None:
            self.merge = allowed[0]
        if not isinstance(self.merge, str):
            raise ValueError(f"reslora: merge must be one of {list(allowed)} or None, got {self.merge!r}")
        _C.check_merge(self.variant, self.merge)
        self.target_modules = _names_or_regex("target_modules", self.target_modules, True)
        self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules, False)
        mts = self.modules_to_save
        if mts is not None:
            if (
                isinstance(mts, str)
                or not isinstance(mts, (list, tuple))
                or not mts
                or not all(isinstance(m, str) and m for m in mts)
            ):
                raise ValueError(
                    f"reslora: modules_to_save must be None or a non-empty list of module names, got {mts!r}"
                )
            self.modules_to_save = list(mts)
        lt = self.layers_to_transform
        if lt is not None:
            items = [lt] if not isinstance(lt, (list, tuple)) else list(lt)
            if not items or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
                raise ValueError(
                    f"reslora: layers_to_transform must be a layer index >= 0 or a non-empty list of them, got {lt!r}"
                )
            if isinstance(self.target_modules, str):
                raise ValueError(
                    f"reslora: layers_to_transform needs target_modules as a list of names, got "
                    f"the string {self.target_modules!r} (write the layers into the regex instead)"
                )
            self.layers_to_transform = lt if isinstance(lt, int) else items
        lp = self.layers_pattern
        if lp is not None:
            if lt is None:
                raise ValueError(f"reslora: layers_pattern {lp!r} needs layers_to_transform, got None")
            items = [lp] if isinstance(lp, str) else lp
            if not isinstance(items, (list, tuple)) or not items or not all(isinstance(i, str) and i for i in items):
                raise ValueError(f"reslora: layers_pattern must be a name or a non-empty list of names, got {lp!r}")
            self.layers_pattern = lp if isinstance(lp, str) else list(items)
        self.rank_pattern = _pattern("rank_pattern", self.rank_pattern, int, "a rank (int >= 1)")
        self.alpha_pattern = _pattern("alpha_pattern", self.alpha_pattern, (int, float), "a lora_alpha > 0")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"reslora: task_type must be None or one of {list(TASK_TYPES)}, got {self.task_type!r}")
        if self.bias not in BIAS:
            raise ValueError(f"reslora: bias must be one of {list(BIAS)}, got {self.bias!r}")
        check_init_options(self.use_rslora, self.init_lora_weights)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> ResLoRAConfig:
        if not isinstance(d, dict):
            raise ValueError(f"reslora: ResLoRAConfig.from_dict needs a dict of config fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"reslora: unknown ResLoRAConfig fields {sorted(unknown)}")
        return cls(**d)
