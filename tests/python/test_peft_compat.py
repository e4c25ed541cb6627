"""The parts of PEFT's model API that fine-tunes use: get_base_model(), disable_adapter(),
unload(), the task type of the exported adapter, and attribute errors that name the ResLoRA
model rather than the wrapped one (or transformers' own PEFT glue)."""

import copy
import json
import os

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
    assert model.get_base_model() is model._modules["model"] is model.model
    assert model.base_model is model.get_base_model().model  # the backbone, as transformers names it
    base = model.unload()
    assert not any(isinstance(m, reslora.ResLoRALinear) for m in base.modules())
    base.eval()
    torch.testing.assert_close(logits(base), logits(ref))


@pytest.mark.parametrize("variant", ["lora", "ms"])
def test_turning_every_nn_dropout_off_turns_the_adapters_off(variant):
    # what TRL's disable_dropout_in_model does (p = 0 on every nn.Dropout), as it does to PEFT's
    model = reslora.get_reslora_model(
        make("llama"), reslora.ResLoRAConfig(r=4, variant=variant, target_modules=TARGETS["llama"], lora_dropout=0.5)
    )
    for blk in model.blocks.values():
        nn.init.normal_(blk.lora_B, std=0.5)
    model.train()
    ids = batch("llama")["input_ids"]
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # masks drawn
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        assert all(blk.lora_dropout == 0.0 for blk in model.blocks.values())
        first = model(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, first, rtol=0, atol=0)
        model.eval()
        torch.testing.assert_close(model(input_ids=ids).logits, first, rtol=1e-6, atol=1e-6)


def test_attribute_errors_name_the_reslora_model():
    model, _ = wrapped()
    with pytest.raises(
        AttributeError, match=r"'ResLoRAModel' object has no attribute 'nope' \(nor has the wrapped LlamaForCausalLM\)"
    ):
        model.nope
    for name in ("disable_adapters", "add_adapter", "set_adapter"):
        with pytest.raises(AttributeError, match=f"ResLoRAModel has no '{name}': it holds one ResLoRA adapter"):
            getattr(model, name)
    assert model.config is model.get_base_model().config  # what the wrapped model has still comes through


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


def trained_peft(name="llama", modules_to_save=None, task_type=None):
    """A PEFT LoRA model with a nonzero adapter (B random), as after some training."""
    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[name], modules_to_save=modules_to_save, task_type=task_type
    )
    model = peft.get_peft_model(make(name), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
            if "modules_to_save" in n:
                p.add_(0.1)  # the trained head differs from the original one
    return model.eval()


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_a_peft_lora_adapter_continues_as_reslora_lora_with_equal_outputs(name):
    head = ["classifier"] if name == "bert" else None
    theirs = trained_peft(name, modules_to_save=head, task_type="SEQ_CLS" if name == "bert" else None)
    ids = batch(name, seed=3)["input_ids"]
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        original_head = theirs.get_base_model().classifier.original_module.weight.clone() if head else None
    ours = reslora.get_reslora_model(theirs, reslora.ResLoRAConfig(variant="lora"))
    assert isinstance(ours, reslora.ResLoRAModel)
    assert ours.reslora_config.r == 4 and ours.reslora_config.lora_alpha == 8
    assert sorted(ours.blocks) == sorted(ours.reslora_config.target_modules)
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    assert not any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in ours.modules())  # no PEFT layer
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-6, atol=1e-6)
    if head:  # the trained head trains on, the original stays for disable_adapter()
        assert sorted(ours.saved_modules) == ["classifier"]
        assert torch.equal(ours.saved_modules["classifier"].original_module.weight, original_head)
    # and it trains as ResLoRA: A and B get gradients
    ours.train()
    out = ours(**batch(name, seed=4))
    out.loss.backward()
    assert all(b.lora_A.grad is not None and b.lora_B.grad is not None for b in ours.blocks.values())


@pytest.mark.parametrize("variant,pre_num", [("is", 1), ("bs", -1), ("ms", -1)])
def test_a_peft_adapter_starts_a_shortcut_variant_from_its_weights_and_says_what_changes(variant, pre_num, tmp_path):
    theirs = trained_peft()
    pairs = {
        n.split("base_model.model.", 1)[1].rsplit(".lora_A", 1)[0]: p.detach().clone()
        for n, p in theirs.named_parameters()
        if "lora_A" in n
    }
    theirs.save_pretrained(str(tmp_path))
    cfg = reslora.ResLoRAConfig(variant=variant, pre_num=pre_num)
    with pytest.warns(UserWarning, match=rf"the PEFT adapter's A and B start a '{variant}' model"):
        ours = reslora.get_reslora_model(theirs, cfg)
    for path, a in pairs.items():
        assert torch.equal(ours.blocks[path].lora_A, a)
    # the same from the adapter's directory, with the config to continue it with
    with pytest.warns(UserWarning, match="start a"):
        again = reslora.ResLoRAModel.from_pretrained(make("llama"), str(tmp_path), config=cfg)
    for path, blk in ours.blocks.items():
        assert torch.equal(again.blocks[path].lora_A, blk.lora_A)
        assert torch.equal(again.blocks[path].lora_B, blk.lora_B)
    with pytest.raises(ValueError, match=r"holds a PEFT adapter, not a ResLoRA checkpoint: give the ResLoRAConfig"):
        reslora.ResLoRAModel.from_pretrained(make("llama"), str(tmp_path))


def test_push_to_hub_uploads_the_adapter_with_a_model_card(monkeypatch, tmp_path):
    # The Hub is mocked where the upload would go: what a user's push would send, file by file.
    import shutil

    import huggingface_hub

    sent = []

    def create_repo(self, repo_id, **kw):
        sent.append(("create", repo_id, kw.get("private"), kw.get("exist_ok")))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        dest = tmp_path / f"upload{len(sent)}"
        shutil.copytree(folder_path, dest)
        sent.append(("upload", repo_id, dest, kw.get("commit_message")))
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model, ref = wrapped()
    assert model.push_to_hub("me/ckpt", private=True) == "commit-info"  # before merging: the checkpoint
    _, repo, folder, message = sent[-1]
    assert sent[0] == ("create", "me/ckpt", True, True) and repo == "me/ckpt"
    assert sorted(os.listdir(folder)) == ["README.md", "reslora_config.json", "reslora_model.safetensors"]
    assert "library_name: reslora" in (folder / "README.md").read_text() and message == "Upload ResLoRA checkpoint"
    model.merge_to_lora()
    model.push_to_hub("me/adapter")
    _, _, folder, message = sent[-1]
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "- reslora-is" in card
    assert os.path.getsize(folder / "adapter_model.safetensors") < 50_000  # the adapter, not the model
    loaded = peft.PeftModel.from_pretrained(ref, str(folder)).eval()  # what was sent loads in PEFT
    model.eval()
    ids = batch("llama", seed=5)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
