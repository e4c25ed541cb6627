"""Wraps the linear layers of a (Hugging Face) model with ResLoRA, links them into chains,
merges the shortcuts away and exports a PEFT LoRA adapter or a dense model."""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
import weakref
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from torch import nn

from . import checkpoints, export, saving, targets
from ._lib import load as _load_core
from .config import ResLoRAConfig
from .layers import (
    DEFAULT_RIDGE,
    Calibration,
    ResLoRAChain,
    ResLoRALinear,
    SequentialCalibration,
    _combined_stats,
    _core_merge,
    _distributed,
    _full,
    _is_dtensor,
    _merge_arguments,
    _PassCheckpoint,
)
from .saved_modules import ModulesToSave

_C = _load_core()

# transformers' PEFT integration methods, which a ResLoRAModel must not forward to its model.
_HF_ADAPTER_METHODS = {
    "add_adapter",
    "set_adapter",
    "disable_adapters",
    "enable_adapters",
    "active_adapters",
    "active_adapter",
    "load_adapter",
    "delete_adapter",
    "get_adapter_state_dict",
}


class _Forward:
    """The wrapper's forward, carrying the base model's signature so that tools that read it
    (the HF Trainer drops dataset columns the forward does not name) see the real arguments.
    It refers to its model weakly: the model is freed as soon as it is dropped."""

    def __init__(self, owner: ResLoRAModel):
        self.owner = weakref.ref(owner)
        try:
            self.__signature__ = inspect.signature(owner.base_model.forward)
        except (TypeError, ValueError):
            pass

    def __call__(self, *args, **kwargs):
        return ResLoRAModel.forward(self.owner(), *args, **kwargs)


