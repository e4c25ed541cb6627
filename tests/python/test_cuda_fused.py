"""The fused fp16 / bf16 low-rank kernels on the GPU against float64 references: shapes that span
many tiles and splits, rows and columns that are not multiples of the tile, the vector and the
element-wise load paths, several dropout segments, the is sum; that they are the kernels that
actually run; that they are deterministic. Skipped without a GPU."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import reslora

from seeds import S

pytestmark = pytest.mark.gpu
ops = torch.ops.reslora
SEED = 4321
# The Hopper GEMM with the low-rank product as extra K tiles (CUTLASS): it takes x W^T + s z B^T
# (and dy W + dz A without dropout) when the widths are multiples of 8 and the output has enough
# 128 x 256 tiles to fill a quarter of the GPU (the shapes below stay clear of that limit).
HOPPER = bool(reslora.build_info()["extra_k_gemm"]) and torch.cuda.get_device_capability()[0] == 9


def inputs(n, d_in, d_out, R, dtype, with_prev, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return dict(
        x=t(n, d_in),
        xp=t(n, d_in) if with_prev else None,
        W=t(d_out, d_in) * 0.1,
        A=t(R, d_in) * 0.1,
        B=t(d_out, R) * 0.1,
    )


def block(c, device, dtype, p, seg):
    """y, z and every gradient of one lora_linear block, in `dtype` on `device`."""
    m = {k: None if v is None else v.to(device, dtype).requires_grad_(k != "W") for k, v in c.items()}
    y, z = ops.lora_linear(m["x"], m["xp"], m["W"], None, m["A"], m["B"], None, 2.0, p, S(SEED, m["x"]), 0, seg)
    gy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y).to(device, dtype)
    leaves = [m[k] for k in ("x", "xp", "A", "B") if m[k] is not None]
    return [y, z, *torch.autograd.grad((y * gy).sum(), leaves)]


def close(ref, out, tol):
    for i, (a, b) in enumerate(zip(ref, out)):
        a, b = a.double().cpu(), b.double().cpu()
        err = (a - b).abs().max().item()
        assert err <= tol * (a.abs().max().item() + 1e-3), (i, err, a.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize(
    "n,d_in,d_out,r,segments",
    [
        (300, 520, 136, 16, 1),  # rows and columns past a tile, vector loads
        (1000, 130, 72, 8, 2),  # d_in % 8 != 0: element-wise loads; two dropout segments
        (70, 2048, 96, 32, 1),  # many splits of the long dimension
        (129, 64, 4100, 48, 1),  # rank 48 (three 16-wide fragments), wide output
        (64, 256, 64, 64, 2),  # the largest fused rank
        (20000, 72, 40, 16, 1),  # z past 1024 x 256 outputs: the split reduction's grid-stride loop
    ],
)
@pytest.mark.parametrize("with_prev", [False, True])
def test_fused_matches_float64(dtype, p, n, d_in, d_out, r, segments, with_prev):
    c = inputs(n, d_in, d_out, r * segments, dtype, with_prev)
    ref = block(c, "cpu", torch.float64, p, r)  # the same masks: they depend on the seed only
    out = block(c, "cuda", dtype, p, r)
    close(ref, out, 2e-2 if dtype == torch.bfloat16 else 4e-3)


def launches(fn):
    """{kernel name: launches} of the CUDA kernels fn() runs."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, {e.key: e.count for e in prof.key_averages()}


def count(calls, kernel):
    """Launches of the kernel named `kernel` (its whole name: up_dx_kernel is not
    grad_a_up_dx_kernel), or of every kernel whose name holds `kernel` when it has no '_kernel'."""
    if kernel.endswith("_kernel"):
        return sum(v for k, v in calls.items() if f"::{kernel}<" in k or k.startswith(f"{kernel}<"))
    return sum(v for k, v in calls.items() if kernel in k)


