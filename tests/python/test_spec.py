"""The spec's exact values (section 5) through the Python layers and the C++ merges."""

import math

import pytest
import torch

from spec_cases import FORWARD_CASES, XS, make_chain, set_window


def t(v):
    return torch.tensor(v, dtype=torch.float64)


def run(chain, xs, device="cpu"):
    xs = [torch.tensor(x, dtype=torch.float64, device=device, requires_grad=True) for x in xs]
    hs = chain(xs)
    sum(h.sum() for h in hs).backward()
    return xs, hs


@pytest.mark.parametrize("case", sorted(FORWARD_CASES))
def test_forward_and_gradients(case, device):
    variant, pre_num, h, dA, dB, dx = FORWARD_CASES[case]
    chain = make_chain(variant, pre_num, device)
    xs, hs = run(chain, XS, device)
    for n in range(3):
        torch.testing.assert_close(hs[n].detach().cpu(), t(h[n]), rtol=0, atol=1e-12)
        torch.testing.assert_close(chain.blocks[n].lora_A.grad.cpu(), t([dA[n]]), rtol=0, atol=1e-12)
        torch.testing.assert_close(chain.blocks[n].lora_B.grad.cpu(), t(dB[n]).view(2, 1), rtol=0, atol=1e-12)
        torch.testing.assert_close(xs[n].grad.cpu(), t(dx[n]), rtol=0, atol=1e-12)


def merged_weights(chain):
    return [blk.base_weight() + blk.scaling * blk.lora_B @ blk.lora_A for blk in chain.blocks]


def eval_outputs(chain, xs):
    for blk in chain.blocks:
        blk.eval()
    with torch.no_grad():
        return [y.tolist() for y in chain([t(x) for x in xs])]


def close(a, b, tol=1e-6):
    torch.testing.assert_close(t(a), t(b), rtol=0, atol=tol)


def with_windows(chain, values, z=False):
    for blk, v in zip(chain.blocks, values):
        set_window(blk, v, z=z)


def test_is_input_merge():
    chain = make_chain("is", 1)
    with_windows(chain, [[2, 4], [6], [1.5, 1.5]])
    chain.merge_to_lora("input")
    w = merged_weights(chain)
    close(w[0].tolist(), [[5, 0], [4, 1]])
    close(w[1].tolist(), [[1, 6], [0, 1]])
    close(w[2].tolist(), [[1, 0], [10, 11]])
    close(eval_outputs(chain, XS), [[5, 6], [-3, -1], [1, 32]])
    assert all(blk.variant == "lora" for blk in chain.blocks)


def test_is_weight_merge():
    chain = make_chain("is", 1)
    chain.merge_to_lora("weight")
    w = merged_weights(chain)
    a2 = math.sqrt(14 / 18)
    assert abs(a2 - 0.881917) < 1e-6
    close(w[2].tolist(), [[1, 0], [3.763834, 4.763834]])
    close(eval_outputs(chain, XS)[2], [1, 13.291503])


@pytest.mark.parametrize("pre_num,a1,a2,h", [
    (1, [0.5, 1], [1, 5], [[3, 4], [5, -1], [1, 24]]),
    (-1, [0.5, 1], [3, 5], [[3, 4], [5, -1], [1, 28]]),
])
def test_ms_input_merge(pre_num, a1, a2, h):
    chain = make_chain("ms", pre_num)
    with_windows(chain, [[2, 4], [6], [1.5, 1.5]])
    chain.merge_to_lora("input")
    close(chain.blocks[1].lora_A.tolist(), [a1])
    close(chain.blocks[2].lora_A.tolist(), [a2])
    close(eval_outputs(chain, XS), h)


def test_ms_mid_merge():
    chain = make_chain("ms", 1)
    with_windows(chain, [[1, 3], [4], [0.5]], z=True)
    B = [blk.lora_B.detach().clone() for blk in chain.blocks]
    chain.merge_to_lora("mid")
    for blk, b, alpha in zip(chain.blocks, B, [0, 0.5, 8]):
        torch.testing.assert_close(blk.lora_B.detach(), (1 + alpha) * b)
    close(eval_outputs(chain, XS), [[3, 4], [-3, -1], [1, 56]])


@pytest.mark.parametrize("pre_num,w2", [(1, [[1, 4], [2, 3]]), (-1, [[3, 4], [4, 3]])])
def test_bs_exact_merge(pre_num, w2):
    chain = make_chain("bs", pre_num)
    train = [h.tolist() for h in chain([t(x) for x in XS])]
    chain.merge_to_lora()
    w = merged_weights(chain)
    close(w[0].tolist(), [[3, 0], [2, 1]])
    close(w[1].tolist(), [[3, 4], [2, 1]])
    close(w[2].tolist(), w2)
    close(eval_outputs(chain, XS), train, tol=1e-12)
    assert chain.blocks[2].lora_A.shape[0] == (2 if pre_num == 1 else 3)


PROP = [[1, 2], [0.5, 1], [0.25, 0.5]]


@pytest.mark.parametrize("variant,merge,h", [
    ("is", "input", [[5, 6], [12.5, 1], [0.25, 5]]),
    ("ms", "input", [[3, 4], [8.5, 1], [0.25, 4]]),
    ("ms", "mid", None),
])
def test_proportional_inputs_merge_exactly(variant, merge, h):
    chain = make_chain(variant, 1)
    train = [y.tolist() for y in chain([t(x) for x in PROP])]  # fills the windows
    if h is not None:
        close(train, h)
    if merge == "mid":
        B = [blk.lora_B.detach().clone() for blk in chain.blocks]
    chain.merge_to_lora(merge)
    if merge == "mid":
        for blk, b, alpha in zip(chain.blocks, B, [0, 1, 4 / 3]):
            torch.testing.assert_close(blk.lora_B.detach(), (1 + alpha) * b)
    close(eval_outputs(chain, PROP), train, tol=1e-9)


@pytest.mark.parametrize("variant,merge", [("is", "input"), ("is", "weight"), ("ms", "input"), ("ms", "mid")])
def test_non_proportional_inputs_have_merge_error(variant, merge):
    chain = make_chain(variant, 1)
    train = torch.stack([y.detach() for y in chain([t(x) for x in XS])])
    chain.merge_to_lora(merge)
    merged = torch.stack([torch.tensor(y, dtype=torch.float64) for y in eval_outputs(chain, XS)])
    assert (merged - train).abs().max() > 1e-3
