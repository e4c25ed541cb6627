"""The shortcut state of a pass, the way people train: checkpointing with more than one forward
before a backward, copies at any time, models freed without the garbage collector, no state
between passes, the C++ modules' masks, torch.compile with dropout on."""

import copy
import gc
import io
import pickle
import weakref

import pytest
import torch
from torch import nn

import reslora

from hf_models import TARGETS, batch, make
from hf_training import trainer_args

transformers = pytest.importorskip("transformers")

VARIANTS = [("lora", 1), ("is", 1), ("bs", 1), ("bs", -1), ("ms", 1), ("ms", -1)]


def wrapped(variant, pre_num, name="llama", dropout=0.1):
    base = make(name)
    cfg = reslora.ResLoRAConfig(
        variant=variant, r=4, lora_alpha=8, pre_num=pre_num, lora_dropout=dropout, target_modules=TARGETS[name]
    )
    model = reslora.get_reslora_model(base, cfg)
    torch.manual_seed(1)
    for blk in model.blocks.values():
        nn.init.normal_(blk.lora_B, std=0.1)
    model.train()
    return model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


# --- more than one forward before a backward, with and without checkpointing ------------------


def two_forwards(model):
    (model(**batch("llama", seed=1)).loss + model(**batch("llama", seed=2)).loss).backward()


def no_grad_forward_between(model):
    loss = model(**batch("llama", seed=1)).loss
    with torch.no_grad():
        model(**batch("llama", seed=3))
    loss.backward()


def accumulation(model):
    for i in range(4):
        (model(**batch("llama", seed=i)).loss / 4).backward()


SCENARIOS = {"two_forwards": two_forwards, "no_grad_between": no_grad_forward_between, "accumulation": accumulation}


def run(variant, pre_num, scenario, ckpt=None):
    model = wrapped(variant, pre_num)
    if ckpt is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": ckpt})
    torch.manual_seed(7)
    SCENARIOS[scenario](model)
    return grads(model)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("variant,pre_num", VARIANTS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_gives_the_gradients_of_no_checkpointing(variant, pre_num, scenario, reentrant):
    if reentrant and variant in ("is", "ms"):
        with pytest.raises(ValueError, match="reentrant checkpointing cannot differentiate"):
            run(variant, pre_num, scenario, ckpt=True)
        return
    assert_same(run(variant, pre_num, scenario, ckpt=reentrant), run(variant, pre_num, scenario))


@pytest.mark.parametrize("variant,pre_num", VARIANTS)
def test_two_forwards_then_one_backward_match_separate_backwards(variant, pre_num):
    """Without checkpointing too: each pass's graph keeps its own shortcut inputs and seed."""
    model = wrapped(variant, pre_num)
    torch.manual_seed(7)
    two_forwards(model)
    together = grads(model)
    model.zero_grad()
    torch.manual_seed(7)
    model(**batch("llama", seed=1)).loss.backward()
    model(**batch("llama", seed=2)).loss.backward()
    assert_same(together, grads(model))


def test_dropout_is_on_in_these_tests():
    """Two passes with dropout draw different masks, so the tests above compare real masks."""
    model = wrapped("is", 1)
    ids = batch("llama")["input_ids"]
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
        torch.manual_seed(3)
        a = model(input_ids=ids).logits
        torch.manual_seed(3)
        assert torch.equal(a, model(input_ids=ids).logits)


@pytest.mark.parametrize("variant,pre_num", VARIANTS)
def test_hf_trainer_with_gradient_checkpointing_trains_as_without(tmp_path, variant, pre_num):
    data = [{k: v[0] for k, v in batch("llama", seed=i, n=1).items()} for i in range(6)]

    def trained(ckpt):
        model = wrapped(variant, pre_num)
        args = trainer_args(
            tmp_path / str(ckpt),
            per_device_train_batch_size=2,
            max_steps=3,
            learning_rate=1e-2,
            seed=11,
            gradient_checkpointing=ckpt,
            dataloader_drop_last=True,
        )
        transformers.Trainer(model=model, args=args, train_dataset=data).train()
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    assert_same(trained(True), trained(False), tol=1e-5)


def test_a_foreign_checkpoint_function_is_a_clear_error_and_reslora_checkpoint_is_right():
    def chain_and_inputs():
        torch.manual_seed(0)
        blocks = [reslora.ResLoRALinear(nn.Linear(6, 6), r=2, variant="is", lora_dropout=0.3) for _ in range(3)]
        for blk in blocks:
            nn.init.normal_(blk.lora_B)
        chain = reslora.ResLoRAChain(blocks, name="c")
        xs = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
        return chain, xs

    def segment(chain):
        return lambda *xs: torch.stack(chain(list(xs))).sum()

    chain, xs = chain_and_inputs()
    loss = torch.utils.checkpoint.checkpoint(segment(chain), *xs, use_reentrant=False)
    chain([x.detach() for x in xs])  # another pass before the backward
    with pytest.raises(RuntimeError, match="recomputed during backward by a checkpoint function"):
        loss.backward()

    chain, xs = chain_and_inputs()
    torch.manual_seed(5)
    segment(chain)(*xs).backward()
    ref = [x.grad for x in xs] + [blk.lora_A.grad for blk in chain.blocks]
    chain, xs = chain_and_inputs()
    torch.manual_seed(5)
    loss = reslora.checkpoint(segment(chain), *xs)
    chain([x.detach() for x in xs])
    loss.backward()
    got = [x.grad for x in xs] + [blk.lora_A.grad for blk in chain.blocks]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


# --- no state between passes ----------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,pre_num,what", [("is", 1, "input"), ("ms", 1, "mid activation"), ("ms", -1, "mid activation sum")]
)
def test_a_block_alone_after_a_pass_never_reads_that_pass(variant, pre_num, what):
    model = wrapped(variant, pre_num, dropout=0.0)
    model(**batch("llama"))
    chain = next(iter(model.linked_chains.values()))
    assert chain.links.current is None
    x = torch.randn(2, 5, chain.blocks[1].in_features)
    with pytest.raises(RuntimeError, match=f"block 1 of chain .* needs the {what} of block 0 from this forward pass"):
        chain.blocks[1](x)


