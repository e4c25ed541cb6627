"""The block op lora_linear (one autograd node per block) against lora_down then lora_up, its
gradients, bias training, autocast and opcheck; the ops' tags, the refusal of double backward,
and the loader's message when the core does not load."""

import json

import pytest
import torch

from op_refs import rand
from seeds import S

ops = torch.ops.reslora


def block_args(device, with_prev, with_extra, segments=2, r=2, requires_grad=True):
    torch.manual_seed(3)
    R = segments * r
    x = rand(2, 3, 6, device=device, requires_grad=requires_grad)
    xp = rand(2, 3, 6, device=device, requires_grad=requires_grad) if with_prev else None
    W, b = rand(5, 6, device=device), rand(5, device=device)
    A = rand(R, 6, device=device, requires_grad=requires_grad)
    B = rand(5, R, device=device, requires_grad=requires_grad)
    ze = rand(2, 3, R, device=device, requires_grad=requires_grad) if with_extra else None
    return x, xp, W, b, A, B, ze, r


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("with_prev,with_extra", [(False, False), (True, False), (False, True)])
def test_lora_linear_matches_down_then_up(dropout, with_prev, with_extra, device):
    x, xp, W, b, A, B, ze, r = block_args(device, with_prev, with_extra)
    y, z = ops.lora_linear(x, xp, W, b, A, B, ze, 1.5, dropout, S(11, x), 0, r)
    z_ref = ops.lora_down(x, xp, A, dropout, S(11, x), 0, r)
    y_ref = ops.lora_up(x, W, b, z_ref if ze is None else z_ref + ze, B, 1.5)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(y, y_ref)
    gy, gz = torch.randn_like(y), torch.randn_like(z)
    leaves = [t for t in (x, xp, A, B, ze) if t is not None]
    got = torch.autograd.grad((y * gy).sum() + (z * gz).sum(), leaves)
    want = torch.autograd.grad((y_ref * gy).sum() + (z_ref * gz).sum(), leaves)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("with_prev,with_extra", [(False, False), (True, False), (False, True)])
def test_gradcheck_lora_linear(dropout, with_prev, with_extra, device):
    x, xp, W, b, A, B, ze, r = block_args(device, with_prev, with_extra)

    def f(x, xp, A, B, ze):
        y, z = ops.lora_linear(x, xp, W, b, A, B, ze, 0.7, dropout, S(5, x), 0, r)
        return y, z

    assert torch.autograd.gradcheck(f, (x, xp, A, B, ze))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_linear_trains_the_bias(device, dropout):
    # PEFT's bias="all" / "lora_only": the bias gets dY summed over the tokens; W stays frozen.
    x, xp, W, b, A, B, ze, r = block_args(device, True, False)
    b = b.detach().clone().requires_grad_()

    def f(x, xp, b, A, B):
        return ops.lora_linear(x, xp, W, b, A, B, None, 0.7, dropout, S(5, x), 0, r)

    assert torch.autograd.gradcheck(f, (x, xp, b, A, B))
    y, _ = f(x, xp, b, A, B)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(b.grad, g.reshape(-1, g.shape[-1]).sum(0))
    b2 = b.detach().clone().requires_grad_()
    yu = ops.lora_up(x, W, b2, torch.randn(*x.shape[:-1], B.shape[1], dtype=x.dtype, device=x.device), B, 0.7)
    yu.backward(g)
    torch.testing.assert_close(b2.grad, g.reshape(-1, g.shape[-1]).sum(0))


def test_opcheck_lora_linear(device):
    for with_prev, with_extra, p in [(True, False, 0.25), (False, True, 0.0), (False, False, 0.5)]:
        x, xp, W, b, A, B, ze, r = block_args(device, with_prev, with_extra)
        torch.library.opcheck(ops.lora_linear.default, (x, xp, W, b, A, B, ze, 2.0, p, S(3, x), 0, r))
        d = lambda t: None if t is None else t.detach()  # noqa: E731
        y, z = ops.lora_linear(d(x), d(xp), W, b, d(A), d(B), d(ze), 2.0, p, S(3, d(x)), 0, r)
        torch.library.opcheck(
            ops._lora_linear_backward.default,
            (
                torch.randn_like(y),
                torch.randn_like(z),
                d(x),
                d(xp),
                W,
                d(A),
                d(B),
                z,
                d(ze),
                2.0,
                p,
                S(3, d(x)),
                0,
                r,
                True,
            ),
        )
        torch.library.opcheck(
            ops._lora_linear_backward.default,
            (torch.randn_like(y), None, d(x), d(xp), W, d(A), d(B), z, d(ze), 2.0, p, S(3, d(x)), 0, r, False),
        )


