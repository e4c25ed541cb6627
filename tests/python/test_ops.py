"""Every op against a plain PyTorch reference, gradcheck, opcheck, shapes, dtypes, dropout,
torch.compile, and the messages of bad input."""

import json
import pathlib

import pytest
import torch
from torch import nn

import reslora

from op_refs import rand, ref_down, ref_up
from seeds import S

ops = torch.ops.reslora


@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 1, 3)])
@pytest.mark.parametrize("with_prev", [False, True])
def test_down_up_match_reference_float64(lead, with_prev, device):
    d_in, d_out, r = 7, 5, 3
    x = rand(*lead, d_in, device=device)
    xp = rand(*lead, d_in, device=device) if with_prev else None
    A, B = rand(r, d_in, device=device), rand(d_out, r, device=device)
    W, b = rand(d_out, d_in, device=device), rand(d_out, device=device)
    z = ops.lora_down(x, xp, A, 0.0, S(0, x), 0, r)
    assert z.shape == (*lead, r)
    torch.testing.assert_close(z, ref_down(x, xp, A))
    y = ops.lora_up(x, W, b, z, B, 1.5)
    assert y.shape == (*lead, d_out)
    torch.testing.assert_close(y, ref_up(x, W, b, z, B, 1.5))
    torch.testing.assert_close(ops.lora_up(x, W, None, z, B, 1.5), ref_up(x, W, None, z, B, 1.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_error_is_pytorchs_own(dtype, device):
    torch.manual_seed(0)
    d_in, d_out, r, n = 64, 48, 8, 32
    x64, xp64 = rand(n, d_in), rand(n, d_in)
    A64, B64 = rand(r, d_in), rand(d_out, r)
    W64, b64 = rand(d_out, d_in), rand(d_out)
    x, xp, A, B, W, b = (t.to(device=device, dtype=dtype) for t in (x64, xp64, A64, B64, W64, b64))
    ref_z = ref_down(x, xp, A).cpu()
    z = ops.lora_down(x, xp, A, 0.0, S(0, x), 0, r)
    torch_z = ((x + xp) @ A.t()).cpu()  # PyTorch's own result in this dtype
    err_torch = (torch_z.double() - ref_z).abs().max()
    assert z.dtype == dtype
    assert (z.cpu().double() - ref_z).abs().max() <= 2 * err_torch + 1e-6
    ref_y = ref_up(x, W, b, z, B, 2.0).cpu()
    y = ops.lora_up(x, W, b, z, B, 2.0)
    torch_y = (x @ W.t() + b + 2.0 * (z @ B.t())).cpu()
    err_torch = (torch_y.double() - ref_y).abs().max()
    assert (y.cpu().double() - ref_y).abs().max() <= 2 * err_torch + 1e-6


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("with_prev", [False, True])
def test_gradcheck_down(dropout, with_prev, device):
    x = rand(2, 3, 4, device=device, requires_grad=True)
    xp = rand(2, 3, 4, device=device, requires_grad=True) if with_prev else None
    A = rand(4, 4, device=device, requires_grad=True)  # two segments of rank 2
    args = (x, xp, A) if with_prev else (x, A)

    def f(*a):
        if with_prev:
            return ops.lora_down(a[0], a[1], a[2], dropout, S(1234, a[0]), 0, 2)
        return ops.lora_down(a[0], None, a[1], dropout, S(1234, a[0]), 0, 2)

    assert torch.autograd.gradcheck(f, args)


def test_gradcheck_up(device):
    x = rand(2, 3, 4, device=device, requires_grad=True)
    z = rand(2, 3, 2, device=device, requires_grad=True)
    B = rand(5, 2, device=device, requires_grad=True)
    W, b = rand(5, 4, device=device), rand(5, device=device)
    assert torch.autograd.gradcheck(lambda x, z, B: ops.lora_up(x, W, b, z, B, 0.7), (x, z, B))


def test_opcheck_every_op(device):
    x = rand(3, 4, device=device, requires_grad=True)
    xp = rand(3, 4, device=device)
    A = rand(4, 4, device=device, requires_grad=True)
    W, b = rand(5, 4, device=device), rand(5, device=device)
    z = rand(3, 4, device=device, requires_grad=True)
    B = rand(5, 4, device=device, requires_grad=True)
    checks = [
        (ops.lora_down.default, (x, xp, A, 0.0, S(0, x), 0, 2)),
        (ops.lora_down.default, (x, None, A, 0.25, S(7, x), 0, 2)),
        (ops.lora_up.default, (x, W, b, z, B, 2.0)),
        (ops.lora_up.default, (x, W, None, z, B, 2.0)),
        (ops._lora_down_backward.default, (z.detach(), x.detach(), xp, A.detach(), 0.25, S(7, x.detach()), 0, 2, True)),
        (
            ops._lora_down_backward.default,
            (z.detach(), x.detach(), None, A.detach(), 0.0, S(0, x.detach()), 0, 2, False),
        ),
        (ops._lora_up_backward.default, (rand(3, 5, device=device), W, z.detach(), B.detach(), 2.0, True)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)
    ring = torch.zeros(4, device=device)
    count = torch.zeros(1, dtype=torch.long, device=device)
    torch.library.opcheck(ops.record_stats_.default, (ring, ring.clone(), count, x.detach(), z.detach()))
    torch.library.opcheck(ops.stats_mean.default, (ring, count))


def test_empty_and_non_contiguous(device):
    A, B, W = rand(3, 6, device=device), rand(4, 3, device=device), rand(4, 6, device=device)
    x = rand(0, 6, device=device, requires_grad=True)
    z = ops.lora_down(x, None, A, 0.5, S(1, x), 0, 3)
    y = ops.lora_up(x, W, None, z, B, 1.0)
    assert z.shape == (0, 3) and y.shape == (0, 4)
    y.sum().backward()
    assert x.grad.shape == (0, 6)
    xt = rand(6, 5, device=device).t()  # [5, 6], not contiguous
    assert not xt.is_contiguous()
    zt = ops.lora_down(xt, xt, A, 0.0, S(0, xt), 0, 3)
    torch.testing.assert_close(zt, ref_down(xt, xt, A))
    torch.testing.assert_close(ops.lora_up(xt, W, None, zt, B, 1.0), ref_up(xt, W, None, zt, B, 1.0))
    # dropout path on non-contiguous input: the mask indexes the logical element order
    zd = ops.lora_down(xt, None, A, 0.5, S(9, xt), 0, 3)
    torch.testing.assert_close(zd, ops.lora_down(xt.contiguous(), None, A, 0.5, S(9, xt.contiguous()), 0, 3))


def test_dropout_mask_from_seed(device):
    d = 64
    x = rand(32, d, device=device, requires_grad=True)
    eye = torch.eye(d, dtype=torch.float64, device=device, requires_grad=True)
    p = 0.25
    z = ops.lora_down(x, None, eye, p, S(42, x), 0, d)  # drop(x) itself
    keep = z.detach() != 0
    frac = keep.double().mean().item()
    assert abs(frac - (1 - p)) < 0.03
    torch.testing.assert_close(z[keep], x[keep] / (1 - p))
    torch.testing.assert_close(ops.lora_down(x, None, eye, p, S(42, x), 0, d), z)  # same seed, same mask
    assert not torch.equal(ops.lora_down(x, None, eye, p, S(43, x), 0, d) != 0, keep)  # other seed
    g = rand(32, d, device=device)
    z.backward(g)
    # backward regenerates the forward mask: dx = mask * g / (1 - p)
    torch.testing.assert_close(x.grad, torch.where(keep, g / (1 - p), torch.zeros_like(g)))


def test_dropout_masks_differ_per_segment(device):
    d = 32
    x = rand(16, d, device=device)
    eye2 = torch.cat([torch.eye(d), torch.eye(d)]).double().to(device)
    z = ops.lora_down(x, None, eye2, 0.5, S(5, x), 0, d)
    assert not torch.equal(z[:, :d] != 0, z[:, d:] != 0)


def test_dropout_is_sum_then_mask(device):
    d = 16
    x, xp = rand(8, d, device=device), rand(8, d, device=device)
    eye = torch.eye(d, dtype=torch.float64, device=device)
    z = ops.lora_down(x, xp, eye, 0.5, S(3, x), 0, d)
    keep = z != 0
    torch.testing.assert_close(z[keep], ((x + xp) / 0.5)[keep])


@pytest.mark.gpu
def test_cpu_and_cuda_masks_agree():
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        x = rand(33, 17).to(dtype)
        eye = torch.eye(17, dtype=dtype)
        zc = ops.lora_down(x, x, eye, 0.4, S(77, x), 0, 17)
        zg = ops.lora_down(x.cuda(), x.cuda(), eye.cuda(), 0.4, S(77, x.cuda()), 0, 17).cpu()
        assert torch.equal(zc != 0, zg != 0)


class Chain3(nn.Module):
    def __init__(self, variant):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            reslora.ResLoRALinear(nn.Linear(8, 8), r=2, lora_alpha=4, variant=variant, pre_num=-1) for _ in range(3)
        )
        for blk in self.blocks:
            nn.init.normal_(blk.lora_B)
        self.chain = reslora.ResLoRAChain(list(self.blocks))

    def forward(self, x):
        for blk in self.blocks:
            x = torch.tanh(blk(x))
        return x


@pytest.mark.parametrize(
    "variant,backend",
    [
        ("lora", "aot_eager"),
        ("is", "aot_eager"),
        ("bs", "aot_eager"),
        ("ms", "aot_eager"),
        pytest.param("is", "inductor", marks=pytest.mark.slow),
    ],
)
def test_torch_compile_fullgraph(variant, backend):
    model = Chain3(variant)
    x = torch.randn(4, 8)
    eager = model(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    for g, p in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, g)


# What AOTAutograd hands the compiler for a chain of 4 blocks with dropout, besides views and the
# one seed draw: one op per block forward and backward, and per variant only what
# docs/performance.md says ("What the compiler sees around the ops").
GRAPH_EXTRAS = {
    "lora": ({}, {}),
    "is": ({}, {"aten.add.Tensor": 4}),
    "ms": ({}, {}),
    "bs": ({"aten.cat.default": 6}, {"aten.slice.Tensor": 12, "aten.add.Tensor": 6}),
}


@pytest.mark.parametrize("variant", sorted(GRAPH_EXTRAS))
def test_compiled_graphs_hold_one_op_per_block(variant):
    from collections import Counter

    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs = []

    def name(node):
        # the block op declares its statistics buffers mutable: functionalized, it is wrapped
        if str(node.target) == "auto_functionalized_v2":
            return str(node.args[0])
        return str(node.target)

    def compiler(gm, example_inputs):
        graphs.append(Counter(name(n) for n in gm.graph.nodes if n.op == "call_function"))
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=compiler, bw_compiler=compiler)

    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    cfg = reslora.ResLoRAConfig(r=4, variant=variant, lora_dropout=0.05, target_modules=[str(i) for i in range(4)])
    model = reslora.get_reslora_model(base, cfg).train()
    x = torch.randn(8, 16, requires_grad=True)
    torch.compile(model, backend=backend, fullgraph=True)(x).sum().backward()
    # is / ms blocks recorded their statistics inside their op, once each
    recorded = [int(blk.stats_count) for blk in model.blocks.values()]
    assert recorded == [1 if variant in ("is", "ms") else 0] * 4
    fw, bw = graphs
    assert fw.pop("reslora.lora_linear.default") == 4 and bw.pop("reslora._lora_linear_backward.default") == 4
    assert fw.pop("aten.randint.low") == 1  # the pass's dropout seed
    views = {"<built-in function getitem>", "aten.detach.default"}
    for counts, want in zip((fw, bw), GRAPH_EXTRAS[variant]):
        assert {k: v for k, v in counts.items() if k not in views} == want


def autograd_nodes(t):
    """The autograd nodes behind t, counted by name (each node once)."""
    from collections import Counter

    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [n for n, _ in node.next_functions]
    return Counter(node.name() for node in seen)


# What an eager training step dispatches for the same chain (its input needs no gradient here),
# besides views: one op per block forward and backward, the pass's one seed draw, and per variant
# only the extras the compiled graphs hold: is sums the gradients of blocks 1 and 2's inputs
# (their own op's and the next block's shortcut); bs sums each earlier block's A and B gradients
# with slices of the next block's, and one such sum keeps a column slice's strides, which
# AccumulateGrad copies into the parameter's layout.
EAGER_EXTRAS = {
    "lora": ({}, {}),
    "is": ({}, {"aten.add.Tensor": 2}),
    "ms": ({}, {}),
    "bs": (
        {"aten.cat.default": 6},
        {
            "aten.slice.Tensor": 12,
            "aten.add.Tensor": 6,
            "aten.new_empty_strided.default": 1,
            "aten.copy_.default": 1,
        },
    ),
}


@pytest.mark.parametrize("variant", sorted(EAGER_EXTRAS))
def test_eager_steps_dispatch_one_op_per_block(variant):
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Dispatched(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    cfg = reslora.ResLoRAConfig(r=4, variant=variant, lora_dropout=0.05, target_modules=[str(i) for i in range(4)])
    model = reslora.get_reslora_model(base, cfg).train()
    x = torch.randn(8, 16)
    for _ in range(2):  # the second step, as every later one: the gradients were set to None
        model.zero_grad(set_to_none=True)
        with Dispatched() as fw:
            loss = model(x).sum()
        # one autograd node per block, whatever the variant joins (bs: no node for the earlier
        # blocks' A and B, which the op takes as they are)
        nodes = Counter(node.split("::")[-1] for node in autograd_nodes(loss).elements())
        assert nodes == {"SumBackward0": 1, "LoraLinearFunction>": 4, "AccumulateGrad": 8}  # A, B
        with Dispatched() as bw:
            loss.backward()
    assert fw.ops.pop("reslora.lora_linear.default") == 4 and bw.ops.pop("reslora._lora_linear_backward.default") == 4
    assert fw.ops.pop("aten.randint.low") == 1 and fw.ops.pop("aten.sum.default") == 1
    assert bw.ops.pop("aten.ones_like.default") == 1  # the loss's gradient
    views = {"aten.detach.default", "aten.expand.default"}
    for counts, want in zip((fw.ops, bw.ops), EAGER_EXTRAS[variant]):
        assert {k: v for k, v in counts.items() if k not in views} == want


def test_ms_reaching_every_earlier_block_adds_one_running_sum_per_block():
    # pre_num -1: block n's shortcut is the sum of the n earlier mid activations, carried as a
    # running sum (one add per block; summing them anew would take n - 1 adds in block n), and
    # the outputs are the float64 reference's.
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(8, 8).double() for _ in range(6)])
    cfg = reslora.ResLoRAConfig(
        r=2, variant="ms", pre_num=-1, init_lora_weights=False, target_modules=[str(i) for i in range(6)]
    )
    model = reslora.get_reslora_model(base, cfg).train()
    x = torch.randn(5, 8, dtype=torch.float64)
    out = model(x)
    assert autograd_nodes(out)["AddBackward0"] == 4  # the sums of blocks 1 to 4
    h, mids = x, []
    for blk in model.blocks.values():
        z = h @ blk.lora_A.T
        h = blk.base_layer(h) + blk.scaling * (z + sum(mids, torch.zeros_like(z))) @ blk.lora_B.T
        mids.append(z)
    torch.testing.assert_close(out, h)


