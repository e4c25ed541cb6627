"""The model wrapper: wraps the target linear layers of a (Hugging Face) model with ResLoRA
blocks, links them into chains and runs them; merging (reslora.merging), saving and loading
(reslora.checkpoints) are the modules it calls."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from torch import nn

from . import _lib, checkpointing, checkpoints, classes, merging, peft_adapters, targets
from .block import ResLoRALinear
from .chain import ResLoRAChain
from .config import ResLoRAConfig
from .merging import DEFAULT_RIDGE
from .saved_modules import ModulesToSave

_C = _lib.load()

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


def _wrapper_class(base_cls: type) -> type:
    return classes.wrapper_class(ResLoRAModel, base_cls)


def _new_wrapper(base_cls: type) -> ResLoRAModel:
    """An empty wrapper of the class for base_cls, which pickle and copy then fill."""
    return nn.Module.__new__(_wrapper_class(base_cls))


class ResLoRAModel(nn.Module):
    """A model whose target linear layers are ResLoRALinear blocks linked into chains.

    Attribute access falls through to the wrapped model (config, generate, ...), as with PEFT.
    An instance is of the subclass made for its base model's class (ResLoRALlamaForCausalLM,
    say), whose forward has the base model's signature."""

    def __new__(cls, model=None, config=None):
        if (cls is ResLoRAModel or classes.is_wrapper_class(cls)) and isinstance(model, nn.Module):
            cls = _wrapper_class(type(model))
        return super().__new__(cls)

    def __reduce_ex__(self, protocol):
        # the class is made at run time: copies and pickles make it again from the base's class
        return (_new_wrapper, (type(self.__dict__["_modules"][checkpoints.WRAPPED]),), self.__getstate__())

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
        setattr(self, checkpoints.WRAPPED, model)  # self.model: state-dict keys begin with "model."
        self.reslora_config = config
        self.merge_errors: Dict[str, Optional[float]] = {}
        self.merge_delta_errors: Dict[str, Optional[float]] = {}
        self._merged = False
        self._unloaded = False
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
        self.training = model.training
        checkpointing.wrap_checkpoint_functions(self.get_base_model())
        # Each data-parallel rank records the norms of its own share of the batch (the merge
        # combines them): DDP must not overwrite them with rank 0's at every forward.
        self._ddp_params_and_buffers_to_ignore = [
            f"{checkpoints.PREFIX}{name}.{key}"
            for name in self._blocks
            for key in ("x_norms", "z_norms", "stats_count")
        ]
        self.register_state_dict_post_hook(checkpoints.adapter_state_only)
        self.register_load_state_dict_pre_hook(checkpoints.check_loaded_state)
        self.register_load_state_dict_post_hook(checkpoints.ignore_missing_base_keys)

    def _replace(self, path: str, module: nn.Module) -> None:
        parent_name, _, leaf = path.rpartition(".")
        parent = self.get_base_model().get_submodule(parent_name) if parent_name else self.get_base_model()
        setattr(parent, leaf, module)

    def __getstate__(self):
        return self.__dict__.copy()

    def _add_chain(self, key: str, part: int, names: List[str]) -> None:
        cname = key if part == 0 else f"{key}#{part}"
        self._chains[cname] = ResLoRAChain([self._blocks[n] for n in names], name=cname)
        self._chain_paths[cname] = list(names)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in (checkpoints.WRAPPED, "_modules", "_parameters", "_buffers"):
                raise
        if name in _HF_ADAPTER_METHODS:
            # transformers' own PEFT glue on the wrapped model would answer for another library.
            raise AttributeError(
                f"reslora: ResLoRAModel has no {name!r}: it holds one ResLoRA adapter; use "
                "disable_adapter() (a context manager), merge_to_lora(), unload() or "
                "merge_and_unload()"
            )
        try:
            return getattr(self.get_base_model(), name)
        except AttributeError:
            raise AttributeError(
                f"'ResLoRAModel' object has no attribute {name!r} (nor has the wrapped "
                f"{type(self.get_base_model()).__name__})"
            ) from None

    def get_base_model(self) -> nn.Module:
        """The wrapped model (its target layers are the ResLoRA blocks until unload())."""
        try:
            return self._modules[checkpoints.WRAPPED]
        except KeyError:
            raise AttributeError("reslora: this ResLoRAModel holds no model yet") from None

    @property
    def base_model(self) -> nn.Module:
        """As on the wrapped transformers model: its backbone (the decoder stack of a causal LM,
        the encoder of a classifier), which trainers such as TRL run for the hidden states; the
        wrapped model itself when it has none. The wrapped model is get_base_model() (as in
        PEFT), also reachable as .model, the name its state-dict keys begin with."""
        wrapped = self.get_base_model()
        return getattr(wrapped, "base_model", wrapped)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block, every adapted layer computes its base layer alone (as PEFT's
        disable_adapter): the frozen model's outputs, with no shortcut and no statistics; the
        modules to save run their original. (Biases trained with bias="all" / "lora_only" stay
        trained, as in PEFT.)"""
        layers = list(self._blocks.values()) + list(self._saved_modules.values())
        before = [m.disabled for m in layers]
        for m in layers:
            m.disabled = True
        try:
            yield
        finally:
            for m, was in zip(layers, before):
                m.disabled = was

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
        self._chain_paths.clear()
        self._saved_modules.clear()
        self._unloaded = True
        return self.get_base_model()

    def _check_not_unloaded(self, call: str) -> None:
        if self._unloaded:
            raise RuntimeError(
                f"reslora: {call} after unload(): unload() put the original layers back and dropped "
                "the adapter, so there is nothing to merge or save; wrap the model again "
                "(get_reslora_model) to adapt it"
            )

    # --- running -------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        """The wrapped model's forward, with one pass of every chain."""
        # One pass of every chain per call: begun here, ended when the wrapped model returns (or
        # raises), so no pass outlives its call. Checkpointed layers keep the pass they ran in for
        # their recompute (checkpointing.wrap_checkpoint_functions).
        for chain in self._chains.values():
            chain.begin_pass()
        try:
            return self.get_base_model()(*args, **kwargs)
        finally:
            for chain in self._chains.values():
                if not chain.capture:
                    chain.reset()

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

    @property
    def linked_chains(self) -> Dict[str, ResLoRAChain]:
        """Chain name -> its ResLoRAChain (the blocks linked in order)."""
        return dict(self._chains)

    @property
    def saved_modules(self) -> Dict[str, ModulesToSave]:
        """Module path -> the wrapper of a module trained in full (modules_to_save)."""
        return dict(self._saved_modules)

    @property
    def trained_biases(self) -> List[str]:
        """Parameter paths of the biases trained with the adapter (bias="all" / "lora_only")."""
        return list(self._trained_biases)

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
        checkpointing.enable(
            self.get_base_model(), self.reslora_config.variant, gradient_checkpointing_kwargs, **kwargs
        )

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None, **kwargs):
        """The newer transformers name of gradient_checkpointing_enable (same behaviour)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    # --- merging -------------------------------------------------------------------------------

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

        inputs, for every merge: one batch or an iterable of batches (a list, a DataLoader); a
        batch is a dict of model arguments, a tensor of input ids, or a tuple / list whose first
        item is the ids (a DataLoader's (ids, labels): the rest is left out); its tensors go to
        the model's device. merge: the config's merge when None; "fit" (is, ms) fits, per block,
        the least-squares prediction of the shortcut's term from the block's own input on the
        inputs, run in eval mode until max_tokens tokens (all when None; an attention_mask in a
        batch leaves the padding out); ridge: relative to tr(E[x x^T]) / d_in, centred on the
        input merge. chains_at_once: fit that many chains per run over the calibration batches
        (which must then be a re-iterable collection), so that only their sums are held at once:
        less memory, more forwards; the result is the same. sequential (fit): then refit the
        blocks one chain position at a time, in order, on the inputs the merged model gives them
        (each position's blocks see every earlier position refitted), one more run over the
        calibration batches per position; the merged model then corrects its own drift.

        merge_errors then holds, per block, the relative error ||y_merged - y|| / ||y|| of its
        output, and merge_delta_errors the error on the adapter's own term,
        ||y_merged - y|| / ||y - base(x)||, on eval_inputs (one batch), else on the first batch of
        `inputs`, run once in eval mode. Without either the errors are None: no pass is kept
        after its forward. Exact merges (lora, bs) give 0."""
        self._check_not_unloaded("merge_to_lora()")
        if self._merged:
            raise RuntimeError(_C.merged_twice_error("the model"))
        errors = merging.merge_model(self, inputs, merge, eval_inputs, ridge, max_tokens, chains_at_once, sequential)
        self.merge_errors, self.merge_delta_errors = errors
        self._merged = True
        return self

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Folds every block (merged first if needed) into its base weight and returns the
        wrapped model with the original layers back in place."""
        self._check_not_unloaded("merge_and_unload()")
        if not self._merged:
            merging.warn_uncalibrated_fold(self.reslora_config)
            self.merge_to_lora()
        merging.warn_quantized_fold(self._blocks.values())
        for blk in self._blocks.values():
            blk.fold(blk.scaling * (blk.lora_B @ blk.lora_A))
        return self.unload()

    # --- saving and loading (reslora.checkpoints) ----------------------------------------------

    def adapter_state_names(self) -> List[str]:
        """The entries of the state dict (relative to the wrapped model) that the adapter owns:
        A, B and the merge statistics of each block, the modules to save, the trained biases.
        state_dict() holds these (and the adapter's description), nothing of the frozen base."""
        return checkpoints.adapter_state_names(self)

    def get_extra_state(self) -> torch.Tensor:
        return checkpoints.encode(checkpoints.describe(self))

    def set_extra_state(self, state) -> None:
        """Checks that a state dict being loaded describes this adapter (its values load next)."""
        checkpoints.check_description(self, state)

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
        self._check_not_unloaded("save_pretrained()")
        checkpoints.save(self, save_directory, format, **kwargs)

    def push_to_hub(
        self, repo_id: str, commit_message=None, private=None, token=None, revision=None, create_pr=False, **kwargs
    ):
        """Uploads what save_pretrained writes (a PEFT LoRA adapter after merge_to_lora(), else a
        ResLoRA checkpoint) with a model card, to the Hub repository repo_id (made if missing):
        the adapter, never the wrapped model's weights. Returns huggingface_hub's CommitInfo."""
        self._check_not_unloaded("push_to_hub()")
        if kwargs:
            raise TypeError(f"reslora: push_to_hub got unexpected keyword arguments {sorted(kwargs)}")
        return checkpoints.push_to_hub(self, repo_id, commit_message, private, token, revision, create_pr)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, save_directory: str, config: Optional[ResLoRAConfig] = None
    ) -> ResLoRAModel:
        """Wraps `model` as the checkpoint in save_directory says and loads its adapters and
        statistics, ready to resume training or to merge. save_directory: a save_pretrained()
        directory or an HF Trainer checkpoint folder (checkpoint-N, or save_model()'s). A PEFT
        LoRA adapter directory is continued as ResLoRA with `config` (its variant; the adapter's
        values are taken over, as get_reslora_model does for a PeftModel)."""
        if peft_adapters.is_peft_adapter_dir(save_directory) and not checkpoints.has_checkpoint(save_directory):
            return peft_adapters.from_peft_adapter_dir(model, save_directory, config)
        description, tensors = checkpoints.read(save_directory)
        out = cls(model, ResLoRAConfig.from_dict(description["config"]))
        checkpoints.load_into(out, description, tensors)
        return out

    def load_checkpoint(self, save_directory: str) -> None:
        """Loads a ResLoRA checkpoint (save_pretrained's or an HF Trainer's) into this model; the
        variant, links and shapes must match."""
        if self._merged:
            raise RuntimeError("reslora: cannot load a ResLoRA checkpoint into a merged model")
        checkpoints.load_into(self, *checkpoints.read(save_directory))


def get_reslora_model(model: nn.Module, config: ResLoRAConfig) -> ResLoRAModel:
    """Wraps the target linear layers of `model` with ResLoRA blocks (base weights frozen) and
    links them into chains: one per projection, ordered by the layer index in the module path.
    A peft.PeftModel with a LoRA adapter is continued: the adapter's A, B, scaling, targets,
    biases and modules to save are taken over, and the config gives the variant (with "lora" the
    outputs equal the adapter's)."""
    if peft_adapters.is_peft_model(model):
        return peft_adapters.from_peft_model(model, config)
    return ResLoRAModel(model, config)
