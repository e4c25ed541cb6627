"""The fit merge's calibration: the sums it reads (Calibration, and SequentialCalibration for the
refit in chain order) and the eval-mode runs of a model over calibration batches that fill them."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .block import ResLoRALinear


class Calibration:
    """The fit merge's calibration sums, gathered over eval forwards while blocks point to it
    (ResLoRAModel.merge_to_lora(merge="fit", inputs=...) sets that up): per block, xx = sum x x^T
    over its input tokens, shared by the blocks that read the same input tensor (q / k / v), and
    zx = sum p x^T, p being the rank-r term the block's shortcut adds (is: A x_prev; ms: the
    earlier blocks' mid activations). float32, on the blocks' device. mask: the tokens to count
    (padding left out), a bool vector over the batch's tokens, or None for all."""

    def __init__(self):
        self.xx: dict = {}
        self.zx: dict = {}
        self.tokens: dict = {}
        self.mask: Optional[torch.Tensor] = None
        self._seen: dict = {}  # id(input) -> (input, its xx) within the current forward

    def next_batch(self, mask: Optional[torch.Tensor] = None) -> None:
        self._seen = {}
        self.mask = None if mask is None else mask.reshape(-1).bool()

    def add(self, blk: ResLoRALinear, x: torch.Tensor, p: Optional[torch.Tensor]) -> None:
        def rows(t):
            t = t.reshape(-1, t.shape[-1])
            if self.mask is not None and self.mask.numel() == t.shape[0]:
                t = t[self.mask.to(t.device)]
            return t.float()

        xf = rows(x)
        seen = self._seen.get(id(x))
        acc = self.xx.get(blk)
        if acc is None:
            acc = seen[1] if seen is not None else xf.new_zeros(xf.shape[1], xf.shape[1])
            self.xx[blk] = acc
        if seen is None or seen[1] is not acc:  # not yet added in this forward
            acc.addmm_(xf.t(), xf)
            self._seen[id(x)] = (x, acc)  # the reference keeps id(x) from being reused
        self.tokens[blk] = self.tokens.get(blk, 0) + xf.shape[0]
        if p is not None:
            pf = rows(p)
            zx = self.zx.get(blk)
            if zx is None:
                zx = self.zx[blk] = xf.new_zeros(pf.shape[1], xf.shape[1])
            zx.addmm_(pf.t(), xf)


class SequentialCalibration(Calibration):
    """The sums of the fit's refinement in chain order. The model runs merged (every block a
    plain LoRA pair), and the blocks at chain position `position` add xx of the input they get
    there and zx of the term their shortcut would add, computed from the merged model's own
    inputs with the A of each block before the merge: is A_n x_{n-1}, ms sum_k A_{n-k} x_{n-k}.
    original: block -> (its A before the merge, its reach, its variant). Every block points to
    this while it runs, so the earlier inputs of a forward can be kept."""

    def __init__(self, position: int, original: dict):
        super().__init__()
        self.position = position
        self.original = original
        self._inputs: dict = {}  # (id of the chain, position) -> that block's input, this forward

    def next_batch(self, mask: Optional[torch.Tensor] = None) -> None:
        super().next_batch(mask)
        self._inputs = {}

    def add(self, blk: ResLoRALinear, x: torch.Tensor, p: Optional[torch.Tensor]) -> None:
        n, key = blk.position, id(blk.links)
        _, reach, variant = self.original[blk]
        if n != self.position:
            if n < self.position:
                self._inputs[(key, n)] = x
            return
        if reach == 0:
            return
        links = blk.links
        if variant == "is":  # the block's own A on the earlier block's input
            p = nn.functional.linear(self._inputs[(key, n - 1)], self.original[blk][0])
        else:  # the earlier blocks' mid activations
            p = sum(
                nn.functional.linear(self._inputs[(key, n - j)], self.original[links.block(n, n - j)][0])
                for j in range(1, reach + 1)
            )
        super().add(blk, x, p)


BATCH = "a batch (a dict of model arguments, a tensor of input ids, or a tuple / list whose first item is the ids)"


