"""The ResLoRAModel subclass made for each base model class: tools read a model's class (the HF
Trainer finds the label names in its forward's signature, question-answering models by name),
so a wrapped model's class has its base model's forward signature and name."""

from __future__ import annotations

import inspect
from typing import Dict

_MADE: Dict[type, type] = {}


def wrapper_class(root: type, base_cls: type) -> type:
    """The subclass of root (ResLoRAModel) for models of class base_cls, made once per class:
    ResLoRA<BaseName>, whose forward carries base_cls.forward's signature."""
    cls = _MADE.get(base_cls)
    if cls is None:

        def forward(self, *args, **kwargs):
            return root.forward(self, *args, **kwargs)

        try:
            forward.__signature__ = inspect.signature(base_cls.forward)
        except (TypeError, ValueError, AttributeError):
            pass
        forward.__doc__ = root.forward.__doc__
        name = f"ResLoRA{base_cls.__name__}"
        cls = type(name, (root,), {"forward": forward, "__module__": root.__module__, "__qualname__": name})
        _MADE[base_cls] = cls
    return cls


def is_wrapper_class(cls: type) -> bool:
    return cls in _MADE.values()
