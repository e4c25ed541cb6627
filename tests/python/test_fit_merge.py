"""The fit merge (is, ms): the shortcut's rank-r term replaced by its least-squares prediction
from the block's own input, fitted on calibration batches."""

import copy

import pytest
import torch
from torch import nn

import reslora
from reslora import _C

from hf_models import TARGETS, batch, make

CASES = [("is", 1), ("ms", 1), ("ms", -1)]


class Stack(nn.Module):
    """Square bias-free layers: every block's input is a linear function of the next block's
    (x_n = P_n x_0 with P_n invertible), where fit is exact."""

    def __init__(self, d=8, n=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(d, d, bias=False)}) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer["proj"](x)
        return x


def stack_model(variant, pre_num, seed=0, stack=None):
    """The stack (Stack by default) wrapped, B random, three training forwards done."""
    torch.manual_seed(seed)
    base = (stack or Stack)()
    with torch.no_grad():
        for layer in base.layers:
            layer["proj"].weight.copy_(torch.eye(8) + 0.3 * torch.randn(8, 8))
    model = reslora.get_reslora_model(
        base,
        reslora.ResLoRAConfig(
            variant=variant, pre_num=pre_num, r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["proj"]
        ),
    )
    for blk in model.blocks.values():
        nn.init.normal_(blk.lora_B, std=0.5)
    model.train()
    for _ in range(3):  # training forwards with dropout on: the statistics of the input merge
        model(torch.randn(16, 8))
    return model


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("variant,pre_num", CASES)
def test_fit_is_exact_where_inputs_are_linearly_related(variant, pre_num, sequential):
    model = stack_model(variant, pre_num)
    calib = [torch.randn(64, 8) for _ in range(4)]
    held_out = torch.randn(32, 8)
    other = copy.deepcopy(model)
    model.merge_to_lora(inputs=calib, merge="fit", eval_inputs=held_out, ridge=1e-10, sequential=sequential)
    fit_err = max(model.merge_errors.values())
    assert fit_err < 1e-3  # the float32 sums of the calibration: exact up to their rounding
    assert max(model.merge_delta_errors.values()) < 1e-2
    assert model.training  # the calibration ran in eval mode and left the mode as it was
    other.merge_to_lora(inputs=held_out, merge="input")
    assert max(other.merge_errors.values()) > 20 * fit_err  # the scalar merge is not exact here


class TanhStack(Stack):
    """A nonlinear stack: the merged model's inputs drift from the unmerged ones."""

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer["proj"](x))
        return x


def reference_sequential_fit(model, calib, variant, pre_num, ridge):
    """The sequential fit in float64 from the spec's formulas: the fit of every block on the
    unmerged model's inputs, then positions 1, 2, ... refitted in turn on the inputs of the
    merged model (the shortcut's term from them, with the A before the merge)."""
    blocks = list(model.blocks.values())
    W = [b.base_layer.weight.double() for b in blocks]
    A = [b.lora_A.double() for b in blocks]
    B = [b.lora_B.double() for b in blocks]
    xm = [b.x_norm_mean().double() for b in blocks]
    s, X, d = blocks[0].scaling, torch.cat(calib).double(), A[0].shape[1]

    def reach(n):
        return n if pre_num < 0 else min(n, pre_num)

    def term(xs, n):  # the rank-r term the shortcut adds to z_n
        if variant == "is":
            return xs[n - 1] @ A[n].T
        return sum(xs[n - j] @ A[n - j].T for j in range(1, reach(n) + 1))

    def run(pairs=None):  # the block inputs of the unmerged chain, or of plain LoRA pairs A'
        xs, x = [], X
        for n in range(len(blocks)):
            xs.append(x)
            if pairs is not None:
                z = x @ pairs[n].T
            else:
                z = x @ A[n].T + (xs[n] @ A[n].T if variant == "is" and n == 0 else term(xs, n) if n else 0)
            x = torch.tanh(x @ W[n].T + s * z @ B[n].T)
        return xs

    def fit(xs, n):
        if n == 0:
            return 2 * A[0] if variant == "is" else A[0]
        xx, zx = xs[n].T @ xs[n], term(xs, n).T @ xs[n]
        lam = ridge * xx.trace() / d
        if variant == "is":
            m0 = A[n] * xm[n - 1] / xm[n]
        else:
            m0 = sum(A[n - j] * xm[n - j] / xm[n] for j in range(1, reach(n) + 1))
        return A[n] + torch.linalg.solve(xx + lam * torch.eye(d, dtype=xx.dtype), (zx + lam * m0).T).T

    xs = run()
    pairs = [fit(xs, n) for n in range(len(blocks))]
    for n in range(1, len(blocks)):
        pairs[n] = fit(run(pairs), n)
    return pairs


