"""ResLoRAConfig: what to adapt and how (PEFT-style)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import List, Optional, Union

VARIANTS = ("lora", "is", "bs", "ms")
MERGES = {"lora": ("exact",), "is": ("input", "weight"), "bs": ("exact",), "ms": ("input", "mid")}

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
        if self.variant not in VARIANTS:
            raise ValueError(f"reslora: variant must be one of {list(VARIANTS)}, got {self.variant!r}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"reslora: r must be an int > 0, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or not math.isfinite(self.lora_alpha):
            raise ValueError(f"reslora: lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"reslora: lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.pre_num, bool) or not isinstance(self.pre_num, int) or self.pre_num < -1:
            raise ValueError(f"reslora: pre_num must be -1 (all) or an int >= 0, got {self.pre_num!r}")
        if isinstance(self.stats_window, bool) or not isinstance(self.stats_window, int) or self.stats_window < 1:
            raise ValueError(f"reslora: stats_window must be an int >= 1, got {self.stats_window!r}")
        allowed = MERGES[self.variant]
        if self.merge is None:
            self.merge = allowed[0]
        if self.merge not in allowed:
            raise ValueError(
                f"reslora: merge {self.merge!r} does not fit variant {self.variant!r}; expected one of "
                f"{list(allowed)}"
            )
        tm = self.target_modules
        if tm is not None and not isinstance(tm, str):
            tm = list(tm)
            if not tm or not all(isinstance(t, str) and t for t in tm):
                raise ValueError(
                    f"reslora: target_modules must be a non-empty list of names, a regex string or "
                    f"'all-linear', got {self.target_modules!r}"
                )
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
