"""Benchmark: frozen base vs PEFT LoRA vs reslora (lora / is / bs / ms), in one process.

    python bench/bench.py [--quick] [--only eager|compiled] [--config NAME ...] [--out bench/results]

Layer chains (8 stacked d x d linear layers, or alternately d x hidden and hidden x d as a
transformer MLP's up and down projections; bf16, forward + backward to the input; at 16
tokens also captured in a CUDA graph and replayed) and a Llama training step (AdamW on the
adapters), eager; with --only compiled, the Llama training step under torch.compile (the whole
model, fullgraph, default inductor mode) for the base, PEFT LoRA and every variant. Times are
medians of CUDA-event timed repeats; memory is the peak allocated during the timed repeats.
Prints the tables and writes the run's record, results.json (results_compiled.json for the
compiled run), with the GPU, versions, date and commit; bench/render.py puts the records'
tables into docs/performance.md.
"""

import argparse
import copy
import datetime
import gc
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import reslora

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import render

R = 16


def timed(fn, warmup, repeat):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def timed_with_host(fn, warmup, repeat):
    """Median GPU time of fn (CUDA events, ms), median time the host takes to issue it (ms,
    without waiting for the GPU), and the peak memory (GiB) over the repeats."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    gpu, host = [], []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end))
    return statistics.median(gpu), statistics.median(host), torch.cuda.max_memory_allocated() / 2**30


def measure(make_step, args):
    """Times the step that make_step() builds, then frees everything it held (the model lives
    only in the step's closure) before the next configuration is built."""
    step = make_step()
    result = timed(step, args.warmup, args.repeat)
    del step
    torch._dynamo.reset()  # compiled configurations: drop their graphs and guards too
    gc.collect()
    torch.cuda.empty_cache()
    return result


def peft_wrap(model, targets, dropout, fp32_adapters):
    import peft

    cfg = peft.LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=dropout, target_modules=targets)
    return peft.get_peft_model(model, cfg, autocast_adapter_dtype=fp32_adapters)


def ours_wrap(model, targets, variant, dropout, pre_num=1):
    cfg = reslora.ResLoRAConfig(
        variant=variant, r=R, lora_alpha=2 * R, lora_dropout=dropout, pre_num=pre_num, target_modules=targets
    )
    return reslora.get_reslora_model(model, cfg)


def configs(dropout):
    return [
        ("frozen base", None),
        (f"PEFT LoRA bf16, dropout {dropout}", lambda m, t: peft_wrap(m, t, dropout, False)),
        ("PEFT LoRA bf16, dropout 0", lambda m, t: peft_wrap(m, t, 0.0, False)),
        (f"PEFT default (fp32 adapters), dropout {dropout}", lambda m, t: peft_wrap(m, t, dropout, True)),
        (f"reslora lora, dropout {dropout}", lambda m, t: ours_wrap(m, t, "lora", dropout)),
        (f"reslora is, dropout {dropout}", lambda m, t: ours_wrap(m, t, "is", dropout)),
        (f"reslora bs pre_num 1, dropout {dropout}", lambda m, t: ours_wrap(m, t, "bs", dropout)),
        (f"reslora ms, dropout {dropout}", lambda m, t: ours_wrap(m, t, "ms", dropout)),
        # Without dropout the input gradient is one GEMM too (dy W + dz A, on Hopper).
        ("reslora lora, dropout 0", lambda m, t: ours_wrap(m, t, "lora", 0.0)),
        ("reslora ms, dropout 0", lambda m, t: ours_wrap(m, t, "ms", 0.0)),
    ]


class UpDown(nn.Module):
    """d -> hidden -> d: two linear layers, up and down, as in a transformer MLP (without its
    activation, so that the chain is its GEMMs alone)."""

    def __init__(self, d, hidden):
        super().__init__()
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down(self.up(x))


