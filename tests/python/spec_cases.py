"""The exact test cases of the spec (section 5), read from tests/data/spec_cases.txt (the C++
tests read the same file): three blocks, d = 2, r = 1, s = 2, W = I."""

import os
from collections import defaultdict

import torch
from torch import nn

import reslora

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "spec_cases.txt")


def _load():
    cases = defaultdict(dict)
    with open(DATA) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            name, field, *values = line.split()
            cases[name][field] = values
    return dict(cases)


CASES = _load()
FORWARD_CASES = sorted(c for c, f in CASES.items() if "dx" in f)
MERGE_CASES = sorted(c for c, f in CASES.items() if c.startswith("merge_") and "merge" in f)


def numbers(case, field):
    return [float(v) for v in CASES[case][field]]


def per_block(case, field, shape, blocks=3):
    v = torch.tensor(numbers(case, field), dtype=torch.float64)
    return list(v.view(blocks, *shape).unbind(0))


def word(case, field):
    return CASES[case][field][0]


def inputs(field="x"):
    return per_block("setup", field, (2,))


def make_chain(variant, pre_num, device="cpu", dtype=torch.float64):
    blocks = []
    for a, b in zip(per_block("setup", "A", (1, 2)), per_block("setup", "B", (2, 1))):
        base = nn.Linear(2, 2, bias=False).to(device=device, dtype=dtype)
        with torch.no_grad():
            base.weight.copy_(torch.eye(2, dtype=dtype))
        blk = reslora.ResLoRALinear(base, r=1, lora_alpha=2, variant=variant, pre_num=pre_num)
        with torch.no_grad():
            blk.lora_A.copy_(a)
            blk.lora_B.copy_(b)
        blocks.append(blk)
    return reslora.ResLoRAChain(blocks, name="spec")


def make_case_chain(case, device="cpu"):
    return make_chain(word(case, "variant"), int(word(case, "pre_num")), device)


def set_window(blk, values, z=False):
    ring = blk.z_norms if z else blk.x_norms
    with torch.no_grad():
        ring.zero_()
        ring[: len(values)] = torch.tensor(values, dtype=ring.dtype)
        blk.stats_count.fill_(len(values))
