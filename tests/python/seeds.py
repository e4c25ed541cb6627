"""The ops take their dropout seed as an int64 tensor of one element on the input's device (what
reslora::draw_seed returns); S builds one from a fixed value, for tests that pin the mask."""

import torch


def S(value, like):
    return torch.tensor([value], dtype=torch.int64, device=like.device)
