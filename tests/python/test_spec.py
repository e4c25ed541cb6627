"""The spec's exact values (section 5) through the Python layers and the C++ merges; the cases
come from tests/data/spec_cases.txt, which the C++ tests read too."""

import pytest
import torch

from spec_cases import CASES, FORWARD_CASES, MERGE_CASES, inputs, make_case_chain, numbers, per_block, set_window, word


def close(got, want, tol):
    torch.testing.assert_close(got.detach().cpu().double(), want, rtol=0, atol=tol)


def test_the_data_file_has_every_case():
    assert len(FORWARD_CASES) == 6 and len(MERGE_CASES) == 14


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_and_gradients(case, device):
    chain = make_case_chain(case, device)
    xs = [x.to(device).requires_grad_() for x in inputs()]
    hs = chain(xs)
    sum(h.sum() for h in hs).backward()
    h, dA = per_block(case, "h", (2,)), per_block(case, "dA", (1, 2))
    dB, dx = per_block(case, "dB", (2, 1)), per_block(case, "dx", (2,))
    for n in range(3):
        close(hs[n], h[n], 1e-12)
        close(chain.blocks[n].lora_A.grad, dA[n], 1e-12)
        close(chain.blocks[n].lora_B.grad, dB[n], 1e-12)
        close(xs[n].grad, dx[n], 1e-12)


def eval_outputs(chain, xs):
    for blk in chain.blocks:
        blk.eval()
    with torch.no_grad():
        return chain(xs)


@pytest.mark.parametrize("case", MERGE_CASES)
def test_merge(case):
    f = CASES[case]
    tol = float(word(case, "tol")) if "tol" in f else 1e-9
    chain = make_case_chain(case)
    for n, blk in enumerate(chain.blocks):
        for kind in ("x", "z"):
            if f"{kind}_window_{n}" in f:
                set_window(blk, numbers(case, f"{kind}_window_{n}"), z=kind == "z")
    xs = inputs(word(case, "train") if "train" in f else "x")
    train = None
    if "train" in f:
        train = [h.detach() for h in chain(xs)]  # fills the windows
        if "h_train" in f:
            for h, want in zip(train, per_block(case, "h_train", (2,))):
                close(h, want, tol)
    B0 = [blk.lora_B.detach().clone() for blk in chain.blocks]
    chain.merge_to_lora(word(case, "merge"))
    assert all(blk.variant == "lora" for blk in chain.blocks)
    W = [blk.base_weight() + blk.scaling * blk.lora_B @ blk.lora_A for blk in chain.blocks]
    if "W" in f:
        for w, want in zip(W, per_block(case, "W", (2, 2))):
            close(w, want, tol)
    if "W2" in f:
        close(W[2], per_block(case, "W2", (2, 2), 1)[0], tol)
    for n in (1, 2):
        if f"A{n}" in f:
            close(chain.blocks[n].lora_A, per_block(case, f"A{n}", (1, 2), 1)[0], tol)
    if "alpha" in f:
        for blk, b, alpha in zip(chain.blocks, B0, numbers(case, "alpha")):
            close(blk.lora_B, (1 + alpha) * b, tol)
    if "rank2" in f:
        assert chain.blocks[2].lora_A.shape[0] == int(word(case, "rank2"))
    h = eval_outputs(chain, xs)
    if "h" in f:
        for y, want in zip(h, per_block(case, "h", (2,))):
            close(y, want, tol)
    if "h2" in f:
        close(h[2], per_block(case, "h2", (2,), 1)[0], tol)
    if "exact" in f:
        for y, want in zip(h, train):
            close(y, want, tol)
    if "error" in f:
        assert max((y - t).abs().max().item() for y, t in zip(h, train)) > 1e-3
