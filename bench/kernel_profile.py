"""Per-kernel breakdown of one configuration of the benchmark (torch.profiler, CUDA time).

    python bench/kernel_profile.py [--llama] [--host] [--d 4096] [--hidden H] [--tokens 8192]
                                   [--dropout 0.05] [--rows 25] [--only NAME ...]

Profiles the 8-layer chain of bench.py (or, with --llama, its Llama training step) for the frozen
base, PEFT LoRA and each reslora variant and prints, per configuration, the kernels that take
the most GPU time. With --host it prints, instead, how long the host takes to issue a step
against how long the GPU takes to run it (a step whose issue time is close to its run time is
host-bound: the GPU waits for launches), flags any host-device synchronisation inside a step,
and lists the host-side operators that take the most CPU time.
"""

import argparse
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import bench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=None, help="the chain alternates d x hidden and hidden x d")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--llama", action="store_true", help="the Llama training step of bench.py")
    ap.add_argument("--host", action="store_true", help="host issue time and host-side operators")
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        help="profile only the configurations whose name contains this (repeatable)",
    )
    args = ap.parse_args()
    args.quick = False
    if args.llama:
        return profile_llama(args)
    torch.manual_seed(0)
    base, targets = bench.chain(args.d, args.hidden)
    x = torch.randn(args.tokens, args.d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    for name, wrap in selected(args):
        step = bench.chain_step(base, wrap, x, g, targets)
        report(name, step, args)


def selected(args, skip=()):
    """The configurations of bench.py to profile (PEFT's fp32 default never); an --only that
    matches none of them is an error naming the choices."""
    choices = [(n, w) for n, w in bench.configs(args.dropout) if "default" not in n and n not in skip]
    for o in args.only:
        if not any(o in n for n, _ in choices):
            raise SystemExit(
                f"--only {o!r} matches no configuration; the names are: " + "; ".join(n for n, _ in choices)
            )
    return [(n, w) for n, w in choices if not args.only or any(o in n for o in args.only)]


def report(name, step, args, steps=5):
    if args.host:
        return report_host(name, step, args, steps)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages()) / steps / 1000
    print(f"\n=== {name}: {total:.3f} ms of kernels per step")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=90))


def report_host(name, step, args, steps):
    run, issue, _ = bench.timed_with_host(step, 3, steps)
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
    torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = sorted({str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)})
    print(
        f"\n=== {name}: GPU {run:.3f} ms per step, host issue {issue:.3f} ms, host-device syncs in a step: {len(syncs)}"
    )
    for s in syncs:
        print("    sync:", s)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70))


def profile_llama(args):
    ids = torch.randint(0, 32000, (8, 1024), device="cuda")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base = bench.llama(args).requires_grad_(False)
    for name, wrap in selected(args, skip=("PEFT LoRA bf16, dropout 0",)):
        step = bench.training_step(base, wrap, ids, targets)
        report(name, step, args, steps=3)
        del step
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
