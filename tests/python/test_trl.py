"""TRL with a wrapped model, as users fine-tune LLMs: SFT on plain text and on chat data (packing
off and on), DPO against the frozen base without a second copy, GRPO; checkpoints adapter-sized,
resumed, loaded with from_pretrained."""

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import reslora  # noqa: E402

from hf_models import char_tokenizer, chat_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _wrap(variant, seed=0, dropout=0.1):
    cfg = reslora.ResLoRAConfig(r=4, lora_alpha=8, variant=variant, target_modules=TARGETS, lora_dropout=dropout)
    return reslora.get_reslora_model(chat_llama(seed), cfg)


def _sums(n=8):
    return [(a, b) for a in range(n) for b in range(n)]


def _text_data():
    return datasets.Dataset.from_dict({"text": [f"{a} plus {b} is {a + b}." for a, b in _sums()]})


def _chat_data():
    return datasets.Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": f"{a} + {b}?"}, {"role": "assistant", "content": f"{a + b}"}]
                for a, b in _sums()
            ]
        }
    )


def _adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _eval_logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _assert_adapter_sized(ckpt):
    # the checkpoint holds the adapter (and its statistics), none of the frozen base's weights
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("lora_B" in k for k in keys)
    assert not any("base_layer" in k or "embed_tokens" in k or "lm_head" in k or "norm.weight" in k for k in keys)


def _args(config_class, out, **kw):
    """A TRL config for these tests: CPU, fp32 (so that reloaded adapters give the trained
    model's logits exactly), a log line per step, no reporting."""
    common = dict(learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, bf16=False)
    return config_class(output_dir=str(out), **{**common, **kw})


def _sft_args(out, **kw):
    kw = {"max_steps": 4, "save_steps": 2, "packing": False, **kw}
    return _args(trl.SFTConfig, out, per_device_train_batch_size=8, max_length=64, seed=0, **kw)


@pytest.mark.parametrize("variant", ["is", "ms"])
def test_sft_trains_checkpoints_resumes_and_loads(tmp_path, variant):
    tok = char_tokenizer()
    model = _wrap(variant)
    before = _adapter(model)
    trainer = trl.SFTTrainer(model=model, args=_sft_args(tmp_path), train_dataset=_text_data(), processing_class=tok)
    trainer.train()
    # TRL turns gradient checkpointing on by default: the shortcuts trained through it
    assert model.get_base_model().is_gradient_checkpointing
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    after = _adapter(model)
    assert all(not torch.equal(before[n], after[n]) for n in after if "lora_B" in n)

    ckpt = tmp_path / "checkpoint-4"
    _assert_adapter_sized(ckpt)
    ids = torch.tensor([tok("3 plus 4 is 7.")["input_ids"]])
    loaded = reslora.ResLoRAModel.from_pretrained(chat_llama(), ckpt)
    torch.testing.assert_close(_eval_logits(loaded, ids), _eval_logits(model, ids), rtol=0, atol=0)

    # resuming from the step-2 checkpoint reaches the same adapter
    again = _wrap(variant)
    resumed = trl.SFTTrainer(
        model=again, args=_sft_args(tmp_path / "again"), train_dataset=_text_data(), processing_class=tok
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for n, p in _adapter(again).items():
        torch.testing.assert_close(p, after[n], rtol=1e-5, atol=1e-6)


def test_sft_loss_is_the_adapted_models():
    # TRL runs the backbone (model.base_model) and the LM head itself: the chains run inside it
    tok = char_tokenizer()
    model = _wrap("is", dropout=0.0)
    for blk in model.blocks.values():
        torch.nn.init.normal_(blk.lora_B, std=0.5)
    trl.trainer.utils.add_fused_lm_head(model)
    ids = torch.tensor([tok("5 plus 2 is 7.")["input_ids"]])
    model.eval()
    with torch.no_grad():
        fused = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
        logits = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    want = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(fused.double(), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, base, atol=1e-3)  # the adapter is in what TRL trains on


def test_sft_chat_data_with_packing(tmp_path):
    tok = char_tokenizer()
    model = _wrap("bs")
    before = _adapter(model)
    args = _sft_args(tmp_path, packing=True, max_steps=2, save_steps=2)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=_chat_data(), processing_class=tok)
    assert len(trainer.train_dataset) < len(_chat_data())  # conversations packed into longer rows
    trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in _adapter(model).items() if "lora_B" in n)
    _assert_adapter_sized(tmp_path / "checkpoint-2")


