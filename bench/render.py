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
# host work per adapted block (bench/host_work.py), one record per device, rendered when present
HOST_RECORDS = {f"host-{d}": f"host_work_{d}.json" for d in ("cpu", "cuda")}


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


def render_host(record: dict) -> str:
    """A host-work record: per configuration the step's host time by phase, and per adapted
    block what it adds to the frozen base's."""
    info = record["info"]
    r = info["reslora"]
    lines = [
        f"{info['machine']} | torch {info['torch']} | transformers {info['transformers']} | peft {info['peft']} | "
        f"reslora {r['version']} (CUDA kernels: {r['cuda_kernels']}, extra-K GEMM: {r.get('extra_k_gemm')}) | "
        f"commit {info['commit']} | {info['date']} | {info['model']}, {info['tokens']} tokens, "
        f"{info['blocks']} adapted blocks, r = {info['r']}, dropout {info['dropout']}, {info['dtype']}, "
        f"median of {info['repeat']}",
        "",
        "| configuration | forward (us) | backward (us) | optimizer (us) | per block: host (us) | ops | autograd nodes |"
        + (" launches |" if info["device"] == "cuda" else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if info["device"] == "cuda" else ""),
    ]
    for row in record["rows"]:
        per = row.get("per_block")
        cells = [row["config"], f"{row['fwd']:.0f}", f"{row['bwd']:.0f}", f"{row['opt']:.0f}"]
        if per is None:
            cells += ["", "", ""] + ([""] if info["device"] == "cuda" else [])
        else:
            cells += [f"{per['fwd'] + per['bwd'] + per['opt']:.1f}", f"{per['ops']:.1f}", f"{per['nodes']:.2f}"]
            cells += [f"{per['launches']:.1f}"] if info["device"] == "cuda" else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rendered_doc(text: str) -> str:
    records = {n: (f, render) for n, f in RECORDS.items()}
    records.update({n: (f, render) for n, f in SHAPE_RECORDS.items() if (RESULTS / f).exists()})
    records.update({n: (f, render_host) for n, f in HOST_RECORDS.items() if (RESULTS / f).exists()})
    for name, (file, how) in records.items():
        record = json.loads((RESULTS / file).read_text())
        pattern = re.compile(rf"(<!-- record:{name} -->\n).*?(<!-- /record:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{DOC} has no <!-- record:{name} --> ... <!-- /record:{name} --> block")
        text = pattern.sub(lambda m, r=record, how=how: m.group(1) + how(r) + m.group(2), text)
    return text


def write_record(record: dict, out_dir: str, stem: str) -> str:
    """Writes a benchmark's record as out_dir/stem.json (what main() renders) and says so."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem + ".json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(f"wrote {path}; python bench/render.py puts it into docs/performance.md")
    return path


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
