"""The inputs and helpers of the bad-input battery (test_bad_input_battery.py)."""

import os
import tempfile

import torch
from torch import nn

import reslora
from reslora import _C

from hf_models import make

ops = torch.ops.reslora
C = reslora.ResLoRAConfig
TMP = tempfile.mkdtemp(prefix="reslora-bad-input-")


def lin(**kw):
    return reslora.ResLoRALinear(nn.Linear(4, 3), r=2, **kw)


def seq(n=2, **kw):
    kw.setdefault("r", 2)
    return reslora.get_reslora_model(
        nn.Sequential(*[nn.Linear(4, 4) for _ in range(n)]), C(target_modules=[str(i) for i in range(n)], **kw)
    )


def peft_model(kind):
    import peft

    if kind == "ia3":
        return peft.get_peft_model(make("llama"), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    model = peft.get_peft_model(make("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    if kind == "two":
        model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    return model


def peft_dir():
    """A saved PEFT LoRA adapter directory."""
    d = os.path.join(TMP, "peft-adapter")
    peft_model("lora").save_pretrained(d)
    return d


def unloaded():
    model = seq(variant="is")
    model.unload()
    assert model.chains == {}  # the chains went with the blocks
    return model


def llama(**kw):
    return reslora.get_reslora_model(make("llama"), C(r=2, **kw))


def saved(sub, **kw):
    d = os.path.join(TMP, sub)
    seq(**kw).save_pretrained(d)
    return d


x, W = torch.randn(3, 4), torch.randn(5, 4)
A, B = torch.randn(2, 4), torch.randn(5, 2)
z = torch.randn(3, 2)
XM = [torch.tensor(1.0), torch.tensor(1.0)]


def merge2(merge, weights=(None, None), As=(A, A), Bs=(B, B), means=(None, None), variant="is", **kw):
    """The C++ core's merge of a two-block chain (pre_num 1, scaling 1)."""
    return _C.merge_chain(list(weights), list(As), list(Bs), list(means), list(means), variant, merge, 1, 1.0, **kw)


FIT = dict(xx=[torch.eye(4), torch.eye(4)], zx=[None, torch.zeros(2, 4)], tokens=[10, 10])
