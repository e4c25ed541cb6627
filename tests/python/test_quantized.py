"""ResLoRA on a quantized base (torchao NF4 and bitsandbytes 4-bit NF4, as in QLoRA; both run on
the CPU): the base module computes its own output, the ops the low-rank term, and merges go
through a dequantized copy."""

import copy
import importlib.util
import warnings

import pytest
import torch
from torch import nn

import reslora

transformers = pytest.importorskip("transformers")

BACKENDS = [
    pytest.param(b, marks=pytest.mark.skipif(importlib.util.find_spec(m) is None, reason=f"needs {m}"))
    for b, m in (("torchao", "torchao"), ("bitsandbytes", "bitsandbytes"))
]


def nf4():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    return nf4_tensor


def quantize(lin, backend):
    """The layer with its weight in NF4, the backend's way."""
    if backend == "torchao":
        lin.weight = nn.Parameter(nf4().to_nf4(lin.weight.detach()), requires_grad=False)
        return lin
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(
        lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.float32, quant_type="nf4"
    )
    q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4")
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return q.to("cpu")


def dequantized(layer):
    from reslora.compat import dequantize

    return dequantize(layer)


def is_quantized(layer, backend):
    return (
        isinstance(layer.weight, nf4().NF4Tensor)
        if backend == "torchao"
        else type(layer.weight).__name__ == "Params4bit"
    )


VARIANTS = [("lora", 1), ("is", 1), ("bs", -1), ("ms", -1)]
TARGETS = ["q_proj", "v_proj", "o_proj"]


def llama():
    # NF4 quantizes in blocks of 64 values with scalers in blocks of 256: 128 x 128 weights
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def quantized_and_dense(backend):
    """An NF4 model and a dense one holding the NF4 model's dequantized weights."""
    q = llama()
    for name, m in list(q.named_modules()):
        if isinstance(m, nn.Linear) and name != "lm_head":
            parent, _, leaf = name.rpartition(".")
            setattr(q.get_submodule(parent), leaf, quantize(m, backend))
    dense = llama()
    with torch.no_grad():
        for name, d in dense.named_modules():
            if isinstance(d, nn.Linear) and name != "lm_head":
                d.weight.copy_(dequantized(q.get_submodule(name)))
    return q, dense


def wrap(model, variant, pre_num, **kw):
    cfg = reslora.ResLoRAConfig(
        variant=variant, pre_num=pre_num, r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS, **kw
    )
    return reslora.get_reslora_model(model, cfg)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant,pre_num", VARIANTS)
def test_nf4_base_trains_as_its_dense_equivalent(backend, variant, pre_num):
    q, dense = quantized_and_dense(backend)
    mq, md = wrap(q, variant, pre_num), wrap(dense, variant, pre_num)
    assert all(blk.opaque for blk in mq.blocks.values())
    assert not any(blk.opaque for blk in md.blocks.values())
    with torch.no_grad():
        for blk in mq.blocks.values():
            nn.init.normal_(blk.lora_B, std=0.1)
        md.load_state_dict(mq.state_dict())
    w_before = {n: dequantized(blk.base_layer).clone() for n, blk in mq.blocks.items()}
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (mq, md)]
    losses = []
    for step in range(3):
        out = []
        for m, opt in zip((mq, md), opts):
            m.train()
            torch.manual_seed(step)  # the same dropout masks in both
            loss = m(**batch(0)).loss
            loss.backward()
            out.append((loss.item(), {n: blk.lora_A.grad.clone() for n, blk in m.blocks.items()}))
            opt.step()
            opt.zero_grad()
        (lq, gq), (ld, gd) = out
        assert lq == pytest.approx(ld, rel=1e-5)
        for n in gq:
            torch.testing.assert_close(gq[n], gd[n], rtol=1e-3, atol=2e-5)
        losses.append(lq)
    assert losses[-1] < losses[0]
    for n, blk in mq.blocks.items():  # the quantized base stays as it was
        assert is_quantized(blk.base_layer, backend)
        assert torch.equal(dequantized(blk.base_layer), w_before[n])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant,merge", [("is", "input"), ("is", "weight"), ("ms", "input"), ("bs", "exact")])