def is_batch(value) -> bool:
    """One batch of merge_to_lora's inputs: a dict of model arguments, a tensor of ids, or a tuple
    / list whose first item is a tensor (a DataLoader's (ids, labels, ...); the rest is left out)."""
    if isinstance(value, (torch.Tensor, dict)):
        return True
    return isinstance(value, (tuple, list)) and len(value) > 0 and isinstance(value[0], torch.Tensor)


def as_batches(inputs):
    """merge_to_lora's inputs as an iterable of batches: one batch, or an iterable of them (a list,
    a DataLoader). A list of tensors is a list of batches; a tuple of tensors is one batch."""
    if isinstance(inputs, (torch.Tensor, dict)) or (is_batch(inputs) and isinstance(inputs, tuple)):
        return [inputs]
    return inputs


def first_batch(inputs):
    """The first batch of merge_to_lora's inputs (for the merge errors), or None."""
    if inputs is None:
        return None
    for b in as_batches(inputs):
        return b
    return None


def check_batches(name: str, value, many: bool) -> None:
    """inputs (many) / eval_inputs (one batch) of merge_to_lora, checked before any work."""
    if value is None or is_batch(value):
        return
    if many and hasattr(value, "__iter__") and not isinstance(value, (str, bytes, tuple)):
        return
    expected = BATCH + (" or an iterable of batches (a list, a DataLoader)" if many else "")
    raise ValueError(f"reslora: {name} must be None, {expected}, got {type(value).__name__}")


def run_batch(model: nn.Module, batch):
    """Calls the model on one batch of merge_to_lora's inputs, its tensors moved to the model's
    device (as the HF Trainer moves them)."""
    if not is_batch(batch):
        raise ValueError(f"reslora: merge_to_lora(inputs=...): each item must be {BATCH}, got {type(batch).__name__}")
    device = next((p.device for p in model.parameters()), None)

    def moved(t):
        return t.to(device) if isinstance(t, torch.Tensor) and device is not None and t.device != device else t

    if isinstance(batch, dict):
        return model(**{k: moved(v) for k, v in batch.items()})
    return model(moved(batch if isinstance(batch, torch.Tensor) else batch[0]))


@torch.no_grad()
def calibrate(model, inputs, max_tokens: Optional[int], blocks=None, cal=None, warn: bool = True):
    """Runs calibration batches through a ResLoRAModel in eval mode with the given blocks (all by
    default) adding to the fit merge's sums (cal, a new Calibration by default); returns them and
    the first batch."""
    batches = as_batches(inputs)
    cal = Calibration() if cal is None else cal
    every = list(model.blocks.values())
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for blk in every if blocks is None else blocks:
        blk.calibration = cal
    first, seen = None, 0
    try:
        for b in batches:
            first = b if first is None else first
            mask = b.get("attention_mask") if isinstance(b, dict) else None
            cal.next_batch(mask)
            run_batch(model, b)
            seen = max(cal.tokens.values(), default=0)
            if max_tokens is not None and seen >= max_tokens:
                break
    finally:
        for blk in every:
            blk.calibration = None
        for m, mode in modes.items():
            m.training = mode
    if first is None:
        raise ValueError("reslora: merge 'fit' got no calibration batch (inputs is empty)")
    d = max(blk.in_features for blk in every)
    if warn and seen < d:
        warnings.warn(
            f"reslora: the fit merge saw {seen} calibration tokens, fewer than d_in = {d}: "
            "E[x x^T] is then singular and the fit leans on the ridge (the input merge); give "
            "at least 10 d_in tokens",
            stacklevel=4,
        )
    return cal, first


def capture_inputs(model, inputs) -> None:
    """Runs one batch in eval mode with every chain keeping its blocks' inputs (merge errors)."""
    chains = list(model.linked_chains.values())
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for chain in chains:
        chain.capture = True
    try:
        run_batch(model, inputs)
    except BaseException:
        for chain in chains:
            chain.capture = False
        raise
    finally:
        for m, mode in modes.items():
            m.training = mode
