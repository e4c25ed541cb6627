"""The exact test cases of the spec (section 5): three blocks, d = 2, r = 1, s = 2, W = I."""

import torch
from torch import nn

import reslora

A0 = [[1.0, 0.0]]
B0 = [[1.0], [1.0]]
A1 = [[0.0, 1.0]]
B1 = [[2.0], [0.0]]
A2 = [[1.0, 1.0]]
B2 = [[0.0], [1.0]]
XS = [[1.0, 2.0], [3.0, -1.0], [1.0, 2.0]]

# case -> (variant, pre_num, h, dA, dB (columns), dx)
FORWARD_CASES = {
    "lora": ("lora", 1, [[3, 4], [-1, -1], [1, 8]], [[4, 8], [12, -4], [2, 4]],
             [[2, 2], [-2, -2], [6, 6]], [[5, 1], [1, 5], [3, 3]]),
    "is": ("is", 1, [[5, 6], [7, -1], [1, 12]], [[8, 16], [16, 4], [8, 2]],
           [[4, 4], [2, 2], [10, 10]], [[9, 5], [3, 7], [3, 3]]),
    "bs1": ("bs", 1, [[3, 4], [5, 5], [9, 8]], [[16, 4], [16, 4], [2, 4]],
            [[8, 8], [2, 2], [6, 6]], [[5, 1], [5, 5], [3, 7]]),
    "bs-1": ("bs", -1, [[3, 4], [5, 5], [11, 10]], [[20, 12], [16, 4], [2, 4]],
             [[10, 10], [2, 2], [6, 6]], [[5, 1], [5, 5], [7, 7]]),
    "ms1": ("ms", 1, [[3, 4], [3, -1], [1, 6]], [[8, 16], [18, -6], [2, 4]],
            [[2, 2], [0, 0], [4, 4]], [[9, 1], [1, 7], [3, 3]]),
    "ms-1": ("ms", -1, [[3, 4], [3, -1], [1, 8]], [[10, 20], [18, -6], [2, 4]],
             [[2, 2], [0, 0], [6, 6]], [[11, 1], [1, 7], [3, 3]]),
}


def make_chain(variant, pre_num, device="cpu", dtype=torch.float64):
    blocks = []
    for a, b in ((A0, B0), (A1, B1), (A2, B2)):
        base = nn.Linear(2, 2, bias=False).to(device=device, dtype=dtype)
        with torch.no_grad():
            base.weight.copy_(torch.eye(2, dtype=dtype))
        blk = reslora.ResLoRALinear(base, r=1, lora_alpha=2, variant=variant, pre_num=pre_num)
        with torch.no_grad():
            blk.lora_A.copy_(torch.tensor(a, dtype=dtype))
            blk.lora_B.copy_(torch.tensor(b, dtype=dtype))
        blocks.append(blk)
    return reslora.ResLoRAChain(blocks, name="spec")


def set_window(blk, values, z=False):
    ring = blk.z_norms if z else blk.x_norms
    with torch.no_grad():
        ring.zero_()
        ring[: len(values)] = torch.tensor(values, dtype=ring.dtype)
        blk.stats_count.fill_(len(values))