def test_nf4_merges_go_through_a_dequantized_copy(backend, variant, merge, tmp_path):
    q, dense = quantized_and_dense(backend)
    mq = wrap(q, variant, 1 if variant == "is" else -1, merge=merge)
    md = wrap(dense, variant, 1 if variant == "is" else -1, merge=merge)
    mq.train()
    opt = torch.optim.SGD([p for p in mq.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        mq(**batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    md.load_state_dict(mq.state_dict())
    mq.merge_to_lora()
    md.merge_to_lora()
    for n in mq.blocks:  # the same merged adapter as the dense model's
        torch.testing.assert_close(mq.blocks[n].lora_A, md.blocks[n].lora_A)
        torch.testing.assert_close(mq.blocks[n].lora_B, md.blocks[n].lora_B)
    mq.save_pretrained(str(tmp_path))  # the PEFT export never touches the base weights
    assert (tmp_path / "adapter_model.safetensors").exists()
    mq.eval()
    with torch.no_grad():
        want = mq(input_ids=batch(9)["input_ids"]).logits
        deltas = {n: blk.scaling * blk.lora_B @ blk.lora_A for n, blk in mq.blocks.items()}
        base = {n: dequantized(blk.base_layer) for n, blk in mq.blocks.items()}
    with pytest.warns(UserWarning, match=r"folds the adapter into quantized base weights \((NF4Tensor|Params4bit)\)"):
        folded = mq.merge_and_unload()  # NF4 again: the dequantized sum quantized the same way
    original = dict(llama().named_modules())
    for n, d in deltas.items():
        layer = folded.get_submodule(n)
        assert is_quantized(layer, backend)
        exact = base[n] + d
        err = (dequantized(layer) - exact).norm() / exact.norm()
        # no worse than NF4's own rounding of the original weight
        w0 = original[n].weight.detach()
        err0 = (dequantized(quantize(copy.deepcopy(original[n]), backend)) - w0).norm() / w0.norm()
        assert err <= 1.25 * err0
    with torch.no_grad():
        got = folded(input_ids=batch(9)["input_ids"]).logits
        dense_ref = llama()(input_ids=batch(9)["input_ids"]).logits
        q0, _ = quantized_and_dense(backend)
        base_err = (q0(input_ids=batch(9)["input_ids"]).logits - dense_ref).norm() / dense_ref.norm()
    # the folded model is as far from the unfolded one as NF4 is from the dense base
    assert (got - want).norm() / want.norm() <= 1.5 * base_err


def test_a_base_that_cannot_be_dequantized_is_named():
    class Packed(torch.Tensor):
        pass

    lin = nn.Linear(8, 8)
    lin.weight = nn.Parameter(lin.weight.detach().to(torch.int8).as_subclass(Packed), requires_grad=False)
    blk = reslora.ResLoRALinear(lin, r=2, variant="is")
    assert blk.opaque and blk.lora_A.dtype == torch.float32
    with pytest.raises(ValueError, match=r"cannot dequantize a base weight of type Packed"):
        blk.dense_weight()


def test_a_bitsandbytes_weight_in_the_cpu_packed_layout_dequantizes_to_its_values():
    # bitsandbytes >= 0.49 repacks a Linear4bit's weight in place at its first eval-mode forward
    # on CPUs with AVX512-BF16; a merge after evaluation must still read the weight's values
    bnb = pytest.importorskip("bitsandbytes")
    pack = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if pack is None:
        pytest.skip("this bitsandbytes has no CPU-packed 4-bit layout")
    torch.manual_seed(0)
    layer = quantize(nn.Linear(128, 256), "bitsandbytes")
    before = dequantized(layer).clone()
    w = layer.weight
    w.data, w.quant_state = pack(w.data, w.quant_state)
    assert w.quant_state.packing_format_for_cpu
    # the packed layout keeps the block scales in bf16: the values agree to bf16's rounding
    torch.testing.assert_close(dequantized(layer), before, rtol=1e-2, atol=1e-3)
    assert layer.weight.quant_state.packing_format_for_cpu  # the layer keeps its kernel's layout