@pytest.mark.parametrize("block_rank,fused_backward", [(16, False), (32, True)])
def test_fused_kernels_run_and_are_deterministic(block_rank, fused_backward):
    c = inputs(500, 512, 256, 32, torch.bfloat16, True)
    first, calls = launches(lambda: block(c, "cuda", torch.bfloat16, 0.1, block_rank))
    assert count(calls, "down_kernel") == 1, calls
    # The forward's s z B^T: the up kernel (four output tiles: too few for the extra-K GEMM).
    assert count(calls, "up_out_kernel") == 1, calls
    assert count(calls, "ExtraKMainloop") == 0, calls
    if fused_backward:  # one segment: grad_A and the low-rank dx share one pass over x
        assert count(calls, "grad_a_up_dx_kernel") == 1, calls
        assert count(calls, "grad_a_kernel") == 0 and count(calls, "up_dx_kernel") == 0, calls
        # is: the pass writes the low-rank dx twice (x_prev's gradient and dx's C); no copy.
        assert count(calls, "Memcpy DtoD") == 0, calls
    else:  # two dropout segments: grad_A per segment, the up kernel sums the masked products
        assert count(calls, "grad_a_kernel") == 1 and count(calls, "up_dx_kernel") == 1, calls
        assert count(calls, "grad_a_up_dx_kernel") == 0, calls
    assert count(calls, "dropout_add_kernel") == 0, calls  # no full-size masked copy of x
    second = block(c, "cuda", torch.bfloat16, 0.1, block_rank)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d_out,R", [(1, 8, 1), (333, 1000, 16), (64, 130, 48), (257, 72, 64), (2049, 2048, 16)])
def test_fused_up_output_matches_float64(dtype, n, d_out, R):
    """lora_up without bias: the low-rank output comes from the up kernel (up to 2^22 output
    elements; cuBLAS past that), the base GEMM adds x W^T onto it; a single row, odd widths
    (element-wise path) and every fragment count. On Hopper the 2049 x 2048 case (136 tiles) is
    one extra-K GEMM instead."""
    g = torch.Generator().manual_seed(n)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x, W, z, B = t(n, 40), t(d_out, 40), t(n, R), t(d_out, R)
    ref = ops.lora_up(x.double(), W.double(), None, z.double(), B.double(), 0.75)
    out, calls = launches(lambda: ops.lora_up(x.cuda(), W.cuda(), None, z.cuda(), B.cuda(), 0.75))
    fused = HOPPER and n == 2049
    assert count(calls, "ExtraKMainloop") == int(fused), calls
    assert count(calls, "up_out_kernel") == (1 if n * d_out <= 1 << 22 and not fused else 0), calls
    close([ref], [out], 2e-2 if dtype == torch.bfloat16 else 4e-3)


def linear_block(c, device, dtype, p, bias, z_shortcut, scaling=0.75):
    """lora_linear with bias and z_shortcut (ms) as given: y, z and every gradient."""
    m = {k: None if v is None else v.to(device, dtype).requires_grad_(k != "W") for k, v in c.items()}
    b = None if bias is None else bias.to(device, dtype).requires_grad_()
    ze = None if z_shortcut is None else z_shortcut.to(device, dtype).requires_grad_()
    y, z = ops.lora_linear(
        m["x"], m["xp"], m["W"], b, m["A"], m["B"], ze, scaling, p, S(SEED, m["x"]), 0, m["A"].shape[0]
    )
    # Random upstream gradients: a smooth one makes the bias gradient (a column sum) cancel.
    g = torch.Generator().manual_seed(3)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device, dtype)
    gz = torch.randn(z.shape, generator=g, dtype=torch.float64).to(device, dtype)
    leaves = [t for t in (m["x"], m["xp"], m["A"], m["B"], b, ze) if t is not None]
    return [y, z, *torch.autograd.grad((y * gy).sum() + (z * gz).sum(), leaves)]


