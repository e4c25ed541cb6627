"""The parts of PEFT's model API that fine-tunes use: get_base_model(), disable_adapter(),
unload(), the task type of the exported adapter, and attribute errors that name the ResLoRA
model rather than the wrapped one (or transformers' own PEFT glue)."""

import copy
import json

import pytest
import torch
from torch import nn

import reslora

from hf_models import TARGETS, batch, make

peft = pytest.importorskip("peft")

VARIANTS = [("lora", 1), ("is", 1), ("bs", -1), ("ms", -1)]


def wrapped(name="llama", variant="is", pre_num=1):
    base = make(name)
    ref = copy.deepcopy(base)
    model = reslora.get_reslora_model(
        base, reslora.ResLoRAConfig(variant=variant, pre_num=pre_num, r=4, lora_alpha=8, target_modules=TARGETS[name])
    )
    torch.manual_seed(1)
    for blk in model.blocks.values():
        nn.init.normal_(blk.lora_B, std=0.2)
    return model, ref


def logits(model, name="llama"):
    with torch.no_grad():
        return model(input_ids=batch(name, seed=3)["input_ids"]).logits


@pytest.mark.parametrize("variant,pre_num", VARIANTS)
def test_disable_adapter_gives_the_base_model(variant, pre_num):
    model, ref = wrapped(variant=variant, pre_num=pre_num)
    model.eval()
    with_adapter, base = logits(model), logits(ref)
    assert not torch.allclose(with_adapter, base)
    model.train()
    counts = [blk.stats_count.clone() for blk in model.blocks.values()]
    with model.disable_adapter():
        model.eval()
        torch.testing.assert_close(logits(model), base)
        model.train()
        model(**batch("llama"))  # a training forward records nothing while disabled
    assert all(torch.equal(c, blk.stats_count) for c, blk in zip(counts, model.blocks.values()))
    model.eval()
    torch.testing.assert_close(logits(model), with_adapter)  # back on after the block


def test_get_base_model_and_unload():
    model, ref = wrapped()
    assert model.get_base_model() is model.base_model
    base = model.unload()
    assert not any(isinstance(m, reslora.ResLoRALinear) for m in base.modules())
    base.eval()
    torch.testing.assert_close(logits(base), logits(ref))


def test_attribute_errors_name_the_reslora_model():
    model, _ = wrapped()
    with pytest.raises(
        AttributeError, match=r"'ResLoRAModel' object has no attribute 'nope' \(nor has the wrapped LlamaForCausalLM\)"
    ):
        model.nope
    for name in ("disable_adapters", "add_adapter", "set_adapter"):
        with pytest.raises(AttributeError, match=f"ResLoRAModel has no '{name}': it holds one ResLoRA adapter"):
            getattr(model, name)
    assert model.config is model.base_model.config  # what the wrapped model has still comes through


@pytest.mark.parametrize("name,task", [("llama", "CAUSAL_LM"), ("gpt2", "CAUSAL_LM"), ("bert", None)])
def test_exported_adapter_names_its_task_type(tmp_path, name, task):
    model, ref = wrapped(name, variant="lora")
    model.merge_to_lora()
    model.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["task_type"] == task
    if name == "llama":
        loaded = peft.PeftModel.from_pretrained(ref, str(tmp_path))
        assert type(loaded).__name__ == "PeftModelForCausalLM"
        loaded.eval()
        model.eval()
        torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
