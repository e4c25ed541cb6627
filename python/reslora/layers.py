"""Python ResLoRA layers. The math runs in the custom ops (torch.ops.reslora.*) and the merges
in the C++ core; this file only links blocks and holds parameters."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import _lib

_C = _lib.load()
_ops = torch.ops.reslora

VARIANTS = ("lora", "is", "bs", "ms")


def _reach(index: int, pre_num: int) -> int:
    return index if pre_num < 0 else min(index, pre_num)


def _in_backward() -> bool:
    """True while autograd runs a backward pass: a checkpointed segment being recomputed. The
    recompute must see the shortcut state of the original forward and must not record again."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph (eagerly, not through
    torch.compile, whose graphs replay compiled code)."""
    return not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing()


def _draw_seed() -> int:
    # From torch's default CPU generator, so torch.manual_seed makes dropout reproducible.
    return int(torch.randint(0, 2**62, (1,)).item())


class ResLoRALinear(nn.Module):
    """One adapted linear layer: y = base(x) + scaling * (shortcut-augmented LoRA term).

    base_layer: an nn.Linear (weight [d_out, d_in]) or a GPT-2 style Conv1D (weight
    [d_in, d_out]); it is frozen. lora_A: [r, d_in]; lora_B: [d_out, r]; scaling = lora_alpha / r.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        variant: str = "lora",
        pre_num: int = 1,
        stats_window: int = 100,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"reslora: variant must be one of {VARIANTS}, got {variant!r}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"reslora: r must be an int >= 1, got {r!r}")
        if not math.isfinite(float(lora_alpha)):
            raise ValueError(
                f"reslora: lora_alpha must be finite (scaling = lora_alpha / r), got {lora_alpha!r}"
            )
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"reslora: lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if not isinstance(pre_num, int) or pre_num < -1:
            raise ValueError(f"reslora: pre_num must be -1 (all) or an int >= 0, got {pre_num!r}")
        if not isinstance(stats_window, int) or stats_window < 1:
            raise ValueError(f"reslora: stats_window must be an int >= 1, got {stats_window!r}")
        self.base_layer = base_layer
        self._transposed = type(base_layer).__name__ == "Conv1D"
        weight = self.base_weight()
        if weight.dim() != 2:
            raise ValueError(
                f"reslora: base_layer must hold a 2-D weight, got shape {tuple(weight.shape)}"
            )
        for p in base_layer.parameters():
            p.requires_grad_(False)
        d_out, d_in = weight.shape
        self.in_features, self.out_features = d_in, d_out
        self.variant, self.r, self.lora_alpha = variant, r, float(lora_alpha)
        self.lora_dropout, self.pre_num = float(lora_dropout), pre_num
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) on [r, d_in]
        dev, dt = weight.device, weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, d_in, device=dev, dtype=dt).uniform_(-bound, bound))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=dev, dtype=dt))
        f32 = dict(device=dev, dtype=torch.float32)
        self.register_buffer("x_norms", torch.zeros(stats_window, **f32))
        self.register_buffer("z_norms", torch.zeros(stats_window, **f32))
        self.register_buffer("stats_count", torch.zeros(1, device=dev, dtype=torch.long))
        self._chain: Optional[ResLoRAChain] = None
        self._position = 0

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype) / .half() must not round the norm statistics: they stay float32.
        super()._apply(fn, *args, **kwargs)
        for name in ("x_norms", "z_norms"):
            buf = self._buffers[name]
            if buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as [d_out, d_in] (a view for Conv1D)."""
        w = self.base_layer.weight
        return w.t() if self._transposed else w

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant}, r={self.r}, lora_alpha={self.lora_alpha}, "
            f"lora_dropout={self.lora_dropout}, pre_num={self.pre_num}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chain = self._chain
        n = self._position if chain is not None else 0
        recompute = _in_backward()
        if chain is not None and n == 0 and not recompute:
            chain._begin()  # the head starts a new pass
        p = self.lora_dropout if self.training else 0.0
        seed = 0
        if p > 0.0 and x.is_cuda and _capturing():
            raise RuntimeError(
                f"reslora: lora_dropout = {p} while a CUDA graph is being captured: the dropout "
                "seed is drawn on the host for every pass, so each replay of the graph would "
                "reuse one mask. Capture with lora_dropout=0 (or in eval mode)"
            )
        if p > 0.0:
            # One draw per chain pass; a recomputed (checkpointed) block gets its pass's seed back.
            seed = _draw_seed() if chain is None else chain._block_seed(n)
        w, b, r, s = self.base_weight(), self.base_layer.bias, self.r, self.scaling
        # Every variant is one lora_linear op (one autograd node per block).
        if self.variant == "is":
            x_prev = x if n == 0 else chain._need(n, n - 1, "input")
            y, z_own = _ops.lora_linear(x, x_prev, w, b, self.lora_A, self.lora_B, None, s, p, seed, r)
        elif self.variant == "bs" and _reach(n, self.pre_num) > 0:
            blocks = [self] + [chain.blocks[n - k] for k in range(1, _reach(n, self.pre_num) + 1)]
            a_cat = torch.cat([blk.lora_A for blk in blocks], 0)
            b_cat = torch.cat([blk.lora_B for blk in blocks], 1)
            y, z = _ops.lora_linear(x, None, w, b, a_cat, b_cat, None, s, p, seed, r)
            z_own = z[..., :r]
        elif self.variant == "ms" and _reach(n, self.pre_num) > 0:
            z_extra = chain._need(n, n - 1, "mid activation")
            for k in range(2, _reach(n, self.pre_num) + 1):
                z_extra = z_extra + chain._need(n, n - k, "mid activation")
            y, z_own = _ops.lora_linear(x, None, w, b, self.lora_A, self.lora_B, z_extra, s, p, seed, r)
        else:
            y, z_own = _ops.lora_linear(x, None, w, b, self.lora_A, self.lora_B, None, s, p, seed, r)
        if chain is not None and not recompute:
            chain._record(n, x, z_own)
        if self.training and not recompute and self.variant in ("is", "ms"):
            # Only the is / ms merges read the norm statistics.
            _ops.record_stats_(self.x_norms, self.z_norms, self.stats_count, x, z_own)
        return y

    def x_norm_mean(self) -> torch.Tensor:
        return _ops.stats_mean(self.x_norms, self.stats_count)

    def z_norm_mean(self) -> torch.Tensor:
        return _ops.stats_mean(self.z_norms, self.stats_count)

    @torch.no_grad()
    def load_lora(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Replaces A and B by a plain LoRA pair (rank may change; scaling is kept)."""
        if A.dim() != 2 or A.shape[1] != self.in_features:
            raise ValueError(
                f"reslora: A must have shape [r, d_in] = [{A.shape[0]}, {self.in_features}], "
                f"got {list(A.shape)}"
            )
        if B.dim() != 2 or B.shape[0] != self.out_features or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"reslora: B must have shape [d_out, r] = [{self.out_features}, {A.shape[0]}], "
                f"got {list(B.shape)}"
            )
        s = self.scaling
        self.lora_A = nn.Parameter(A.detach().to(self.lora_A).clone())
        self.lora_B = nn.Parameter(B.detach().to(self.lora_B).clone())
        self.r = int(A.shape[0])
        self.lora_alpha = s * self.r
        self.variant = "lora"


