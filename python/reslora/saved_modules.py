"""modules_to_save: a module trained in full next to the adapter (a classifier head), kept as a
trained copy beside the frozen original, as PEFT does, so that disable_adapter() still gives the
base model's outputs."""

from __future__ import annotations

import copy

from torch import nn


class ModulesToSave(nn.Module):
    """original_module: the module as it was, frozen. modules_to_save: its trained copy, which
    the forward runs (the original while the adapter is disabled). Attributes other than these
    come from the module the forward runs (weight, out_features, ...)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = copy.deepcopy(module)
        for p in self.original_module.parameters():
            p.requires_grad_(False)
        for p in self.modules_to_save.parameters():
            p.requires_grad_(True)
        self.disabled = False

    @property
    def active(self) -> nn.Module:
        return self.original_module if self.disabled else self.modules_to_save

    def forward(self, *args, **kwargs):
        return self.active(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "_modules", "_parameters", "_buffers"):
                raise
        return getattr(self.active, name)
