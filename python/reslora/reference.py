"""The frozen reference of a wrapped model without a second copy of it: the wrapped model run with
its adapter disabled, as PEFT models give their reference to preference trainers (TRL's DPO)."""

from __future__ import annotations

import warnings

from torch import nn


class _Disabled(nn.Module):
    """Calls a module of the policy with the policy's adapter disabled. The policy is held outside
    the module tree, so nothing done to this module's modules (moving, turning dropout off)
    reaches the policy's."""

    def __init__(self, policy, target_of):
        super().__init__()
        object.__setattr__(self, "_policy", policy)
        object.__setattr__(self, "_target_of", target_of)

    def forward(self, *args, **kwargs):
        with self._policy.disable_adapter():
            return self._target_of(self._policy)(*args, **kwargs)


class ReferenceModel(_Disabled):
    """What reference_model returns: a module with the wrapped model's config, backbone
    (base_model), output embeddings and generation, each run with the adapter disabled. It
    holds no parameters: the policy's frozen weights serve both."""

    def __init__(self, policy):
        super().__init__(policy, lambda p: p)
        object.__setattr__(self, "base_model", _Disabled(policy, lambda p: p.base_model))

    @property
    def config(self):
        return self._policy.config

    @property
    def device(self):
        return self._policy.device

    @property
    def dtype(self):
        return self._policy.dtype

    def get_output_embeddings(self):
        return self._policy.get_output_embeddings()

    def get_input_embeddings(self):
        return self._policy.get_input_embeddings()

    def generate(self, *args, **kwargs):
        with self._policy.disable_adapter():
            return self._policy.generate(*args, **kwargs)


def reference_model(model) -> ReferenceModel:
    """The frozen model a preference trainer compares against, without a second copy: model (a
    ResLoRAModel) run with its adapter disabled, i.e. the base model (what a fresh adapter
    starts from). Pass it as TRL's ref_model (DPOTrainer(model, ref_model=reslora.reference_model(model), ...)):
    the reference log-probabilities are then the frozen base's, computed per step as TRL does
    for a PEFT model, with no second model in memory. Warns when the adapter is already trained
    (the reference would then not be the model as it is)."""
    from .model import ResLoRAModel

    if not isinstance(model, ResLoRAModel):
        raise TypeError(
            f"reslora: reference_model needs the wrapped model (a ResLoRAModel from get_reslora_model), "
            f"got {type(model).__name__}"
        )
    if any(bool(blk.lora_B.detach().any()) for blk in model.blocks.values()):
        warnings.warn(
            "reslora: reference_model: the adapter is already trained, so this reference is the base "
            "model without it, not the model as it is now; for that reference (DPO after SFT), pass "
            "ref_model=None with precompute_ref_log_probs=True (TRL then scores the data with the "
            "model before training starts), or a copy of the model",
            stacklevel=2,
        )
    return ReferenceModel(model)