class ResLoRAChain:
    """Links blocks of one projection type in layer order. Not a module: it owns no parameters
    (the model does), and holds the per-forward state, cleared when the head (block 0) runs."""

    def __init__(self, blocks: Sequence[ResLoRALinear], name: str = "chain"):
        self.name = name
        self.capture = False  # record every block's input (for measuring merge errors)
        self.blocks: List[ResLoRALinear] = []
        self._inputs: List[Optional[torch.Tensor]] = []
        self._mids: List[Optional[torch.Tensor]] = []
        for blk in blocks:
            self.append(blk)

    def append(self, blk: ResLoRALinear) -> None:
        n = len(self.blocks)
        if blk._chain is not None:
            raise ValueError(f"reslora: chain {self.name!r}: the block is already in a chain")
        if n > 0:
            head = self.blocks[0]
            if blk.variant != head.variant:
                raise ValueError(
                    f"reslora: chain {self.name!r}: block {n} must have the head's variant "
                    f"{head.variant!r}, got {blk.variant!r}"
                )
            if head.variant != "lora":
                want = (head.out_features, head.in_features)
                got = (blk.out_features, blk.in_features)
                if got != want:
                    raise ValueError(
                        f"reslora: chain {self.name!r}: block {n} must have the head's shape "
                        f"[d_out, d_in] = {list(want)} for the {head.variant!r} shortcut, got "
                        f"{list(got)}; start a new chain for it"
                    )
                hk = (head.r, head.lora_alpha, head.pre_num)
                bk = (blk.r, blk.lora_alpha, blk.pre_num)
                if hk != bk:
                    raise ValueError(
                        f"reslora: chain {self.name!r}: block {n} must have the head's "
                        f"(r, lora_alpha, pre_num) = {hk}, got {bk}"
                    )
        blk._chain, blk._position = self, n
        self.blocks.append(blk)
        self._begin()

    def __len__(self) -> int:
        return len(self.blocks)

    def _begin(self) -> None:
        self._inputs = [None] * len(self.blocks)
        self._mids = [None] * len(self.blocks)
        self._seed: Optional[int] = None

    def _block_seed(self, n: int) -> int:
        if self._seed is None:
            self._seed = _draw_seed()
        return (self._seed + n * 0x9E3779B97F4A7C15) % (1 << 62)

    def reset(self) -> None:
        """Drops the activations the current pass holds."""
        self._begin()

    def _record(self, n: int, x: torch.Tensor, z: torch.Tensor) -> None:
        # Only what a later block of this pass reads (is: inputs, ms: mid activations), or
        # everything while capture is on: holding more would keep activations alive that
        # autograd (or checkpointing) already let go.
        variant = self.blocks[0].variant
        if variant == "is" or self.capture:
            self._inputs[n] = x
        if variant == "ms":
            self._mids[n] = z

    def last_inputs(self) -> Optional[List[torch.Tensor]]:
        """The inputs every block saw in the last pass (detached), or None if a block did not run."""
        if any(x is None for x in self._inputs):
            return None
        return [x.detach() for x in self._inputs]

    def _need(self, n: int, j: int, what: str) -> torch.Tensor:
        t = (self._inputs if what == "input" else self._mids)[j]
        if t is None:
            raise RuntimeError(
                f"reslora: block {n} of chain {self.name!r} needs the {what} of block {j} from "
                f"this forward pass, but block {j} has not run since the chain's head (block 0) "
                "started the pass"
            )
        return t

    def forward(self, xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Runs every block in order on its own input, as one pass."""
        if len(xs) != len(self.blocks):
            raise ValueError(
                f"reslora: chain {self.name!r}: forward needs one input per block "
                f"({len(self.blocks)}), got {len(xs)}"
            )
        return [blk(x) for blk, x in zip(self.blocks, xs)]

    __call__ = forward

    def merged_lora(self, merge: Optional[str] = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        return merge_chain(self.blocks, merge)

    def merge_to_lora(self, merge: Optional[str] = None) -> None:
        """Applies the merge in place: every block becomes a plain LoRA block."""
        pairs = self.merged_lora(merge)
        for blk, (a, b) in zip(self.blocks, pairs):
            blk.load_lora(a, b)
        self._begin()


def merge_chain(
    blocks: Sequence[ResLoRALinear], merge: Optional[str] = None
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The spec's merge of a chain (in order) into plain LoRA pairs (A', B'), by the C++ core."""
    if not blocks:
        raise ValueError("reslora: merge_chain needs at least one block, got none")
    head = blocks[0]
    if merge is None:
        merge = _C.merges_for(head.variant)[0]
    with torch.no_grad():
        return _C.merge_chain(
            [blk.base_weight() for blk in blocks],
            [blk.lora_A for blk in blocks],
            [blk.lora_B for blk in blocks],
            [blk.x_norm_mean() for blk in blocks],
            [blk.z_norm_mean() for blk in blocks],
            head.variant,
            merge,
            head.pre_num,
            head.scaling,
        )