def chain(d, hidden=None, layers=8):
    """The frozen bf16 chain of `layers` linear layers: d x d, or with hidden alternately
    d -> hidden and hidden -> d (layers / 2 UpDown pairs: two chains, up and down), and the
    names of its target modules."""
    if hidden is None:
        base = nn.Sequential(*[nn.Linear(d, d, bias=False) for _ in range(layers)])
        targets = [str(i) for i in range(layers)]
    else:
        base = nn.Sequential(*[UpDown(d, hidden) for _ in range(layers // 2)])
        targets = ["up", "down"]
    return base.cuda().bfloat16().requires_grad_(False), targets


def bench_chain(d, tokens, args, graph=False, hidden=None):
    """The 8-layer chain for every configuration; graph: each step captured once in a CUDA graph
    and replayed (what is left when the host's issue time is taken out)."""
    torch.manual_seed(0)
    base, targets = chain(d, hidden)
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    rows = []
    make = graph_step if graph else chain_step
    for name, wrap in graph_configs() if graph else configs(0.05):
        rows.append((name, *measure(lambda wrap=wrap: make(base, wrap, x, g, targets), args)))
    return rows


def chain_step(base, wrap, x, g, targets):
    """Forward + backward to the input x of a copy of the chain base wrapped by wrap (None: the
    frozen chain), with random lora_B so that no product is trivially zero."""
    model = copy.deepcopy(base)
    if wrap is not None:
        model = wrap(model, targets)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.01)
    model.train()

    def step():
        x.grad = None
        model(x).backward(g)
        for p in model.parameters():
            p.grad = None

    step.model = model
    return step


def graph_configs():
    """Configurations of the CUDA-graph workload: those of configs() without PEFT's fp32
    default. reslora draws its dropout seed on the device, so a replay draws fresh masks."""
    return [(name, wrap) for name, wrap in configs(0.05) if "default" not in name]


def graph_step(base, wrap, x, g, targets):
    """chain_step's forward + backward captured in a CUDA graph; the step replays it."""
    eager = chain_step(base, wrap, x, g, targets)
    model = eager.model
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    for p in model.parameters():
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x).backward(g)

    def step():
        graph.replay()

    step.model = model  # the graph reads its parameters: keep them alive with the step
    return step


def llama(args):
    # hidden, MLP, layers, heads, KV heads, vocabulary
    return random_llama((1024, 2816, 4, 16, 4, 32000) if args.quick else (2048, 5632, 22, 32, 4, 32000))


def random_llama(widths, device="cuda", dtype=torch.bfloat16, tie=False):
    """A randomly initialised, frozen Llama of widths (hidden, MLP, layers, heads, KV heads,
    vocabulary), seed 0, without a KV cache: what every benchmark times."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, mlp, layers, heads, kv, vocab = widths
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    return model.requires_grad_(False)


def bench_training_step(args, compiled=False):
    batch, seq = (2, 512) if args.quick else (8, 1024)
    ids = torch.randint(0, 32000, (batch, seq), device="cuda")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    rows = []
    base = llama(args)
    for p in base.parameters():
        p.requires_grad_(False)
    chosen = [(n, w) for n, w in configs(0.05) if not (compiled and "default" in n)]
    if args.config:  # the frozen base always: the ratios are to it
        names = [n for n, _ in chosen]
        for c in args.config:
            if not any(c in n for n in names):
                raise SystemExit(f"--config {c!r} names no configuration of this run; expected part of one of {names}")
        chosen = [(n, w) for n, w in chosen if w is None or any(c in n for c in args.config)]
    for name, wrap in chosen:
        step = lambda wrap=wrap: training_step(base, wrap, ids, targets, compiled)  # noqa: E731
        rows.append((name, *measure(step, args)))
        print(f"  {name}: {rows[-1][1]:.3f} ms", flush=True)
    return rows


def training_step(base, wrap, ids, targets, compiled=False):
    """One training step of a copy of base wrapped by wrap (None: the frozen base, timed through
    forward + backward to the input embeddings), with AdamW on the adapters; compiled: the
    model's forward and backward under torch.compile(fullgraph=True)."""
    model = copy.deepcopy(base)
    opt = None
    if wrap is not None:
        model = wrap(model, targets)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    elif not compiled:
        model.enable_input_require_grads()
    model.train()
    run = torch.compile(model, fullgraph=True) if compiled else model
    embed = model.get_input_embeddings()

    def inputs():
        if wrap is None and compiled:
            # The hook of enable_input_require_grads breaks a fullgraph trace: the compiled base
            # gets its input embeddings as a leaf that requires grad instead.
            return {"inputs_embeds": embed(ids).detach().requires_grad_(), "labels": ids}
        return {"input_ids": ids, "labels": ids}

    def step():
        loss = run(**inputs()).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def bench_inference(args):
    """Forward (no grad) of the frozen base vs each variant after merge_to_lora() and
    merge_and_unload(): nothing of the adapter is left to run."""
    batch, seq = (2, 512) if args.quick else (8, 1024)
    ids = torch.randint(0, 32000, (batch, seq), device="cuda")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base = llama(args).eval()
    rows = []
    for name, variant in [
        ("frozen base", None),
        ("reslora is, merged", "is"),
        ("reslora bs, merged", "bs"),
        ("reslora ms, merged", "ms"),
    ]:

        def make_step(variant=variant):
            model = copy.deepcopy(base)
            if variant is not None:
                wrapped = ours_wrap(model, targets, variant, 0.0)
                for blk in wrapped.blocks.values():
                    nn.init.normal_(blk.lora_B, std=0.01)
                wrapped.merge_to_lora()
                model = wrapped.merge_and_unload().eval()

            @torch.no_grad()
            def step():
                model(input_ids=ids)

            return step

        rows.append((name, *measure(make_step, args)))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument(
        "--only",
        choices=["eager", "compiled"],
        default="eager",
        help="eager: every workload; compiled: the Llama step under torch.compile",
    )
    ap.add_argument("--out", default=os.path.join("bench", "results"))
    ap.add_argument(
        "--config",
        action="append",
        default=[],
        help="Llama step: only the configurations whose name contains this (repeatable; the base always)",
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU")

    info = {
        **run_info(),
        "r": R,
        "dtype": "bfloat16",
        "repeat": args.repeat,
        "warmup": args.warmup,
    }
    workloads = []
    step_name = (
        "Llama training step, "
        + (
            "1024 hidden, 4 layers, batch 2 x 512"
            if args.quick
            else "2048 hidden, 5632 MLP, 22 layers, 32 heads, 4 KV heads, batch 8 x 1024"
        )
        + ", all 7 projections, AdamW"
    )
    if args.only == "compiled":
        torch._dynamo.config.cache_size_limit = 64  # one model per configuration
        workloads.append((step_name + ", under torch.compile", bench_training_step(args, True)))
    elif args.quick:
        workloads.append(("8 layers 1024x1024, 2048 tokens, fwd+bwd", bench_chain(1024, 2048, args)))
        workloads.append(
            (
                "8 layers alternately 1024x2816 and 2816x1024, 2048 tokens, fwd+bwd",
                bench_chain(1024, 2048, args, hidden=2816),
            )
        )
        workloads.append(
            ("8 layers 1024x1024, 16 tokens, fwd+bwd captured in a CUDA graph", bench_chain(1024, 16, args, graph=True))
        )
    else:
        workloads.append(("8 layers 4096x4096, 8192 tokens, fwd+bwd", bench_chain(4096, 8192, args)))
        workloads.append(
            (
                "8 layers alternately 4096x11008 and 11008x4096 (4 up / down pairs), 8192 tokens, fwd+bwd",
                bench_chain(4096, 8192, args, hidden=11008),
            )
        )
        workloads.append(("8 layers 2048x2048, 8192 tokens, fwd+bwd", bench_chain(2048, 8192, args)))
        workloads.append(("8 layers 4096x4096, 16 tokens, fwd+bwd", bench_chain(4096, 16, args)))
        workloads.append(
            ("8 layers 4096x4096, 16 tokens, fwd+bwd captured in a CUDA graph", bench_chain(4096, 16, args, graph=True))
        )
    if args.only == "eager":
        workloads.append((step_name, bench_training_step(args)))
        workloads.append(
            ("Inference forward after merge_to_lora() + merge_and_unload(), same Llama", bench_inference(args))
        )

    record = {
        "info": info,
        "workloads": [
            {"name": w, "rows": [{"config": n, "ms": ms, "peak_gib": mem} for n, ms, mem in rows]}
            for w, rows in workloads
        ],
    }
    print(render.render(record))
    render.write_record(record, args.out, "results" if args.only == "eager" else "results_compiled")


def run_info() -> dict:
    """What a benchmark record says of its run: the GPU, versions, date and commit."""
    import peft

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peft": peft.__version__,
        "reslora": reslora.build_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
    }


def commit() -> str:
    """The checkout's commit (with -dirty for uncommitted changes), or RESLORA_COMMIT where the
    tree is a copy without git."""
    if os.environ.get("RESLORA_COMMIT"):
        return os.environ["RESLORA_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True)
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    main()