def stats_buffers(device, window=3):
    f32 = dict(device=device, dtype=torch.float32)
    return torch.zeros(window, **f32), torch.zeros(window, **f32), torch.zeros(1, dtype=torch.long, device=device)


@pytest.mark.parametrize("segments", [1, 2])
def test_lora_linear_records_the_statistics_of_record_stats(segments, device):
    # The block's op with the statistics buffers records what record_stats_ records for x and the
    # block's own z (its first block_rank columns), slot after slot; its outputs and gradients
    # are those of the op without them, and opcheck holds with the mutation declared.
    x, xp, W, b, A, B, ze, r = block_args(device, True, False, segments=segments)
    got, want = stats_buffers(device), stats_buffers(device)
    for step in range(4):  # past the window of 3: the ring wraps
        seed = S(step, x)
        y, z = ops.lora_linear(x, xp, W, b, A, B, ze, 2.0, 0.25, seed, 1, r, *got)
        y_ref, z_ref = ops.lora_linear(x, xp, W, b, A, B, ze, 2.0, 0.25, seed, 1, r)
        ops.record_stats_(*want, x.detach(), z_ref.detach()[..., :r])
        torch.testing.assert_close((y, z), (y_ref, z_ref), rtol=0, atol=0)
        gy = torch.randn_like(y)
        leaves = (x, xp, A, B)
        torch.testing.assert_close(
            torch.autograd.grad((y * gy).sum(), leaves), torch.autograd.grad((y_ref * gy).sum(), leaves), rtol=0, atol=0
        )
        x = (x.detach() * 1.5).requires_grad_()  # other norms each step
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert got[2].item() == 4 and not got[0].requires_grad
    torch.library.opcheck(ops.lora_linear.default, (x, xp, W, b, A, B, ze, 2.0, 0.25, S(9, x), 1, r, *got))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_linear_joins_the_shortcut_lists(dropout, device):
    # bs: the earlier blocks' A and B as lists give the outputs of the op on their concatenation,
    # and each list entry gets its own slice of that op's gradients.
    x, xp, W, b, A, B, ze, r = block_args(device, False, False, segments=3)
    parts_A = [t.detach().clone().requires_grad_() for t in A.split(r, 0)]
    parts_B = [t.detach().clone().requires_grad_() for t in B.split(r, 1)]
    seed = S(4, x)
    y, z = ops.lora_linear(x, None, W, b, parts_A[0], parts_B[0], None, 1.5, dropout, seed, 2, r,
                           None, None, None, parts_A[1:], parts_B[1:])  # fmt: skip
    y_ref, z_ref = ops.lora_linear(x, None, W, b, A, B, None, 1.5, dropout, seed, 2, r)
    torch.testing.assert_close((y, z), (y_ref, z_ref), rtol=0, atol=0)
    gy, gz = torch.randn_like(y), torch.randn_like(z)
    got = torch.autograd.grad((y * gy).sum() + (z * gz).sum(), [x] + parts_A + parts_B)
    want = torch.autograd.grad((y_ref * gy).sum() + (z_ref * gz).sum(), [x, A, B])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(got[1:4], 0), want[1], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(got[4:], 1), want[2], rtol=0, atol=0)
    torch.library.opcheck(
        ops.lora_linear.default,
        (
            x,
            None,
            W,
            b,
            parts_A[0],
            parts_B[0],
            None,
            1.5,
            dropout,
            seed,
            2,
            r,
            None,
            None,
            None,
            parts_A[1:],
            parts_B[1:],
        ),
    )


