"""Model-shape sweep: one training step of Llama-architecture models at the widths people
fine-tune (randomly initialised, real vocabularies), frozen base vs PEFT LoRA vs every reslora
variant, at r = 16 and 64; eager, under torch.compile, or with the whole step captured in one
CUDA graph and replayed (the host's issue time taken out).

    python bench/shapes.py [--mode eager|compiled|graphed ...] [--shape NAME ...] [--rank R ...]
                           [--out bench/results]

Per configuration: the GPU time of a step (median of CUDA-event timed repeats), the host's time
to issue it (median wall time of the call, without waiting for the GPU: when it is close to the
GPU time, the host sets the pace), and the peak memory. Writes results_shapes_<mode>.json with
the GPU, versions, date and commit; bench/render.py puts the records into docs/performance.md.
"""

import argparse
import copy
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import render

import bench

# name: (hidden, MLP, layers, heads, KV heads, vocabulary)
SHAPES = {
    "Qwen2.5-0.5B": (896, 4864, 24, 14, 2, 151936),
    "Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 151936),
    "Llama-3.2-1B": (2048, 8192, 16, 32, 8, 128256),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DROPOUT = 0.05
BATCH, SEQ = 8, 1024


def configs(r):
    def peft(m, t):
        import peft

        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=DROPOUT, target_modules=t)
        return peft.get_peft_model(m, cfg, autocast_adapter_dtype=False)

    def ours(variant):
        def wrap(m, t):
            import reslora

            cfg = reslora.ResLoRAConfig(
                variant=variant, r=r, lora_alpha=2 * r, lora_dropout=DROPOUT, pre_num=1, target_modules=t
            )
            return reslora.get_reslora_model(m, cfg)

        return wrap

    return [("frozen base", None), (f"PEFT LoRA bf16, dropout {DROPOUT}", peft)] + [
        (f"reslora {v}, dropout {DROPOUT}", ours(v)) for v in ("lora", "is", "bs", "ms")
    ]


def model(shape):
    return bench.random_llama(SHAPES[shape], tie=shape.startswith("Qwen"))


def make_step(base, wrap, ids, mode):
    """A training step of a copy of base wrapped by wrap (None: the frozen base, forward +
    backward to the input embeddings), AdamW on the adapters; mode eager, compiled (the model
    under torch.compile, fullgraph) or graphed (forward, backward and the optimizer step captured
    in one CUDA graph)."""
    m = copy.deepcopy(base)
    opt = None
    if wrap is not None:
        m = wrap(m, TARGETS)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, capturable=mode == "graphed")
    m.train()
    embed = m.get_input_embeddings()
    run = torch.compile(m, fullgraph=True) if mode == "compiled" else m

    def inputs():
        if wrap is None:
            # the frozen base: backward to its input embeddings (a leaf that requires grad)
            return {"inputs_embeds": embed(ids).detach().requires_grad_(), "labels": ids}
        return {"input_ids": ids, "labels": ids}

    def step():
        run(**inputs()).loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=mode != "graphed")

    if mode != "graphed":
        step.model = m
        return step
    static = inputs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run(**static).loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(**static).loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=False)

    def replay():
        graph.replay()

    replay.model, replay.static = m, static  # the graph reads them: keep them alive
    return replay


def sweep(shape, r, mode, args):
    base = model(shape)
    ids = torch.randint(0, SHAPES[shape][5], (BATCH, SEQ), device="cuda")
    rows = []
    for name, wrap in configs(r):
        try:
            step = make_step(base, wrap, ids, mode)
            ms, host, mem = bench.timed_with_host(step, args.warmup, args.repeat)
            rows.append({"config": name, "ms": ms, "host_ms": host, "peak_gib": mem})
            print(f"  {shape} r={r} {mode} {name}: {ms:.2f} ms (host {host:.2f} ms)", flush=True)
        except Exception as e:  # a mode a configuration does not support is reported, not hidden
            rows.append({"config": name, "ms": None, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            print(f"  {shape} r={r} {mode} {name}: failed: {rows[-1]['error']}", flush=True)
        step = None
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    del base
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", action="append", choices=["eager", "compiled", "graphed"])
    ap.add_argument("--shape", action="append", choices=list(SHAPES))
    ap.add_argument("--rank", action="append", type=int)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default=os.path.join("bench", "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU")
    torch._dynamo.config.cache_size_limit = 64
    for mode in args.mode or ["eager"]:
        info = {
            **bench.run_info(),
            "r": ", ".join(str(r) for r in args.rank or [16, 64]),
            "dtype": "bfloat16",
            "repeat": args.repeat,
            "warmup": args.warmup,
            "note": (
                f"Training step, batch {BATCH} x {SEQ}, all 7 projections adapted, dropout {DROPOUT}, "
                f"AdamW on the adapters; mode {mode}. Host: the median time the host took to issue a "
                "step (close to the GPU time: the host sets the pace)."
            ),
        }
        workloads = []
        for shape in args.shape or list(SHAPES):
            hidden, mlp, layers, heads, kv, vocab = SHAPES[shape]
            for r in args.rank or [16, 64]:
                name = (
                    f"{shape} widths ({hidden} hidden, {mlp} MLP, {layers} layers, {heads} / {kv} heads, "
                    f"vocabulary {vocab}), r = {r}, {mode}"
                )
                workloads.append({"name": name, "rows": sweep(shape, r, mode, args)})
        record = {"info": info, "workloads": workloads}
        print(render.render(record))
        render.write_record(record, args.out, f"results_shapes_{mode}")


if __name__ == "__main__":
    main()
