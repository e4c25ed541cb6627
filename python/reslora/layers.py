"""Python ResLoRA layers. The math runs in the custom ops (torch.ops.reslora.*) and the merges
in the C++ core; this file only links blocks and holds parameters."""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import _lib
from .config import check_init_options, lora_scaling

_C = _lib.load()
_ops = torch.ops.reslora

VARIANTS = tuple(_C.variants())
DEFAULT_RIDGE = _C.DEFAULT_RIDGE  # the fit merge's relative ridge (the C++ core's)

# A checkpointed segment (reslora.checkpoint) notes the pass each chain ran in during its forward,
# and its recompute runs the chains in those passes again.
_SEGMENTS: List[dict] = []  # checkpointed segments whose forward runs now, innermost last


def _in_backward() -> bool:
    """True while autograd runs a backward pass, i.e. a checkpointed segment is being recomputed
    (eager only: compiled graphs recompute inside the graph)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class _Pass:
    """What one forward pass of a chain produced for its later blocks: the inputs (is), the mid
    activations (ms) and the dropout seed (a device tensor drawn by the pass's first block with
    dropout; block n uses stream n of it). A pass belongs to its chain only while it runs; a
    checkpointed segment keeps the pass it ran in, for its recompute."""

    def __init__(self, n: int):
        self.inputs: List[Optional[torch.Tensor]] = [None] * n
        self.mids: List[Optional[torch.Tensor]] = [None] * n
        self.seed: Optional[torch.Tensor] = None


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
        self._transposed = type(base_layer).__name__ == "Conv1D"
        weight = base_layer.weight
        # A weight the ops cannot read (quantized: torchao NF4 / int8 tensor subclasses,
        # bitsandbytes' packed 4-bit and 8-bit parameters): the base module computes its own
        # output, and merges go through a dequantized copy.
        self._opaque = not (type(weight) in (torch.Tensor, nn.Parameter) and weight.is_floating_point())
        if self._opaque and self._transposed:
            raise ValueError(
                "reslora: a quantized GPT-2 Conv1D base_layer is not supported; got "
                f"a weight of type {type(weight).__name__}"
            )
        if self._opaque:
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
        self.lora_dropout, self.pre_num = float(lora_dropout), pre_num
        check_init_options(use_rslora, init_lora_weights)
        self.use_rslora = use_rslora
        dev = weight.device
        dt = weight.dtype if weight.is_floating_point() else _compute_dtype(base_layer)
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
        self._chain: Optional[_ChainLinks] = None  # set when a chain links the block
        self._stale: List[weakref.ref] = []  # parameters a rank-changing merge replaced
        self._disabled = False  # ResLoRAModel.disable_adapter(): the base layer alone
        self._calibration: Optional[Calibration] = None  # set while the fit merge calibrates
        self._position = 0
        self._reach = 0  # predecessors this block reads in a pass (the C++ rule)

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
        return w.t() if self._transposed else w

    def dense_weight(self) -> torch.Tensor:
        """The base weight as a dense [d_out, d_in] tensor: the weight itself, or a dequantized
        copy of a quantized one."""
        return _dequantize(self.base_layer) if self._opaque else self.base_weight()

    @torch.no_grad()
    def fold(self, delta: torch.Tensor) -> None:
        """Adds delta ([d_out, d_in]) to the base weight: in place, or for a quantized weight by
        quantizing the dequantized sum again the same way (as PEFT merges into such bases)."""
        if not self._opaque:
            w = self.base_weight()  # a view of Conv1D's transposed weight: updated in place
            w.add_(delta.to(w.dtype))
            return
        self.base_layer.weight = _requantize(self.base_layer, _dequantize(self.base_layer) + delta)

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
        if self._disabled:
            return self.base_layer(x)
        if self._stale and self.training and torch.is_grad_enabled():
            self._check_stale()
        chain = self._chain
        n = self._position if chain is not None else 0
        k = self._reach if chain is not None else 0
        p = self.lora_dropout if self.training else 0.0
        replay = chain is not None and chain._replaying > 0
        if chain is not None and not replay:
            if _in_backward() and (k > 0 or p > 0.0):
                raise RuntimeError(
                    f"reslora: block {n} of chain {chain.name!r} is being recomputed during "
                    "backward by a checkpoint function that does not restore its forward pass, so "
                    "it would read another pass's shortcut inputs or dropout seed; enable "
                    "checkpointing with ResLoRAModel.gradient_checkpointing_enable() or wrap the "
                    "segment with reslora.checkpoint(...) instead of torch.utils.checkpoint"
                )
            if n == 0 or chain._pass is None:
                chain._begin()  # the head starts a new pass (as does a block run outside one)
            for seen in _SEGMENTS:
                seen.setdefault(chain, chain._pass)
        state = chain._pass if chain is not None else None
        seed = None
        if p > 0.0:
            if state is None:
                seed = _ops.draw_seed(x)
            else:
                if state.seed is None:
                    state.seed = _ops.draw_seed(x)
                seed = state.seed
        r, s = self.r, self.scaling
        x_prev, z_extra, a, b = None, None, self.lora_A, self.lora_B
        # Every variant is one low-rank product on x (one lora_linear op, one autograd node per
        # block); they differ in what joins it: is adds x_prev to x, bs the earlier blocks' A and
        # B (concatenated rank), ms the earlier blocks' mid activations to z.
        if self.variant == "is":
            x_prev = x if k == 0 else chain._need(state, n, n - 1, "input")
        elif self.variant == "bs" and k > 0:
            blocks = [self] + [chain.block(n, n - j) for j in range(1, k + 1)]
            a = torch.cat([_gathered(blk.lora_A, self.lora_A) for blk in blocks], 0)
            b = torch.cat([_gathered(blk.lora_B, self.lora_B) for blk in blocks], 1)
        elif self.variant == "ms" and k > 0:
            z_extra = chain._need(state, n, n - 1, "mid activation")
            for j in range(2, k + 1):
                z_extra = z_extra + chain._need(state, n, n - j, "mid activation")
        if self._opaque:
            # A quantized base (NF4, int8, ...): its own module computes x W^T + b, the ops the
            # low-rank term, with the same dropout streams.
            z = _ops.lora_down(x, x_prev, a, p, seed, n, r)
            low = nn.functional.linear(z if z_extra is None else z + z_extra, b)
            y = self.base_layer(x) + (s * low).to(x.dtype)
        else:
            y, z = _ops.lora_linear(
                x, x_prev, self.base_weight(), self.base_layer.bias, a, b, z_extra, s, p, seed, n, r
            )
        z_own = z[..., :r] if z.shape[-1] != r else z
        if self._calibration is not None and not self.training:
            p = None
            if k > 0 and self.variant == "is":
                p = nn.functional.linear(x_prev, self.lora_A)
            elif k > 0 and self.variant == "ms":
                p = z_extra
            self._calibration.add(self, x, p)
        if replay or _in_backward():
            return y  # a recompute: the forward already recorded this block's results and norms
        if state is not None:
            chain._record(state, n, self.variant, x, z_own)
        if self.training and self.variant in ("is", "ms"):
            # Only the is / ms merges read the norm statistics.
            _ops.record_stats_(self.x_norms, self.z_norms, self.stats_count, x, z_own)
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
            if p.shape == new.shape and _is_dtensor(p):  # sharded by FSDP2: each rank its shard
                from torch.distributed.tensor import distribute_tensor

                p.copy_(distribute_tensor(new.to(p.dtype), p.device_mesh, p.placements))
            elif p.shape == new.shape:
                p.copy_(new)  # the same Parameter: an optimizer made before the merge trains on
            elif _is_dtensor(p):
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
        self._reach = 0


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def _gathered(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An earlier block's A or B as this block computes with it. Under FSDP2 (fully_shard per
    layer) an earlier layer's parameters are sharded again after its forward: they are gathered
    here (a small all-gather of r x d values), and in backward their gradient is averaged and
    scattered back over the ranks (reduce-scatter), as FSDP does for the layer's own use."""
    if _is_dtensor(p) and not _is_dtensor(like):
        from torch.distributed.tensor import Partial

        p = p.full_tensor(grad_placements=[Partial("avg")] * p.device_mesh.ndim)
    return p.to(like.dtype)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A parameter as one plain tensor (gathered from its shards under FSDP2; collective)."""
    return t.full_tensor() if _is_dtensor(t) else t


def _compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a quantized layer computes in: bitsandbytes' compute_dtype, its bias's, else
    float32."""
    dt = getattr(layer, "compute_dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    bias = getattr(layer, "bias", None)
    return bias.dtype if isinstance(bias, torch.Tensor) and bias.is_floating_point() else torch.float32


def _dequantize(layer: nn.Module) -> torch.Tensor:
    w = layer.weight
    if hasattr(w, "get_original_weight"):  # torchao NF4Tensor
        return w.get_original_weight()
    if type(w).__name__ == "Params4bit" and getattr(w, "quant_state", None) is not None:  # bitsandbytes
        import bitsandbytes as bnb

        data, state = _bnb_standard_layout(w)
        return bnb.functional.dequantize_4bit(data, state).to(_compute_dtype(layer))
    if getattr(type(w), "dequantize", torch.Tensor.dequantize) is not torch.Tensor.dequantize:
        # torchao's affine quantized tensors, among others
        return w.dequantize()
    raise ValueError(
        f"reslora: cannot dequantize a base weight of type {type(w).__name__}: the is 'weight' "
        "merge and merge_and_unload() need it dense (the other merges and the PEFT export do not)"
    )


def _bnb_standard_layout(w) -> Tuple[torch.Tensor, object]:
    """A bitsandbytes 4-bit weight's data and quant state in the layout dequantize_4bit reads.

    bitsandbytes >= 0.49 repacks a Linear4bit's weight in place for its CPU kernel at the first
    eval-mode forward without grad, on CPUs with AVX512-BF16 (quant_state.packing_format_for_cpu);
    dequantize_4bit does not read that layout and returns values unrelated to the weight. The
    standard layout is rebuilt here on copies, so the layer keeps the layout its kernel uses."""
    state = w.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return w.data, state
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack
    except ImportError as e:
        raise RuntimeError(
            "reslora: this bitsandbytes 4-bit weight is in bitsandbytes' CPU-packed layout "
            "(quant_state.packing_format_for_cpu=True) and this bitsandbytes has no inverse of it; "
            "call the layer's state_dict() (which restores the standard layout) or move it to CUDA first"
        ) from e
    return unpack(w.data.clone(), copy.deepcopy(state))


def _requantize(layer: nn.Module, dense: torch.Tensor) -> nn.Parameter:
    w = layer.weight
    if hasattr(w, "get_original_weight") and hasattr(type(w), "from_tensor"):  # torchao NF4Tensor
        q = type(w).from_tensor(dense.to(w.dtype), w.block_size, w.scaler_block_size)
        return nn.Parameter(q, requires_grad=False)
    if type(w).__name__ == "Params4bit":  # bitsandbytes: quantized again on its device
        import bitsandbytes as bnb

        q = bnb.nn.Params4bit(
            dense.to("cpu"),
            requires_grad=False,
            quant_type=w.quant_type,
            blocksize=w.blocksize,
            compress_statistics=w.compress_statistics,
        )
        return q.to(w.device)
    raise ValueError(
        f"reslora: cannot quantize a merged weight back into {type(w).__name__}: fold the adapter "
        "into a dense copy of the model instead (or serve the exported PEFT adapter)"
    )


class _ChainLinks:
    """What the blocks of one chain share: their order (weakly: the blocks are owned by the model
    or the ResLoRAChain, and nothing here keeps them, so no reference cycle forms) and the pass in
    progress. The head (block 0) starts a pass, the last block (or the model's forward) ends it;
    nothing of a pass stays behind, and a copy or a pickle carries the links, never a pass."""

    def __init__(self, name: str):
        self.name = name
        self.capture = False  # keep every block's input after the pass (merge errors)
        self.blocks: List[weakref.ref] = []
        self._pass: Optional[_Pass] = None
        self._replaying = 0  # > 0 while a checkpointed segment of an earlier pass is recomputed

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

    def _begin(self) -> None:
        self._pass = _Pass(len(self.blocks))

    def _end(self) -> None:
        self._pass = None

    def _record(self, state: _Pass, n: int, variant: str, x: torch.Tensor, z: torch.Tensor) -> None:
        # Only what a later block of this pass reads (is: inputs, ms: mid activations), or
        # everything while capture is on. Every block of a chain has the head's variant.
        if variant == "is" or self.capture:
            state.inputs[n] = x
        if variant == "ms":
            state.mids[n] = z
        if n + 1 == len(self.blocks) and not self.capture:
            self._end()  # no later block reads this pass

    def _need(self, state: Optional[_Pass], n: int, j: int, what: str) -> torch.Tensor:
        t = None
        if state is not None:
            t = (state.inputs if what == "input" else state.mids)[j]
        if t is None:
            raise RuntimeError(
                f"reslora: block {n} of chain {self.name!r} needs the {what} of block {j} from "
                f"this forward pass, but block {j} has not run since the chain's head (block 0) "
                "started the pass"
            )
        return t


class ResLoRAChain:
    """Links blocks of one projection type in layer order and holds them. Not a module: it owns
    no parameters (the model does). The blocks stay linked as long as they live, whether or not
    this object is kept."""

    def __init__(self, blocks: Sequence[ResLoRALinear], name: str = "chain"):
        self.name = name
        self.blocks: List[ResLoRALinear] = []
        self._links = _ChainLinks(name)
        for blk in blocks:
            self.append(blk)

    def append(self, blk: ResLoRALinear) -> None:
        n = len(self.blocks)
        if not isinstance(blk, ResLoRALinear):
            raise TypeError(f"reslora: chain {self.name!r}: blocks must be ResLoRALinear, got {type(blk).__name__}")
        if blk._chain is not None:
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
        blk._chain = self._links
        blk._position = n
        blk._reach = _C.shortcut_reach(blk.variant, n, blk.pre_num)
        self.blocks.append(blk)
        self._links.blocks.append(weakref.ref(blk))
        self._links._end()

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def capture(self) -> bool:
        """While on, a pass keeps every block's input after it ends (for merge errors)."""
        return self._links.capture

    @capture.setter
    def capture(self, on: bool) -> None:
        self._links.capture = bool(on)

    @property
    def _pass(self) -> Optional[_Pass]:
        return self._links._pass

    def _begin(self) -> None:
        self._links._begin()

    def _end(self) -> None:
        self._links._end()

    def reset(self) -> None:
        """Ends the pass in progress, releasing what it holds."""
        self._end()

    def last_inputs(self) -> Optional[List[torch.Tensor]]:
        """With capture on: the inputs every block saw in the last pass (detached), or None if a
        block did not run."""
        state = self._pass
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
        """Applies the merge in place: every block becomes a plain LoRA block."""
        self.load_pairs(self.merged_lora(merge, calibration, ridge))

    def load_pairs(self, pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Makes every block the plain LoRA block of its pair (A', B'), in chain order."""
        if len(pairs) != len(self.blocks):
            raise ValueError(f"reslora: chain {self.name!r} has {len(self.blocks)} blocks, got {len(pairs)} pairs")
        for blk, (a, b) in zip(self.blocks, pairs):
            blk.load_lora(a, b)
        self._end()


def checkpoint(function, *args, use_reentrant: bool = False, **kwargs):
    """torch.utils.checkpoint.checkpoint for code that runs ResLoRA blocks: the recompute of the
    segment sees the shortcut inputs and dropout seeds of the pass it first ran in, whatever ran
    in between (other forwards, no-grad passes). Same arguments as torch's."""
    if not callable(function):
        raise TypeError(f"reslora.checkpoint: function must be callable, got {type(function).__name__}")
    seen: dict = {}
    out = _checkpoint_with(
        torch.utils.checkpoint.checkpoint, function, *args, use_reentrant=use_reentrant, _seen=seen, **kwargs
    )
    if use_reentrant:
        shortcuts = sorted({c.name for c in seen if c.blocks and c.block(0, 0).variant in ("is", "ms")})
        if shortcuts:
            raise ValueError(
                f"reslora: use_reentrant=True recomputes the segment detached from the rest of "
                f"the graph, which would silently cut the gradient that the is / ms shortcuts of "
                f"chains {shortcuts} carry between layers; use use_reentrant=False (the default)"
            )
    return out


def _checkpoint_with(inner, function, *args, _seen=None, **kwargs):
    if torch.compiler.is_compiling():
        return inner(function, *args, **kwargs)  # compiled graphs recompute inside the graph
    seen: dict = {} if _seen is None else _seen  # chain -> the pass its blocks ran in here
    ran = []

    def run(*a, **k):
        if not ran:  # the forward, in the passes in progress
            ran.append(True)
            _SEGMENTS.append(seen)
            try:
                return function(*a, **k)
            finally:
                _SEGMENTS.pop()
        saved = [(c, c._pass) for c in seen]
        for c, p in seen.items():
            c._pass = p
            c._replaying += 1
        try:
            return function(*a, **k)
        finally:
            for c, p in saved:
                c._pass = p
                c._replaying -= 1

    return inner(run, *args, **kwargs)


class _PassCheckpoint:
    """Wraps a model's checkpoint function (HF layers call it) the way reslora.checkpoint wraps
    torch's: the recompute of a layer sees its own pass."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, function, *args, **kwargs):
        return _checkpoint_with(self.inner, function, *args, **kwargs)


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _combined_stats(blk: ResLoRALinear) -> Tuple[torch.Tensor, torch.Tensor]:
    """The block's x and z norm rings as one process that saw every rank's data would have
    recorded them: slot by slot, the root of the sum over ranks of the squared norms (each rank's
    forward sees its share of the batch). Collective under a process group of several ranks."""
    if not _distributed():
        return blk.x_norms, blk.z_norms
    dist = torch.distributed
    counts = torch.stack([blk.stats_count.view(()), -blk.stats_count.view(())])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    if int(counts[0]) != -int(counts[1]):
        raise RuntimeError(
            f"reslora: the ranks recorded different numbers of training forwards (from "
            f"{-int(counts[1])} to {int(counts[0])}): data-parallel ranks must run the same "
            "forwards for their merge statistics to combine"
        )
    rings = torch.stack([blk.x_norms, blk.z_norms]).double().square()
    dist.all_reduce(rings)
    rings = rings.sqrt().float()
    return rings[0], rings[1]


def _norm_means(blk: ResLoRALinear) -> Tuple[torch.Tensor, torch.Tensor]:
    """The block's mean ||x||_F and ||z||_F over its window, of the whole batch under data
    parallelism (_combined_stats). Collective: every rank must merge."""
    x, z = _combined_stats(blk)
    return _ops.stats_mean(x, blk.stats_count), _ops.stats_mean(z, blk.stats_count)


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
        n, key = blk._position, id(blk._chain)
        _, reach, variant = self.original[blk]
        if n != self.position:
            if n < self.position:
                self._inputs[(key, n)] = x
            return
        if reach == 0:
            return
        links = blk._chain
        if variant == "is":  # the block's own A on the earlier block's input
            p = nn.functional.linear(self._inputs[(key, n - 1)], self.original[blk][0])
        else:  # the earlier blocks' mid activations
            p = sum(
                nn.functional.linear(self._inputs[(key, n - j)], self.original[links.block(n, n - j)][0])
                for j in range(1, reach + 1)
            )
        super().add(blk, x, p)


def _merge_arguments(blocks: Sequence[ResLoRALinear], merge: str) -> dict:
    """What the C++ core's merge reads of a chain's blocks, as of now: base weights (the is /
    weight merge alone; a quantized one dequantized), A, B, the norm means, the head's variant,
    pre_num and scaling."""
    head = blocks[0]
    means = [_norm_means(blk) for blk in blocks]
    return dict(
        weights=[_full(blk.dense_weight()) if merge == "weight" else None for blk in blocks],
        As=[_full(blk.lora_A).detach() for blk in blocks],
        Bs=[_full(blk.lora_B).detach() for blk in blocks],
        x_means=[m[0] for m in means],
        z_means=[m[1] for m in means],
        variant=head.variant,
        merge=merge,
        pre_num=head.pre_num,
        scaling=head.scaling,
    )


def _core_merge(
    arguments: dict,
    blocks: Sequence[ResLoRALinear],
    calibration: Optional[Calibration],
    ridge: float,
    only: int = -1,
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The C++ core's merge of a chain from _merge_arguments and the calibration sums of its
    blocks (fit); only >= 0: that block's pair alone."""
    with torch.no_grad():
        return _C.merge_chain(
            **arguments,
            xx=[calibration.xx.get(blk) for blk in blocks] if calibration else [],
            zx=[calibration.zx.get(blk) for blk in blocks] if calibration else [],
            tokens=[calibration.tokens.get(blk, 0) for blk in blocks] if calibration else [],
            ridge=ridge,
            only=only,
        )


def merge_chain(
    blocks: Sequence[ResLoRALinear],
    merge: Optional[str] = None,
    calibration: Optional[Calibration] = None,
    ridge: float = DEFAULT_RIDGE,
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The spec's merge of a chain (in order) into plain LoRA pairs (A', B'), by the C++ core.
    fit (is, ms) needs the calibration sums of the blocks; ridge is relative to tr(xx) / d_in."""
    if not blocks:
        raise ValueError("reslora: merge_chain needs at least one block, got none")
    bad = [type(b).__name__ for b in blocks if not isinstance(b, ResLoRALinear)]
    if bad:
        raise TypeError(f"reslora: merge_chain needs ResLoRALinear blocks, got {bad[0]}")
    head = blocks[0]
    if merge is None:
        merge = _C.merges_for(head.variant)[0]
    _C.check_merge(head.variant, merge)
    if (head.variant, merge) in (("is", "input"), ("ms", "input"), ("ms", "mid")):
        empty = [i for i, blk in enumerate(blocks) if int(blk.stats_count.item()) == 0]
        if empty:
            warnings.warn(
                f"reslora: the {head.variant!r} / {merge!r} merge averages norms recorded in "
                f"training forwards, and blocks {empty} have none (no training forward ran): "
                "their ratios are taken as 1",
                stacklevel=3,
            )
    with torch.no_grad():
        arguments = _merge_arguments(blocks, merge)
    return _core_merge(arguments, blocks, calibration, ridge)
