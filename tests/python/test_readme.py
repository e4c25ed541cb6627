"""The README's Python example runs as written."""

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    import reslora

    assert scope["model"].merged
    assert not any(isinstance(m, reslora.ResLoRALinear) for m in scope["dense"].modules())
    assert (tmp_path / "ckpt" / "reslora_model.safetensors").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert "trainable params" in capsys.readouterr().out
