"""Wrapping, training and reading tiny Hugging Face models, as the HF tests do."""

import copy

import torch

import reslora

from hf_models import TARGETS, batch, make

VARIANTS = [("lora", 1), ("is", 1), ("bs", 1), ("bs", -1), ("ms", 1), ("ms", -1)]


def wrap(name, variant="is", pre_num=1, **kw):
    base = make(name)
    ref = copy.deepcopy(base)
    cfg = reslora.ResLoRAConfig(variant=variant, r=4, lora_alpha=8, pre_num=pre_num, target_modules=TARGETS[name], **kw)
    return reslora.get_reslora_model(base, cfg), ref


def train(model, name, steps=4, lr=5e-2, optim=torch.optim.AdamW):
    model.train()
    opt = optim([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for i in range(steps):
        out = model(**batch(name, seed=i))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    model.eval()
    return losses


def trainer_args(out, **kw):
    """The HF Trainer's arguments for a test: on the CPU, nothing reported, no checkpoint and no
    progress bar unless kw says otherwise."""
    import transformers

    base = dict(output_dir=str(out), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def logits(model, name):
    with torch.no_grad():
        b = batch(name, seed=99)
        return model(input_ids=b["input_ids"]).logits
