"""ResLoRA checkpoints: the adapter's state (A and B, the merge statistics, the modules to save,
the trained biases) and a description of the adapter (config, chains) that travels in the state
dict itself as its `_extra_state`, so that any file holding the state dict is a complete
checkpoint: reslora's own save and the HF Trainer's model.safetensors alike."""

from __future__ import annotations

import json
import os
import warnings
from typing import Dict, Optional, Tuple

import torch

from . import export, saving
from .compat import full, is_distributed
from .merging import combined_stats

CHECKPOINT_FILE = "reslora_model.safetensors"
CHECKPOINT_CONFIG = "reslora_config.json"
TRAINER_FILE = "model.safetensors"  # what the HF Trainer writes for a model it does not know
EXTRA_STATE = "_extra_state"
FORMAT = "2"
WRAPPED = "model"  # the name a ResLoRAModel holds its wrapped model under
PREFIX = WRAPPED + "."  # so its state-dict keys are the wrapped model's under this prefix
LEGACY_PREFIX = "base_model."  # the prefix of reslora 0.2's checkpoints, read too

# The config fields that change what the adapter is; the others (lora_dropout, merge, targets:
# the chains stand for those) may differ when a checkpoint is loaded.
STRUCTURE = (
    "variant",
    "pre_num",
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "stats_window",
    "bias",
)


