"""Merging the shortcuts away: the statistics the is / ms merges read, the C++ core's merge of a
chain (merge_chain), and the merge of a whole ResLoRAModel (merge_model: one argument check, the
fit's calibration, the sequential refit, the merge errors)."""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import _lib
from .block import ResLoRALinear
from .calibration import (
    Calibration,
    SequentialCalibration,
    as_batches,
    calibrate,
    capture_inputs,
    check_batches,
    first_batch,
)
from .compat import full, is_distributed, is_dtensor

_C = _lib.load()
_ops = torch.ops.reslora

DEFAULT_RIDGE = _C.DEFAULT_RIDGE  # the fit merge's relative ridge (the C++ core's)


def combined_stats(blk: ResLoRALinear) -> Tuple[torch.Tensor, torch.Tensor]:
    """The block's x and z norm rings as one process that saw every rank's data would have
    recorded them: slot by slot, the root of the sum over ranks of the squared norms (each rank's
    forward sees its share of the batch). Collective under a process group of several ranks."""
    if not is_distributed():
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


def norm_means(blk: ResLoRALinear) -> Tuple[torch.Tensor, torch.Tensor]:
    """The block's mean ||x||_F and ||z||_F over its window, of the whole batch under data
    parallelism (combined_stats). Collective: every rank must merge."""
    x, z = combined_stats(blk)
    return _ops.stats_mean(x, blk.stats_count), _ops.stats_mean(z, blk.stats_count)


def merge_arguments(blocks: Sequence[ResLoRALinear], merge: str) -> dict:
    """What the C++ core's merge reads of a chain's blocks, as of now: base weights (the is /
    weight merge alone; a quantized one dequantized), A, B, the norm means, the head's variant,
    pre_num and scaling."""
    head = blocks[0]
    means = [norm_means(blk) for blk in blocks]
    return dict(
        weights=[full(blk.dense_weight()) if merge == "weight" else None for blk in blocks],
        As=[full(blk.lora_A).detach() for blk in blocks],
        Bs=[full(blk.lora_B).detach() for blk in blocks],
        x_means=[m[0] for m in means],
        z_means=[m[1] for m in means],
        variant=head.variant,
        merge=merge,
        pre_num=head.pre_num,
        scaling=head.scaling,
    )


def core_merge(
    arguments: dict,
    blocks: Sequence[ResLoRALinear],
    calibration: Optional[Calibration],
    ridge: float,
    only: int = -1,
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The C++ core's merge of a chain from merge_arguments and the calibration sums of its
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
            chain = head.links.name if head.links is not None else "(unlinked blocks)"
            warnings.warn(
                f"reslora: chain {chain!r}: the {head.variant!r} / {merge!r} merge averages norms recorded in "
                f"training forwards, and blocks {empty} have none (no training forward ran): "
                "their ratios are taken as 1",
                stacklevel=3,
            )
    with torch.no_grad():
        arguments = merge_arguments(blocks, merge)
    return core_merge(arguments, blocks, calibration, ridge)


def check_merge_arguments(
    model, merge, inputs, eval_inputs, ridge, max_tokens, chains_at_once, sequential
) -> Tuple[str, int]:
    """Every argument of ResLoRAModel.merge_to_lora checked before any work, against the model:
    returns the merge's name and how many chains each calibration run fits."""
    config = model.reslora_config
    variant = config.variant
    merge = config.merge if merge is None else merge
    if not isinstance(merge, str):
        raise ValueError(f"reslora: merge must be a merge name or None, got {merge!r}")
    _C.check_merge(variant, merge)
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)):
        raise ValueError(f"reslora: ridge must be a number > 0 (relative to tr(xx) / d_in), got {ridge!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"reslora: max_tokens must be None (all) or an int >= 1, got {max_tokens!r}")
    if not isinstance(sequential, bool):
        raise ValueError(f"reslora: sequential must be True or False, got {sequential!r}")
    if sequential and merge != "fit":
        raise ValueError(f"reslora: sequential=True refits the fit merge, got merge={merge!r}")
    check_batches("inputs", inputs, many=True)
    check_batches("eval_inputs", eval_inputs, many=False)
    sharded = any(is_dtensor(b.lora_A) for b in model.blocks.values())
    if sharded and variant == "bs" and config.pre_num != 0:
        raise RuntimeError(
            "reslora: the bs merge gives block n rank (n + 1) r (or (pre_num + 1) r), and these "
            "parameters are sharded by FSDP2, which cannot change their shape: save the ResLoRA "
            "checkpoint (save_pretrained) and merge it on one process"
        )
    if sharded and (inputs is not None or eval_inputs is not None):
        raise ValueError(
            "reslora: merge_to_lora(inputs=...) runs the blocks outside the model's forward, "
            "which FSDP2's sharded parameters do not allow: merge without inputs (errors None)"
        )
    n_chains = len(model.linked_chains)
    step = n_chains
    if merge == "fit":
        if inputs is None:
            raise ValueError(
                "reslora: merge 'fit' needs calibration inputs: merge_to_lora(merge='fit', "
                "inputs=batches), got inputs=None"
            )
        step = n_chains if chains_at_once is None else chains_at_once
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"reslora: chains_at_once must be None or an int >= 1, got {chains_at_once!r}")
        again = "chains_at_once" if step < n_chains else "sequential=True" if sequential else None
        batches = as_batches(inputs)
        if again and iter(batches) is batches:
            raise ValueError(
                f"reslora: {again} runs the calibration batches several times: give a "
                f"list or a DataLoader, got a one-shot iterator ({type(inputs).__name__})"
            )
    return merge, step


