"""Wraps the linear layers of a (Hugging Face) model with ResLoRA, links them into chains,
merges the shortcuts away and exports a PEFT LoRA adapter or a dense model."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import weakref
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from torch import nn

from .config import DEFAULT_TARGETS, ResLoRAConfig
from . import saving
from .layers import ResLoRAChain, ResLoRALinear, _PassCheckpoint

CHECKPOINT_FILE = "reslora_model.safetensors"
CHECKPOINT_CONFIG = "reslora_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _output_head_names(model: nn.Module) -> set:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {name for name, m in model.named_modules() if head is not None and m is head}


def _targets(model: nn.Module, config: ResLoRAConfig) -> List[str]:
    tm = config.target_modules
    if tm is None:
        mtype = getattr(getattr(model, "config", None), "model_type", None)
        if mtype not in DEFAULT_TARGETS:
            raise ValueError(
                f"reslora: target_modules must be given for model type {mtype!r} (defaults exist "
                f"for {sorted(DEFAULT_TARGETS)})"
            )
        tm = DEFAULT_TARGETS[mtype]
    heads = _output_head_names(model)
    names = []
    for name, m in model.named_modules():
        if not name:
            continue
        if tm == "all-linear":
            hit = _is_linear(m) and name not in heads
        elif isinstance(tm, str):
            hit = re.fullmatch(tm, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in tm)
        if hit and not _is_linear(m):
            raise ValueError(
                f"reslora: target_modules {tm!r} names {name!r}, a {type(m).__name__}; reslora "
                "adapts nn.Linear and GPT-2 Conv1D layers: name those (or use 'all-linear')"
            )
        if hit:
            names.append(name)
    if not names:
        raise ValueError(
            f"reslora: target_modules {tm!r} match no nn.Linear or Conv1D layer of "
            f"{type(model).__name__}"
        )
    return names


# transformers' PEFT integration methods, which a ResLoRAModel must not forward to its model.
_HF_ADAPTER_METHODS = {
    "add_adapter", "set_adapter", "disable_adapters", "enable_adapters", "active_adapters",
    "active_adapter", "load_adapter", "delete_adapter", "get_adapter_state_dict",
}

# PEFT task types by the suffix of the model class, so that PEFT builds the matching PeftModel.
# Only the generative ones: for the classification types PEFT expects the trained head in the
# adapter (modules_to_save), which the export does not hold, so those adapters keep no task type.
_TASK_TYPES = [
    ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
]


def _task_type(model: nn.Module) -> Optional[str]:
    name = type(model).__name__
    for suffix, task in _TASK_TYPES:
        if name.endswith(suffix):
            return task
    return None


def _skeleton(path: str):
    parts = path.split(".")
    key = ".".join("*" if p.isdigit() else p for p in parts)
    index = tuple(int(p) for p in parts if p.isdigit())
    return key, index


class _Forward:
    """The wrapper's forward, carrying the base model's signature so that tools that read it
    (the HF Trainer drops dataset columns the forward does not name) see the real arguments.
    It refers to its model weakly: the model is freed as soon as it is dropped."""

    def __init__(self, owner: "ResLoRAModel"):
        self.owner = weakref.ref(owner)
        try:
            self.__signature__ = inspect.signature(owner.base_model.forward)
        except (TypeError, ValueError):
            pass

    def __call__(self, *args, **kwargs):
        return ResLoRAModel.forward(self.owner(), *args, **kwargs)


def _tied_aliases(module: nn.Module) -> Dict[str, str]:
    """alias name -> first name, for parameters / buffers registered under several names (tied
    input and output embeddings)."""
    first: Dict[int, str] = {}
    aliases: Dict[str, str] = {}
    named = list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    )
    for name, t in named:
        if t is None:
            continue
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases


def _drop_tied(module, state_dict, prefix, local_metadata):
    # A tied tensor is stored once, so the state dict can go through safetensors (which refuses
    # shared storage), as the HF Trainer does for models it does not know.
    for alias, name in _tied_aliases(module).items():
        if prefix + name in state_dict:
            state_dict.pop(prefix + alias, None)


class ResLoRAModel(nn.Module):
    """A model whose target linear layers are ResLoRALinear blocks linked into chains.

    Attribute access falls through to the wrapped model (config, generate, ...), as with PEFT."""

    def __init__(self, model: nn.Module, config: ResLoRAConfig):
        super().__init__()
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
        self._merged = False
        for p in model.parameters():
            p.requires_grad_(False)
        self._blocks: "OrderedDict[str, ResLoRALinear]" = OrderedDict()
        for name in _targets(model, config):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            blk = ResLoRALinear(
                getattr(parent, leaf),
                r=config.r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                variant=config.variant,
                pre_num=config.pre_num,
                stats_window=config.stats_window,
            )
            blk.train(blk.base_layer.training)  # wrapping does not change the model's mode
            setattr(parent, leaf, blk)
            self._blocks[name] = blk
        self._chains: "OrderedDict[str, ResLoRAChain]" = OrderedDict()
        self._chain_paths: "OrderedDict[str, List[str]]" = OrderedDict()
        groups: Dict[str, list] = OrderedDict()
        for name in self._blocks:
            key, index = _skeleton(name)
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
        self._register_state_dict_hook(_drop_tied)
        self._register_load_state_dict_pre_hook(self._restore_tied, with_module=True)

    @staticmethod
    def _restore_tied(module, state_dict, prefix, *args):
        for alias, name in _tied_aliases(module).items():
            if prefix + alias not in state_dict and prefix + name in state_dict:
                state_dict[prefix + alias] = state_dict[prefix + name]

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
        disable_adapter): the frozen model's outputs, with no shortcut and no statistics."""
        blocks = list(self._blocks.values())
        before = [blk._disabled for blk in blocks]
        for blk in blocks:
            blk._disabled = True
        try:
            yield
        finally:
            for blk, was in zip(blocks, before):
                blk._disabled = was

    def unload(self) -> nn.Module:
        """Puts the original layers back without merging anything and returns the wrapped model:
        the frozen base, the adapter dropped."""
        for name, blk in self._blocks.items():
            parent_name, _, leaf = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            setattr(parent, leaf, blk.base_layer)
        self._blocks.clear()
        self._chains.clear()
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
    def merge_to_lora(self, inputs=None) -> "ResLoRAModel":
        """Merges the shortcuts away by the configured merge (in place): every block becomes a
        plain LoRA block. merge_errors then holds, per block, the relative error
        ||y_merged - y|| / ||y|| of its output on `inputs` (model inputs: a dict of keyword
        arguments, a tuple of positional ones or one tensor), run once in eval mode before the
        merge. Without inputs the errors are None: no pass is kept after its forward. Exact merges
        (lora, bs) give 0."""
        if self._merged:
            raise RuntimeError(
                "reslora: the model is already merged; merge_to_lora() would apply the merge twice"
            )
        if inputs is not None:
            self._capture_inputs(inputs)
        errors: Dict[str, Optional[float]] = {}
        for cname, chain in self._chains.items():
            xs = chain.last_inputs()
            modes = [b.training for b in chain.blocks]
            for b in chain.blocks:
                b.eval()
            before = chain(xs) if xs is not None else None
            chain.merge_to_lora(self.reslora_config.merge)
            after = chain(xs) if xs is not None else None
            for b, mode in zip(chain.blocks, modes):
                b.train(mode)
            for i, path in enumerate(self._chain_paths[cname]):
                if before is None:
                    errors[path] = None
                else:
                    den = before[i].double().norm().item()
                    num = (after[i].double() - before[i].double()).norm().item()
                    errors[path] = num / den if den > 0 else num
            chain.capture = False
            chain.reset()
        self.merge_errors = errors
        self._merged = True
        return self

    def _capture_inputs(self, inputs) -> None:
        modes = {m: m.training for m in self.modules()}
        self.eval()
        for chain in self._chains.values():
            chain.capture = True
        try:
            if isinstance(inputs, dict):
                self(**inputs)
            elif isinstance(inputs, (tuple, list)):
                self(*inputs)
            else:
                self(inputs)
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
        for name, blk in self._blocks.items():
            w = blk.base_weight()  # a view of Conv1D's transposed weight: updated in place
            w.add_((blk.scaling * (blk.lora_B @ blk.lora_A)).to(w.dtype))
        return self.unload()

    # --- saving and loading --------------------------------------------------------------------

    def save_pretrained(self, save_directory: str, format: Optional[str] = None) -> None:
        """After merge_to_lora(): a PEFT LoRA adapter (adapter_config.json and
        adapter_model.safetensors). Before: a ResLoRA checkpoint that resumes training and can
        be merged later. format: "peft" or "reslora" to insist on one. The directory is replaced
        as a whole (reslora.saving): after a crash at any moment it holds the previous save or
        this one, complete; other files in it are kept."""
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
                "reslora: the model is merged and has no shortcuts left; save it as a PEFT "
                "adapter (format='peft')"
            )
        if fmt == "peft":
            self._save_peft(save_directory)
        else:
            self._save_reslora(save_directory)

    def _save_peft(self, d: str) -> None:
        rank = max(b.r for b in self._blocks.values())
        s = self.reslora_config.scaling
        tensors = {}
        conv1d = False
        for name, blk in self._blocks.items():
            a, b = blk.lora_A.detach(), blk.lora_B.detach()
            if blk.r < rank:  # zero blocks keep one r and lora_alpha for every layer
                a = torch.cat([a, a.new_zeros(rank - blk.r, a.shape[1])], 0)
                b = torch.cat([b, b.new_zeros(b.shape[0], rank - blk.r)], 1)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
            conv1d |= blk._transposed
        base_cfg = getattr(self.base_model, "config", None)
        config = {
            "peft_type": "LORA",
            "task_type": _task_type(self.base_model),
            "base_model_name_or_path": getattr(base_cfg, "_name_or_path", None) or None,
            "r": rank,
            "lora_alpha": s * rank,
            "lora_dropout": 0.0,
            "target_modules": sorted(self._blocks),
            "bias": "none",
            "fan_in_fan_out": conv1d,
            "inference_mode": True,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "modules_to_save": None,
        }
        saving.write_checkpoint(d, {ADAPTER_FILE: saving.safetensors_writer(tensors, {"format": "pt"}),
                                    ADAPTER_CONFIG: saving.json_writer(config)})

    def _checkpoint_tensors(self) -> Dict[str, torch.Tensor]:
        out = {}
        for name, blk in self._blocks.items():
            for key in ("lora_A", "lora_B", "x_norms", "z_norms", "stats_count"):
                out[f"{name}.{key}"] = getattr(blk, key)
        return out

    def _save_reslora(self, d: str) -> None:
        meta = {
            "format": "pt",
            "reslora_format": "1",
            "reslora_config": self.reslora_config.to_json(),
            "chains": json.dumps(self.chains),
        }
        saving.write_checkpoint(d, {
            CHECKPOINT_FILE: saving.safetensors_writer(self._checkpoint_tensors(), meta),
            CHECKPOINT_CONFIG: saving.json_writer(self.reslora_config.to_dict()),
        })

    @staticmethod
    def _read_checkpoint(d: str):
        from safetensors import safe_open

        saving.recover(d)  # a save interrupted between its two renames is put back first
        path = os.path.join(d, CHECKPOINT_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reslora: no ResLoRA checkpoint at {path!r}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"reslora: cannot read the checkpoint file {path!r}: {e}") from e
        if meta.get("reslora_format") != "1":
            raise ValueError(f"reslora: {path!r} is not a ResLoRA checkpoint (format {meta.get('reslora_format')!r})")
        return meta, tensors

    @classmethod
    def from_pretrained(cls, model: nn.Module, save_directory: str) -> "ResLoRAModel":
        """Wraps `model` as the checkpoint in save_directory says and loads its adapters and
        statistics, ready to resume training or to merge."""
        meta, _ = cls._read_checkpoint(save_directory)
        config = ResLoRAConfig.from_dict(json.loads(meta["reslora_config"]))
        out = cls(model, config)
        out.load_checkpoint(save_directory)
        return out

    @torch.no_grad()
    def load_checkpoint(self, save_directory: str) -> None:
        """Loads a ResLoRA checkpoint into this model; the variant, links and shapes must match."""
        meta, tensors = self._read_checkpoint(save_directory)
        saved = ResLoRAConfig.from_dict(json.loads(meta["reslora_config"]))
        mine = self.reslora_config
        for key in ("variant", "pre_num", "r", "lora_alpha"):
            if getattr(saved, key) != getattr(mine, key):
                raise ValueError(
                    f"reslora: the checkpoint has {key} = {getattr(saved, key)!r}, this model "
                    f"{getattr(mine, key)!r}"
                )
        if self._merged:
            raise RuntimeError("reslora: cannot load a ResLoRA checkpoint into a merged model")
        chains = json.loads(meta.get("chains", "{}"))
        if chains != self.chains:
            raise ValueError(
                f"reslora: the checkpoint links blocks as {chains}, this model as {self.chains}"
            )
        expected = self._checkpoint_tensors()
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ValueError(f"reslora: checkpoint keys differ: missing {missing[:5]}, unexpected {extra[:5]}")
        for k, t in expected.items():
            if tuple(tensors[k].shape) != tuple(t.shape):
                raise ValueError(
                    f"reslora: checkpoint tensor {k!r} must have shape {list(t.shape)}, got "
                    f"{list(tensors[k].shape)}"
                )
        for k, t in expected.items():
            t.copy_(tensors[k].to(t.dtype))


def get_reslora_model(model: nn.Module, config: ResLoRAConfig) -> ResLoRAModel:
    """Wraps the target linear layers of `model` with ResLoRA blocks (base weights frozen) and
    links them into chains: one per projection, ordered by the layer index in the module path."""
    return ResLoRAModel(model, config)