@pytest.mark.skipif(not HOPPER, reason="the extra-K GEMM runs on Hopper builds with CUTLASS")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("variant", ["lora", "is", "ms"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "n,d_in,d_out,r",
    [(2100, 520, 1032, 16), (1100, 1032, 2056, 3), (4500, 264, 136, 72), (2048, 520, 1024, 128)],
)
def test_extra_k_gemm_block_matches_float64(dtype, p, variant, bias, n, d_in, d_out, r):
    """The block whose products run as extra-K GEMMs on Hopper against float64: ragged tiles (M, N
    and K past a tile), ranks padded to 8 (3) or over one K tile (72, 128), the bias as the extra K's ones column, the is
    sum, ms's z_shortcut, dropout on (the forward fused, dx unfused) and off (dx fused too)."""
    c = inputs(n, d_in, d_out, r, dtype, variant == "is", seed=n + r)
    g = torch.Generator().manual_seed(7)
    b = torch.randn(d_out, generator=g, dtype=torch.float64).to(dtype) if bias else None
    ze = torch.randn(n, r, generator=g, dtype=torch.float64).to(dtype) if variant == "ms" else None
    ref = linear_block(c, "cpu", torch.float64, p, b, ze)
    out, calls = launches(lambda: linear_block(c, "cuda", dtype, p, b, ze))
    assert count(calls, "ExtraKMainloop") == (2 if p == 0.0 else 1), calls
    assert count(calls, "up_out_kernel") == 0, calls
    close(ref, out, 2e-2 if dtype == torch.bfloat16 else 4e-3)
    again = linear_block(c, "cuda", dtype, p, b, ze)
    for a, b2 in zip(out, again):
        assert torch.equal(a, b2)  # no split-K: deterministic


def wide_tiles(m, n):
    """128 x 256 output tiles of an m x n product."""
    return -(-m // 128) * -(-n // 256)


@pytest.mark.skipif(not HOPPER, reason="the extra-K GEMM runs on Hopper builds with CUTLASS")
@pytest.mark.parametrize("n,d_in,d_out", [(4500, 264, 136), (2048, 520, 1024), (8192, 1024, 2048)])
def test_extra_k_gemm_runs_the_tile_its_rule_picks(n, d_in, d_out):
    """Each product (y = x W^T + s z B^T, and dx = dy W + dz A without dropout) launches the
    128 x 128 tile when the 128 x 256 tiles would leave more than half of the multiprocessors
    idle, the 128 x 256 tile otherwise: the kernel's symbol names its tile. The cases take the
    narrow tile in the forward only, in both products, and in neither (on an H100 / H200)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    products = [(n, d_out), (n, d_in)]  # the forward's output, dx
    narrow = sum(2 * wide_tiles(m, k) < sms for m, k in products)
    c = inputs(n, d_in, d_out, 16, torch.bfloat16, False)
    _, calls = launches(lambda: linear_block(c, "cuda", torch.bfloat16, 0.0, None, None))
    assert count(calls, "ExtraKMainloop") == 2, calls
    assert count(calls, "TileName128x128") == narrow, calls
    assert count(calls, "TileName128x256") == 2 - narrow, calls


@pytest.mark.skipif(not HOPPER, reason="the extra-K GEMM runs on Hopper builds with CUTLASS")
def test_extra_k_gemm_leaves_what_it_does_not_take_to_the_generic_path():
    """Widths not multiples of 8, too few output tiles (a few tokens, a narrow output), fp32 and
    a non-contiguous x take cuBLAS and the low-rank kernels, with the same results against
    float64."""
    cases = [
        (4096, 130, 1032, torch.bfloat16),
        (4096, 1024, 1030, torch.bfloat16),
        (16, 4096, 4096, torch.bfloat16),
        (300, 520, 136, torch.float16),
        (4096, 1024, 1024, torch.float32),
    ]
    for n, d_in, d_out, dtype in cases:
        c = inputs(n, d_in, d_out, 16, dtype, False)
        ref = linear_block(c, "cpu", torch.float64, 0.0, None, None)
        out, calls = launches(lambda: linear_block(c, "cuda", dtype, 0.0, None, None))
        assert count(calls, "ExtraKMainloop") == 0, (n, d_in, d_out, calls)
        close(ref, out, 2e-2 if dtype == torch.bfloat16 else 4e-3)
    x = torch.randn(8192, 1024, dtype=torch.bfloat16, device="cuda")[:, :1000]  # rows 2048 bytes apart
    W = torch.randn(2048, 1000, dtype=torch.bfloat16, device="cuda") * 0.05
    A = torch.randn(16, 1000, dtype=torch.bfloat16, device="cuda") * 0.05
    B = torch.randn(2048, 16, dtype=torch.bfloat16, device="cuda") * 0.05
    (y, _), calls = launches(lambda: ops.lora_linear(x, None, W, None, A, B, None, 0.5, 0.0, None, 0, 16))
    assert count(calls, "ExtraKMainloop") == 0, calls
    want = x.double() @ W.double().T + 0.5 * (x.double() @ A.double().T).bfloat16().double() @ B.double().T
    assert (y.double() - want).abs().max().item() <= 2e-2 * want.abs().max().item()


def test_fused_down_op_with_segments_matches_reference():
    """lora_down alone: each segment has its own mask, z columns in segment order."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 96, generator=g, dtype=torch.float64).bfloat16()
    A = torch.randn(3 * 5, 96, generator=g, dtype=torch.float64).bfloat16()
    ref = ops.lora_down(x.double(), None, A.double(), 0.3, S(SEED, x.double()), 0, 5)
    out = ops.lora_down(x.cuda(), None, A.cuda(), 0.3, S(SEED, x.cuda()), 0, 5)
    close([ref], [out], 2e-2)
    gz = torch.randn(200, 15, generator=g, dtype=torch.float64).bfloat16()
    ref_g = ops._lora_down_backward(gz.double(), x.double(), None, A.double(), 0.3, S(SEED, x.double()), 0, 5, True)
    out_g = ops._lora_down_backward(gz.cuda(), x.cuda(), None, A.cuda(), 0.3, S(SEED, x.cuda()), 0, 5, True)
    close(ref_g, out_g, 2e-2)


# --- the fused norm statistics (record_stats_) -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize(
    "nx,nz,offset",
    [
        (3_000_001, 4099, 0),  # many blocks, a tail past the 16-byte loads
        (1000, 16, 1),  # a base that is not 16-byte aligned: element loads only
        (0, 0, 0),  # empty inputs: the norms are 0
    ],
)
def test_record_stats_cuda_matches_float64(dtype, nx, nz, offset):
    g = torch.Generator().manual_seed(nx)
    x64 = torch.randn(nx + offset, generator=g, dtype=torch.float64)
    z64 = torch.randn(nz + offset, generator=g, dtype=torch.float64) * 3
    x, z = x64.to("cuda", dtype)[offset:], z64.to("cuda", dtype)[offset:]
    ring_x = torch.full((3,), -1.0, device="cuda")
    ring_z = torch.full((3,), -1.0, device="cuda")
    count = torch.full((1,), 4, dtype=torch.long, device="cuda")  # slot 4 % 3 = 1
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ops.record_stats_(ring_x, ring_z, count, x, z)
        torch.cuda.synchronize()
    assert "sumsq_kernel" in " ".join(e.key for e in prof.key_averages())
    assert count.item() == 5
    want_x = x.double().norm().item()  # the rounded inputs, summed in float64
    want_z = z.double().norm().item()
    assert ring_x[[0, 2]].tolist() == [-1.0, -1.0] and ring_z[[0, 2]].tolist() == [-1.0, -1.0]
    assert ring_x[1].item() == pytest.approx(want_x, rel=1e-5, abs=1e-6)
    assert ring_z[1].item() == pytest.approx(want_z, rel=1e-5, abs=1e-6)
    again_x, again_z = ring_x.clone(), ring_z.clone()
    count.fill_(4)
    ops.record_stats_(ring_x, ring_z, count, x, z)
    assert torch.equal(ring_x, again_x) and torch.equal(ring_z, again_z)  # deterministic


def test_record_stats_cuda_bad_input_messages():
    # The fused CUDA entry checks its arguments like the generic one, before any launch.
    ring, x = torch.zeros(3, device="cuda"), torch.ones(8, device="cuda")
    with pytest.raises(RuntimeError, match=r"count must be an int64 tensor with one element, got Float"):
        ops.record_stats_(ring, ring.clone(), torch.zeros(1, device="cuda"), x, x)
    with pytest.raises(RuntimeError, match=r"z_norms must have the length of x_norms \(3\), got 2"):
        ops.record_stats_(ring, torch.zeros(2, device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda"), x, x)


def test_record_stats_cuda_falls_back_for_other_layouts():
    # A float64 ring and a non-contiguous x take the ATen composition: same values.
    x = torch.randn(64, 32, device="cuda").t()
    z = torch.randn(32, 4, device="cuda")
    ring_x = torch.zeros(2, dtype=torch.float64, device="cuda")
    ring_z = torch.zeros(2, dtype=torch.float64, device="cuda")
    count = torch.zeros(1, dtype=torch.long, device="cuda")
    ops.record_stats_(ring_x, ring_z, count, x, z)
    assert count.item() == 1
    assert ring_x[0].item() == pytest.approx(x.double().norm().item(), rel=1e-5)
    assert ring_z[0].item() == pytest.approx(z.double().norm().item(), rel=1e-5)
