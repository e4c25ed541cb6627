"""Activation checkpointing that keeps ResLoRA's passes: a recomputed segment sees the shortcut
inputs and dropout seeds of the pass it first ran in (reslora.checkpoint, and the wrapper of an
HF model's own checkpoint function)."""

from __future__ import annotations

import torch

from .block import SEGMENTS


def checkpoint(function, *args, use_reentrant: bool = False, **kwargs):
    """torch.utils.checkpoint.checkpoint for code that runs ResLoRA blocks: the recompute of the
    segment sees the shortcut inputs and dropout seeds of the pass it first ran in, whatever ran
    in between (other forwards, no-grad passes). Same arguments as torch's."""
    if not callable(function):
        raise TypeError(f"reslora.checkpoint: function must be callable, got {type(function).__name__}")
    seen: dict = {}
    out = checkpoint_with(
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


def checkpoint_with(inner, function, *args, _seen=None, **kwargs):
    if torch.compiler.is_compiling():
        return inner(function, *args, **kwargs)  # compiled graphs recompute inside the graph
    seen: dict = {} if _seen is None else _seen  # chain -> the pass its blocks ran in here
    ran = []

    def run(*a, **k):
        if not ran:  # the forward, in the passes in progress
            ran.append(True)
            SEGMENTS.append(seen)
            try:
                return function(*a, **k)
            finally:
                SEGMENTS.pop()
        saved = [(c, c.current) for c in seen]
        for c, p in seen.items():
            c.current = p
            c.replaying += 1
        try:
            return function(*a, **k)
        finally:
            for c, p in saved:
                c.current = p
                c.replaying -= 1

    return inner(run, *args, **kwargs)


class PassCheckpoint:
    """Wraps a model's checkpoint function (HF layers call it) the way reslora.checkpoint wraps
    torch's: the recompute of a layer sees its own pass."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, function, *args, **kwargs):
        return checkpoint_with(self.inner, function, *args, **kwargs)


def wrap_checkpoint_functions(model) -> None:
    """Makes every checkpoint function of a model (the `_gradient_checkpointing_func` that HF
    layers call) recompute a layer in the pass it first ran in, so that more than one forward
    before a backward, or a no-grad forward in between, leaves the gradients right. Done when
    checkpointing is turned on, and at wrapping, for checkpointing turned on before."""
    for m in model.modules():
        f = m.__dict__.get("_gradient_checkpointing_func")
        if f is not None and not isinstance(f, PassCheckpoint):
            m._gradient_checkpointing_func = PassCheckpoint(f)


def enable(base, variant: str, gradient_checkpointing_kwargs=None, **kwargs) -> None:
    """ResLoRAModel.gradient_checkpointing_enable's work on the wrapped model `base`."""
    if gradient_checkpointing_kwargs is not None and not isinstance(gradient_checkpointing_kwargs, dict):
        raise TypeError(
            f"reslora: gradient_checkpointing_kwargs must be a dict or None, got {gradient_checkpointing_kwargs!r}"
        )
    ckpt = dict(gradient_checkpointing_kwargs or {})
    ckpt.setdefault("use_reentrant", False)
    if ckpt["use_reentrant"] and variant in ("is", "ms"):
        raise ValueError(
            f"reslora: variant {variant!r} carries activations between "
            "layers, which reentrant checkpointing cannot differentiate; use "
            "gradient_checkpointing_kwargs={'use_reentrant': False} (the default here)"
        )
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt, **kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt, **kwargs)
    if ckpt["use_reentrant"] and hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()
    wrap_checkpoint_functions(base)
