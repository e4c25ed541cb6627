"""Saves are atomic as a whole: a process killed at any moment of save_pretrained leaves the
previous complete save or the new complete one, never a mix, and the next save removes what the
killed one left behind."""

import json
import os
import random
import signal
import textwrap
import time

import pytest
from torch import nn

import reslora
from reslora import saving

safetensors = pytest.importorskip("safetensors")

# A small model saved with lora_alpha and lora_B values that say which save it is: version v has
# lora_alpha = 8 v and lora_B filled with v, so a directory mixing two saves shows it.
MODEL = textwrap.dedent("""
    import torch, reslora
    from torch import nn

    def save(path, version, fmt="reslora"):
        torch.manual_seed(0)
        base = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
        cfg = reslora.ResLoRAConfig(variant="is" if fmt == "reslora" else "bs", r=4,
                                    lora_alpha=8.0 * version,
                                    target_modules=[str(i) for i in range(4)])
        model = reslora.get_reslora_model(base, cfg)
        with torch.no_grad():
            for blk in model.blocks.values():
                blk.lora_B.fill_(float(version))
        if fmt == "peft":
            model.merge_to_lora()
        model.save_pretrained(path)
""")


def versions_in(path):
    """The versions each file of a reslora checkpoint says it is, or None if a file is missing."""
    from safetensors import safe_open

    cfg_path = os.path.join(path, "reslora_config.json")
    st_path = os.path.join(path, "reslora_model.safetensors")
    if not (os.path.isfile(cfg_path) and os.path.isfile(st_path)):
        return None
    with open(cfg_path) as f:
        v_json = json.load(f)["lora_alpha"] / 8
    from reslora import checkpoints

    with safe_open(st_path, framework="pt") as f:
        described = checkpoints.decode(f.get_tensor("_extra_state"), st_path)
        v_meta = described["config"]["lora_alpha"] / 8
        values = {f.get_tensor(k).unique().item() for k in f.keys() if k.endswith("lora_B")}
    return {v_json, v_meta} | values


def leftovers(parent):
    return [n for n in os.listdir(parent) if ".reslora-" in n]


def crash_at(k):
    """Makes the k-th point of this process's file-system calls (before or after each call a
    save makes) kill the process, as a power cut or an OOM kill would."""
    import shutil

    import safetensors.torch as st

    calls = [0]

    def crashing(f):
        def g(*a, **kw):
            for when in ("before", "after"):
                calls[0] += 1
                if calls[0] == k:
                    os.kill(os.getpid(), signal.SIGKILL)
                if when == "before":
                    out = f(*a, **kw)
            return out

        return g

    for mod, name in [
        (os, "fsync"),
        (os, "rename"),
        (os, "link"),
        (os, "mkdir"),
        (os, "chmod"),
        (shutil, "rmtree"),
        (st, "save_file"),
        (json, "dump"),
    ]:
        setattr(mod, name, crashing(getattr(mod, name)))
    saving._exchange = crashing(saving._exchange)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("exchange", [True, False])
def test_a_save_killed_at_any_call_leaves_the_old_or_the_new_checkpoint_whole(tmp_path, exchange):
    path = str(tmp_path / "ckpt")
    ns = {}
    exec(MODEL, ns)
    ns["save"](path, 1)
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")  # not ours: must survive
    seen, k = set(), 1
    while True:
        pid = os.fork()  # the save runs in a child that is killed at point k
        if pid == 0:
            try:
                if not exchange:
                    saving._exchange = lambda a, b: False
                crash_at(k)
                ns["save"](path, 2)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        saving.recover(path)  # what the next save or load does first
        v = versions_in(path)
        assert v in ({1}, {2}), f"killed at point {k}: the directory holds {v}"
        assert (tmp_path / "ckpt" / "tokenizer.json").read_text() == "{}"
        seen.add(v.pop())
        if os.WIFEXITED(status):  # the save got past its last point
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
        ns["save"](path, 1)  # back to the old save (this also cleans up), for the next k
        assert not leftovers(str(tmp_path))
        k += 1
    assert seen == {1, 2} and k > 8  # kills before and after the swap were both tried


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_saves_killed_at_random_moments(tmp_path):
    # Kills (SIGKILL, as an OOM kill or a power cut) at random moments of a process that saves two
    # versions in turn, not only at the file-system calls the test above stops at: after each, the
    # directory holds one whole checkpoint. Where the kills land depends on the machine's speed,
    # so only what a save guarantees is asserted; the test above covers every point of a save.
    path = str(tmp_path / "ckpt")
    ns = {}
    exec(MODEL, ns)
    start = time.perf_counter()
    ns["save"](path, 1)
    save_s = time.perf_counter() - start
    rng = random.Random(0)
    for kill in range(24):
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child saves in a loop until it is killed
            try:
                os.close(ready_r)
                os.write(ready_w, b"1")
                i = 0
                while True:
                    ns["save"](path, 1 + i % 2)
                    i += 1
            finally:
                os._exit(0)
        os.close(ready_w)
        os.read(ready_r, 1)
        os.close(ready_r)
        time.sleep(rng.uniform(0.0, 3 * save_s))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        saving.recover(path)  # what the next save or load does first
        v = versions_in(path)
        assert v in ({1}, {2}), f"kill {kill}: the directory holds {v}"
    ns["save"](path, 1)
    assert not leftovers(str(tmp_path)) and versions_in(path) == {1}


def test_peft_adapter_saves_are_whole_too_and_keep_other_files(tmp_path):
    ns = {}
    exec(MODEL, ns)
    ns["save"](str(tmp_path), 1, fmt="peft")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    ns["save"](str(tmp_path), 2, fmt="peft")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert cfg["lora_alpha"] / cfg["r"] == 4.0  # the second save's scaling (16 / 4)
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep"
    assert any(k.endswith("lora_B.weight") for k in weights)


def test_a_file_as_save_directory_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    model = reslora.get_reslora_model(nn.Sequential(nn.Linear(4, 4)), reslora.ResLoRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(NotADirectoryError, match="save_directory must be a directory, got the file"):
        model.save_pretrained(str(f))
    assert f.read_text() == "x"