class ResLoRAModel(nn.Module):
    """A model whose target linear layers are ResLoRALinear blocks linked into chains.

    Attribute access falls through to the wrapped model (config, generate, ...), as with PEFT."""

    def __init__(self, model: nn.Module, config: ResLoRAConfig):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"reslora: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, ResLoRAConfig):
            raise TypeError(f"reslora: config must be a ResLoRAConfig, got {type(config).__name__}")
        if any(isinstance(m, ResLoRALinear) for m in model.modules()):
            raise ValueError(
                "reslora: the model already contains ResLoRA layers; wrap the original model "
                "(from_pretrained needs a fresh base model too)"
            )
        self.base_model = model
        self.reslora_config = config
        self.merge_errors: Dict[str, Optional[float]] = {}
        self.merge_delta_errors: Dict[str, Optional[float]] = {}
        self._merged = False
        saved = targets.modules_to_save(model, config)
        names = targets.targets(model, config, saved)
        for p in model.parameters():
            p.requires_grad_(False)
        self._blocks: OrderedDict[str, ResLoRALinear] = OrderedDict()
        for name in names:
            r, alpha = targets.rank_and_alpha(config, name)
            blk = ResLoRALinear(
                model.get_submodule(name),
                r=r,
                lora_alpha=alpha,
                lora_dropout=config.lora_dropout,
                variant=config.variant,
                pre_num=config.pre_num,
                stats_window=config.stats_window,
                use_rslora=config.use_rslora,
                init_lora_weights=config.init_lora_weights,
            )
            blk.train(blk.base_layer.training)  # wrapping does not change the model's mode
            self._replace(name, blk)
            self._blocks[name] = blk
        self._saved_modules: OrderedDict[str, ModulesToSave] = OrderedDict()
        for name in saved:
            wrapper = ModulesToSave(model.get_submodule(name))
            wrapper.train(wrapper.original_module.training)
            self._replace(name, wrapper)
            self._saved_modules[name] = wrapper
        self._trained_biases = targets.trained_biases(model, config, names)
        for path in self._trained_biases:
            model.get_parameter(path).requires_grad_(True)
        self._chains: OrderedDict[str, ResLoRAChain] = OrderedDict()
        self._chain_paths: OrderedDict[str, List[str]] = OrderedDict()
        groups: Dict[str, list] = OrderedDict()
        for name in self._blocks:
            key, index = targets.skeleton(name)
            groups.setdefault(key, []).append((index, name))
        for key, members in groups.items():
            members.sort()
            part, current, shape = 0, [], None
            for _, name in members:
                blk = self._blocks[name]
                s = (blk.out_features, blk.in_features)
                if current and s != shape:  # a new shape starts a new chain
                    self._add_chain(key, part, current)
                    part, current = part + 1, []
                current.append(name)
                shape = s
            self._add_chain(key, part, current)
        self.forward = _Forward(self)
        self.training = model.training
        self._wrap_checkpoint_functions()
        # Each data-parallel rank records the norms of its own share of the batch (the merge
        # combines them): DDP must not overwrite them with rank 0's at every forward.
        self._ddp_params_and_buffers_to_ignore = [
            f"base_model.{name}.{key}" for name in self._blocks for key in ("x_norms", "z_norms", "stats_count")
        ]
        self.register_state_dict_post_hook(_adapter_state_only)
        self.register_load_state_dict_pre_hook(_check_loaded_state)
        self.register_load_state_dict_post_hook(_ignore_missing_base_keys)

    def _replace(self, path: str, module: nn.Module) -> None:
        parent_name, _, leaf = path.rpartition(".")
        parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
        setattr(parent, leaf, module)

    def __getstate__(self):
        # The per-instance forward refers to this model weakly; a copy gets its own.
        state = self.__dict__.copy()
        state.pop("forward", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.forward = _Forward(self)

    def _add_chain(self, key: str, part: int, names: List[str]) -> None:
        cname = key if part == 0 else f"{key}#{part}"
        self._chains[cname] = ResLoRAChain([self._blocks[n] for n in names], name=cname)
        self._chain_paths[cname] = list(names)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_modules", "_parameters", "_buffers"):
                raise
        if name in _HF_ADAPTER_METHODS:
            # transformers' own PEFT glue on the wrapped model would answer for another library.
            raise AttributeError(
                f"reslora: ResLoRAModel has no {name!r}: it holds one ResLoRA adapter; use "
                "disable_adapter() (a context manager), merge_to_lora(), unload() or "
                "merge_and_unload()"
            )
        try:
            return getattr(self.base_model, name)
        except AttributeError:
            raise AttributeError(
                f"'ResLoRAModel' object has no attribute {name!r} (nor has the wrapped "
                f"{type(self.base_model).__name__})"
            ) from None

    def get_base_model(self) -> nn.Module:
        """The wrapped model (its target layers are the ResLoRA blocks until unload())."""
        return self.base_model

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block, every adapted layer computes its base layer alone (as PEFT's
        disable_adapter): the frozen model's outputs, with no shortcut and no statistics; the
        modules to save run their original. (Biases trained with bias="all" / "lora_only" stay
        trained, as in PEFT.)"""
        layers = list(self._blocks.values()) + list(self._saved_modules.values())
        before = [m._disabled for m in layers]
        for m in layers:
            m._disabled = True
        try:
            yield
        finally:
            for m, was in zip(layers, before):
                m._disabled = was

    def unload(self) -> nn.Module:
        """Puts the original layers back without merging anything and returns the wrapped model:
        the base with the adapter dropped. As in PEFT, the modules to save keep their trained
        copy (and trained biases stay)."""
        for name, blk in self._blocks.items():
            self._replace(name, blk.base_layer)
        for name, wrapper in self._saved_modules.items():
            self._replace(name, wrapper.modules_to_save)
        self._blocks.clear()
        self._chains.clear()
        self._saved_modules.clear()
        return self.base_model

    # --- running -------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):  # replaced per instance by _Forward (same behaviour)
        # One pass of every chain per call: begun here, ended when the wrapped model returns (or
        # raises), so no pass outlives its call. Checkpointed layers keep the pass they ran in for
        # their recompute (see _wrap_checkpoint_functions).
        for chain in self._chains.values():
            chain._begin()
        try:
            return self.base_model(*args, **kwargs)
        finally:
            for chain in self._chains.values():
                if not chain.capture:
                    chain._end()

    @property
    def chains(self) -> Dict[str, List[str]]:
        """Chain name -> module paths in link order."""
        return {k: list(v) for k, v in self._chain_paths.items()}

    @property
    def blocks(self) -> Dict[str, ResLoRALinear]:
        return dict(self._blocks)

    @property
    def merged(self) -> bool:
        return self._merged

    def get_nb_trainable_parameters(self):
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / max(a, 1):.4f}")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs):
        """Turns on the wrapped model's activation (gradient) checkpointing. Non-reentrant
        checkpointing is the default and gives the gradients of the unchecked model. Reentrant
        checkpointing recomputes each layer detached from the others, which would silently cut
        the gradient the is / ms shortcuts carry between layers, so it is refused for those
        variants. Other keyword arguments (every_n_layers, ...) go to the wrapped model."""
        if gradient_checkpointing_kwargs is not None and not isinstance(gradient_checkpointing_kwargs, dict):
            raise TypeError(
                f"reslora: gradient_checkpointing_kwargs must be a dict or None, got {gradient_checkpointing_kwargs!r}"
            )
        ckpt = dict(gradient_checkpointing_kwargs or {})
        ckpt.setdefault("use_reentrant", False)
        if ckpt["use_reentrant"] and self.reslora_config.variant in ("is", "ms"):
            raise ValueError(
                f"reslora: variant {self.reslora_config.variant!r} carries activations between "
                "layers, which reentrant checkpointing cannot differentiate; use "
                "gradient_checkpointing_kwargs={'use_reentrant': False} (the default here)"
            )
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt, **kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt, **kwargs)
        if ckpt["use_reentrant"] and hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()
        self._wrap_checkpoint_functions()

    def _wrap_checkpoint_functions(self) -> None:
        """Makes every checkpoint function of the wrapped model (the `_gradient_checkpointing_func`
        that HF layers call) recompute a layer in the pass it first ran in, so that more than one
        forward before a backward, or a no-grad forward in between, leaves the gradients right.
        Also done at wrapping, for checkpointing turned on before."""
        for m in self.base_model.modules():
            f = m.__dict__.get("_gradient_checkpointing_func")
            if f is not None and not isinstance(f, _PassCheckpoint):
                m._gradient_checkpointing_func = _PassCheckpoint(f)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None, **kwargs):
        """The newer transformers name of gradient_checkpointing_enable (same behaviour)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    # --- merging -------------------------------------------------------------------------------

    @torch.no_grad()
    def merge_to_lora(
        self,
        inputs=None,
        merge: Optional[str] = None,
        eval_inputs=None,
        ridge: float = DEFAULT_RIDGE,
        max_tokens: Optional[int] = None,
        chains_at_once: Optional[int] = None,
        sequential: bool = False,
    ) -> ResLoRAModel:
        """Merges the shortcuts away (in place): every block becomes a plain LoRA block.

        merge: the config's merge when None; "fit" (is, ms) fits, per block, the least-squares
        prediction of the shortcut's term from the block's own input on calibration data:
        `inputs` is then an iterable of model inputs (a DataLoader, a list of batches) or one
        batch, run in eval mode until max_tokens tokens (all when None; an attention_mask in a
        batch leaves the padding out); ridge: relative to tr(E[x x^T]) / d_in, centred on the
        input merge. chains_at_once: fit that many chains per run over the calibration batches
        (which must then be a re-iterable collection), so that only their sums are held at once:
        less memory, more forwards; the result is the same. sequential (fit): then refit the
        blocks one chain position at a time, in order, on the inputs the merged model gives them
        (each position's blocks see every earlier position refitted), one more run over the
        calibration batches per position; the merged model then corrects its own drift.

        merge_errors then holds, per block, the relative error ||y_merged - y|| / ||y|| of its
        output, and merge_delta_errors the error on the adapter's own term,
        ||y_merged - y|| / ||y - base(x)||, on eval_inputs (one batch), else on `inputs` (its first
        batch for fit), run once in eval mode. Without either the errors are None: no pass is kept
        after its forward. Exact merges (lora, bs) give 0."""
        if self._merged:
            raise RuntimeError("reslora: the model is already merged; merge_to_lora() would apply the merge twice")
        variant = self.reslora_config.variant
        merge = self.reslora_config.merge if merge is None else merge
        if not isinstance(merge, str):
            raise ValueError(f"reslora: merge must be a merge name or None, got {merge!r}")
        _C.check_merge(variant, merge)
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)):
            raise ValueError(f"reslora: ridge must be a number > 0 (relative to tr(xx) / d_in), got {ridge!r}")
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise ValueError(f"reslora: max_tokens must be None (all) or an int >= 1, got {max_tokens!r}")
        if not isinstance(sequential, bool):
            raise ValueError(f"reslora: sequential must be True or False, got {sequential!r}")
        if sequential and merge != "fit":
            raise ValueError(f"reslora: sequential=True refits the fit merge, got merge={merge!r}")
        _check_batches("inputs", inputs, many=True)
        _check_batches("eval_inputs", eval_inputs, many=False)
        sharded = any(_is_dtensor(b.lora_A) for b in self._blocks.values())
        if sharded and variant == "bs" and self.reslora_config.pre_num != 0:
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
        calibration = None
        error_inputs = eval_inputs
        if merge == "fit":
            if inputs is None:
                raise ValueError(
                    "reslora: merge 'fit' needs calibration inputs: merge_to_lora(merge='fit', "
                    "inputs=batches), got inputs=None"
                )
            names = list(self._chains)
            step = len(names) if chains_at_once is None else chains_at_once
            if isinstance(step, bool) or not isinstance(step, int) or step < 1:
                raise ValueError(f"reslora: chains_at_once must be None or an int >= 1, got {chains_at_once!r}")
            again = "chains_at_once" if step < len(names) else "sequential=True" if sequential else None
            if again and not isinstance(inputs, (dict, torch.Tensor)) and iter(inputs) is inputs:
                raise ValueError(
                    f"reslora: {again} runs the calibration batches several times: give a "
                    f"list or a DataLoader, got a one-shot iterator ({type(inputs).__name__})"
                )
            fitted = {}  # chain -> its merged pairs, all computed on the unmerged model
            for i in range(0, len(names), step):
                group = [self._chains[c] for c in names[i : i + step]]
                calibration, first = self._calibrate(inputs, max_tokens, [b for c in group for b in c.blocks])
                for c in names[i : i + step]:
                    fitted[c] = self._chains[c].merged_lora(merge, calibration, ridge)
                del calibration
            error_inputs = first if eval_inputs is None else eval_inputs
        elif error_inputs is None:
            error_inputs = inputs
        if error_inputs is not None:
            self._capture_inputs(error_inputs)
        # Each chain's inputs and outputs before its merge (all of them first when the sequential
        # refit runs the model again); the merge; the outputs after, on the same inputs.
        before = {c: self._chain_outputs(chain) for c, chain in self._chains.items()} if sequential else {}
        if sequential:
            fitted = self._refit_in_order(fitted, inputs, max_tokens, ridge)
        errors: Dict[str, Optional[float]] = {}
        delta_errors: Dict[str, Optional[float]] = {}
        for cname, chain in self._chains.items():
            xs, outs, base = before[cname] if sequential else self._chain_outputs(chain)
            if merge == "fit":
                chain.load_pairs(fitted[cname])
            else:
                chain.merge_to_lora(merge)
            after = self._chain_outputs(chain, xs)[1]
            for i, path in enumerate(self._chain_paths[cname]):
                if outs is None:
                    errors[path] = delta_errors[path] = None
                    continue
                y, num = outs[i].double(), (after[i].double() - outs[i].double()).norm().item()
                for out, den in ((errors, y.norm().item()), (delta_errors, (y - base[i].double()).norm().item())):
                    out[path] = num / den if den > 0 else num
        self.merge_errors = errors
        self.merge_delta_errors = delta_errors
        self._merged = True
        return self

    def _chain_outputs(self, chain: ResLoRAChain, xs=None):
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

    def _refit_in_order(self, fitted: dict, inputs, max_tokens: Optional[int], ridge: float) -> dict:
        """The sequential fit: loads the fitted pairs, then refits the blocks at chain position 1,
        2, ... in turn on the inputs the merged model gives them, the shortcut's term computed
        there with the A of the blocks before the merge (SequentialCalibration). Returns the
        final pairs; the chains are left merged with them."""
        original, arguments = {}, {}
        for cname, chain in self._chains.items():
            arguments[cname] = args = _merge_arguments(chain.blocks, "fit")
            args["As"], args["Bs"] = [a.clone() for a in args["As"]], [b.clone() for b in args["Bs"]]
            for blk in chain.blocks:
                original[blk] = (blk.lora_A.detach().clone(), blk._reach, blk.variant)
        pairs = {c: list(p) for c, p in fitted.items()}
        for cname, chain in self._chains.items():
            chain.load_pairs(pairs[cname])
        for position in range(1, max(len(c) for c in self._chains.values())):
            cal = SequentialCalibration(position, original)
            self._calibrate(inputs, max_tokens, list(original), cal=cal, warn=False)
            for cname, chain in self._chains.items():
                if position < len(chain):
                    (pair,) = _core_merge(arguments[cname], chain.blocks, cal, ridge, only=position)
                    chain.blocks[position].load_lora(*pair)
                    pairs[cname][position] = pair
        return pairs

    @torch.no_grad()
    def _calibrate(self, inputs, max_tokens: Optional[int], blocks=None, cal=None, warn: bool = True):
        """Runs calibration batches in eval mode with the given blocks (all by default) adding to
        the fit merge's sums (cal, a new Calibration by default); returns them and the first
        batch."""
        batches = [inputs] if isinstance(inputs, (dict, torch.Tensor)) else inputs
        cal = Calibration() if cal is None else cal
        modes = {m: m.training for m in self.modules()}
        self.eval()
        for blk in self._blocks.values() if blocks is None else blocks:
            blk._calibration = cal
        first, seen = None, 0
        try:
            for b in batches:
                first = b if first is None else first
                mask = b.get("attention_mask") if isinstance(b, dict) else None
                cal.next_batch(mask)
                self._run(b)
                seen = max(cal.tokens.values(), default=0)
                if max_tokens is not None and seen >= max_tokens:
                    break
        finally:
            for blk in self._blocks.values():
                blk._calibration = None
            for m, mode in modes.items():
                m.training = mode
        if first is None:
            raise ValueError("reslora: merge 'fit' got no calibration batch (inputs is empty)")
        d = max(blk.in_features for blk in self._blocks.values())
        if warn and seen < d:
            warnings.warn(
                f"reslora: the fit merge saw {seen} calibration tokens, fewer than d_in = {d}: "
                "E[x x^T] is then singular and the fit leans on the ridge (the input merge); give "
                "at least 10 d_in tokens",
                stacklevel=3,
            )
        return cal, first

    def _run(self, inputs):
        """Calls the model on one batch: a dict of keyword arguments, a tuple / list of positional
        ones, or one tensor."""
        if isinstance(inputs, dict):
            return self(**inputs)
        if isinstance(inputs, (tuple, list)):
            return self(*inputs)
        return self(inputs)

    def _capture_inputs(self, inputs) -> None:
        modes = {m: m.training for m in self.modules()}
        self.eval()
        for chain in self._chains.values():
            chain.capture = True
        try:
            self._run(inputs)
        except BaseException:
            for chain in self._chains.values():
                chain.capture = False
            raise
        finally:
            for m, mode in modes.items():
                m.training = mode

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Folds every block (merged first if needed) into its base weight and returns the
        wrapped model with the original layers back in place."""
        if not self._merged:
            self.merge_to_lora()
        for blk in self._blocks.values():
            blk.fold(blk.scaling * (blk.lora_B @ blk.lora_A))
        return self.unload()

    # --- saving and loading --------------------------------------------------------------------

    def adapter_state_names(self) -> List[str]:
        """The entries of the state dict (relative to the wrapped model) that the adapter owns:
        A, B and the merge statistics of each block, the modules to save, the trained biases.
        state_dict() holds these (and the adapter's description), nothing of the frozen base."""
        out = []
        for name in self._blocks:
            out += [f"{name}.{k}" for k in ("lora_A", "lora_B", "x_norms", "z_norms", "stats_count")]
        for name, wrapper in self._saved_modules.items():
            out += [f"{name}.modules_to_save.{k}" for k in wrapper.modules_to_save.state_dict()]
        return out + list(self._trained_biases)

    def _description(self) -> dict:
        return {
            "reslora_format": checkpoints.FORMAT,
            "config": self.reslora_config.to_dict(),
            "chains": self.chains,
            "modules_to_save": sorted(self._saved_modules),
            "biases": list(self._trained_biases),
            "merged": self._merged,
            # the merge statistics: of the whole batch, or of this rank's share (a state dict
            # taken on one rank of a data-parallel run, as the HF Trainer's checkpoints are)
            "statistics": "rank" if _distributed() else "whole batch",
        }

    def get_extra_state(self) -> torch.Tensor:
        return checkpoints.encode(self._description())

    def set_extra_state(self, state) -> None:
        """Checks that a state dict being loaded describes this adapter (its values load next)."""
        saved = checkpoints.decode(state, "the state dict")
        mine = self._description()
        for key in checkpoints.STRUCTURE:
            a, b = saved["config"].get(key), mine["config"][key]
            if a != b:
                raise ValueError(f"reslora: the checkpoint has {key} = {a!r}, this model {b!r}")
        for key, what in (
            ("chains", "links blocks as"),
            ("modules_to_save", "trains in full"),
            ("biases", "trains the biases"),
            ("merged", "has merged ="),
        ):
            if saved[key] != mine[key]:
                raise ValueError(f"reslora: the checkpoint {what} {saved[key]}, this model {mine[key]}")

    def save_pretrained(self, save_directory: str, format: Optional[str] = None, **kwargs) -> None:
        """After merge_to_lora(): a PEFT LoRA adapter (adapter_config.json and
        adapter_model.safetensors). Before: a ResLoRA checkpoint (the state dict) that resumes
        training and can be merged later. format: "peft" or "reslora" to insist on one. The
        directory is replaced as a whole (reslora.saving): after a crash at any moment it holds
        the previous save or this one, complete; other files in it are kept. Keyword arguments
        of transformers' save_pretrained (state_dict, safe_serialization, is_main_process) are
        accepted; on a process that is not the main one nothing is written.

        Under an initialised process group of several ranks (DDP, FSDP2) it is collective: call
        it on every rank. The sharded parameters are gathered, the merge statistics of all ranks
        combined (so a merge of the checkpoint on one process equals the distributed merge), rank
        0 writes and the others wait for it."""
        if not isinstance(save_directory, (str, os.PathLike)):
            raise TypeError(
                f"reslora: save_directory must be a path (str or os.PathLike), got {type(save_directory).__name__}"
            )
        unknown = set(kwargs) - {"state_dict", "safe_serialization", "is_main_process"}
        if unknown:
            raise TypeError(f"reslora: save_pretrained got unexpected keyword arguments {sorted(unknown)}")
        if not kwargs.get("is_main_process", True) and not _distributed():
            return
        fmt = format or ("peft" if self._merged else "reslora")
        if fmt not in ("peft", "reslora"):
            raise ValueError(f"reslora: format must be 'peft' or 'reslora', got {format!r}")
        if fmt == "peft" and not self._merged:
            raise RuntimeError(
                "reslora: a PEFT LoRA adapter can only be saved after merge_to_lora(): the "
                "shortcuts have no PEFT equivalent"
            )
        if fmt == "reslora" and self._merged:
            raise RuntimeError(
                "reslora: the model is merged and has no shortcuts left; save it as a PEFT adapter (format='peft')"
            )
        if fmt == "peft":
            tensors, config = export.peft_adapter(self)
            files = {export.ADAPTER_CONFIG: saving.json_writer(config)}
            name, meta = export.ADAPTER_FILE, {"format": "pt"}
        else:
            tensors = self.state_dict()
            files = {checkpoints.CHECKPOINT_CONFIG: saving.json_writer(self.reslora_config.to_dict())}
            name, meta = checkpoints.CHECKPOINT_FILE, {"format": "pt", "reslora_format": checkpoints.FORMAT}
            for path, blk in self._blocks.items():  # the whole batch's statistics (collective)
                x, z = _combined_stats(blk)
                tensors[f"base_model.{path}.x_norms"], tensors[f"base_model.{path}.z_norms"] = x, z
            tensors[checkpoints.EXTRA_STATE] = checkpoints.encode({**self._description(), "statistics": "whole batch"})
        # sharded parameters (FSDP2) gathered: collective, like the statistics
        tensors = {k: _full(v).detach().contiguous() for k, v in tensors.items()}
        distributed = _distributed()
        if not distributed or torch.distributed.get_rank() == 0:
            files[name] = saving.safetensors_writer(tensors, meta)
            saving.write_checkpoint(save_directory, files)
        if distributed:
            torch.distributed.barrier()  # the others wait for rank 0's complete save

    @classmethod
    def from_pretrained(cls, model: nn.Module, save_directory: str) -> ResLoRAModel:
        """Wraps `model` as the checkpoint in save_directory says and loads its adapters and
        statistics, ready to resume training or to merge. save_directory: a save_pretrained()
        directory or an HF Trainer checkpoint folder (checkpoint-N, or save_model()'s)."""
        description, tensors = checkpoints.read(save_directory)
        out = cls(model, ResLoRAConfig.from_dict(description["config"]))
        out._load(description, tensors)
        return out

    def load_checkpoint(self, save_directory: str) -> None:
        """Loads a ResLoRA checkpoint (save_pretrained's or an HF Trainer's) into this model; the
        variant, links and shapes must match."""
        if self._merged:
            raise RuntimeError("reslora: cannot load a ResLoRA checkpoint into a merged model")
        self._load(*checkpoints.read(save_directory))

    @torch.no_grad()
    def _load(self, description: dict, tensors: Dict[str, torch.Tensor]) -> None:
        self.load_state_dict(tensors)
        whole = description.get("statistics", "whole batch") == "whole batch"
        if whole and _distributed():
            # Whole-batch norms spread evenly over the ranks: combined again at the merge
            # (root of the summed squares), they give back the saved values.
            share = torch.distributed.get_world_size() ** -0.5
            for blk in self._blocks.values():
                blk.x_norms.mul_(share)
                blk.z_norms.mul_(share)
        elif not whole and not _distributed() and self.reslora_config.variant in ("is", "ms"):
            warnings.warn(
                "reslora: the checkpoint holds one rank's merge statistics (a state dict taken on "
                "one rank of a data-parallel run, such as an HF Trainer checkpoint): an is / ms "
                "merge from it here sees that rank's share of each batch, not the whole batch; "
                "save_pretrained() under the process group stores the whole batch's",
                stacklevel=3,
            )


def _check_batches(name: str, value, many: bool) -> None:
    """inputs / eval_inputs of merge_to_lora: one batch (a tensor, a dict of keyword arguments, a
    tuple / list of positional ones) or, where many, an iterable of batches."""
    if value is None or isinstance(value, (torch.Tensor, dict, tuple, list)):
        return
    if many and hasattr(value, "__iter__") and not isinstance(value, (str, bytes)):
        return
    expected = "a batch (a tensor, a dict of model arguments or a tuple of them)" + (
        " or an iterable of batches (a list, a DataLoader)" if many else ""
    )
    raise ValueError(f"reslora: {name} must be None, {expected}, got {type(value).__name__}")


def _adapter_state_only(module: ResLoRAModel, state_dict, prefix, local_metadata) -> None:
    # The state dict holds what the adapter owns: checkpoints (the HF Trainer's among them) are
    # adapter-sized, and the frozen base comes from where it always comes from.
    keep = {prefix + "base_model." + n for n in module.adapter_state_names()}
    base = prefix + "base_model."
    for k in [k for k in state_dict if k.startswith(base) and k not in keep]:
        del state_dict[k]


def _check_loaded_state(module: ResLoRAModel, state_dict, prefix, *args) -> None:
    # Before anything is copied: the state dict must describe this adapter, and its entries must
    # have this adapter's shapes (a clear error, not torch's list of size mismatches).
    module.__dict__["_load_prefix"] = prefix
    if prefix + checkpoints.EXTRA_STATE in state_dict:
        module.set_extra_state(state_dict[prefix + checkpoints.EXTRA_STATE])
    own = module.base_model.state_dict(keep_vars=True)
    for n in module.adapter_state_names():
        t = state_dict.get(prefix + "base_model." + n)
        if t is not None and tuple(t.shape) != tuple(own[n].shape):
            raise ValueError(
                f"reslora: checkpoint tensor {n!r} must have shape {list(own[n].shape)}, got {list(t.shape)}"
            )


def _ignore_missing_base_keys(module: ResLoRAModel, incompatible_keys) -> None:
    # A state dict without the base's entries is complete: only the adapter's may be missing.
    prefix = module.__dict__.pop("_load_prefix", "")
    keep = {prefix + "base_model." + n for n in module.adapter_state_names()}
    base = prefix + "base_model."
    incompatible_keys.missing_keys[:] = [
        k for k in incompatible_keys.missing_keys if not k.startswith(base) or k in keep
    ]


def get_reslora_model(model: nn.Module, config: ResLoRAConfig) -> ResLoRAModel:
    """Wraps the target linear layers of `model` with ResLoRA blocks (base weights frozen) and
    links them into chains: one per projection, ordered by the layer index in the module path."""
    return ResLoRAModel(model, config)