# --- copies and memory ------------------------------------------------------------------------


@pytest.mark.parametrize("variant,pre_num", VARIANTS)
def test_deepcopy_and_pickle_after_a_training_step(variant, pre_num):
    model = wrapped(variant, pre_num)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch("llama")).loss.backward()
    opt.step()
    twin = copy.deepcopy(model)
    pickled = pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert set(model.state_dict()) == set(twin.state_dict())  # parameters and buffers only
    ids = batch("llama", seed=4)["input_ids"]
    for m in (model, twin, pickled, loaded):
        m.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        for other in (twin, pickled, loaded):
            assert torch.equal(other(input_ids=ids).logits, ref)
            for chain in other.linked_chains.values():  # each copy's chains link its own blocks
                for blk in chain.blocks:
                    assert blk.links is chain.links and any(blk is b for b in other.blocks.values())
    before = grads(model)
    twin.train()
    twin.zero_grad()
    twin(**batch("llama")).loss.backward()  # the copy trains on its own
    assert all(p.grad is not None for n, p in twin.named_parameters() if p.requires_grad)
    assert_same(grads(model), before, tol=0)


@pytest.mark.parametrize("variant,pre_num", VARIANTS)
@pytest.mark.parametrize("ckpt", [False, True])
def test_del_model_frees_every_tensor_without_the_garbage_collector(variant, pre_num, ckpt):
    gc.collect()
    gc.disable()
    try:
        model = wrapped(variant, pre_num)
        if ckpt:
            model.gradient_checkpointing_enable()
        refs = [weakref.ref(t) for t in list(model.parameters()) + list(model.buffers())]
        seen = []
        for blk in model.blocks.values():
            blk.register_forward_hook(lambda m, args, out: seen.append(weakref.ref(args[0])))
        out = model(**batch("llama"))
        out.loss.backward()
        refs += seen
        del model, out, blk
        alive = sum(r() is not None for r in refs)
        assert alive == 0, f"{alive} of {len(refs)} tensors outlived the model"
    finally:
        gc.enable()


