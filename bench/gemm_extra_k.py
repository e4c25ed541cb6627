"""The Hopper extra-K GEMM against cuBLAS on the Llama step's projection shapes (bf16, r = 16,
8192 tokens): the frozen product alone (x W^T), the composition it replaces (s z B^T by cuBLAS,
then x W^T accumulated onto it with beta = 1) and the one GEMM (reslora::lora_up, whose product
runs as [x | s z] [W | B]^T). Each time is per call over 20 calls queued back to back, as in a
training step, where the GPU does not wait for the host between products. Writes gemm_extra_k.md next to the other results. Needs a CUDA GPU
(the extra-K rows need a Hopper build with CUTLASS)."""

import argparse
import datetime
import os

import torch

import reslora
from bench import timed

SHAPES = [
    ("q / o", 2048, 2048),
    ("k / v", 256, 2048),
    ("gate / up", 5632, 2048),
    ("down", 2048, 5632),
    ("4096 chain", 4096, 4096),
    ("MLP up", 11008, 4096),
    ("MLP down", 4096, 11008),
]


def per_call(fn, calls=20):
    """Milliseconds per call of fn, `calls` calls queued between two events (median of 15)."""
    return timed(lambda: [fn() for _ in range(calls)], 3, 15)[0] / calls


def row(name, d_out, d_in, args):
    dev, dt, s = "cuda", torch.bfloat16, 2.0
    x = torch.randn(args.tokens, d_in, device=dev, dtype=dt)
    W = torch.randn(d_out, d_in, device=dev, dtype=dt) * 0.02
    z = torch.randn(args.tokens, args.rank, device=dev, dtype=dt)
    B = torch.randn(d_out, args.rank, device=dev, dtype=dt) * 0.02

    def composed():
        y = torch.mm(z, B.t()).mul_(s)
        return y.addmm_(x, W.t())

    base = per_call(lambda: torch.mm(x, W.t()))
    comp = per_call(composed)
    fused = per_call(lambda: torch.ops.reslora.lora_up(x, W, None, z, B, s))
    ref = x.double() @ W.double().t() + s * z.double() @ B.double().t()
    err = (torch.ops.reslora.lora_up(x, W, None, z, B, s).double() - ref).abs().max().item()
    assert err <= 2e-2 * ref.abs().max().item(), (name, err)
    return (
        f"| {name} ({d_out} x {d_in}) | {base * 1e3:.1f} | {comp * 1e3:.1f} | {fused * 1e3:.1f} | {fused / base:.3f} |"
    )


def grad_x_row(name, d_out, d_in, args):
    """cuBLAS's dy W, the base product of the input gradient (build/cmake/extra_k_bench times the
    extra-K GEMM's [dy | dz] [W ; A] on the same shapes)."""
    dy = torch.randn(args.tokens, d_out, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) * 0.02
    return f"| {name} ({d_out} x {d_in}) | {per_call(lambda: torch.mm(dy, W)) * 1e3:.1f} |"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default=os.path.join("bench", "results"))
    args = ap.parse_args()
    lines = [
        f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | reslora {reslora.build_info()} | "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} | bf16, {args.tokens} tokens, "
        f"r = {args.rank}, microseconds per call (20 calls back to back, median of 15)",
        "",
        "| projection (d_out x d_in) | x W^T (cuBLAS) | s z B^T, then x W^T onto it | extra-K GEMM | extra-K / x W^T |",
        "|---|---|---|---|---|",
    ]
    lines += [row(name, d_out, d_in, args) for name, d_out, d_in in SHAPES]
    lines += ["", "| input gradient (d_out x d_in) | dy W (cuBLAS) |", "|---|---|"]
    lines += [grad_x_row(name, d_out, d_in, args) for name, d_out, d_in in SHAPES]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gemm_extra_k.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
