"""Data parallelism on the CPU (gloo, 2 processes spawned here): with DDP every rank merges to
the same adapter, equal to one process that trained on the whole batch, because the is / ms
merge statistics are combined across ranks."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import reslora
from hf_models import TARGETS, batch, make

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

WORLD = 2
STEPS = 3


def model_for(variant, pre_num):
    base = make("llama")
    cfg = reslora.ResLoRAConfig(variant=variant, pre_num=pre_num, r=4, lora_alpha=8,
                                target_modules=TARGETS["llama"])
    model = reslora.get_reslora_model(base, cfg)
    torch.manual_seed(1)
    for blk in model.blocks.values():
        torch.nn.init.normal_(blk.lora_B, std=0.1)
    return model.train()


def train(model, rank=None):
    """STEPS SGD steps on 4-sequence batches; a rank trains on its half of each."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(STEPS):
        b = batch("llama", seed=step, n=4)
        if rank is not None:
            b = {k: v.chunk(WORLD)[rank] for k, v in b.items()}
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()


def merged(model):
    inner = model.module if hasattr(model, "module") else model
    inner.merge_to_lora()
    return {n: (b.lora_A.detach().clone(), b.lora_B.detach().clone()) for n, b in inner.blocks.items()}


def worker(rank, port, variant, pre_num, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model_for(variant, pre_num))
        train(ddp, rank)
        torch.save(merged(ddp), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("variant,pre_num", [("is", 1), ("ms", -1)])
def test_ddp_ranks_merge_to_the_single_process_adapter(tmp_path, variant, pre_num):
    mp.spawn(worker, args=(free_port(), variant, pre_num, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = model_for(variant, pre_num)
    train(single)
    want = merged(single)
    assert ranks[0].keys() == want.keys()
    for name in want:
        for r in range(1, WORLD):
            assert all(torch.equal(a, b) for a, b in zip(ranks[0][name], ranks[r][name])), name
        for got, ref in zip(ranks[0][name], want[name]):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)  # float32 sums in another order