# --- one source of truth: the C++ modules and the Python layers ------------------------------


@pytest.mark.parametrize("variant,pre_num", VARIANTS)
@pytest.mark.parametrize("training", [True, False])
def test_cpp_modules_and_python_layers_give_identical_outputs_and_masks(variant, pre_num, training):
    g = torch.Generator().manual_seed(3)
    W = [torch.randn(10, 10, generator=g) for _ in range(4)]
    A = [torch.randn(3, 10, generator=g) for _ in range(4)]
    B = [torch.randn(10, 3, generator=g) for _ in range(4)]
    xs = [torch.randn(2, 5, 10, generator=g) for _ in range(4)]
    gy = [torch.randn(2, 5, 10, generator=g) for _ in range(4)]
    ys_c, gA_c, gB_c = reslora._C._chain_forward_cpp(variant, pre_num, 3, 6.0, 0.4, training, W, A, B, xs, gy, 21)
    blocks = []
    for w, a, b in zip(W, A, B):
        base = nn.Linear(10, 10, bias=False)
        with torch.no_grad():
            base.weight.copy_(w)
        blk = reslora.ResLoRALinear(base, r=3, lora_alpha=6.0, lora_dropout=0.4, variant=variant, pre_num=pre_num)
        with torch.no_grad():
            blk.lora_A.copy_(a)
            blk.lora_B.copy_(b)
        blk.train(training)
        blocks.append(blk)
    chain = reslora.ResLoRAChain(blocks)
    torch.manual_seed(21)
    ys = chain(xs)
    sum((y * t).sum() for y, t in zip(ys, gy)).backward()
    for y, yc in zip(ys, ys_c):
        assert torch.equal(y, yc)
    for blk, ga, gb in zip(blocks, gA_c, gB_c):
        assert torch.equal(blk.lora_A.grad, ga) and torch.equal(blk.lora_B.grad, gb)
    if training:  # the masks were really drawn: another seed gives other outputs
        torch.manual_seed(22)
        assert not torch.equal(chain(xs)[0], ys[0])


def test_option_rules_come_from_the_core():
    """The same message from the config, the layer and the C++ core, with bool refused as int."""
    for bad in (True, 0, 2.0, "4"):
        msgs = set()
        for make_it in (
            lambda: reslora.ResLoRAConfig(r=bad),
            lambda: reslora.ResLoRALinear(nn.Linear(4, 4), r=bad),
            lambda: reslora._C.validate_options("lora", bad, 16.0, 0.0, 1, 100),
        ):
            with pytest.raises(ValueError) as e:
                make_it()
            msgs.add(str(e.value))
        assert msgs == {f"reslora: r must be an int >= 1, got {bad!r}"}
    with pytest.raises(ValueError, match="merge 'mid' does not apply to variant 'is'"):
        reslora.ResLoRAConfig(variant="is", merge="mid")
    with pytest.raises(ValueError, match="merge 'mid' does not apply to variant 'is'"):
        reslora.merge_chain(
            reslora.ResLoRAChain([reslora.ResLoRALinear(nn.Linear(2, 2), r=1, variant="is")]).blocks, "mid"
        )


# --- torch.compile with dropout on --------------------------------------------------------------


