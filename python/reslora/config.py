"""ResLoRAConfig: what to adapt and how (PEFT-style)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import List, Optional, Union

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


@dataclass
class ResLoRAConfig:
    """variant: "lora" | "is" | "bs" | "ms". pre_num: previous blocks a bs / ms shortcut reaches
    (-1 = all; is always uses exactly one). target_modules: list of names (exact module paths or
    suffixes), a regex string (full match), or "all-linear" (every linear layer but the output
    head). merge: is: "input" | "weight"; ms: "input" | "mid"; bs, lora: "exact"; None picks the
    first. stats_window: training forwards whose input norms the is / ms merges average."""

    variant: str = "is"
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    pre_num: int = 1
    target_modules: Optional[Union[List[str], str]] = None
    merge: Optional[str] = None
    stats_window: int = 100

    def __post_init__(self):
        _C.validate_options(
            self.variant, self.r, self.lora_alpha, self.lora_dropout, self.pre_num, self.stats_window
        )
        allowed = MERGES[self.variant]
        if self.merge is None:
            self.merge = allowed[0]
        if not isinstance(self.merge, str):
            raise ValueError(f"reslora: merge must be one of {list(allowed)} or None, got {self.merge!r}")
        _C.check_merge(self.variant, self.merge)
        tm = self.target_modules
        expected = "a non-empty list of names, a regex string or 'all-linear'"
        if isinstance(tm, str) and tm != "all-linear":
            try:
                re.compile(tm)
            except re.error as e:
                raise ValueError(
                    f"reslora: target_modules must be {expected}; got the string {tm!r}, which "
                    f"is not a valid regular expression ({e})"
                ) from None
        elif tm is not None and not isinstance(tm, str):
            if not isinstance(tm, (list, tuple, set, frozenset)):
                raise ValueError(f"reslora: target_modules must be {expected}, got {tm!r}")
            tm = list(tm)
            if not tm or not all(isinstance(t, str) and t for t in tm):
                raise ValueError(f"reslora: target_modules must be {expected}, got {self.target_modules!r}")
            self.target_modules = tm

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ResLoRAConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"reslora: unknown ResLoRAConfig fields {sorted(unknown)}")
        return cls(**d)
