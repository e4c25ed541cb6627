"""The ResLoRA block (one adapted linear layer) and the state its chain shares during a forward
pass. The math runs in the custom ops (torch.ops.reslora.*); this file links blocks and holds
parameters."""

from __future__ import annotations

import math
import weakref
from typing import List, Optional

import torch
from torch import nn

from . import _lib
from .compat import compute_dtype, dequantize, gathered, is_dtensor, requantize
from .config import check_init_options, lora_scaling

_C = _lib.load()
_ops = torch.ops.reslora

# A checkpointed segment (reslora.checkpoint) notes the pass each chain ran in during its forward,
# and its recompute runs the chains in those passes again.
SEGMENTS: List[dict] = []  # checkpointed segments whose forward runs now, innermost last


def in_backward() -> bool:
    """True while autograd runs a backward pass, i.e. a checkpointed segment is being recomputed
    (eager only: compiled graphs recompute inside the graph)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class Pass:
    """What one forward pass of a chain produced for its later blocks: the inputs (is), the mid
    activations (ms) and the dropout seed (a device tensor drawn by the pass's first block with
    dropout; block n uses stream n of it). A pass belongs to its chain only while it runs; a
    checkpointed segment keeps the pass it ran in, for its recompute."""

    def __init__(self, n: int):
        self.inputs: List[Optional[torch.Tensor]] = [None] * n
        self.mids: List[Optional[torch.Tensor]] = [None] * n
        self.sums: List[Optional[torch.Tensor]] = [None] * n  # ms, pre_num -1: mids 0..n summed
        self.seed: Optional[torch.Tensor] = None


class ChainLinks:
    """What the blocks of one chain share: their order (weakly: the blocks are owned by the model
    or the ResLoRAChain, and nothing here keeps them, so no reference cycle forms) and the pass in
    progress. The head (block 0) starts a pass, the last block (or the model's forward) ends it;
    nothing of a pass stays behind, and a copy or a pickle carries the links, never a pass."""

    def __init__(self, name: str):
        self.name = name
        self.capture = False  # keep every block's input after the pass (merge errors)
        self.blocks: List[weakref.ref] = []
        self.current: Optional[Pass] = None
        self.replaying = 0  # > 0 while a checkpointed segment of an earlier pass is recomputed

    def __getstate__(self):
        # Strong references while copied or pickled; the blocks themselves carry their state.
        return {"name": self.name, "blocks": [ref() for ref in self.blocks]}

    def __setstate__(self, state):
        self.__init__(state["name"])
        self.blocks = [weakref.ref(blk) for blk in state["blocks"]]

    def block(self, n: int, j: int) -> ResLoRALinear:
        blk = self.blocks[j]()
        if blk is None:
            raise RuntimeError(
                f"reslora: block {n} of chain {self.name!r} needs block {j}, which no longer "
                "exists (a block copied alone is not linked to copies of the others)"
            )
        return blk

    def begin(self) -> None:
        self.current = Pass(len(self.blocks))

    def end(self) -> None:
        self.current = None

    def record(self, state: Pass, n: int, variant: str, running_sum: bool, x: torch.Tensor, z: torch.Tensor) -> None:
        # Only what a later block of this pass reads (is: inputs, ms: mid activations, and their
        # running sum where the chain carries one), or everything while capture is on. Every
        # block of a chain has the head's variant and pre_num.
        last = n + 1 == len(self.blocks)
        if variant == "is" or self.capture:
            state.inputs[n] = x
        if variant == "ms":
            state.mids[n] = z
            if running_sum and not last:
                state.sums[n] = z if n == 0 else state.sums[n - 1] + z
        if last and not self.capture:
            self.end()  # no later block reads this pass

    def need(self, state: Optional[Pass], n: int, j: int, what: str) -> torch.Tensor:
        """What block j recorded in this pass for block n: its input, its mid activation, or the
        running sum of the mid activations up to it ("mid activation sum")."""
        t = None
        if state is not None:
            t = {"input": state.inputs, "mid activation": state.mids, "mid activation sum": state.sums}[what][j]
        if t is None:
            raise RuntimeError(
                f"reslora: block {n} of chain {self.name!r} needs the {what} of block {j} from "
                f"this forward pass, but block {j} has not run since the chain's head (block 0) "
                "started the pass"
            )
        return t


class ResLoRALinear(nn.Module):
    """One adapted linear layer: y = base(x) + scaling * (shortcut-augmented LoRA term).

    base_layer: an nn.Linear (weight [d_out, d_in]) or a GPT-2 style Conv1D (weight
    [d_in, d_out]); it is frozen. lora_A: [r, d_in]; lora_B: [d_out, r]; scaling = lora_alpha / r.
    """

    running_sum = False  # also for blocks pickled before chains carried running sums

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        variant: str = "lora",
        pre_num: int = 1,
        stats_window: int = 100,
        use_rslora: bool = False,
        init_lora_weights=True,
    ):
        super().__init__()
        _C.validate_options(variant, r, lora_alpha, lora_dropout, pre_num, stats_window)
        if not (isinstance(base_layer, nn.Linear) or type(base_layer).__name__ == "Conv1D"):
            raise ValueError(
                f"reslora: base_layer must be an nn.Linear or a GPT-2 Conv1D, got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.transposed = type(base_layer).__name__ == "Conv1D"
        weight = base_layer.weight
        # A weight the ops cannot read (quantized: torchao NF4 / int8 tensor subclasses,
        # bitsandbytes' packed 4-bit and 8-bit parameters): the base module computes its own
        # output, and merges go through a dequantized copy.
        self.opaque = not (type(weight) in (torch.Tensor, nn.Parameter) and weight.is_floating_point())
        if self.opaque and self.transposed:
            raise ValueError(
                "reslora: a quantized GPT-2 Conv1D base_layer is not supported; got "
                f"a weight of type {type(weight).__name__}"
            )
        if self.opaque:
            d_out, d_in = base_layer.out_features, base_layer.in_features
        else:
            weight = self.base_weight()
            if weight.dim() != 2:
                raise ValueError(f"reslora: base_layer must hold a 2-D weight, got shape {tuple(weight.shape)}")
            d_out, d_in = weight.shape
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = d_in, d_out
        self.variant, self.r, self.lora_alpha = variant, r, float(lora_alpha)
        # an nn.Dropout child, as PEFT's: tools that turn dropout off by setting p = 0 on every
        # nn.Dropout (TRL's DPO, GRPO) reach the adapter's too; its p is what the ops apply
        self.dropout = nn.Dropout(float(lora_dropout))
        self.pre_num = pre_num
        check_init_options(use_rslora, init_lora_weights)
        self.use_rslora = use_rslora
        dev = weight.device
        dt = weight.dtype if weight.is_floating_point() else compute_dtype(base_layer)
        # PEFT's initialisations: kaiming_uniform(a=sqrt(5)) is uniform(+-1/sqrt(fan_in)).
        A = torch.empty(r, d_in, device=dev, dtype=dt)
        if init_lora_weights == "gaussian":
            A.normal_(0.0, 1.0 / r)
        else:
            A.uniform_(-1.0 / math.sqrt(d_in), 1.0 / math.sqrt(d_in))
        B = torch.zeros(d_out, r, device=dev, dtype=dt)
        if init_lora_weights is False:  # nn.Linear's own init: the adapter starts non-zero
            B.uniform_(-1.0 / math.sqrt(r), 1.0 / math.sqrt(r))
        self.lora_A = nn.Parameter(A)
        self.lora_B = nn.Parameter(B)
        f32 = dict(device=dev, dtype=torch.float32)
        self.register_buffer("x_norms", torch.zeros(stats_window, **f32))
        self.register_buffer("z_norms", torch.zeros(stats_window, **f32))
        self.register_buffer("stats_count", torch.zeros(1, device=dev, dtype=torch.long))
        self.links: Optional[ChainLinks] = None  # set when a chain links the block
        self._stale: List[weakref.ref] = []  # parameters a rank-changing merge replaced
        self.disabled = False  # ResLoRAModel.disable_adapter(): the base layer alone
        self.calibration: object = None  # set while the fit merge calibrates
        self.position = 0
        self.reach = 0  # predecessors this block reads in a pass (the C++ rule)
        self.running_sum = False  # its chain carries the mid activations summed (the C++ rule)

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
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as [d_out, d_in] (a view for Conv1D). A quantized weight as
        it is stored: dense_weight() dequantizes it."""
        w = self.base_layer.weight
        return w.t() if self.transposed else w

    def dense_weight(self) -> torch.Tensor:
        """The base weight as a dense [d_out, d_in] tensor: the weight itself, or a dequantized
        copy of a quantized one."""
        return dequantize(self.base_layer) if self.opaque else self.base_weight()

    @torch.no_grad()
    def fold(self, delta: torch.Tensor) -> None:
        """Adds delta ([d_out, d_in]) to the base weight: in place, or for a quantized weight by
        quantizing the dequantized sum again the same way (as PEFT merges into such bases)."""
        if not self.opaque:
            w = self.base_weight()  # a view of Conv1D's transposed weight: updated in place
            w.add_(delta.to(w.dtype))
            return
        self.base_layer.weight = requantize(self.base_layer, dequantize(self.base_layer) + delta)

    @property
    def lora_dropout(self) -> float:
        """The dropout probability on the adapter's input (the p of the dropout child)."""
        return self.dropout.p

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant}, r={self.r}, lora_alpha={self.lora_alpha}, "
            f"lora_dropout={self.lora_dropout}, pre_num={self.pre_num}"
            + (", use_rslora=True" if self.use_rslora else "")
        )

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_stale"] = []  # weak references to the replaced parameters: not part of a copy
        return state

    def _check_stale(self) -> None:
        if any(ref() is not None for ref in self._stale):
            raise RuntimeError(
                f"reslora: merge_to_lora() gave this block rank {self.r}, so its lora_A and lora_B "
                "are new parameters, and the old ones are still held (by an optimizer made before "
                "the merge, most likely), which would train nothing: make a new optimizer from "
                "the model's parameters after merging"
            )
        self._stale = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x)
        if self._stale and self.training and torch.is_grad_enabled():
            self._check_stale()
        chain = self.links
        n = self.position if chain is not None else 0
        k = self.reach if chain is not None else 0
        p = self.dropout.p if self.training else 0.0
        replay = chain is not None and chain.replaying > 0
        recompute = replay or in_backward()  # a checkpointed segment's recompute
        if chain is not None and not replay:
            if recompute and (k > 0 or p > 0.0):
                raise RuntimeError(
                    f"reslora: block {n} of chain {chain.name!r} is being recomputed during "
                    "backward by a checkpoint function that does not restore its forward pass, so "
                    "it would read another pass's shortcut inputs or dropout seed; enable "
                    "checkpointing with ResLoRAModel.gradient_checkpointing_enable() or wrap the "
                    "segment with reslora.checkpoint(...) instead of torch.utils.checkpoint"
                )
            if n == 0 or chain.current is None:
                chain.begin()  # the head starts a new pass (as does a block run outside one)
            for seen in SEGMENTS:
                seen.setdefault(chain, chain.current)
        state = chain.current if chain is not None else None
        seed = None
        if p > 0.0:
            if state is None:
                seed = _ops.draw_seed(x)
            else:
                if state.seed is None:
                    state.seed = _ops.draw_seed(x)
                seed = state.seed
        r, s = self.r, self.scaling
        x_prev, z_shortcut, a, b = None, None, self.lora_A, self.lora_B
        a_shortcut = b_shortcut = None
        # Every variant is one low-rank product on x (one lora_linear op, one autograd node per
        # block); they differ in what joins it: is adds x_prev to x, bs the earlier blocks' A and
        # B (the op joins them to the block's own rank), ms the earlier blocks' mid activations
        # to z.
        if self.variant == "is":
            x_prev = x if k == 0 else chain.need(state, n, n - 1, "input")
        elif self.variant == "bs" and k > 0:
            earlier = [chain.block(n, n - j) for j in range(1, k + 1)]
            a_shortcut = [gathered(blk.lora_A, a) for blk in earlier]
            b_shortcut = [gathered(blk.lora_B, b) for blk in earlier]
        elif k > 0 and self.running_sum:
            # every earlier block: the running sum the previous block left (one add per block,
            # not one per earlier block)
            z_shortcut = chain.need(state, n, n - 1, "mid activation sum")
        elif self.variant == "ms" and k > 0:
            z_shortcut = chain.need(state, n, n - 1, "mid activation")
            for j in range(2, k + 1):
                z_shortcut = z_shortcut + chain.need(state, n, n - j, "mid activation")
        # Only the is / ms merges read the norm statistics, recorded once per training forward
        # (not again when a checkpointed segment is recomputed): by the block's op itself.
        stats = (
            (self.x_norms, self.z_norms, self.stats_count)
            if self.training and self.variant in ("is", "ms") and not recompute
            else (None, None, None)
        )
        if self.opaque:
            # A quantized base (NF4, int8, ...): its own module computes x W^T + b, the ops the
            # low-rank term, with the same dropout streams.
            if a_shortcut is not None:
                a, b = torch.cat([a] + a_shortcut, 0), torch.cat([b] + b_shortcut, 1)
            z = _ops.lora_down(x, x_prev, a, p, seed, n, r)
            low = nn.functional.linear(z if z_shortcut is None else z + z_shortcut, b)
            y = self.base_layer(x) + (s * low).to(x.dtype)
            if stats[0] is not None:
                _ops.record_stats_(*stats, x, z)
        else:
            y, z = _ops.lora_linear(
                x,
                x_prev,
                self.base_weight(),
                self.base_layer.bias,
                a,
                b,
                z_shortcut,
                s,
                p,
                seed,
                n,
                r,
                *stats,
                a_shortcut,
                b_shortcut,
            )
        if self.calibration is not None and not self.training:
            p = None
            if k > 0 and self.variant == "is":
                p = nn.functional.linear(x_prev, self.lora_A)
            elif k > 0 and self.variant == "ms":
                p = z_shortcut
            self.calibration.add(self, x, p)
        if recompute:
            return y  # a recompute: the forward already recorded this block's results
        if state is not None:
            # z is the block's own mid activation for is / ms, what record reads; bs's z is
            # wider (the earlier blocks' ranks too), and nothing reads it
            chain.record(state, n, self.variant, self.running_sum, x, z)
        return y

    def x_norm_mean(self) -> torch.Tensor:
        return _ops.stats_mean(self.x_norms, self.stats_count)

    def z_norm_mean(self) -> torch.Tensor:
        return _ops.stats_mean(self.z_norms, self.stats_count)

    @torch.no_grad()
    def load_lora(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Replaces A and B by a plain LoRA pair (scaling is kept). Where the shapes stay, the
        values are copied into the same parameters, so training goes on with the optimizer the
        user has; where the rank changes, A and B are new parameters, and a training forward
        while the old ones are still held (by an optimizer made before) is an error."""
        if A.dim() != 2 or A.shape[1] != self.in_features:
            raise ValueError(
                f"reslora: A must have shape [r, d_in] = [{A.shape[0]}, {self.in_features}], got {list(A.shape)}"
            )
        if B.dim() != 2 or B.shape[0] != self.out_features or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"reslora: B must have shape [d_out, r] = [{self.out_features}, {A.shape[0]}], got {list(B.shape)}"
            )
        s = self.scaling
        stale = []
        for name, new in (("lora_A", A.detach()), ("lora_B", B.detach())):
            p = getattr(self, name)
            if p.shape == new.shape and is_dtensor(p):  # sharded by FSDP2: each rank its shard
                from torch.distributed.tensor import distribute_tensor

                p.copy_(distribute_tensor(new.to(p.dtype), p.device_mesh, p.placements))
            elif p.shape == new.shape:
                p.copy_(new)  # the same Parameter: an optimizer made before the merge trains on
            elif is_dtensor(p):
                raise RuntimeError(
                    f"reslora: this merge gives the block rank {A.shape[0]} (was {p.shape[0]}), and "
                    "its parameters are sharded by FSDP2, which cannot change their shape"
                )
            else:  # a new rank (bs): new Parameters, and the old ones are watched (see forward)
                stale.append(weakref.ref(p))
                setattr(self, name, nn.Parameter(new.to(p).clone(), requires_grad=p.requires_grad))
        self._stale = stale
        self.r = int(A.shape[0])
        self.lora_alpha = s * self.r  # the scaling stays, whatever the new rank
        self.use_rslora = False
        self.variant = "lora"
        self.reach = 0
        self.running_sum = False