def compiled_training(name, variant, pre_num, backend, steps=5, device="cpu"):
    """Losses and final gradients of `steps` AdamW steps, eager and compiled (fullgraph), from
    the same generator state; dynamo's graph breaks and recompiles after the first step."""
    from torch._dynamo.utils import counters

    def train(compiled):
        model = wrapped(variant, pre_num, name=name, dropout=0.05).to(device)
        # Settings the base models would otherwise fill in on their first call (a recompile) or
        # warn about from inside the graph (a graph break), with or without adapters.
        if name == "gpt2":
            model.get_base_model().loss_type = "ForCausalLM"
        if name == "bert":
            model.config.problem_type = "single_label_classification"
        run = torch.compile(model, fullgraph=True, backend=backend) if compiled else model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(5)
        losses = []
        for i in range(steps):
            loss = run(**{k: v.to(device) for k, v in batch(name, seed=i).items()}).loss
            loss.backward()
            if i == steps - 1:
                last = grads(model)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            if compiled and i == 0:
                torch._dynamo.config.error_on_recompile = True
        return losses, last

    torch._dynamo.reset()
    counters.clear()
    eager = train(False)
    try:
        with torch._inductor.config.patch(fallback_random=True):
            comp = train(True)
    finally:
        torch._dynamo.config.error_on_recompile = False
    breaks = sum(counters["graph_break"].values())
    return eager, comp, breaks


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("variant,pre_num", VARIANTS)
def test_torch_compile_fullgraph_trains_with_dropout_as_eager(name, variant, pre_num):
    (l_e, g_e), (l_c, g_c), breaks = compiled_training(name, variant, pre_num, "aot_eager")
    assert breaks == 0
    torch.testing.assert_close(l_c, l_e, rtol=1e-5, atol=1e-6)
    assert_same(g_c, g_e, tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant,pre_num", [("is", 1), ("ms", -1)])
def test_torch_compile_inductor_trains_with_dropout_as_eager(variant, pre_num):
    (l_e, g_e), (l_c, g_c), breaks = compiled_training("llama", variant, pre_num, "inductor")
    assert breaks == 0
    torch.testing.assert_close(l_c, l_e, rtol=1e-4, atol=1e-5)
    assert_same(g_c, g_e, tol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("variant,pre_num", VARIANTS)
def test_torch_compile_inductor_trains_with_dropout_as_eager_cuda(variant, pre_num):
    (l_e, g_e), (l_c, g_c), breaks = compiled_training("llama", variant, pre_num, "inductor", device="cuda")
    assert breaks == 0
    torch.testing.assert_close(l_c, l_e, rtol=1e-4, atol=1e-5)
    assert_same(g_c, g_e, tol=1e-4)


# --- training after a merge -------------------------------------------------------------------


@pytest.mark.parametrize("variant,pre_num", VARIANTS)
def test_training_goes_on_after_a_merge_with_the_optimizer_the_user_has(variant, pre_num):
    model = wrapped(variant, pre_num, dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for i in range(2):
        model(**batch("llama", seed=i)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.merge_to_lora(inputs={"input_ids": batch("llama")["input_ids"]})
    model.train()
    same_shape = variant != "bs"
    if not same_shape:  # the rank grew: the old optimizer would train stale parameters
        with pytest.raises(RuntimeError, match="make a new optimizer from the model's parameters"):
            model(**batch("llama"))
        del opt, params
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    else:
        assert [p for p in model.parameters() if p.requires_grad] == params  # the same objects
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = []
    for i in range(3):
        loss = model(**batch("llama", seed=0)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_a_recompute_records_no_statistics_twice():
    """Any checkpoint function, reslora's or torch's (where the block needs no pass state)."""
    for ckpt in (reslora.checkpoint, torch.utils.checkpoint.checkpoint):
        blk = reslora.ResLoRALinear(nn.Linear(6, 6), r=2, variant="is")
        x = torch.randn(4, 6, requires_grad=True)
        ckpt(blk, x, use_reentrant=False).sum().backward()
        assert blk.stats_count.item() == 1


def test_reslora_checkpoint_refuses_reentrant_mode_where_it_would_cut_shortcut_gradients():
    for variant, refused in (("is", True), ("ms", True), ("bs", False), ("lora", False)):
        blocks = [reslora.ResLoRALinear(nn.Linear(6, 6), r=2, variant=variant) for _ in range(2)]
        chain = reslora.ResLoRAChain(blocks, name="c")
        xs = [torch.randn(4, 6, requires_grad=True) for _ in range(2)]
        run = lambda *a: torch.stack(chain(list(a))).sum()  # noqa: E731
        if refused:
            with pytest.raises(ValueError, match=r"use_reentrant=True .* chains \['c'\]"):
                reslora.checkpoint(run, *xs, use_reentrant=True)
        else:
            reslora.checkpoint(run, *xs, use_reentrant=True).backward()
            assert all(blk.lora_A.grad is not None for blk in blocks)
