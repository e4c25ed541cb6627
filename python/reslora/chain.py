"""A chain: the blocks of one projection type linked in layer order (ResLoRAChain)."""

from __future__ import annotations

import weakref
from typing import List, Optional, Sequence, Tuple

import torch

from . import _lib
from .block import ChainLinks, ResLoRALinear
from .merging import DEFAULT_RIDGE, Calibration, merge_chain

_C = _lib.load()


class ResLoRAChain:
    """Links blocks of one projection type in layer order and holds them. Not a module: it owns
    no parameters (the model does). The blocks stay linked as long as they live, whether or not
    this object is kept."""

    def __init__(self, blocks: Sequence[ResLoRALinear], name: str = "chain"):
        self.name = name
        self.merged = False  # set by merge_to_lora / load_pairs
        self.blocks: List[ResLoRALinear] = []
        self.links = ChainLinks(name)
        for blk in blocks:
            self.append(blk)

    def append(self, blk: ResLoRALinear) -> None:
        n = len(self.blocks)
        if not isinstance(blk, ResLoRALinear):
            raise TypeError(f"reslora: chain {self.name!r}: blocks must be ResLoRALinear, got {type(blk).__name__}")
        if blk.links is not None:
            raise ValueError(f"reslora: chain {self.name!r}: the block is already in a chain")
        if n > 0:
            h = self.blocks[0]
            _C.check_link(
                self.name,
                n,
                h.variant,
                h.r,
                h.lora_alpha,
                h.pre_num,
                h.out_features,
                h.in_features,
                blk.variant,
                blk.r,
                blk.lora_alpha,
                blk.pre_num,
                blk.out_features,
                blk.in_features,
            )
        blk.links = self.links
        blk.position = n
        blk.reach = _C.shortcut_reach(blk.variant, n, blk.pre_num)
        blk.running_sum = _C.shortcut_running_sum(blk.variant, blk.pre_num)
        self.blocks.append(blk)
        self.links.blocks.append(weakref.ref(blk))
        self.links.end()

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def capture(self) -> bool:
        """While on, a pass keeps every block's input after it ends (for merge errors)."""
        return self.links.capture

    @capture.setter
    def capture(self, on: bool) -> None:
        self.links.capture = bool(on)

    def begin_pass(self) -> None:
        """Starts a pass of every block (the model's forward does, before the wrapped model runs)."""
        self.links.begin()

    def reset(self) -> None:
        """Ends the pass in progress, releasing what it holds."""
        self.links.end()

    def last_inputs(self) -> Optional[List[torch.Tensor]]:
        """With capture on: the inputs every block saw in the last pass (detached), or None if a
        block did not run."""
        state = self.links.current
        if state is None or any(x is None for x in state.inputs):
            return None
        return [x.detach() for x in state.inputs]

    def forward(self, xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Runs every block in order on its own input, as one pass."""
        if len(xs) != len(self.blocks):
            raise ValueError(
                f"reslora: chain {self.name!r}: forward needs one input per block ({len(self.blocks)}), got {len(xs)}"
            )
        return [blk(x) for blk, x in zip(self.blocks, xs)]

    __call__ = forward

    def merged_lora(
        self, merge: Optional[str] = None, calibration: Optional[Calibration] = None, ridge: float = DEFAULT_RIDGE
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        return merge_chain(self.blocks, merge, calibration, ridge)

    def merge_to_lora(
        self, merge: Optional[str] = None, calibration: Optional[Calibration] = None, ridge: float = DEFAULT_RIDGE
    ) -> None:
        """Applies the merge in place: every block becomes a plain LoRA block. Refused on a chain
        already merged (as by the C++ chain)."""
        if self.merged:
            raise RuntimeError(_C.merged_twice_error(f"chain '{self.name}'"))
        self.load_pairs(self.merged_lora(merge, calibration, ridge))

    def load_pairs(self, pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Makes every block the plain LoRA block of its pair (A', B'), in chain order."""
        if len(pairs) != len(self.blocks):
            raise ValueError(f"reslora: chain {self.name!r} has {len(self.blocks)} blocks, got {len(pairs)} pairs")
        for blk, (a, b) in zip(self.blocks, pairs):
            blk.load_lora(a, b)
        self.links.end()
        self.merged = True
