"""CUDA kernels against the CPU reference ops: every variant's block op, dtypes, dropout on and
off (same seed, same mask on both devices), odd shapes, empty batches, CUDA graphs through
torch.compile(mode="reduce-overhead") and a training step captured with torch.cuda.graph. Skipped without a GPU."""

import pytest
import torch
from torch import nn

import reslora

from seeds import S

pytestmark = pytest.mark.gpu
ops = torch.ops.reslora

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def case(n, d_in, d_out, R, dtype, with_prev, with_extra, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return dict(
        x=t(n, d_in),
        xp=t(n, d_in) if with_prev else None,
        W=t(d_out, d_in),
        b=t(d_out),
        A=t(R, d_in) * 0.3,
        B=t(d_out, R) * 0.3,
        ze=t(n, R) if with_extra else None,
    )


def run(c, device, p, seg, requires_grad=True):
    moved = {
        k: (None if v is None else v.to(device).requires_grad_(requires_grad and k not in ("W", "b")))
        for k, v in c.items()
    }
    y, z = ops.lora_linear(
        moved["x"],
        moved["xp"],
        moved["W"],
        moved["b"],
        moved["A"],
        moved["B"],
        moved["ze"],
        1.7,
        p,
        S(1234, moved["x"]),
        0,
        seg,
    )
    gy = torch.ones_like(y)
    leaves = [moved[k] for k in ("x", "xp", "A", "B", "ze") if moved[k] is not None]
    grads = torch.autograd.grad((y * gy).sum() + z.sum(), leaves)
    return [y, z, *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize(
    "d_in,d_out,r,segments", [(13, 7, 1, 1), (64, 40, 3, 2), (96, 33, 64, 1), (200, 72, 128, 1), (24, 24, 4, 3)]
)
@pytest.mark.parametrize("with_prev,with_extra", [(False, False), (True, False), (False, True)])
def test_block_op_cuda_matches_cpu(dtype, p, d_in, d_out, r, segments, with_prev, with_extra):
    c = case(37, d_in, d_out, r * segments, dtype, with_prev, with_extra)
    cpu = run(c, "cpu", p, r)
    gpu = run(c, "cuda", p, r)
    for a, b in zip(cpu, gpu):
        scale = a.double().abs().max().item() + 1
        err = (a.double() - b.double().cpu()).abs().max().item()
        assert err <= TOL[dtype] * scale, (err, scale)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_same_mask_on_both_devices(p):
    x = torch.randn(64, 29, dtype=torch.float64)
    eye = torch.eye(29, dtype=torch.float64)
    zc = ops.lora_down(x, x, eye, p, S(99, x), 0, 29)
    zg = ops.lora_down(x.cuda(), x.cuda(), eye.cuda(), p, S(99, x.cuda()), 0, 29).cpu()
    assert torch.equal(zc != 0, zg != 0)
    torch.testing.assert_close(zc, zg)


def test_empty_batch_cuda():
    c = case(0, 16, 8, 4, torch.bfloat16, True, False)
    y, z, *grads = run(c, "cuda", 0.1, 4)
    assert y.shape == (0, 8) and z.shape == (0, 4)
    assert grads[0].shape == (0, 16)


@pytest.mark.parametrize("variant", ["lora", "is", "bs", "ms"])
def test_compile_reduce_overhead(variant):
    torch.manual_seed(0)
    blocks = nn.ModuleList(
        reslora.ResLoRALinear(nn.Linear(32, 32), r=4, lora_alpha=8, variant=variant, pre_num=-1) for _ in range(3)
    ).cuda()
    for blk in blocks:
        nn.init.normal_(blk.lora_B, std=0.1)
    reslora.ResLoRAChain(list(blocks))
    blocks.eval()

    def f(x):
        for blk in blocks:
            x = torch.tanh(blk(x))
        return x

    x = torch.randn(8, 32, device="cuda")
    with torch.no_grad():
        eager = f(x)
        compiled = torch.compile(f, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):  # warm up, record the CUDA graph, replay it
            out = compiled(x)
    torch.testing.assert_close(out, eager)


# (tokens, width) of the graph-captured chains: small (the generic path), and large enough for
# the Hopper extra-K GEMM in bf16 (4096 x 1024 is 128 output tiles).
GRAPH_SIZES = [(40, 64), (4096, 1024)]


def graph_chain(variant, dtype, dropout=0.0, width=64):
    torch.manual_seed(0)
    blocks = (
        nn.ModuleList(
            reslora.ResLoRALinear(
                nn.Linear(width, width, bias=False),
                r=8,
                lora_alpha=16,
                variant=variant,
                lora_dropout=dropout,
                pre_num=1,
            )
            for _ in range(3)
        )
        .cuda()
        .to(dtype)
    )
    for blk in blocks:
        nn.init.normal_(blk.lora_B, std=0.1)
    reslora.ResLoRAChain(list(blocks))
    return blocks.train()


def chain_loss(blocks, x):
    for blk in blocks:
        x = torch.tanh(blk(x))
    return x.float().square().sum()


@pytest.mark.parametrize("size", GRAPH_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["lora", "is", "bs", "ms"])
def test_training_step_in_cuda_graph(variant, dtype, size):
    """Forward and backward captured once with torch.cuda.graph and replayed on new inputs give
    the gradients of eager steps (no host syncs, everything on the current stream)."""
    tokens, width = size
    blocks = graph_chain(variant, dtype, width=width)
    params = [p for p in blocks.parameters() if p.requires_grad]
    static_x = torch.randn(tokens, width, device="cuda", dtype=dtype, requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (allocates .grad) off the capturing stream
        for _ in range(2):
            chain_loss(blocks, static_x).backward()
    torch.cuda.current_stream().wait_stream(side)
    for p in params + [static_x]:
        p.grad = None  # the captured backward allocates them from the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain_loss(blocks, static_x).backward()
    static_grads = [p.grad for p in params + [static_x]]
    for _ in range(2):
        new_x = torch.randn(tokens, width, device="cuda", dtype=dtype)
        with torch.no_grad():
            static_x.copy_(new_x)
        graph.replay()
        eager_x = new_x.clone().requires_grad_(True)
        want = torch.autograd.grad(chain_loss(blocks, eager_x), params + [eager_x])
        for got, ref in zip(static_grads, want):
            torch.testing.assert_close(got, ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("size", GRAPH_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["lora", "is", "bs", "ms"])
def test_training_step_with_dropout_in_cuda_graph_draws_fresh_masks(variant, dtype, size):
    """The pass seed is drawn on the device inside the graph: every replay draws new masks (two
    replays on one input differ), and each replay equals an eager step from the generator state
    it started from."""
    tokens, width = size
    blocks = graph_chain(variant, dtype, dropout=0.3, width=width)
    params = [p for p in blocks.parameters() if p.requires_grad]
    static_x = torch.randn(tokens, width, device="cuda", dtype=dtype, requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            chain_loss(blocks, static_x).backward()
    torch.cuda.current_stream().wait_stream(side)
    for p in params + [static_x]:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain_loss(blocks, static_x).backward()
    static_grads = [p.grad for p in params + [static_x]]
    replays = []
    for _ in range(2):
        state = torch.cuda.get_rng_state()
        graph.replay()
        replays.append([g.clone() for g in static_grads])
        torch.cuda.set_rng_state(state)
        eager_x = static_x.detach().clone().requires_grad_(True)
        want = torch.autograd.grad(chain_loss(blocks, eager_x), params + [eager_x])
        for got, ref in zip(replays[-1], want):
            torch.testing.assert_close(got, ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert not torch.equal(replays[0][-1], replays[1][-1])  # a fresh mask on every replay


@pytest.mark.parametrize("variant", ["lora", "ms", "bs"])
def test_whole_hf_training_step_in_one_cuda_graph(variant):
    """A wrapped Llama's training step (forward, backward, AdamW with capturable=True) captured
    once in a CUDA graph and replayed on new batches copied into its static inputs trains as the
    same steps run eagerly (docs/performance.md, "Capturing the step")."""
    import copy

    from hf_models import llama

    torch.manual_seed(0)
    # dropout off: replays draw other masks than the eager steps, so the two could not be compared
    # (test_training_step_with_dropout_in_cuda_graph_draws_fresh_masks covers dropout in a graph)
    cfg = reslora.ResLoRAConfig(r=4, variant=variant, target_modules="all-linear", lora_dropout=0.0)
    eager = reslora.get_reslora_model(llama().cuda(), cfg)
    for blk in eager.blocks.values():
        nn.init.normal_(blk.lora_B, std=0.02)
    graphed = copy.deepcopy(eager)
    batches = [torch.randint(0, 64, (2, 16), device="cuda") for _ in range(6)]

    def optimizer(m):
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, capturable=True)

    opt_e, opt_g = optimizer(eager), optimizer(graphed)
    static = batches[0].clone()

    def step(m, opt, ids):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for ids in batches[:3]:  # warm-up steps, the same on both copies
            static.copy_(ids)
            step(graphed, opt_g, static)
    torch.cuda.current_stream().wait_stream(side)
    for ids in batches[:3]:
        step(eager, opt_e, ids)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(graphed, opt_g, static)
    for ids in batches[3:]:
        static.copy_(ids)
        graph.replay()
        want = step(eager, opt_e, ids)
        torch.testing.assert_close(static_loss, want, rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(eager.named_parameters(), graphed.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)
