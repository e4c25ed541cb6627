"""ResLoRA checkpoints: the adapter's state (A and B, the merge statistics, the modules to save,
the trained biases) and a description of the adapter (config, chains) that travels in the state
dict itself as its `_extra_state`, so that any file holding the state dict is a complete
checkpoint: reslora's own save and the HF Trainer's model.safetensors alike."""

from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import torch

from . import saving

CHECKPOINT_FILE = "reslora_model.safetensors"
CHECKPOINT_CONFIG = "reslora_config.json"
TRAINER_FILE = "model.safetensors"  # what the HF Trainer writes for a model it does not know
EXTRA_STATE = "_extra_state"
FORMAT = "2"

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


def write(d: str, state: Dict[str, torch.Tensor], config_dict: dict) -> None:
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    saving.write_checkpoint(
        d,
        {
            CHECKPOINT_FILE: saving.safetensors_writer(tensors, {"format": "pt", "reslora_format": FORMAT}),
            CHECKPOINT_CONFIG: saving.json_writer(config_dict),
        },
    )
