"""PEFT's LoraConfig options, each against PEFT itself on the same model: the same layers adapted,
the same parameters trained, the same keys exported, and PEFT computing the same outputs from
the exported adapter."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import reslora

from hf_models import batch, make

peft = pytest.importorskip("peft")

# (model, options): every option of PEFT's that reslora takes, alone or as fine-tunes combine them.
CASES = {
    "seq_cls_head": ("bert", dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    "modules_to_save_bias_lora_only": (
        "bert",
        dict(target_modules=["query", "value"], modules_to_save=["classifier"], bias="lora_only"),
    ),
    "bias_all": ("bert", dict(target_modules=["query", "value", "dense"], bias="all")),
    "exclude_list": ("llama", dict(target_modules="all-linear", exclude_modules=["q_proj", "down_proj"])),
    "exclude_regex": ("llama", dict(target_modules="all-linear", exclude_modules=r".*\.mlp\..*")),
    "layers_to_transform": (
        "llama",
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2], layers_pattern="layers"),
    ),
    "layers_to_transform_int": ("llama", dict(target_modules=["up_proj"], layers_to_transform=1)),
    "rank_alpha_pattern": (
        "llama",
        dict(
            target_modules=["q_proj", "v_proj", "up_proj"],
            rank_pattern={"v_proj": 2, "up_proj": 6},
            alpha_pattern={"up_proj": 3.0},
        ),
    ),
    "rslora": ("llama", dict(target_modules=["q_proj", "v_proj"], use_rslora=True)),
    "gpt2_lm_head_saved": ("gpt2", dict(target_modules=["c_attn"], modules_to_save=["lm_head"])),
}


def build(name, options, variant="lora", r=4, alpha=8.0):
    base = make(name)
    fresh = copy.deepcopy(base)
    ours = reslora.get_reslora_model(base, reslora.ResLoRAConfig(variant=variant, r=r, lora_alpha=alpha, **options))
    theirs = peft.get_peft_model(
        copy.deepcopy(fresh), peft.LoraConfig(r=r, lora_alpha=alpha, fan_in_fan_out=name == "gpt2", **options)
    )
    return ours, theirs, fresh


def peft_adapted(model):
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def step(model, name, steps=2):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for i in range(steps):
        out = model(**batch(name, seed=10 + i))
        out.loss.backward()
        opt.step()
        opt.zero_grad()


def logits(model, name):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch(name, seed=99)["input_ids"]).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_option_matches_peft(case, tmp_path):
    name, options = CASES[case]
    ours, theirs, fresh = build(name, options)
    assert set(ours.blocks) == peft_adapted(theirs)
    assert trainable(ours) == trainable(theirs)
    for path, blk in ours.blocks.items():
        layer = theirs.base_model.model.get_submodule(path)
        assert blk.r == layer.r["default"] and blk.scaling == pytest.approx(layer.scaling["default"])
    # trained (every trained part moves: A, B, biases, the saved modules), merged, exported
    step(ours, name)
    ours.merge_to_lora()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(exported) == set(peft.get_peft_model_state_dict(theirs))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["bias"] == options.get("bias", "none")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(fresh), str(tmp_path))
    torch.testing.assert_close(logits(loaded, name), logits(ours, name), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(loaded, name), logits(fresh, name))


def test_trained_biases_and_saved_modules_move_and_the_rest_stays():
    ours, _, fresh = build("bert", dict(target_modules=["query", "value"], task_type="SEQ_CLS", bias="lora_only"))
    step(ours, "bert")
    before = dict(fresh.named_parameters())
    moved = {
        n
        for n, p in ours.get_base_model().named_parameters()
        if n.replace(".base_layer", "").replace(".modules_to_save", "") in before
        and not torch.equal(p, before[n.replace(".base_layer", "").replace(".modules_to_save", "")])
    }
    assert moved == {
        f"bert.encoder.layer.{i}.attention.self.{p}.base_layer.bias" for i in range(3) for p in ("query", "value")
    } | {"classifier.modules_to_save.weight", "classifier.modules_to_save.bias"}
    # the original head stays as it was, and disable_adapter() runs it
    assert torch.equal(ours.get_base_model().classifier.original_module.weight, fresh.classifier.weight)
    with ours.disable_adapter():
        out = logits(ours, "bert")
    ref = logits(fresh, "bert")
    # biases trained with bias="lora_only" stay trained while disabled, as in PEFT
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    assert ours.get_base_model().classifier.weight is ours.get_base_model().classifier.modules_to_save.weight


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_init_lora_weights_as_peft(init):
    ours, theirs, fresh = build("llama", dict(target_modules=["q_proj", "v_proj"], init_lora_weights=init), r=8)
    a = torch.cat([b.lora_A.flatten() for b in ours.blocks.values()])
    b = torch.cat([b.lora_B.flatten() for b in ours.blocks.values()])
    pa = torch.cat(
        [
            m.lora_A["default"].weight.flatten()
            for n, m in theirs.named_modules()
            if hasattr(m, "lora_A") and n.endswith("proj")
        ]
    )
    pb = torch.cat(
        [
            m.lora_B["default"].weight.flatten()
            for n, m in theirs.named_modules()
            if hasattr(m, "lora_A") and n.endswith("proj")
        ]
    )
    assert a.std().item() == pytest.approx(pa.std().item(), rel=0.15)
    assert b.abs().max().item() == pytest.approx(pb.abs().max().item(), rel=0.15, abs=1e-12)
    if init is False:  # the adapter starts non-zero
        assert not torch.allclose(logits(ours, "llama"), logits(fresh, "llama"))
    else:
        assert b.abs().max() == 0
        torch.testing.assert_close(logits(ours, "llama"), logits(fresh, "llama"))


@pytest.mark.parametrize("variant,pre_num", [("is", 1), ("ms", -1), ("bs", -1)])
def test_options_with_shortcut_variants(variant, pre_num, tmp_path):
    # The shortcut variants link blocks of one projection: rank_pattern per projection fits them
    opts = dict(
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        use_rslora=True,
        exclude_modules=r"model\.layers\.1\.self_attn\.q_proj",
    )
    ours, _, fresh = build("llama", opts, variant=variant)
    ours.get_base_model().model.layers
    assert ours.chains["model.layers.*.self_attn.q_proj"] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.2.self_attn.q_proj",
    ]
    assert {blk.r for n, blk in ours.blocks.items() if "v_proj" in n} == {2}
    step(ours, "llama")
    reference = logits(ours, "llama")
    ours.merge_to_lora()
    ours.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(fresh), str(tmp_path))
    torch.testing.assert_close(logits(loaded, "llama"), logits(ours, "llama"), rtol=1e-5, atol=1e-5)
    if variant == "bs":  # the exact merge
        torch.testing.assert_close(logits(ours, "llama"), reference, rtol=1e-5, atol=1e-5)


def test_linked_blocks_need_one_rank():
    with pytest.raises(
        ValueError, match=r"block 1 must have the head's \(r, lora_alpha, pre_num\) = \(4, 8, 1\), got \(2, 8, 1\)"
    ):
        reslora.get_reslora_model(
            make("llama"),
            reslora.ResLoRAConfig(
                variant="is",
                r=4,
                lora_alpha=8,
                target_modules=["q_proj"],
                rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
            ),
        )
    # plain LoRA links nothing, so any pattern goes
    m = reslora.get_reslora_model(
        make("llama"),
        reslora.ResLoRAConfig(
            variant="lora",
            r=4,
            lora_alpha=8,
            target_modules=["q_proj"],
            rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
        ),
    )
    assert [b.r for b in m.blocks.values()] == [4, 2, 4]


@pytest.mark.parametrize(
    "options,msg",
    [
        (
            dict(modules_to_save="classifier"),
            r"modules_to_save must be None or a non-empty list of module names, got 'classifier'",
        ),
        (
            dict(modules_to_save=["clasifier"]),
            r"modules_to_save entry 'clasifier' names no module of BertForSequenceClassification",
        ),
        (dict(exclude_modules=123), r"exclude_modules must be a non-empty list of names, a regex string, got 123"),
        (dict(exclude_modules="(("), r"exclude_modules must be .*not a valid regular expression"),
        (
            dict(exclude_modules=["query", "value"]),
            r"match no nn.Linear or Conv1D layer .* \(after exclude_modules \['query', 'value'\]\)",
        ),
        (
            dict(layers_to_transform=[0, -1]),
            r"layers_to_transform must be a layer index >= 0 or a non-empty list of them, got \[0, -1\]",
        ),
        (dict(layers_to_transform=True), r"layers_to_transform must be a layer index >= 0"),
        (dict(layers_to_transform=7), r"in layers_to_transform 7"),
        (dict(layers_pattern="layer"), r"layers_pattern 'layer' needs layers_to_transform, got None"),
        (
            dict(target_modules=".*query", layers_to_transform=1),
            r"layers_to_transform needs target_modules as a list of names, got the string '.\*query'",
        ),
        (dict(rank_pattern={"query": 0}), r"rank_pattern\['query'\] must be a rank \(int >= 1\), got 0"),
        (dict(rank_pattern={"query": 2.5}), r"rank_pattern\['query'\] must be a rank"),
        (dict(rank_pattern=["query"]), r"rank_pattern must be a dict of module-name patterns to a rank"),
        (dict(alpha_pattern={"((": 2}), r"alpha_pattern key '\(\(' is not a valid regular expression"),
        (dict(alpha_pattern={"query": -1}), r"alpha_pattern\['query'\] must be a lora_alpha > 0, got -1"),
        (dict(task_type="CLASSIFY"), r"task_type must be None or one of \['CAUSAL_LM', .*\], got 'CLASSIFY'"),
        (dict(bias="some"), r"bias must be one of \['none', 'all', 'lora_only'\], got 'some'"),
        (dict(use_rslora=1), r"use_rslora must be a bool, got 1"),
        (dict(init_lora_weights="pissa"), r"init_lora_weights must be one of \[True, False, 'gaussian'\], got 'pissa'"),
        (dict(init_lora_weights=1), r"init_lora_weights must be one of \[True, False, 'gaussian'\], got 1"),
    ],
)
def test_bad_options_name_the_option(options, msg):
    kw = dict(target_modules=["query", "value"])
    kw.update(options)
    with pytest.raises(ValueError, match=msg):
        reslora.get_reslora_model(make("bert"), reslora.ResLoRAConfig(r=4, **kw))


def test_a_checkpoint_must_describe_the_model(tmp_path):
    cfg = dict(variant="is", r=4, lora_alpha=8, target_modules=["query", "value"])
    saved = reslora.get_reslora_model(make("bert"), reslora.ResLoRAConfig(task_type="SEQ_CLS", **cfg))
    saved.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"the checkpoint trains in full \['classifier'\], this model \[\]"):
        reslora.get_reslora_model(make("bert"), reslora.ResLoRAConfig(**cfg)).load_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match=r"the checkpoint has bias = 'none', this model 'all'"):
        reslora.get_reslora_model(
            make("bert"), reslora.ResLoRAConfig(task_type="SEQ_CLS", bias="all", **cfg)
        ).load_checkpoint(str(tmp_path))
    back = reslora.ResLoRAModel.from_pretrained(make("bert"), str(tmp_path))
    assert list(back.saved_modules) == ["classifier"]


def test_unload_and_merge_and_unload_keep_the_trained_head():
    ours, _, fresh = build("bert", dict(target_modules=["query", "value"], task_type="SEQ_CLS"))
    step(ours, "bert")
    trained = ours.get_base_model().classifier.modules_to_save
    want = logits(ours, "bert")
    dense = ours.merge_and_unload()
    assert dense.classifier is trained
    assert not any(
        isinstance(m, (reslora.ResLoRALinear,)) or type(m).__name__ == "ModulesToSave" for m in dense.modules()
    )
    torch.testing.assert_close(logits(dense, "bert"), want, rtol=1e-5, atol=1e-5)


def test_the_layers_take_the_same_rules():
    with pytest.raises(ValueError, match=r"init_lora_weights must be one of \[True, False, 'gaussian'\], got 'pissa'"):
        reslora.ResLoRALinear(nn.Linear(4, 4), r=2, init_lora_weights="pissa")
    with pytest.raises(ValueError, match=r"use_rslora must be a bool, got 'yes'"):
        reslora.ResLoRALinear(nn.Linear(4, 4), r=2, use_rslora="yes")
    blk = reslora.ResLoRALinear(nn.Linear(4, 4), r=4, lora_alpha=8, use_rslora=True)
    assert blk.scaling == pytest.approx(8 / 2)


@pytest.mark.parametrize("variant,pre_num", [("is", 1), ("ms", -1)])
def test_head_and_bias_training_compiles_fullgraph_as_eager(variant, pre_num):
    # modules_to_save (the classifier head) and bias="lora_only" (the ops' bias gradient) under
    # torch.compile(fullgraph=True) with dropout on: no graph break, the losses and gradients of eager
    from torch._dynamo.utils import counters

    def train(compiled):
        model = reslora.get_reslora_model(
            make("bert"),
            reslora.ResLoRAConfig(
                variant=variant,
                pre_num=pre_num,
                r=4,
                lora_alpha=8,
                lora_dropout=0.1,
                target_modules=["query", "value"],
                task_type="SEQ_CLS",
                bias="lora_only",
            ),
        )
        model.config.problem_type = "single_label_classification"
        model.train()
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(5)
        losses = []
        for i in range(3):
            loss = run(**batch("bert", seed=i)).loss
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, grads

    torch._dynamo.reset()
    counters.clear()
    eager = train(False)
    comp = train(True)
    assert sum(counters["graph_break"].values()) == 0
    torch.testing.assert_close(comp[0], eager[0], rtol=1e-5, atol=1e-6)
    assert any("base_layer.bias" in n for n in eager[1]) and any("modules_to_save" in n for n in eager[1])
    for n in eager[1]:
        torch.testing.assert_close(comp[1][n], eager[1][n], rtol=1e-4, atol=1e-6)
