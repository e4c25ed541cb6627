"""The README's Python examples run as written (the TRL one with a tokenizer put in for `...`)."""

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


def test_readme_trl_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from hf_models import char_tokenizer

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    trl_block = [b for b in blocks if "import datasets, trl" in b]
    assert trl_block, "the README has no TRL example"
    monkeypatch.chdir(tmp_path)
    scope = {}
    # the quickstart's definitions (make_base, cfg) without its training
    exec(compile(blocks[0].split("model = reslora.get_reslora_model")[0], "README.md", "exec"), scope)
    code = trl_block[0].replace("tokenizer = ...", "tokenizer = __tokenizer__", 1)
    assert code != trl_block[0]
    scope["__tokenizer__"] = char_tokenizer()
    exec(compile(code, "README.md", "exec"), scope)
    import reslora

    model = scope["model"]
    assert isinstance(model, reslora.ResLoRAModel)
    assert all(bool(b.lora_B.detach().any()) for b in model.blocks.values())  # DPO trained the adapter
