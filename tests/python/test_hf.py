"""The Python API on real transformers models: wrap, train, merge, export to PEFT, reload."""

import copy
import os

import pytest
import torch
from torch import nn

import reslora

from hf_models import batch, make
from hf_training import VARIANTS, logits, train, wrap

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gpt2", "bert"])
@pytest.mark.parametrize("variant,pre_num", VARIANTS)
def test_train_merge_export_reload_with_peft(tmp_path, name, variant, pre_num):
    model, ref = wrap(name, variant, pre_num)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    train(model, name)
    unmerged = logits(model, name)
    model.merge_to_lora(inputs={"input_ids": batch(name, seed=7)["input_ids"]})
    assert all(blk.variant == "lora" for blk in model.blocks.values())
    merged = logits(model, name)
    errs = [e for e in model.merge_errors.values()]
    assert errs and all(e is not None for e in errs)
    if variant in ("lora", "bs"):
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)  # exact merges
        assert max(errs) < 1e-5
    else:
        assert max(errs) > 1e-6  # non-proportional inputs: the merge is an approximation
    model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(ref), str(tmp_path))
    loaded.eval()
    torch.testing.assert_close(logits(loaded, name), merged, rtol=1e-5, atol=1e-5)
    dense_peft = loaded.merge_and_unload()
    dense = model.merge_and_unload()
    torch.testing.assert_close(logits(dense, name), logits(dense_peft, name), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(dense, name), merged, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, reslora.ResLoRALinear) for m in dense.modules())


def test_bs_merge_exports_each_block_at_its_rank(tmp_path):
    # A bs / pre_num -1 merge gives block n rank (n + 1) r: the adapter names the blocks whose
    # rank is not the common one in rank_pattern (and alpha_pattern, for their scaling), with no
    # zero padding, and PEFT computes the merged model's outputs from it.
    model, base = wrap("llama", "bs", -1)
    train(model, "llama", steps=1)
    model.merge_to_lora()
    ranks = {n: blk.r for n, blk in model.blocks.items()}
    assert sorted(set(ranks.values())) == [4, 8, 12]
    model.save_pretrained(str(tmp_path))
    import json

    from safetensors.torch import load_file

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == pytest.approx(2.0 * 4)
    assert cfg["rank_pattern"] == {n: r for n, r in ranks.items() if r != 4}
    assert cfg["alpha_pattern"] == pytest.approx({n: 2.0 * r for n, r in ranks.items() if r != 4})
    w = load_file(str(tmp_path / "adapter_model.safetensors"))
    for n, r in ranks.items():
        assert w[f"base_model.model.{n}.lora_A.weight"].shape[0] == r
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path))
    loaded.eval()
    model.eval()
    torch.testing.assert_close(logits(loaded, "llama"), logits(model, "llama"), rtol=1e-5, atol=1e-5)


