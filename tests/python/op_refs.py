"""Plain PyTorch references and inputs of the op tests."""

import torch


def ref_down(x, xp, A):
    u = x if xp is None else x + xp
    return u.double() @ A.double().t()


def ref_up(x, W, b, z, B, s):
    y = x.double() @ W.double().t() + s * z.double() @ B.double().t()
    return y if b is None else y + b.double()


def rand(*shape, dtype=torch.float64, device="cpu", requires_grad=False):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)
