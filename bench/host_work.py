"""Host work per adapted block: what a training step asks of the host (Python, the dispatcher,
autograd and, on a GPU, the launches) for every adapted projection, frozen base vs PEFT LoRA vs
every reslora variant, on a Llama-architecture model so narrow that its arithmetic is
negligible: what is measured is the work every step pays per block on any device, which sets the
pace of narrow models (0.5B widths) when the host is slower than the GPU.

    python bench/host_work.py [--device cpu|cuda] [--repeat 200] [--out bench/results]

Per configuration: the median wall time of the forward, the backward and the optimizer step
(AdamW, foreach) over the repeats, and per adapted block the extra over the frozen base (its
backward runs to the input embeddings, as the adapters' does); the operators dispatched per
block (every ATen and reslora op the profiler records, nested calls included), the autograd nodes
per block, and on CUDA the kernel launches per block. Writes host_work_<device>.json with the
machine, versions, date and commit; bench/render.py puts it into docs/performance.md.
"""

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import render
import shapes

import bench
import reslora

# hidden, MLP, layers, heads, KV heads, vocabulary: 8 layers of 7 projections = 56 adapted blocks
WIDTHS = (64, 128, 8, 4, 2, 128)
TOKENS = 16
RANK = 4


def model(device):
    return bench.random_llama(WIDTHS, device, torch.bfloat16 if device.type == "cuda" else torch.float32)


def graph_nodes(loss) -> int:
    """The autograd nodes behind loss (each node once)."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo += [n for n, _ in node.next_functions]
    return len(seen)


def prepare(base, wrap, ids, device):
    """The training step of a copy of base wrapped by wrap; step(times) appends the host time of
    its forward, backward and optimizer step to times."""
    m = copy.deepcopy(base)
    opt = None
    if wrap is not None:
        m = wrap(m, shapes.TARGETS)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    m.train()
    embed = m.get_input_embeddings()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def inputs():
        if wrap is None:  # backward to the input embeddings, as bench/shapes.py's base
            return {"inputs_embeds": embed(ids).detach().requires_grad_(), "labels": ids}
        return {"input_ids": ids, "labels": ids}

    def step(times=None):
        kw = inputs()
        sync()
        t0 = time.perf_counter()
        loss = m(**kw).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        sync()
        if times is not None:
            for k, t in zip(("fwd", "bwd", "opt"), (t1 - t0, t2 - t1, t3 - t2)):
                times[k].append(t * 1e6)

    step.nodes = lambda: graph_nodes(m(**inputs()).loss)
    return step


def counts(step) -> dict:
    """Operators and kernel launches of one step (the profiler's events, nested ones included)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        step()
    names = [e.name for e in prof.events()]
    return {
        "ops": sum(n.startswith(("aten::", "reslora::")) for n in names),
        "launches": sum(n in ("cudaLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC") for n in names),
        "nodes": step.nodes(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--out", default=os.path.join("bench", "results"))
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # one host thread issues the work, as it does for a GPU
    base = model(device)
    ids = torch.randint(0, WIDTHS[5], (1, TOKENS), device=device)
    blocks = WIDTHS[2] * len(shapes.TARGETS)
    steps = {}
    for name, wrap in shapes.configs(RANK):
        if device.type == "cpu":
            name = name.replace(" bf16", "")  # the model and its adapters are float32 here
        steps[name] = prepare(base, wrap, ids, device)
        for _ in range(min(10, args.repeat)):  # warm-up
            steps[name]()
    # Round-robin over the configurations, so that a drift of the machine's speed during the run
    # is shared by all of them, not charged to one.
    times = {name: {"fwd": [], "bwd": [], "opt": []} for name in steps}
    rounds = 10
    for i in range(rounds):
        for name, step in steps.items():
            for _ in range(args.repeat // rounds + (i < args.repeat % rounds)):
                step(times[name])
    rows = []
    for name, step in steps.items():
        row = dict(config=name, **{k: statistics.median(v) for k, v in times[name].items()}, **counts(step))
        rows.append(row)
        print(
            f"{name}: fwd {row['fwd']:.0f} us, bwd {row['bwd']:.0f} us, opt {row['opt']:.0f} us, "
            f"{row['ops']} ops, {row['nodes']} autograd nodes, {row['launches']} launches",
            flush=True,
        )
    base_row = rows[0]
    for row in rows[1:]:
        row["per_block"] = {
            k: (row[k] - base_row[k]) / blocks for k in ("fwd", "bwd", "opt", "ops", "nodes", "launches")
        }
    if device.type == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = f"{platform.processor() or platform.machine()} CPU, 1 thread"
    import peft
    import transformers

    record = {
        "info": {
            "machine": machine,
            "device": device.type,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "reslora": reslora.build_info(),
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": bench.commit(),
            "model": "Llama {} wide, MLP {}, {} layers, {} heads / {} KV, vocabulary {}".format(*WIDTHS),
            "blocks": blocks,
            "tokens": TOKENS,
            "r": RANK,
            "dropout": shapes.DROPOUT,
            "repeat": args.repeat,
            "dtype": "bfloat16" if device.type == "cuda" else "float32",
        },
        "rows": rows,
    }
    render.write_record(record, args.out, f"host_work_{device.type}")


if __name__ == "__main__":
    main()