def _dpo_data():
    return datasets.Dataset.from_dict(
        {
            "prompt": [f"{a} plus {b} is" for a, b in _sums(4)],
            "chosen": [f" {a + b}." for a, b in _sums(4)],
            "rejected": [f" {a + b + 1}." for a, b in _sums(4)],
        }
    )


def test_reference_model_is_the_frozen_base_with_no_copy():
    base = chat_llama()
    frozen = copy.deepcopy(base)
    model = reslora.get_reslora_model(
        base, reslora.ResLoRAConfig(r=4, variant="ms", target_modules=TARGETS, lora_dropout=0.1)
    )
    for blk in model.blocks.values():
        torch.nn.init.normal_(blk.lora_B, std=0.5)
    with pytest.warns(UserWarning, match="already trained.*precompute_ref_log_probs"):
        ref = reslora.reference_model(model)
    assert list(ref.parameters()) == [] and ref.config is model.config
    ids = torch.tensor([[1, 5, 9, 14, 20, 7]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, frozen(input_ids=ids).logits, rtol=0, atol=0)
        assert not torch.allclose(model(input_ids=ids).logits, frozen(input_ids=ids).logits, atol=1e-3)
    assert not any(blk.disabled for blk in model.blocks.values())  # the policy is left as it was


@pytest.mark.parametrize("reference", ["reference_model", "precomputed"])
def test_dpo_trains_against_the_frozen_base(tmp_path, reference):
    tok = char_tokenizer()
    model = _wrap("ms")
    before = _adapter(model)
    args = _args(
        trl.DPOConfig,
        tmp_path,
        max_steps=3,
        save_steps=3,
        per_device_train_batch_size=4,
        precompute_ref_log_probs=reference == "precomputed",
    )
    ref = reslora.reference_model(model) if reference == "reference_model" else None
    trainer = trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=_dpo_data(), processing_class=tok)
    # TRL turns dropout off in the policy (its nn.Dropout modules): the adapter's too, as with PEFT
    assert all(blk.lora_dropout == 0.0 for blk in model.blocks.values())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # the first step's policy is the base (B = 0): its rewards against the reference are zero
    assert abs(logs[0]["rewards/chosen"]) < 1e-4 and abs(logs[0]["loss"] - 0.6931) < 1e-3
    assert all(not torch.equal(before[n], p) for n, p in _adapter(model).items() if "lora_B" in n)
    ckpt = tmp_path / "checkpoint-3"
    _assert_adapter_sized(ckpt)
    loaded = reslora.ResLoRAModel.from_pretrained(chat_llama(), ckpt)
    ids = torch.tensor([tok("1 plus 2 is 3.")["input_ids"]])
    torch.testing.assert_close(_eval_logits(loaded, ids), _eval_logits(model, ids), rtol=0, atol=0)


def test_grpo_trains_a_wrapped_model(tmp_path):
    # GRPO generates with the wrapped model (generate() through the adapter) and trains on the
    # rewards; with beta = 0 (TRL's default) there is no reference model
    tok = char_tokenizer()
    model = _wrap("ms")
    before = _adapter(model)
    prompts = datasets.Dataset.from_dict({"prompt": [f"{a} plus {b} is" for a, b in _sums(4)]})

    def longer_is_better(completions, **kwargs):
        return [len(c) / 10.0 for c in completions]

    args = _args(
        trl.GRPOConfig,
        tmp_path,
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
    )
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=longer_is_better, args=args, train_dataset=prompts, processing_class=tok
    )
    trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in _adapter(model).items() if "lora_B" in n)
    _assert_adapter_sized(tmp_path / "checkpoint-2")