def test_chains_follow_layer_index_not_registration_order():
    class Layer(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.proj = nn.Linear(d, d)

        def forward(self, x):
            return self.proj(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleDict({"10": Layer(4), "2": Layer(4), "20": Layer(6), "1": Layer(4)})

        def forward(self, x):
            for k in ("1", "2", "10"):
                x = self.layers[k](x)
            return x

    model = reslora.get_reslora_model(Net(), reslora.ResLoRAConfig(variant="is", r=2, target_modules=["proj"]))
    assert model.chains == {
        "layers.*.proj": ["layers.1.proj", "layers.2.proj", "layers.10.proj"],
        "layers.*.proj#1": ["layers.20.proj"],
    }
    model(torch.randn(2, 4))


@pytest.mark.parametrize("variant", ["is", "bs", "ms"])
def test_gradient_checkpointing_gives_the_same_gradients(variant):
    def grads(ckpt):
        model, _ = wrap("llama", variant, -1 if variant != "is" else 1, lora_dropout=0.1)
        for blk in model.blocks.values():
            nn.init.normal_(blk.lora_B, std=0.1)
        if ckpt:
            model.gradient_checkpointing_enable()
        model.train()
        torch.manual_seed(123)
        model(**batch("llama")).loss.backward()
        stats = {n: blk.stats_count.item() for n, blk in model.blocks.items()}
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, stats

    plain, s0 = grads(False)
    ck, s1 = grads(True)
    assert plain.keys() == ck.keys()
    for k in plain:
        torch.testing.assert_close(ck[k], plain[k], rtol=1e-5, atol=1e-6)
    assert s0 == s1  # the recompute does not record statistics twice


def test_reentrant_checkpointing_is_refused_where_it_would_cut_gradients():
    model, _ = wrap("llama", "is")
    with pytest.raises(ValueError, match="reentrant checkpointing cannot differentiate"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


def test_reentrant_checkpointing_works_for_bs():
    def grads(ckpt):
        model, _ = wrap("llama", "bs", -1)
        for blk in model.blocks.values():
            nn.init.normal_(blk.lora_B, std=0.1)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.train()
        model(**batch("llama")).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ck = grads(False), grads(True)
    for k in plain:
        torch.testing.assert_close(ck[k], plain[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["is", "ms"])
def test_generate_with_kv_cache(variant):
    model, _ = wrap("llama", variant)
    for blk in model.blocks.values():
        nn.init.normal_(blk.lora_B, std=0.5)
    model.eval()
    ids = batch("llama")["input_ids"][:, :5]
    with torch.no_grad():
        cached = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (2, 11)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_train(dtype):
    model, _ = wrap("llama", "ms")
    model.to(dtype)
    for blk in model.blocks.values():
        assert blk.lora_A.dtype == dtype and blk.x_norms.dtype == torch.float32
    # Plain SGD: AdamW's eps underflows in float16 without a float32 master copy.
    losses = train(model, "llama", steps=3, lr=1e-2, optim=torch.optim.SGD)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(blk.lora_B).all() for blk in model.blocks.values())


def test_bad_input():
    with pytest.raises(ValueError, match=r"variant must be one of 'lora', 'is', 'bs', 'ms', got 'xs'"):
        reslora.ResLoRAConfig(variant="xs")
    with pytest.raises(
        ValueError, match=r"merge 'mid' does not apply to variant 'is'; expected one of 'input', 'weight'"
    ):
        reslora.ResLoRAConfig(variant="is", merge="mid")
    with pytest.raises(ValueError, match=r"merge must be one of 'exact', 'input', 'weight', 'mid', 'fit', got 'dense'"):
        reslora.ResLoRAConfig(variant="bs", merge="dense")
    with pytest.raises(ValueError, match=r"r must be an int >= 1, got 0"):
        reslora.ResLoRAConfig(r=0)
    with pytest.raises(ValueError, match=r"r must be an int >= 1, got -2"):
        reslora.ResLoRAConfig(r=-2)
    with pytest.raises(
        ValueError, match=r"target_modules \['nope'\] match no nn.Linear or Conv1D layer of LlamaForCausalLM"
    ):
        reslora.get_reslora_model(make("llama"), reslora.ResLoRAConfig(target_modules=["nope"]))
    model, _ = wrap("llama", "is")
    with pytest.raises(ValueError, match="already contains ResLoRA layers"):
        reslora.get_reslora_model(model.get_base_model(), reslora.ResLoRAConfig())
    with pytest.raises(RuntimeError, match="PEFT LoRA adapter can only be saved after merge_to_lora"):
        model.save_pretrained("/tmp/unused-reslora-dir", format="peft")
    model.merge_to_lora()
    assert all(e is None for e in model.merge_errors.values())  # no pass was recorded
    with pytest.raises(RuntimeError, match="already merged"):
        model.merge_to_lora()


def test_default_targets_and_regex():
    m = reslora.get_reslora_model(make("llama"), reslora.ResLoRAConfig())
    assert all(p.endswith(("q_proj", "v_proj")) for p in m.blocks)
    m = reslora.get_reslora_model(
        make("llama"), reslora.ResLoRAConfig(target_modules=r"model\.layers\.[01]\.mlp\.down_proj")
    )
    assert list(m.blocks) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    m = reslora.get_reslora_model(make("gpt2"), reslora.ResLoRAConfig(target_modules="all-linear"))
    assert "lm_head" not in m.blocks and len(m.blocks) == 12


@pytest.mark.gpu
@pytest.mark.parametrize("variant,pre_num", VARIANTS)
def test_cuda_train_merge_export(tmp_path, variant, pre_num):
    model, ref = wrap("llama", variant, pre_num, lora_dropout=0.1)
    model.cuda()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for i in range(3):
        b = {k: v.cuda() for k, v in batch("llama", seed=i).items()}
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    ids = batch("llama", seed=99)["input_ids"].cuda()
    with torch.no_grad():
        model(input_ids=ids)
        unmerged = model(input_ids=ids).logits
    model.merge_to_lora()
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    if variant in ("lora", "bs"):
        torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    model.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(ref).cuda(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, merged, rtol=1e-4, atol=1e-4)
    bf = reslora.get_reslora_model(
        make("llama").cuda().bfloat16(),
        reslora.ResLoRAConfig(variant=variant, r=4, pre_num=pre_num, lora_dropout=0.1, target_modules="all-linear"),
    )
    bf.train()
    loss = bf(**{k: v.cuda() for k, v in batch("llama").items()}).loss
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("variant", ["lora", "is", "bs", "ms"])
def test_chain_state_holds_only_what_shortcuts_need(variant):
    model, _ = wrap("llama", variant)
    model.train()
    held = {}

    def look(chain):  # what the pass holds while its last block runs
        def hook(module, args):
            held[chain.name] = (
                [x is not None for x in chain.links.current.inputs],
                [z is not None for z in chain.links.current.mids],
            )

        return hook

    for chain in model.linked_chains.values():
        chain.blocks[-1].register_forward_pre_hook(look(chain))
    model(**batch("llama"))
    for chain in model.linked_chains.values():
        inputs, mids = held[chain.name]
        assert all(inputs[:-1]) if variant == "is" else not any(inputs)
        assert all(mids[:-1]) == (variant == "ms") and not mids[-1]
        assert chain.links.current is None  # released when the pass ends


def test_merge_error_on_given_inputs():
    model, _ = wrap("llama", "ms")
    train(model, "llama", steps=2)
    ids = batch("llama", seed=5)["input_ids"]
    model.merge_to_lora(inputs={"input_ids": ids})
    errs = model.merge_errors
    assert all(e is not None for e in errs.values()) and max(errs.values()) > 1e-6
    heads = [paths[0] for paths in model.chains.values()]
    assert all(errs[h] < 1e-6 for h in heads)  # a chain head has no shortcut to approximate
    model, _ = wrap("llama", "is")
    train(model, "llama", steps=2)
    model.merge_to_lora()  # no inputs: no pass is kept after its forward to measure on
    assert set(model.merge_errors) == set(model.blocks)
    assert all(e is None for e in model.merge_errors.values())


@pytest.mark.parametrize("variant", ["is", "bs", "ms"])
def test_torch_export_round_trip_on_a_real_model(tmp_path, variant):
    model, _ = wrap("llama", variant)
    for blk in model.blocks.values():
        nn.init.normal_(blk.lora_B, std=0.1)
    model.eval()

    class Logits(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids, use_cache=False).logits

    net = Logits(model)
    ids = batch("llama")["input_ids"]
    ep = torch.export.export(net, (ids,), strict=False)
    assert any("reslora.lora_linear" in str(n.target) for n in ep.graph.nodes)
    path = str(tmp_path / "model.pt2")
    torch.export.save(ep, path)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(path).module()(ids), net(ids))


def test_deepcopy_and_pickle_give_independent_working_models():
    import io

    model, _ = wrap("llama", "is")
    for blk in model.blocks.values():
        nn.init.normal_(blk.lora_B, std=0.1)
    model.eval()
    ids = batch("llama")["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        twin = copy.deepcopy(model)
        assert torch.equal(twin(input_ids=ids).logits, ref)
        for blk in twin.blocks.values():
            blk.lora_B.zero_()
        assert torch.equal(model(input_ids=ids).logits, ref)  # the original is untouched
        assert not torch.equal(twin(input_ids=ids).logits, ref)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(input_ids=ids).logits, ref)


def test_bad_input_of_the_other_entry_points(tmp_path):
    bad = [
        (dict(lora_dropout=1.0), r"lora_dropout must be a number in \[0, 1\) .*, got 1.0"),
        (dict(pre_num=-2), r"pre_num must be -1 \(all\) or an int >= 0, got -2"),
        (dict(stats_window=0), r"stats_window must be an int >= 1, got 0"),
        (
            dict(lora_alpha=float("nan")),
            r"lora_alpha must be a finite number > 0 \(scaling = lora_alpha / r\), got nan",
        ),
        (dict(target_modules=[]), r"target_modules must be a non-empty list of names"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(ValueError, match=msg):
            reslora.ResLoRAConfig(**kwargs)
    with pytest.raises(ValueError, match=r"unknown ResLoRAConfig fields \['rank'\]"):
        reslora.ResLoRAConfig.from_dict({"rank": 4})
    with pytest.raises(TypeError, match="config must be a ResLoRAConfig, got dict"):
        reslora.ResLoRAModel(make("llama"), {"variant": "is"})
    with pytest.raises(ValueError, match=r"target_modules must be given for model type None"):
        reslora.get_reslora_model(nn.Sequential(nn.Linear(4, 4)), reslora.ResLoRAConfig())
    model, _ = wrap("llama", "is")
    with pytest.raises(ValueError, match=r"format must be 'peft' or 'reslora', got 'onnx'"):
        model.save_pretrained(str(tmp_path), format="onnx")
    with pytest.raises(
        FileNotFoundError,
        match=r"no ResLoRA checkpoint in .*missing.*: expected reslora_model.safetensors \(save_pretrained\) or model.safetensors",
    ):
        reslora.ResLoRAModel.from_pretrained(make("llama"), str(tmp_path / "missing"))
    model.merge_to_lora()
    with pytest.raises(RuntimeError, match="merged and has no shortcuts left; save it as a PEFT adapter"):
        model.save_pretrained(str(tmp_path), format="reslora")
