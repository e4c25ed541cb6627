"""The HF Trainer and checkpoints on real transformers models: the Trainer unchanged, with
checkpointing and mixed precision, resuming, tied weights, and whole saves."""

import copy
import os

import pytest
import torch

import reslora

from hf_models import batch
from hf_training import logits, train, trainer_args, wrap

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_resume_from_checkpoint(tmp_path):
    model, ref = wrap("llama", "ms", 1)
    train(model, "llama", steps=3)
    model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["reslora_config.json", "reslora_model.safetensors"]
    resumed = reslora.ResLoRAModel.from_pretrained(copy.deepcopy(ref), str(tmp_path))
    assert resumed.reslora_config == model.reslora_config
    torch.testing.assert_close(logits(resumed, "llama"), logits(model, "llama"))
    for n, blk in model.blocks.items():
        assert torch.equal(resumed.blocks[n].x_norms, blk.x_norms)
        assert torch.equal(resumed.blocks[n].stats_count, blk.stats_count)
    model.merge_to_lora()
    resumed.merge_to_lora()
    torch.testing.assert_close(logits(resumed, "llama"), logits(model, "llama"))


def test_checkpoint_into_wrong_model_is_a_clear_error(tmp_path):
    model, ref = wrap("llama", "is")
    model.save_pretrained(str(tmp_path))
    other, _ = wrap("llama", "bs")
    with pytest.raises(ValueError, match=r"the checkpoint has variant = 'is', this model 'bs'"):
        other.load_checkpoint(str(tmp_path))
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with pytest.raises(ValueError, match=r"must have shape \[4, 48\], got \[4, 32\]"):
        reslora.ResLoRAModel.from_pretrained(transformers.LlamaForCausalLM(cfg), str(tmp_path))


def test_a_crash_mid_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model, _ = wrap("llama", "is")
    model.save_pretrained(str(tmp_path))
    before = (tmp_path / "reslora_model.safetensors").read_bytes()
    train(model, "llama", steps=1)
    import safetensors.torch as st

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(str(tmp_path))
    assert (tmp_path / "reslora_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["reslora_config.json", "reslora_model.safetensors"]


def test_hf_trainer_unchanged(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, _ = wrap("llama", "ms")
    data = [batch("llama", seed=i, n=1) for i in range(8)]
    data = [{k: v[0] for k, v in d.items()} for d in data]
    args = trainer_args(
        tmp_path,
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=1e-2,
        logging_steps=1,
        gradient_checkpointing=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 4
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed


def test_hf_trainer_reentrant_checkpointing_reaches_our_check(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, _ = wrap("llama", "is")
    args = trainer_args(
        tmp_path,
        per_device_train_batch_size=2,
        max_steps=1,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    data = [{k: v[0] for k, v in batch("llama", seed=i, n=1).items()} for i in range(2)]
    with pytest.raises(ValueError, match="reentrant checkpointing cannot differentiate"):
        transformers.Trainer(model=model, args=args, train_dataset=data).train()


def test_hf_trainer_checkpoints_and_resumes_tied_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    data = [{k: v[0] for k, v in batch("gpt2", seed=i, n=1).items()} for i in range(8)]

    def run(resume):
        model, _ = wrap("gpt2", "is")  # GPT-2 ties its input and output embeddings
        args = trainer_args(
            tmp_path,
            per_device_train_batch_size=2,
            max_steps=4,
            learning_rate=1e-2,
            save_strategy="steps",
            save_steps=2,
            seed=0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2") if resume else None)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    full = run(False)
    assert (tmp_path / "checkpoint-2" / "model.safetensors").exists()
    resumed = run(True)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k])


def test_state_dict_holds_the_adapter_and_loads_strictly():
    # No frozen base weight (tied or not) is in the state dict; loading it strictly into a fresh
    # wrapper of the same base restores the adapter, and the ties of the base stay.
    model, _ = wrap("gpt2", "is")
    for blk in model.blocks.values():
        torch.nn.init.normal_(blk.lora_B)
    sd = model.state_dict()
    assert set(sd) == {"_extra_state"} | {"model." + n for n in model.adapter_state_names()}
    assert not any(k.endswith(("wte.weight", "lm_head.weight", "base_layer.weight")) for k in sd)
    other, _ = wrap("gpt2", "is")
    result = other.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for n, blk in other.blocks.items():
        assert torch.equal(blk.lora_B, model.blocks[n].lora_B)
    assert other.get_base_model().lm_head.weight is other.get_base_model().transformer.wte.weight
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: .*lora_B"):
        other.load_state_dict({k: v for k, v in sd.items() if not k.endswith("lora_B")}, strict=True)


def test_state_dicts_of_version_0_2_load(tmp_path):
    # reslora 0.2 wrote the keys under "base_model." (Trainer checkpoints, save_pretrained)
    model, _ = wrap("llama", "ms")
    for blk in model.blocks.values():
        torch.nn.init.normal_(blk.lora_B)
    old = {
        ("base_model." + k[len("model.") :] if k.startswith("model.") else k): v for k, v in model.state_dict().items()
    }
    assert any(k.startswith("base_model.") for k in old)
    other, _ = wrap("llama", "ms")
    result = other.load_state_dict(old, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for n, blk in other.blocks.items():
        assert torch.equal(blk.lora_B, model.blocks[n].lora_B)
        assert torch.equal(blk.x_norms, model.blocks[n].x_norms)


def test_hf_trainer_bf16_mixed_precision(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, _ = wrap("llama", "is", lora_dropout=0.1)  # an fp32 model, bf16 autocast by the Trainer
    data = [{k: v[0] for k, v in batch("llama", seed=i, n=1).items()} for i in range(4)]
    args = trainer_args(tmp_path, per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2, bf16=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in model.parameters())
