"""Fine-tunes the way PEFT users run them with the HF Trainer: a sequence classifier whose head
trains in full (modules_to_save), adapter-sized Trainer checkpoints that resume exactly, and
from_pretrained on a Trainer checkpoint folder."""

import copy
import json
import os
import warnings

import pytest
import torch

import reslora

import hf_training
from hf_models import batch, make

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def classification_data(n=48, t=8, seed=0):
    # label = first token id mod 3: learnable from the first position alone
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, t), generator=g)
    return [{"input_ids": ids[i], "labels": ids[i, 0] % 3} for i in range(n)]


def accuracy(model, data):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.stack([d["input_ids"] for d in data])).logits
    return (out.argmax(-1) == torch.stack([d["labels"] for d in data])).float().mean().item(), out


def trainer_args(out, **kw):
    return hf_training.trainer_args(out, **{"per_device_train_batch_size": 8, "learning_rate": 2e-2, "seed": 0, **kw})


@pytest.mark.slow
def test_bert_classifier_trains_its_head_and_reloads_in_reslora_and_peft(tmp_path):
    data = classification_data()
    torch.manual_seed(0)
    fresh = make("bert")
    model = reslora.get_reslora_model(
        copy.deepcopy(fresh),
        reslora.ResLoRAConfig(
            variant="ms",
            pre_num=-1,
            r=8,
            lora_alpha=16,
            lora_dropout=0.05,
            task_type="SEQ_CLS",
            target_modules=["query", "value"],
        ),
    )
    base_acc, _ = accuracy(fresh, data)
    transformers.Trainer(
        model=model, args=trainer_args(tmp_path / "run", num_train_epochs=30), train_dataset=data
    ).train()
    acc, out = accuracy(model, data)
    assert acc >= 0.9 > base_acc + 0.3

    # reslora's own checkpoint: the same logits in a fresh wrapper of a fresh base
    model.save_pretrained(str(tmp_path / "reslora"))
    back = reslora.ResLoRAModel.from_pretrained(copy.deepcopy(fresh), str(tmp_path / "reslora"))
    back_acc, back_out = accuracy(back, data)
    torch.testing.assert_close(back_out, out)

    # merged and exported: PEFT builds a sequence classifier with the trained head
    model.merge_to_lora(inputs={"input_ids": torch.stack([d["input_ids"] for d in data])})
    merged_acc, merged_out = accuracy(model, data)
    with pytest.warns(UserWarning, match=r"modules_to_save.*some serving engines"):
        model.save_pretrained(str(tmp_path / "peft"))
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(fresh), str(tmp_path / "peft"))
    assert type(loaded).__name__ == "PeftModelForSequenceClassification"
    peft_acc, peft_out = accuracy(loaded, data)
    torch.testing.assert_close(peft_out, merged_out, rtol=1e-5, atol=1e-5)
    assert peft_acc == merged_acc >= 0.9 and back_acc == acc


def adapter_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_trainer_checkpoints_are_adapter_sized_and_resume_exactly(tmp_path):
    data = [{k: v[0] for k, v in batch("llama", seed=i, n=1).items()} for i in range(16)]
    targets = ["q_proj", "v_proj", "up_proj"]

    def run(resume=None, steps=4):
        model = reslora.get_reslora_model(
            make("llama"),
            reslora.ResLoRAConfig(
                variant="ms", pre_num=-1, r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets
            ),
        )
        args = trainer_args(
            tmp_path / "ours", max_steps=steps, save_strategy="steps", save_steps=2, per_device_train_batch_size=2
        )
        transformers.Trainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=resume)
        return model

    full = run()
    ckpt = tmp_path / "ours" / "checkpoint-2"
    resumed = run(resume=str(ckpt))
    a, b = adapter_state(full), adapter_state(resumed)
    assert a.keys() == b.keys()
    for k in a:  # A, B and the merge statistics, bit for bit
        assert torch.equal(a[k], b[k]), k

    # PEFT LoRA on the same base and targets, through the same Trainer
    theirs = peft.get_peft_model(make("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.Trainer(
            model=theirs,
            args=trainer_args(
                tmp_path / "peft", max_steps=2, save_strategy="steps", save_steps=2, per_device_train_batch_size=2
            ),
            train_dataset=data,
        ).train()
    ours_size = os.path.getsize(ckpt / "model.safetensors")
    peft_size = os.path.getsize(tmp_path / "peft" / "checkpoint-2" / "adapter_model.safetensors")
    base_size = sum(p.numel() * p.element_size() for p in make("llama").parameters())
    # the adapter's A and B as PEFT's, plus the merge statistics (2 x stats_window floats a block)
    # and the description
    stats = 9 * (2 * 100 * 4 + 8)
    assert ours_size < peft_size + stats + 4096
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert not any(k.endswith(("base_layer.weight", "embed_tokens.weight", "norm.weight")) for k in keys)
    print(f"checkpoint weights: reslora {ours_size} B, PEFT {peft_size} B, base model {base_size} B")

    # from_pretrained reads the Trainer's folder: the model as it was at step 2
    two = run(steps=2)
    back = reslora.ResLoRAModel.from_pretrained(make("llama"), str(ckpt))
    for k, v in adapter_state(two).items():
        assert torch.equal(back.state_dict()[k], v), k


def test_trainer_save_model_writes_the_adapter(tmp_path):
    data = classification_data(n=16)
    model = reslora.get_reslora_model(
        make("bert"),
        reslora.ResLoRAConfig(variant="is", r=4, lora_alpha=8, task_type="SEQ_CLS", target_modules=["query", "value"]),
    )
    trainer = transformers.Trainer(model=model, args=trainer_args(tmp_path / "run", max_steps=2), train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    back = reslora.ResLoRAModel.from_pretrained(make("bert"), str(tmp_path / "final"))
    _, want = accuracy(model, data)
    _, got = accuracy(back, data)
    torch.testing.assert_close(got, want)


def test_trainer_evaluation_reports_eval_loss_and_metrics_and_keeps_the_best(tmp_path):
    # The Trainer reads the label names from the model's class: a wrapped model must name them as
    # its base model does, or evaluation silently returns no loss and no metrics.
    train, held_out = classification_data(n=32, seed=0), classification_data(n=16, seed=1)
    model = reslora.get_reslora_model(
        make("bert"),
        reslora.ResLoRAConfig(
            variant="ms", r=4, lora_alpha=8, lora_dropout=0.1, task_type="SEQ_CLS", target_modules=["query", "value"]
        ),
    )
    seen = []

    def compute_metrics(pred):
        seen.append(pred.label_ids)
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    args = trainer_args(
        tmp_path,
        num_train_epochs=2,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=train, eval_dataset=held_out, compute_metrics=compute_metrics
    )
    assert trainer.label_names == ["labels"]
    trainer.train()
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and "eval_accuracy" in metrics, metrics
    assert len(seen) == 3 and all(len(ids) == len(held_out) for ids in seen)  # 2 epochs + evaluate()
    losses = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert metrics["eval_loss"] == pytest.approx(min(losses[:2]), rel=1e-5)  # the best checkpoint, reloaded