# --- bad input ---------------------------------------------------------------------------------


def bad(fn, msg):
    with pytest.raises(RuntimeError, match=msg):
        fn()


def test_bad_input_messages():
    x, W, B = rand(3, 4), rand(5, 4), rand(5, 2)
    A, z = rand(2, 4), rand(3, 2)
    bad(
        lambda: ops.lora_down(x, None, rand(2, 4, 1), 0.0, S(0, x), 0, 2),
        r"A must be a 2-D tensor \[r, d_in\] = \[r, 4\], got a 3-D tensor of shape \[2, 4, 1\]",
    )
    bad(
        lambda: ops.lora_down(x, None, rand(2, 5), 0.0, S(0, x), 0, 2),
        r"A must have shape \[r, d_in\] = \[2, 4\], got \[2, 5\]",
    )
    bad(lambda: ops.lora_down(x, None, rand(0, 4), 0.0, S(0, x), 0, 1), r"A must have r >= 1 rows, got shape \[0, 4\]")
    bad(
        lambda: ops.lora_down(x, None, A.float(), 0.0, S(0, x), 0, 2),
        r"A must have the dtype of x \(Double\), got Float",
    )
    bad(
        lambda: ops.lora_down(x, None, torch.empty(2, 4, dtype=torch.float64, device="meta"), 0.0, S(0, x), 0, 2),
        r"A must be on the device of x \(cpu\), got meta",
    )
    bad(
        lambda: ops.lora_down(x, rand(3, 5), A, 0.0, S(0, x), 0, 2),
        r"x_prev must have the shape of x \[3, 4\], got \[3, 5\]",
    )
    bad(lambda: ops.lora_down(x, None, A, 1.0, S(0, x), 0, 2), r"dropout must be in \[0, 1\), got 1")
    bad(lambda: ops.lora_down(x, None, A, -0.1, S(0, x), 0, 2), r"dropout must be in \[0, 1\), got -0.1")
    bad(
        lambda: ops.lora_down(x, None, A, 0.0, S(0, x), 0, 3),
        r"block_rank must be >= 1 and divide the rows of A \(2\), got 3",
    )
    bad(
        lambda: ops.lora_down(x.long(), None, A.long(), 0.0, S(0, x.long()), 0, 2),
        r"x must be float32, float64, float16 or bfloat16, got Long",
    )
    bad(
        lambda: ops.lora_up(x, rand(5, 3), None, z, B, 1.0),
        r"weight must have shape \[d_out, d_in\] = \[5, 4\], got \[5, 3\]",
    )
    bad(lambda: ops.lora_up(x, W, None, z, rand(6, 2), 1.0), r"B must have shape \[d_out, r\] = \[5, 2\], got \[6, 2\]")
    bad(lambda: ops.lora_up(x, W, None, rand(3, 3), B, 1.0), r"z must have shape \[..., r\] = \[3, 2\], got \[3, 3\]")
    bad(lambda: ops.lora_up(x, W, rand(4), z, B, 1.0), r"bias must have shape \[d_out\] = \[5\], got \[4\]")
    bad(lambda: ops.lora_up(x, W.float(), None, z, B, 1.0), r"weight must have the dtype of x \(Double\), got Float")
    bad(lambda: ops.lora_up(x, W, None, z, B, float("inf")), r"scaling must be finite, got inf")
    bad(lambda: ops.lora_up(x, W, None, z, B, float("nan")), r"scaling must be finite, got nan")
    bad(lambda: ops.lora_up(x, W.requires_grad_(), None, z, B, 1.0), r"weight must be frozen")