@torch.no_grad()
def merge_model(
    model, inputs, merge, eval_inputs, ridge, max_tokens, chains_at_once, sequential
) -> Tuple[Dict[str, Optional[float]], Dict[str, Optional[float]]]:
    """ResLoRAModel.merge_to_lora's work (its docstring says what each argument does): merges
    every chain in place and returns the merge errors per block path, of the output and of the
    adapter's own term (None without inputs)."""
    merge, step = check_merge_arguments(
        model, merge, inputs, eval_inputs, ridge, max_tokens, chains_at_once, sequential
    )
    chains = model.linked_chains
    paths = model.chains
    error_inputs = eval_inputs
    fitted = {}  # chain -> its merged pairs, all computed on the unmerged model
    if merge == "fit":
        names = list(chains)
        for i in range(0, len(names), step):
            group = [chains[c] for c in names[i : i + step]]
            cal, first = calibrate(model, inputs, max_tokens, [b for c in group for b in c.blocks])
            for c in names[i : i + step]:
                fitted[c] = chains[c].merged_lora(merge, cal, ridge)
            del cal
        error_inputs = first if eval_inputs is None else eval_inputs
    elif error_inputs is None:
        error_inputs = first_batch(inputs)
    if error_inputs is not None:
        capture_inputs(model, error_inputs)
    # Each chain's inputs and outputs before its merge (all of them first when the sequential
    # refit runs the model again); the merge; the outputs after, on the same inputs.
    before = {c: chain_outputs(chain) for c, chain in chains.items()} if sequential else {}
    if sequential:
        fitted = refit_in_order(model, fitted, inputs, max_tokens, ridge)
    errors: Dict[str, Optional[float]] = {}
    delta_errors: Dict[str, Optional[float]] = {}
    for cname, chain in chains.items():
        xs, outs, base = before[cname] if sequential else chain_outputs(chain)
        if merge == "fit":
            chain.load_pairs(fitted[cname])
        else:
            chain.merge_to_lora(merge)
        after = chain_outputs(chain, xs)[1]
        for i, path in enumerate(paths[cname]):
            if outs is None:
                errors[path] = delta_errors[path] = None
                continue
            y, num = outs[i].double(), (after[i].double() - outs[i].double()).norm().item()
            for out, den in ((errors, y.norm().item()), (delta_errors, (y - base[i].double()).norm().item())):
                out[path] = num / den if den > 0 else num
    return errors, delta_errors


def chain_outputs(chain, xs=None):
    """(inputs, outputs, base outputs) of a chain's blocks in eval mode: on xs, or on the
    inputs its last pass captured (capture then ends); (None, None, None) without inputs."""
    if xs is None:
        xs = chain.last_inputs()
        chain.capture = False
        chain.reset()
    if xs is None:
        return None, None, None
    modes = [b.training for b in chain.blocks]
    for b in chain.blocks:
        b.eval()
    outs = chain(xs)
    base = [b.base_layer(x) for b, x in zip(chain.blocks, xs)]
    for b, mode in zip(chain.blocks, modes):
        b.train(mode)
    return xs, outs, base


def refit_in_order(model, fitted: dict, inputs, max_tokens: Optional[int], ridge: float) -> dict:
    """The sequential fit: loads the fitted pairs, then refits the blocks at chain position 1,
    2, ... in turn on the inputs the merged model gives them, the shortcut's term computed
    there with the A of the blocks before the merge (SequentialCalibration). Returns the
    final pairs; the chains are left merged with them."""
    chains = model.linked_chains
    original, arguments = {}, {}
    for cname, chain in chains.items():
        arguments[cname] = args = merge_arguments(chain.blocks, "fit")
        args["As"], args["Bs"] = [a.clone() for a in args["As"]], [b.clone() for b in args["Bs"]]
        for blk in chain.blocks:
            original[blk] = (blk.lora_A.detach().clone(), blk.reach, blk.variant)
    pairs = {c: list(p) for c, p in fitted.items()}
    for cname, chain in chains.items():
        chain.load_pairs(pairs[cname])
    for position in range(1, max(len(c) for c in chains.values())):
        cal = SequentialCalibration(position, original)
        calibrate(model, inputs, max_tokens, list(original), cal=cal, warn=False)
        for cname, chain in chains.items():
            if position < len(chain):
                (pair,) = core_merge(arguments[cname], chain.blocks, cal, ridge, only=position)
                chain.blocks[position].load_lora(*pair)
                pairs[cname][position] = pair
    return pairs


def warn_uncalibrated_fold(config) -> None:
    """merge_and_unload() of an is / ms model that was not merged first applies the config's
    scalar merge without calibration: said, with what it costs and what to do instead."""
    if config.variant not in ("is", "ms"):
        return
    warnings.warn(
        f"reslora: merge_and_unload() on an unmerged {config.variant!r} model applies its "
        f"{config.merge!r} merge, a norm-ratio approximation of the shortcuts that loses part of "
        "what the adapter learned (in the study, docs/study.md, the input merge kept 86-97 % of "
        "the adapter's held-out gain, the least-squares fit 97.6-99.5 %); call "
        "merge_to_lora(merge='fit', inputs=calibration_batches) first, then merge_and_unload()",
        stacklevel=4,
    )


def warn_quantized_fold(blocks) -> None:
    """Folding into quantized base weights quantizes them again (as PEFT warns)."""
    kinds = sorted({type(b.base_layer.weight).__name__ for b in blocks if b.opaque})
    if kinds:
        warnings.warn(
            f"reslora: merge_and_unload() folds the adapter into quantized base weights ({', '.join(kinds)}), "
            "which are quantized again: the merged model's outputs differ from the unmerged one's by "
            "about the quantization's own rounding; for exact outputs serve the adapter on the "
            "quantized base, or fold into a dense copy of the base",
            stacklevel=4,
        )
