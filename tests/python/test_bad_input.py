"""Bad input a user can give gets a clear error naming the argument, what was expected and what
was received (or, where legal but likely a mistake, a warning), through the config, the
wrapping, the layers, the ops and the checkpoint reader."""

import re
import warnings

import pytest
import torch
from torch import nn

import reslora

from hf_models import make
from seeds import S

ops = torch.ops.reslora


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (
            dict(target_modules="(q_proj"),
            r"target_modules must be .*; got the string '\(q_proj', which is not a valid regular expression",
        ),
        (
            dict(target_modules=123),
            r"target_modules must be a non-empty list of names, a regex string or 'all-linear', got 123",
        ),
        (dict(target_modules=[]), r"target_modules must be a non-empty list of names, .*got \[\]"),
        (
            dict(target_modules=["q_proj", 3]),
            r"target_modules must be a non-empty list of names, .*got \['q_proj', 3\]",
        ),
        (dict(r=True), r"r must be an int >= 1, got True"),
        (dict(r=2.0), r"r must be an int >= 1, got 2.0"),
        (
            dict(lora_dropout=0.99999999),
            r"lora_dropout must be a number in \[0, 1\) that keeps at least 2\^-15 of the inputs .*, got 0.99999999",
        ),
        (dict(lora_dropout="0.1"), r"lora_dropout must be a number in \[0, 1\) .*, got '0.1'"),
        (
            dict(lora_alpha=float("inf")),
            r"lora_alpha must be a finite number > 0 \(scaling = lora_alpha / r\), got inf",
        ),
        (dict(pre_num=-3), r"pre_num must be -1 \(all\) or an int >= 0, got -3"),
        (dict(stats_window=False), r"stats_window must be an int >= 1, got False"),
        (dict(variant="IS"), r"variant must be one of 'lora', 'is', 'bs', 'ms', got 'IS'"),
        (
            dict(variant="ms", merge="weight"),
            r"merge 'weight' does not apply to variant 'ms'; expected one of 'input', 'mid', 'fit'",
        ),
        (dict(merge=3), r"merge must be one of \['input', 'weight', 'fit'\] or None, got 3"),
    ],
)
def test_config(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        reslora.ResLoRAConfig(**kwargs)


@pytest.mark.parametrize(
    "targets,msg",
    [
        (
            ["embed_tokens"],
            r"names 'model.embed_tokens', a Embedding; reslora adapts nn.Linear and GPT-2 Conv1D layers",
        ),
        (["input_layernorm"], r"names 'model.layers.0.input_layernorm', a LlamaRMSNorm"),
        (r"model\.layers\.0\.self_attn", r"names 'model.layers.0.self_attn', a LlamaAttention"),
        (["nope"], r"target_modules \['nope'\] match no nn.Linear or Conv1D layer of LlamaForCausalLM"),
    ],
)
def test_targets_that_are_not_linear_layers(targets, msg):
    with pytest.raises(ValueError, match=msg):
        reslora.get_reslora_model(make("llama"), reslora.ResLoRAConfig(target_modules=targets))


def test_layer_input():
    with pytest.raises(ValueError, match="base_layer must be an nn.Linear or a GPT-2 Conv1D, got Embedding"):
        reslora.ResLoRALinear(nn.Embedding(10, 4), r=2)
    with pytest.raises(ValueError, match="base_layer must be an nn.Linear or a GPT-2 Conv1D, got LayerNorm"):
        reslora.ResLoRALinear(nn.LayerNorm(4), r=2)
    blk = reslora.ResLoRALinear(nn.Linear(4, 3), r=2)
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "x must have d_in = 4 features in its last dimension (weight is [d_out, d_in] = [3, 4]), "
            "got x of shape [2, 5]"
        ),
    ):
        blk(torch.randn(2, 5))


def test_op_input_is_blamed_on_the_right_argument():
    x, W = torch.randn(3, 4), torch.randn(5, 4)
    A, B = torch.randn(2, 4), torch.randn(5, 3)
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "lora_linear: B must have A's rank: B is [d_out, r] with r = A.size(0) = 2, got B [5, 3] and A [2, 4]"
        ),
    ):
        ops.lora_linear(x, None, W, None, A, B, None, 1.0, 0.0, None, 0, 2)
    with pytest.raises(RuntimeError, match=re.escape("lora_linear: x must have d_in = 4 features")):
        ops.lora_linear(torch.randn(3, 6), None, W, None, A, torch.randn(5, 2), None, 1.0, 0.0, None, 0, 2)
    B = torch.randn(5, 2)
    y, z = ops.lora_linear(x, None, W, None, A, B, None, 1.0, 0.0, None, 0, 2)
    with pytest.raises(
        RuntimeError, match=re.escape("_lora_linear_backward: grad_z must have the shape of z [3, 2], got [2, 3]")
    ):
        ops._lora_linear_backward(
            torch.randn(3, 5), z.t().contiguous(), x, None, W, A, B, z, None, 1.0, 0.0, None, 0, 2, True
        )
    with pytest.raises(RuntimeError, match=r"dropout must keep at least 2\^-15 of the inputs"):
        ops.lora_down(x, None, A, 0.99999999, S(0, x), 0, 2)


def test_seed_arguments():
    x, A = torch.randn(3, 4), torch.randn(2, 4)
    with pytest.raises(
        RuntimeError, match=r"lora_down: seed must be given when dropout > 0 .*got none with dropout = 0.5"
    ):
        ops.lora_down(x, None, A, 0.5, None, 0, 2)
    with pytest.raises(RuntimeError, match=r"seed must be an int64 tensor of one element, got Float of shape \[1\]"):
        ops.lora_down(x, None, A, 0.5, torch.zeros(1), 0, 2)
    with pytest.raises(RuntimeError, match=r"seed must be an int64 tensor of one element, got Long of shape \[2\]"):
        ops.lora_down(x, None, A, 0.5, torch.zeros(2, dtype=torch.long), 0, 2)
    with pytest.raises(RuntimeError, match=r"seed must be on the device of x \(cpu\), got meta"):
        ops.lora_down(x, None, A, 0.5, torch.zeros(1, dtype=torch.long, device="meta"), 0, 2)
    with pytest.raises(RuntimeError, match=r"seed_offset must be >= 0, got -1"):
        ops.lora_down(x, None, A, 0.5, S(1, x), -1, 2)


def test_damaged_checkpoint_file_is_named(tmp_path):
    def model():
        return reslora.get_reslora_model(
            nn.Sequential(nn.Linear(4, 4)), reslora.ResLoRAConfig(r=2, target_modules=["0"])
        )

    model().save_pretrained(str(tmp_path))
    f = tmp_path / "reslora_model.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"cannot read the checkpoint file '{re.escape(str(f))}'"):
        reslora.ResLoRAModel.from_pretrained(nn.Sequential(nn.Linear(4, 4)), str(tmp_path))


@pytest.mark.parametrize("variant,merge", [("is", "input"), ("ms", "input"), ("ms", "mid")])
def test_merging_without_statistics_warns(variant, merge):
    def fresh():
        return reslora.get_reslora_model(
            nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
            reslora.ResLoRAConfig(variant=variant, merge=merge, r=2, target_modules=["0", "1"]),
        )

    with pytest.warns(
        UserWarning,
        match=r"^reslora: chain '\*': the .* merge averages norms recorded in training forwards, and "
        r"blocks \[0, 1\] have none \(no training forward ran\): their ratios are taken as 1",
    ):
        fresh().merge_to_lora()
    trained = fresh().train()
    trained(torch.randn(3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained.merge_to_lora()  # statistics recorded: no warning
