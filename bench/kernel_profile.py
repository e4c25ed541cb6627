"""Per-kernel breakdown of one configuration of the benchmark (torch.profiler, CUDA time).

    python bench/kernel_profile.py [--d 4096] [--tokens 8192] [--dropout 0.05] [--rows 25]

Profiles the 8-layer chain of bench.py for the frozen base, PEFT LoRA and each reslora variant
and prints, per configuration, the kernels that take the most GPU time.
"""

import argparse
import copy

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import bench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    layers = 8
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(args.d, args.d, bias=False) for _ in range(layers)])
    base = base.cuda().bfloat16().requires_grad_(False)
    x = torch.randn(args.tokens, args.d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    targets = [str(i) for i in range(layers)]
    for name, wrap in bench.configs(args.dropout):
        if "default" in name:
            continue
        model = copy.deepcopy(base)
        if wrap is not None:
            model = wrap(model, targets)
        model.train()

        def step():
            x.grad = None
            model(x).backward(g)
            for p in model.parameters():
                p.grad = None

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        total = sum(e.device_time_total for e in prof.key_averages()) / 5 / 1000
        print(f"\n=== {name}: {total:.3f} ms of kernels per step")
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=args.rows,
                                        max_name_column_width=90))
        del model


if __name__ == "__main__":
    main()