def encode(description: dict) -> torch.Tensor:
    """The description as a uint8 tensor of its JSON (a state-dict entry that safetensors and
    torch.save both store)."""
    data = json.dumps(description, sort_keys=True).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode(t, where: str) -> dict:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        got = f"a {t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(
            f"reslora: {where}: the {EXTRA_STATE!r} entry must be a uint8 vector (the adapter's description), got {got}"
        )
    try:
        d = json.loads(bytes(t.tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"reslora: {where}: the adapter's description is damaged ({e})") from None
    if not isinstance(d, dict) or d.get("reslora_format") != FORMAT:
        raise ValueError(
            f"reslora: {where} is not a ResLoRA checkpoint of format {FORMAT!r} (found "
            f"{d.get('reslora_format') if isinstance(d, dict) else d!r})"
        )
    return d


def has_checkpoint(d) -> bool:
    """Whether directory d holds a ResLoRA checkpoint file (save_pretrained's or the Trainer's)."""
    return any(os.path.isfile(os.path.join(d, name)) for name in (CHECKPOINT_FILE, TRAINER_FILE))


def locate(d: str) -> str:
    """The state-dict file of a save directory: reslora's own, or the HF Trainer's."""
    for name in (CHECKPOINT_FILE, TRAINER_FILE):
        path = os.path.join(d, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"reslora: no ResLoRA checkpoint in {d!r}: expected {CHECKPOINT_FILE} (save_pretrained) or "
        f"{TRAINER_FILE} (an HF Trainer checkpoint)"
    )


def read(d: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(description, state dict) of a save directory."""
    from safetensors.torch import load_file

    if not isinstance(d, (str, os.PathLike)):
        raise TypeError(f"reslora: save_directory must be a path (str or os.PathLike), got {type(d).__name__}")
    saving.recover(d)  # a save interrupted between its two renames is put back first
    path = locate(d)
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"reslora: cannot read the checkpoint file {path!r}: {e}") from e
    if EXTRA_STATE not in tensors:
        raise ValueError(
            f"reslora: {path!r} is not a ResLoRA checkpoint: it has no {EXTRA_STATE!r} entry "
            "(the adapter's description)"
        )
    return decode(tensors[EXTRA_STATE], path), tensors


# --- a ResLoRAModel's checkpoint -------------------------------------------------------------


def adapter_state_names(model) -> list:
    """The entries of the state dict (relative to the wrapped model) that the adapter owns."""
    out = []
    for name in model.blocks:
        out += [f"{name}.{k}" for k in ("lora_A", "lora_B", "x_norms", "z_norms", "stats_count")]
    for name, wrapper in model.saved_modules.items():
        out += [f"{name}.modules_to_save.{k}" for k in wrapper.modules_to_save.state_dict()]
    return out + list(model.trained_biases)


def describe(model) -> dict:
    """The adapter's description: what a checkpoint must match to load into the model."""
    return {
        "reslora_format": FORMAT,
        "config": model.reslora_config.to_dict(),
        "chains": model.chains,
        "modules_to_save": sorted(model.saved_modules),
        "biases": list(model.trained_biases),
        "merged": model.merged,
        # the merge statistics: of the whole batch, or of this rank's share (a state dict
        # taken on one rank of a data-parallel run, as the HF Trainer's checkpoints are)
        "statistics": "rank" if is_distributed() else "whole batch",
    }


def check_description(model, state) -> None:
    """A state dict's description (its _extra_state) must describe the model's adapter."""
    saved = decode(state, "the state dict")
    mine = describe(model)
    for key in STRUCTURE:
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


def save(model, save_directory, format: Optional[str] = None, **kwargs) -> None:
    """ResLoRAModel.save_pretrained's work (its docstring says what it writes)."""
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(
            f"reslora: save_directory must be a path (str or os.PathLike), got {type(save_directory).__name__}"
        )
    unknown = set(kwargs) - {"state_dict", "safe_serialization", "is_main_process"}
    if unknown:
        raise TypeError(f"reslora: save_pretrained got unexpected keyword arguments {sorted(unknown)}")
    distributed = is_distributed()
    if not kwargs.get("is_main_process", True) and not distributed:
        return
    fmt = format or ("peft" if model.merged else "reslora")
    if fmt not in ("peft", "reslora"):
        raise ValueError(f"reslora: format must be 'peft' or 'reslora', got {format!r}")
    if fmt == "peft" and not model.merged:
        raise RuntimeError(
            "reslora: a PEFT LoRA adapter can only be saved after merge_to_lora(): the "
            "shortcuts have no PEFT equivalent"
        )
    if fmt == "reslora" and model.merged:
        raise RuntimeError(
            "reslora: the model is merged and has no shortcuts left; save it as a PEFT adapter (format='peft')"
        )
    if fmt == "peft":
        tensors, config = export.peft_adapter(model)
        files = {export.ADAPTER_CONFIG: saving.json_writer(config)}
        name, meta = export.ADAPTER_FILE, {"format": "pt"}
    else:
        tensors = model.state_dict()
        files = {CHECKPOINT_CONFIG: saving.json_writer(model.reslora_config.to_dict())}
        name, meta = CHECKPOINT_FILE, {"format": "pt", "reslora_format": FORMAT}
        for path, blk in model.blocks.items():  # the whole batch's statistics (collective)
            x, z = combined_stats(blk)
            tensors[f"{PREFIX}{path}.x_norms"], tensors[f"{PREFIX}{path}.z_norms"] = x, z
        tensors[EXTRA_STATE] = encode({**describe(model), "statistics": "whole batch"})
    # sharded parameters (FSDP2) gathered: collective, like the statistics
    tensors = {k: full(v).detach().contiguous() for k, v in tensors.items()}
    if not distributed or torch.distributed.get_rank() == 0:
        files[name] = saving.safetensors_writer(tensors, meta)
        saving.write_checkpoint(save_directory, files)
    if distributed:
        torch.distributed.barrier()  # the others wait for rank 0's complete save


@torch.no_grad()
def load_into(model, description: dict, tensors: Dict[str, torch.Tensor]) -> None:
    """Loads a checkpoint's state dict into the model, its merge statistics spread over the ranks
    of a process group as the merge combines them."""
    model.load_state_dict(tensors)
    whole = description.get("statistics", "whole batch") == "whole batch"
    if whole and is_distributed():
        # Whole-batch norms spread evenly over the ranks: combined again at the merge
        # (root of the summed squares), they give back the saved values.
        share = torch.distributed.get_world_size() ** -0.5
        for blk in model.blocks.values():
            blk.x_norms.mul_(share)
            blk.z_norms.mul_(share)
    elif not whole and not is_distributed() and model.reslora_config.variant in ("is", "ms"):
        warnings.warn(
            "reslora: the checkpoint holds one rank's merge statistics (a state dict taken on "
            "one rank of a data-parallel run, such as an HF Trainer checkpoint): an is / ms "
            "merge from it here sees that rank's share of each batch, not the whole batch; "
            "save_pretrained() under the process group stores the whole batch's",
            stacklevel=4,
        )


# --- the state-dict hooks of a ResLoRAModel ----------------------------------------------------


def adapter_state_only(module, state_dict, prefix, local_metadata) -> None:
    """The state dict holds what the adapter owns: checkpoints (the HF Trainer's among them) are
    adapter-sized, and the frozen base comes from where it always comes from."""
    keep = {prefix + PREFIX + n for n in adapter_state_names(module)}
    base = prefix + PREFIX
    for k in [k for k in state_dict if k.startswith(base) and k not in keep]:
        del state_dict[k]


def check_loaded_state(module, state_dict, prefix, *args) -> None:
    """Before anything is copied: the state dict must describe this adapter, and its entries must
    have this adapter's shapes (a clear error, not torch's list of size mismatches)."""
    module.__dict__["_load_prefix"] = prefix
    legacy = prefix + LEGACY_PREFIX
    for k in [k for k in state_dict if k.startswith(legacy)]:  # written by reslora 0.2
        state_dict[prefix + PREFIX + k[len(legacy) :]] = state_dict.pop(k)
    if prefix + EXTRA_STATE in state_dict:
        check_description(module, state_dict[prefix + EXTRA_STATE])
    own = module.get_base_model().state_dict(keep_vars=True)
    for n in adapter_state_names(module):
        t = state_dict.get(prefix + PREFIX + n)
        if t is not None and tuple(t.shape) != tuple(own[n].shape):
            raise ValueError(
                f"reslora: checkpoint tensor {n!r} must have shape {list(own[n].shape)}, got {list(t.shape)}"
            )


def ignore_missing_base_keys(module, incompatible_keys) -> None:
    """A state dict without the base's entries is complete: only the adapter's may be missing."""
    prefix = module.__dict__.pop("_load_prefix", "")
    keep = {prefix + PREFIX + n for n in adapter_state_names(module)}
    base = prefix + PREFIX
    incompatible_keys.missing_keys[:] = [
        k for k in incompatible_keys.missing_keys if not k.startswith(base) or k in keep
    ]


# --- the Hub --------------------------------------------------------------------------------


def model_card(model) -> str:
    """README.md for the Hub: the metadata the Hub reads (library, base model, tags) and a line on
    what the files are. A merged model's files are a PEFT LoRA adapter; an unmerged one's a ResLoRA
    checkpoint."""
    config = getattr(model.get_base_model(), "config", None)
    base = getattr(config, "_name_or_path", None) or None
    variant = model.reslora_config.variant
    library = "peft" if model.merged else "reslora"
    lines = ["---", f"library_name: {library}"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["tags:", "- reslora", "- lora", f"- reslora-{variant}", "---", ""]
    if model.merged:
        what = (
            f"A LoRA adapter trained with ResLoRA (variant {variant}) and merged into plain LoRA: "
            "load it with `peft.PeftModel.from_pretrained(base_model, repo_id)`."
        )
    else:
        what = (
            f"A ResLoRA checkpoint (variant {variant}): load it with "
            "`reslora.ResLoRAModel.from_pretrained(base_model, path)` to train on or merge "
            "(`merge_to_lora()`), after which `save_pretrained` writes a PEFT LoRA adapter."
        )
    return "\n".join(lines) + what + "\n"


def push_to_hub(model, repo_id: str, commit_message=None, private=None, token=None, revision=None, create_pr=False):
    """ResLoRAModel.push_to_hub's work: what save_pretrained writes, with a model card."""
    import tempfile

    from huggingface_hub import HfApi

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"reslora: repo_id must be a non-empty string (user/name), got {repo_id!r}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "upload")
        save(model, folder)
        with open(os.path.join(folder, "README.md"), "w") as f:
            f.write(model_card(model))
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        what = "PEFT LoRA adapter" if model.merged else "ResLoRA checkpoint"
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload {what}",
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
