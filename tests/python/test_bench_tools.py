"""The host-work benchmark (bench/host_work.py) on the CPU: it writes a record that render.py
renders, with every configuration and its per-block figures, and refuses bad arguments by name."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("transformers")
pytest.importorskip("peft")


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_host_work_writes_a_record_that_renders(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "host_work.py"),
        "--device",
        "cpu",
        "--repeat",
        "1",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    record = json.loads((tmp_path / "host_work_cpu.json").read_text())
    info, rows = record["info"], record["rows"]
    for key in ("machine", "torch", "transformers", "peft", "reslora", "date", "commit"):
        assert info.get(key), f"the record has no {key}"
    names = [row["config"] for row in rows]
    assert names[0] == "frozen base" and len(names) == 6
    assert [n.split(",")[0] for n in names[2:]] == [f"reslora {v}" for v in ("lora", "is", "bs", "ms")]
    for row in rows[1:]:
        per = row["per_block"]
        # the counts, not the times: one repeat on a busy machine says nothing about time
        assert per["ops"] > 0 and all(k in per for k in ("fwd", "bwd", "opt", "launches"))
    for row in rows[2:]:
        assert row["per_block"]["nodes"] < 1  # one op per block: no autograd node of its own
    text = load("render").render_host(record)
    assert "| reslora ms, dropout 0.05 |" in text and text.count("\n|") == 8


def test_host_work_refuses_a_bad_repeat(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    monkeypatch.setattr(sys, "argv", ["host_work.py", "--repeat", "0"])
    with pytest.raises(SystemExit):
        load("host_work").main()
    assert "--repeat must be at least 1, got 0" in capsys.readouterr().err