def test_bad_layer_and_chain_input():
    with pytest.raises(ValueError, match=r"r must be an int >= 1, got 0"):
        reslora.ResLoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match=r"lora_dropout must be a number in \[0, 1\) .*, got 1.5"):
        reslora.ResLoRALinear(nn.Linear(4, 4), r=2, lora_dropout=1.5)
    with pytest.raises(ValueError, match=r"lora_alpha must be a finite number"):
        reslora.ResLoRALinear(nn.Linear(4, 4), r=2, lora_alpha=float("inf"))
    with pytest.raises(ValueError, match=r"variant must be one of"):
        reslora.ResLoRALinear(nn.Linear(4, 4), r=2, variant="xs")
    a = reslora.ResLoRALinear(nn.Linear(4, 4), r=2, variant="is")
    b = reslora.ResLoRALinear(nn.Linear(4, 8), r=2, variant="is")
    with pytest.raises(
        ValueError,
        match=r"block 1 must have the head's shape \[d_out, d_in\] = \[4, 4\] for the 'is' shortcut, got \[8, 4\]",
    ):
        reslora.ResLoRAChain([a, b], name="q_proj")
    blocks = [reslora.ResLoRALinear(nn.Linear(4, 4), r=2, variant="ms") for _ in range(2)]
    reslora.ResLoRAChain(blocks, name="v_proj")
    with pytest.raises(RuntimeError, match=r"block 1 of chain 'v_proj' needs the mid activation of block 0"):
        blocks[1](torch.randn(2, 4))
    with pytest.raises(
        ValueError, match=r"merge 'mid' does not apply to variant 'is'; expected one of 'input', 'weight'"
    ):
        reslora.merge_chain([reslora.ResLoRALinear(nn.Linear(4, 4), r=2, variant="is")], "mid")
    with pytest.raises(ValueError, match=r"merge must be one of 'exact', 'input', 'weight', 'mid', 'fit', got 'dense'"):
        reslora.merge_chain([reslora.ResLoRALinear(nn.Linear(4, 4), r=2, variant="bs")], "dense")