def test_lora_linear_bad_input():
    x, xp, W, b, A, B, ze, r = block_args("cpu", False, True, requires_grad=False)
    with pytest.raises(RuntimeError, match=r"z_shortcut must have shape \[2, 3, 4\], got \[2, 3, 3\]"):
        ops.lora_linear(x, None, W, b, A, B, ze[..., :3], 1.0, 0.0, S(0, x), 0, r)
    with pytest.raises(RuntimeError, match=r"lora_linear: weight must be frozen \(requires_grad=False\)"):
        ops.lora_linear(x, None, W.requires_grad_(), b, A, B, None, 1.0, 0.0, S(0, x), 0, r)
    W.requires_grad_(False)
    xn, zn, count = stats_buffers("cpu")
    with pytest.raises(
        RuntimeError,
        match=r"lora_linear: x_norms, z_norms and stats_count must be given together or not at all, got x_norms alone",
    ):
        ops.lora_linear(x, None, W, b, A, B, None, 1.0, 0.0, S(0, x), 0, r, xn, None, None)
    with pytest.raises(RuntimeError, match=r"lora_linear: z_norms must have the length of x_norms \(3\), got 4"):
        ops.lora_linear(x, None, W, b, A, B, None, 1.0, 0.0, S(0, x), 0, r, xn, torch.zeros(4), count)
    with pytest.raises(RuntimeError, match=r"lora_linear: count must be an int64 tensor with one element, got Float"):
        ops.lora_linear(x, None, W, b, A, B, None, 1.0, 0.0, S(0, x), 0, r, xn, zn, count.float())
    a, bb = A[:r], B[:, :r]
    args = (x, None, W, b, a, bb, None, 1.0, 0.0, S(0, x), 0, r, None, None, None)
    with pytest.raises(
        RuntimeError, match=r"A_shortcut and B_shortcut must have one entry per earlier block each, got 1 and 0"
    ):
        ops.lora_linear(*args, [a], [])
    with pytest.raises(
        RuntimeError, match=r"A_shortcut\[0\] must have shape \[block_rank, d_in\] = \[2, 6\], got \[3, 6\]"
    ):
        ops.lora_linear(*args, [torch.randn(3, 6)], [bb])
    with pytest.raises(
        RuntimeError, match=r"B_shortcut\[0\] must have shape \[d_out, block_rank\] = \[5, 2\], got \[4, 2\]"
    ):
        ops.lora_linear(*args, [a], [torch.randn(4, 2)])
    with pytest.raises(
        RuntimeError, match=r"A_shortcut\[0\] and B_shortcut\[0\] must have the dtype and device of A and B"
    ):
        ops.lora_linear(*args, [a.float()], [bb])


def test_load_failure_names_built_and_found_versions(monkeypatch):
    import builtins

    from reslora import _lib

    real_import = builtins.__import__

    def failing(name, globals=None, locals=None, fromlist=(), level=0):
        if fromlist and "_C" in fromlist and globals and globals.get("__name__") == "reslora._lib":
            raise ImportError("undefined symbol: _ZN3c105ErrorC2E")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", failing)
    record = json.loads((_lib._HERE / "build_info.json").read_text())
    with pytest.raises(ImportError) as e:
        _lib.load()
    msg = str(e.value)
    assert "undefined symbol" in msg
    assert f"Found torch {torch.__version__}" in msg
    assert f"built for torch {record['torch_version']}" in msg


def test_lora_linear_under_autocast_casts_like_linear():
    x, xp, W, b, A, B, ze, r = block_args("cpu", True, False)
    x, xp, A, B = (t.detach().float().requires_grad_() for t in (x, xp, A, B))
    W, b = W.float(), b.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, z = ops.lora_linear(x, xp, W, b, A, B, None, 2.0, 0.0, S(0, x), 0, r)
    assert y.dtype == z.dtype == torch.bfloat16
    bf = [t.bfloat16() for t in (x, xp, W, b, A, B)]
    y_ref, z_ref = ops.lora_linear(bf[0], bf[1], bf[2], bf[3], bf[4], bf[5], None, 2.0, 0.0, S(0, bf[0]), 0, r)
    assert torch.equal(y, y_ref) and torch.equal(z, z_ref)
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


OPS = [
    "lora_down",
    "lora_up",
    "lora_linear",
    "_lora_down_backward",
    "_lora_up_backward",
    "_lora_linear_backward",
    "record_stats_",
    "stats_mean",
    "draw_seed",
]


@pytest.mark.parametrize("name", OPS)
def test_every_op_is_tagged_pt2_compliant(name):
    # they pass opcheck (above), so torch.compile and torch.export may trust their schemas
    assert torch.Tag.pt2_compliant_tag in getattr(ops, name).default.tags


def test_double_backward_is_refused_with_a_clear_error(device):
    x = rand(3, 4, device=device, requires_grad=True)
    W, A, B = rand(5, 4, device=device), rand(2, 4, device=device, requires_grad=True), rand(5, 2, device=device)
    first_order = {
        "_lora_linear_backward": lambda: ops.lora_linear(x, None, W, None, A, B, None, 1.0, 0.0, None, 0, 2)[0],
        "_lora_down_backward": lambda: ops.lora_down(x, None, A, 0.0, None, 0, 2),
        "_lora_up_backward": lambda: ops.lora_up(x, W, None, rand(3, 2, device=device, requires_grad=True), B, 1.0),
    }
    for op, forward in first_order.items():
        (gx,) = torch.autograd.grad(forward().square().sum(), x, create_graph=True)
        assert gx.requires_grad  # the first-order gradient is there, as a graph
        with pytest.raises(RuntimeError, match=rf"reslora::{op}: double backward is not supported"):
            gx.sum().backward()
    # without create_graph the backward ops make no graph and first-order training is untouched
    y = ops.lora_linear(x, None, W, None, A, B, None, 1.0, 0.0, None, 0, 2)[0]
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert not gx.requires_grad