@pytest.mark.parametrize("variant,pre_num", CASES)
def test_sequential_fit_equals_a_float64_reference(variant, pre_num):
    model = stack_model(variant, pre_num, seed=1, stack=TanhStack)
    calib = [torch.randn(64, 8) for _ in range(4)]
    want = reference_sequential_fit(model, calib, variant, pre_num, ridge=1e-3)
    plain = copy.deepcopy(model).merge_to_lora(inputs=calib, merge="fit", ridge=1e-3)
    model.merge_to_lora(inputs=calib, merge="fit", ridge=1e-3, sequential=True)
    for n, blk in enumerate(model.blocks.values()):
        torch.testing.assert_close(blk.lora_A.double(), want[n], rtol=2e-4, atol=2e-5)
    # the refit moved the blocks after the first two (the head's and block 1's inputs are the
    # unmerged ones: the head merges exactly)
    last = list(model.blocks)[-1]
    assert (model.blocks[last].lora_A - plain.blocks[last].lora_A).abs().max() > 1e-3


def trained_llama(variant, pre_num, dropout=0.1):
    model = reslora.get_reslora_model(
        make("llama"),
        reslora.ResLoRAConfig(
            variant=variant, pre_num=pre_num, r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS["llama"]
        ),
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for step in range(4):
        model(**batch("llama", seed=step, n=4)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("variant,pre_num", CASES)
def test_fit_is_never_worse_than_input_on_the_calibration_data(variant, pre_num):
    model = trained_llama(variant, pre_num)
    calib = {"input_ids": batch("llama", seed=50, n=8, t=16)["input_ids"]}  # 128 tokens > 4 d_in
    by_input = copy.deepcopy(model).merge_to_lora(inputs=calib, merge="input")
    by_fit = model.merge_to_lora(inputs=calib, merge="fit")
    heads = [paths[0] for paths in model.chains.values()]
    for path, err in by_fit.merge_errors.items():
        assert err <= by_input.merge_errors[path] * (1 + 1e-3) + 1e-7, path
        if path in heads:  # the head: is adds its own input again (exact), ms nothing
            assert err < 1e-6
    assert sum(by_fit.merge_errors.values()) < 0.8 * sum(by_input.merge_errors.values())
    for path, d in by_fit.merge_delta_errors.items():  # the adapter's own term is the harder one
        assert d >= by_fit.merge_errors[path]


def test_sequential_fit_on_a_trained_hf_model_with_padding():
    # Llama trained with dropout on, calibration batches with padding: the refit keeps the
    # heads (their inputs are the unmerged ones), moves the later blocks, and the merged model
    # stays far closer to the trained one than the input merge on the calibration data.
    model = trained_llama("ms", -1)
    ids = batch("llama", seed=70, n=8, t=16)["input_ids"]
    mask = torch.ones_like(ids)
    mask[:2, 10:] = 0
    calib = [{"input_ids": ids, "attention_mask": mask}, {"input_ids": batch("llama", seed=71, n=8, t=16)["input_ids"]}]
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.double()
    plain = copy.deepcopy(model).merge_to_lora(inputs=calib, merge="fit")
    by_input = copy.deepcopy(model).merge_to_lora(merge="input")
    model.merge_to_lora(inputs=calib, merge="fit", sequential=True)
    assert model.training is False and all(e is not None for e in model.merge_errors.values())
    heads = {paths[0] for paths in model.chains.values()}
    moved = 0
    for name, blk in model.blocks.items():
        diff = (blk.lora_A - plain.blocks[name].lora_A).abs().max().item()
        if name in heads:
            assert diff == 0, name
        moved += diff > 1e-6
    assert moved > 0
    with torch.no_grad():
        err = lambda m: ((m(input_ids=ids, attention_mask=mask).logits.double() - want).norm() / want.norm()).item()  # noqa: E731
        assert err(model) < 0.7 * err(by_input)


def test_fit_shares_one_input_sum_and_leaves_padding_out():
    model = trained_llama("is", 1)
    ids = batch("llama", seed=5, n=2, t=12)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    cal, _ = reslora.calibration.calibrate(model, [{"input_ids": ids, "attention_mask": mask}], None)
    q = model.blocks["model.layers.1.self_attn.q_proj"]
    v = model.blocks["model.layers.1.self_attn.v_proj"]
    up = model.blocks["model.layers.1.mlp.up_proj"]
    assert cal.xx[q] is cal.xx[v] and cal.xx[q] is not cal.xx[up]  # q and v read one input
    assert cal.tokens[q] == 20
    assert all(blk.calibration is None for blk in model.blocks.values())


@pytest.mark.parametrize("variant,pre_num", CASES)
def test_cpp_modules_fit_as_python(variant, pre_num):
    torch.manual_seed(0)
    n, d, r = 4, 8, 2
    Ws = [torch.eye(d) + 0.3 * torch.randn(d, d) for _ in range(n)]
    As = [torch.randn(r, d) * 0.3 for _ in range(n)]
    Bs = [torch.randn(d, r) * 0.3 for _ in range(n)]
    train = [torch.randn(16, d) for _ in range(n)]
    calib = [torch.randn(64, d) for _ in range(n)]
    cpp = _C._chain_fit_cpp(variant, pre_num, r, 4.0, Ws, As, Bs, train, calib, 1e-3)
    blocks = []
    for W, A, B in zip(Ws, As, Bs):
        lin = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            lin.weight.copy_(W)
        blk = reslora.ResLoRALinear(lin, r=r, lora_alpha=4.0, variant=variant, pre_num=pre_num)
        with torch.no_grad():
            blk.lora_A.copy_(A)
            blk.lora_B.copy_(B)
        blocks.append(blk)
    chain = reslora.ResLoRAChain(blocks)
    with torch.no_grad():
        chain.forward(train)  # training mode: the statistics
        for b in blocks:
            b.eval()
        cal = reslora.calibration.Calibration()
        for b in blocks:
            b.calibration = cal
        cal.next_batch()
        chain.forward(calib)
        for b in blocks:
            b.calibration = None
    py = chain.merged_lora("fit", cal, 1e-3)
    for (a1, b1), (a2, b2) in zip(py, cpp):
        torch.testing.assert_close(a1, a2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b1, b2)


def test_fit_needs_calibration_and_warns_on_few_tokens():
    model = stack_model("is", 1)
    with pytest.raises(ValueError, match=r"merge 'fit' needs calibration inputs: .*got inputs=None"):
        model.merge_to_lora(merge="fit")
    with pytest.raises(
        ValueError, match=r"merge 'fit' does not apply to variant 'is'|merge 'mid' does not apply to variant 'is'"
    ):
        model.merge_to_lora(merge="mid")
    with pytest.warns(UserWarning, match=r"saw 4 calibration tokens, fewer than d_in = 8"):
        model.merge_to_lora(inputs=torch.randn(4, 8), merge="fit")
    bs = reslora.get_reslora_model(Stack(), reslora.ResLoRAConfig(variant="bs", r=2, target_modules=["proj"]))
    with pytest.raises(ValueError, match=r"merge 'fit' does not apply to variant 'bs'; expected one of 'exact'"):
        bs.merge_to_lora(inputs=torch.randn(4, 8), merge="fit")
    with pytest.raises(ValueError, match=r"ridge must be > 0"):
        stack_model("ms", 1).merge_to_lora(inputs=torch.randn(64, 8), merge="fit", ridge=0.0)


def test_fit_chain_by_chain_gives_the_same_merge():
    # chains_at_once=1: one chain's sums at a time (less memory, a calibration run per chain)
    model = trained_llama("ms", -1)
    calib = [{"input_ids": batch("llama", seed=60 + i, n=4, t=16)["input_ids"]} for i in range(2)]
    other = copy.deepcopy(model)
    model.merge_to_lora(inputs=calib, merge="fit")
    other.merge_to_lora(inputs=calib, merge="fit", chains_at_once=1)
    for n, blk in model.blocks.items():
        torch.testing.assert_close(other.blocks[n].lora_A, blk.lora_A)
        torch.testing.assert_close(other.blocks[n].lora_B, blk.lora_B)
    assert other.merge_errors == pytest.approx(model.merge_errors)
    with pytest.raises(
        ValueError,
        match=r"chains_at_once runs the calibration batches several times: give a list or a DataLoader, got a one-shot iterator",
    ):
        copy.deepcopy(trained_llama("is", 1)).merge_to_lora(inputs=iter(calib), merge="fit", chains_at_once=1)
    with pytest.raises(ValueError, match=r"chains_at_once must be None or an int >= 1, got 0"):
        trained_llama("is", 1).merge_to_lora(inputs=calib, merge="fit", chains_at_once=0)


def adapter_pairs(model):
    return {n: (b.lora_A.detach().clone(), b.lora_B.detach().clone()) for n, b in model.blocks.items()}


@pytest.mark.parametrize("merge", ["input", "fit"])
def test_every_merge_takes_a_batch_a_list_or_a_dataloader_of_dicts_or_tuples(merge):
    # The forms a user has at hand give the same merge: one batch, a list of batches, a DataLoader
    # of dicts, and a DataLoader of (ids, labels) tuples, whose labels are left out.
    from torch.utils.data import DataLoader, TensorDataset

    trained = trained_llama("is", 1)
    ids = torch.cat([batch("llama", seed=10 + i, n=4)["input_ids"] for i in range(4)])
    labels = torch.zeros(len(ids), dtype=torch.long)
    dicts = [{"input_ids": ids[i : i + 4]} for i in range(0, len(ids), 4)]
    forms = {
        "list of dicts": dicts,
        "dataloader of dicts": DataLoader([{"input_ids": row} for row in ids], batch_size=4),
        "dataloader of tuples": DataLoader(TensorDataset(ids, labels), batch_size=4),
        "list of tensors": [ids[i : i + 4] for i in range(0, len(ids), 4)],
    }
    if merge == "input":  # the non-fit merges use one batch (for the merge errors)
        forms = {"one batch": dicts[0], "one tuple": (ids[:4], labels[:4]), **forms}
    want = None
    for name, inputs in forms.items():
        model = copy.deepcopy(trained)
        model.merge_to_lora(inputs=inputs, merge=merge)
        assert all(e is not None for e in model.merge_errors.values()), name  # measured on the first batch
        got = adapter_pairs(model)
        if want is None:
            want, errors = got, model.merge_errors
            continue
        for n in want:
            torch.testing.assert_close(got[n], want[n], msg=lambda m, name=name: f"{name}: {m}")
        assert model.merge_errors == pytest.approx(errors), name


@pytest.mark.parametrize("variant,warns", [("lora", False), ("bs", False), ("is", True), ("ms", True)])
def test_merge_and_unload_of_an_unmerged_is_or_ms_model_warns_and_says_how_to_fit(variant, warns):
    import warnings

    model = trained_llama(variant, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_and_unload()
    said = [str(w.message) for w in caught if "merge_and_unload()" in str(w.message)]
    if not warns:
        assert said == []
        return
    assert len(said) == 1 and f"on an unmerged {variant!r} model" in said[0], said
    assert "merge_to_lora(merge='fit', inputs=calibration_batches)" in said[0]
    fitted = trained_llama(variant, 1)
    fitted.merge_to_lora(merge="fit", inputs=[batch("llama", seed=s, n=4) for s in range(8)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted.merge_and_unload()  # merged first: nothing to say
    assert not [w for w in caught if "merge_and_unload()" in str(w.message)]
