"""Renders the benchmark records (bench/results/*.json: one per run kind, with the GPU, versions,
date and commit) into Markdown tables, and writes them into docs/performance.md between the
markers `<!-- record:NAME -->` and `<!-- /record:NAME -->`.

    python bench/render.py            # rewrite docs/performance.md from the records
    python bench/render.py --check    # exit 1 if docs/performance.md is out of date
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "performance.md"
RECORDS = {"eager": "results.json", "compiled": "results_compiled.json"}
# the model-shape sweep (bench/shapes.py), one record per mode, rendered when present
SHAPE_RECORDS = {f"shapes-{m}": f"results_shapes_{m}.json" for m in ("eager", "compiled", "graphed")}


def header(info: dict) -> str:
    r = info["reslora"]
    return (
        f"GPU: {info['gpu']} | torch {info['torch']} (CUDA {info['cuda']}) | peft {info['peft']} | "
        f"reslora {r['version']} (CUDA kernels: {r['cuda_kernels']}, extra-K GEMM: {r.get('extra_k_gemm')}) | "
        f"commit {info.get('commit', 'not recorded')} | {info['date']} | {info['dtype']}, r = {info['r']}"
        + (f", median of {info['repeat']} after {info['warmup']} warm-up" if "repeat" in info else "")
    )


def render(record: dict) -> str:
    """One table per workload; each row's ratio is to the frozen base of its own run."""
    info = record["info"]
    lines = [header(info), ""]
    if info.get("note"):
        lines += [info["note"], ""]
    for w in record["workloads"]:
        runs = sorted({row.get("run", 1) for row in w["rows"]})
        base = {row.get("run", 1): row["ms"] for row in w["rows"] if row["config"] == "frozen base"}
        run_col = len(runs) > 1
        host_col = any("host_ms" in row for row in w["rows"])
        lines += [f"#### {w['name']}", ""]
        lines.append(
            "| configuration |"
            + (" run |" if run_col else "")
            + " time (ms) |"
            + (" host (ms) |" if host_col else "")
            + " ratio to base | peak memory (GiB) |"
        )
        lines.append("|---|" + ("---|" if run_col else "") + "---|" + ("---|" if host_col else "") + "---|---|")
        for row in w["rows"]:
            run = row.get("run", 1)
            cells = [row["config"]] + ([str(run)] if run_col else [])
            if row["ms"] is None:  # a configuration the mode could not run
                cells += [f"failed: {row.get('error', '')}"] + ([""] if host_col else []) + ["", ""]
            else:
                mem = "" if row.get("peak_gib") is None else f"{row['peak_gib']:.2f}"
                ratio = "" if not base.get(run) else f"{row['ms'] / base[run]:.2f}"
                host = [f"{row['host_ms']:.3f}" if row.get("host_ms") is not None else ""] if host_col else []
                cells += [f"{row['ms']:.3f}"] + host + [ratio, mem]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def rendered_doc(text: str) -> str:
    records = dict(RECORDS)
    records.update({n: f for n, f in SHAPE_RECORDS.items() if (RESULTS / f).exists()})
    for name, file in records.items():
        record = json.loads((RESULTS / file).read_text())
        pattern = re.compile(rf"(<!-- record:{name} -->\n).*?(<!-- /record:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{DOC} has no <!-- record:{name} --> ... <!-- /record:{name} --> block")
        text = pattern.sub(lambda m, r=record: m.group(1) + render(r) + m.group(2), text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/performance.md is out of date")
    args = ap.parse_args()
    text = DOC.read_text()
    new = rendered_doc(text)
    if args.check:
        if new != text:
            sys.exit(f"{DOC} is out of date with bench/results/*.json: run python bench/render.py")
        return
    DOC.write_text(new)


if __name__ == "__main__":
    main()