def test_stats_ring_buffer():
    ring = torch.zeros(3)
    zr = torch.zeros(3)
    count = torch.zeros(1, dtype=torch.long)
    assert ops.stats_mean(ring, count).item() == 0
    for v in [1.0, 2.0, 3.0, 4.0]:
        ops.record_stats_(ring, zr, count, torch.tensor([v]), torch.tensor([2 * v]))
    assert count.item() == 4
    assert ring.tolist() == [4.0, 2.0, 3.0]  # the oldest slot was overwritten
    assert ops.stats_mean(ring, count).item() == pytest.approx(3.0)
    assert ops.stats_mean(zr, count).item() == pytest.approx(6.0)
    ops.record_stats_(ring, zr, count, torch.ones(2, 2, requires_grad=True), torch.ones(1))
    assert not ring.requires_grad


def test_record_stats_bad_input_messages():
    ring, count, x = torch.zeros(3), torch.zeros(1, dtype=torch.long), torch.ones(2)
    bad(
        lambda: ops.record_stats_(torch.zeros(3, 1), ring, count, x, x),
        r"record_stats_: x_norms must be a 1-D floating tensor .* got Float of shape \[3, 1\]",
    )
    bad(
        lambda: ops.record_stats_(ring, torch.zeros(3, dtype=torch.long), count, x, x),
        r"record_stats_: z_norms must be a 1-D floating tensor .* got Long of shape \[3\]",
    )
    bad(
        lambda: ops.record_stats_(ring, torch.zeros(2), count, x, x),
        r"record_stats_: z_norms must have the length of x_norms \(3\), got 2",
    )
    bad(
        lambda: ops.record_stats_(ring, ring.clone(), torch.zeros(1), x, x),
        r"record_stats_: count must be an int64 tensor with one element, got Float of shape \[1\]",
    )
    bad(
        lambda: ops.record_stats_(ring, ring.clone(), torch.zeros(2, dtype=torch.long), x, x),
        r"record_stats_: count must be an int64 tensor with one element, got Long of shape \[2\]",
    )
    assert count.item() == 0 and ring.tolist() == [0.0, 0.0, 0.0]  # nothing was written


def test_build_info():
    info = reslora.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cuda_kernels"] == ("CUDA" in torch._C._dispatch_dump("reslora::lora_down"))
    # The Hopper extra-K GEMM exists only inside the CUDA backend; the loader's record agrees.
    assert isinstance(info["extra_k_gemm"], bool) and (info["cuda_kernels"] or not info["extra_k_gemm"])
    record = json.loads((pathlib.Path(reslora.__file__).parent / "build_info.json").read_text())
    assert bool(record["extra_k_gemm"]) == info["extra_k_gemm"]


# --- the fused block op ------------------------------------------------------------------------
