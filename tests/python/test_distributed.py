"""DDP and FSDP2 on the CPU (gloo, 2 processes spawned here), every variant, dropout on, against
one process doing the same work: the ranks' halves of each batch as two micro-batches, each with
the rank's dropout draws, gradients averaged. Compared: parameters after 3 AdamW steps, the
saved checkpoint (gathered from the shards, the merge statistics of both ranks combined)
reloaded on one process, and the merged adapters. One spawn of the two ranks runs every engine
(DDP, FSDP2, FSDP2 with checkpointing, FSDP2 in bf16): starting the processes is most of the cost."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import reslora

from hf_models import TARGETS, batch, make

transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.xdist_group("distributed"),  # one worker spawns the ranks once for the module
    pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed"),
]

WORLD = 2
STEPS = 2
CONFIGS = [("lora", 1), ("is", 1), ("bs", 1), ("bs", -1), ("ms", 1), ("ms", -1)]
BF16_CONFIGS = [("bs", -1), ("ms", -1)]


def model_for(variant, pre_num, dtype=torch.float32):
    base = make("llama").to(dtype)
    cfg = reslora.ResLoRAConfig(
        variant=variant, pre_num=pre_num, r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS["llama"]
    )
    model = reslora.get_reslora_model(base, cfg)
    torch.manual_seed(1)
    for blk in model.blocks.values():
        torch.nn.init.normal_(blk.lora_B, std=0.1)
    return model.train()


def half(step, rank):
    return {k: v.chunk(WORLD)[rank] for k, v in batch("llama", seed=step, n=4).items()}


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def adapter(model):
    """A and B of every block, gathered from their shards."""
    from reslora.compat import full as _full

    return {n: (_full(b.lora_A).detach().clone(), _full(b.lora_B).detach().clone()) for n, b in model.blocks.items()}


# (engine, gradient checkpointing); fsdp: fully_shard on each decoder layer and the root,
# reshard_after_forward on (the default)
ENGINES = [("ddp", False), ("fsdp", False), ("fsdp", True), ("fsdp_bf16", False)]


def out_dir(out, engine, checkpointing):
    return os.path.join(out, engine + ("-ckpt" if checkpointing else ""))


def worker(rank, ports, out):
    # one process group per engine, as a training script has: nothing of one engine's
    # collectives or sharding outlives it
    for (engine, checkpointing), port in zip(ENGINES, ports):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        try:
            run_engine(rank, engine, out_dir(out, engine, checkpointing), checkpointing)
        finally:
            dist.destroy_process_group()


def run_engine(rank, engine, out, checkpointing):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from reslora.compat import is_dtensor as _is_dtensor

    mesh = init_device_mesh("cpu", (WORLD,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for variant, pre_num in CONFIGS if engine != "fsdp_bf16" else BF16_CONFIGS:
        model = model_for(variant, pre_num)
        if checkpointing:
            model.gradient_checkpointing_enable()
        if engine == "ddp":
            run = torch.nn.parallel.DistributedDataParallel(model)
        else:  # per decoder layer, then the root: what accelerate's FSDP2 does
            kw = dict(mesh=mesh, mp_policy=policy) if engine == "fsdp_bf16" else dict(mesh=mesh)
            for layer in model.get_base_model().model.layers:
                fully_shard(layer, **kw)
            fully_shard(model, **kw)
            run = model
            # resharded between forwards (the default): bs gathers the earlier layers' A, B
            assert all(_is_dtensor(b.lora_A) for b in model.blocks.values())
        opt = optimizer(model)
        for step in range(STEPS):
            torch.manual_seed(100 * step + rank)
            run(**half(step, rank)).loss.backward()
            opt.step()
            opt.zero_grad()
        trained = adapter(model)
        tag = f"{engine}-{variant}{pre_num}"
        model.save_pretrained(os.path.join(out, tag))  # collective: rank 0 writes
        merged = None
        if not (engine.startswith("fsdp") and variant == "bs"):  # bs under FSDP2: merged on one process
            model.merge_to_lora()
            merged = adapter(model)
        if rank == 0 or engine == "ddp":
            torch.save({"trained": trained, "merged": merged}, os.path.join(out, f"{tag}-rank{rank}.pt"))


def free_ports(n):
    """n distinct free ports (the sockets held open together, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def reference(variant, pre_num, checkpointing):
    """One process: each step the ranks' halves as micro-batches with the ranks' seeds."""
    model = model_for(variant, pre_num)
    if checkpointing:
        model.gradient_checkpointing_enable()
    opt = optimizer(model)
    for step in range(STEPS):
        for rank in range(WORLD):
            torch.manual_seed(100 * step + rank)
            (model(**half(step, rank)).loss / WORLD).backward()
        opt.step()
        opt.zero_grad()
    trained = adapter(model)
    # The statistics of the whole batch: the ranks record one slot a step, the root of the
    # summed squares of their halves' norms; here the halves took two slots.
    with torch.no_grad():
        for blk in model.blocks.values():
            for ring in (blk.x_norms, blk.z_norms):
                pairs = ring[: STEPS * WORLD].view(STEPS, WORLD)
                whole = pairs.square().sum(1).sqrt()
                ring.zero_()
                ring[:STEPS] = whole
            blk.stats_count.fill_(STEPS)
    return model, trained


def close(a, b, rtol=2e-4, atol=2e-5):
    for n in b:
        for x, y in zip(a[n], b[n]):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """The ranks' results for every engine, from one spawn of the two processes."""
    out = tmp_path_factory.mktemp("ranks")
    ports = free_ports(len(ENGINES))
    mp.spawn(worker, args=(ports, str(out)), nprocs=WORLD, join=True)
    return out


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(variant, pre_num, checkpointing):
        key = (variant, pre_num, checkpointing)
        if key not in cache:
            cache[key] = reference(variant, pre_num, checkpointing)
        return cache[key]

    return get


@pytest.mark.parametrize("engine,checkpointing", [e for e in ENGINES if e[0] != "fsdp_bf16"])
def test_data_parallel_equals_one_process(spawned, references, engine, checkpointing):
    out = out_dir(str(spawned), engine, checkpointing)
    for variant, pre_num in CONFIGS:
        tag = f"{engine}-{variant}{pre_num}"
        got = torch.load(os.path.join(out, f"{tag}-rank0.pt"))
        if engine == "ddp":  # the replicas stay equal, and merge to the same adapter
            other = torch.load(os.path.join(out, f"{tag}-rank1.pt"))
            for key in ("trained", "merged"):
                for n in got[key]:
                    assert all(torch.equal(x, y) for x, y in zip(got[key][n], other[key][n])), (tag, n)
        ref, want = references(variant, pre_num, checkpointing)
        close(got["trained"], want)
        # the checkpoint reloads on one process with the whole batch's statistics
        back = reslora.ResLoRAModel.from_pretrained(make("llama"), os.path.join(out, tag))
        close(adapter(back), want)
        for n, blk in back.blocks.items():
            torch.testing.assert_close(blk.x_norms, ref.blocks[n].x_norms, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(
                blk.z_norms, ref.blocks[n].z_norms, rtol=1e-4, atol=1e-6, msg=lambda m: f"{tag} {n}: {m}"
            )
        merged_ref = copy.deepcopy(ref).merge_to_lora()
        back.merge_to_lora()
        close(adapter(back), adapter(merged_ref))
        if got["merged"] is not None:
            close(got["merged"], adapter(merged_ref))


def test_fsdp_mixed_precision_trains_as_float32(spawned, references):
    # bf16 parameters in compute, float32 gradient reduction: the updates of float32 training to
    # within bf16 rounding (a missing or doubled reduction would be off by ~100 %)
    out = out_dir(str(spawned), "fsdp_bf16", False)
    for variant, pre_num in BF16_CONFIGS:
        got = torch.load(os.path.join(out, f"fsdp_bf16-{variant}{pre_num}-rank0.pt"))
        _, want = references(variant, pre_num, False)
        start = adapter(model_for(variant, pre_num))
        for n in want:  # the updates agree to bf16 precision
            for g, w, s in zip(got["trained"][n], want[n], start[n]):
                assert g.dtype == torch.float32  # FSDP2 keeps the sharded parameters in float32
                rel = (g - w).norm() / (w - s).norm()
                assert rel < 0.2, (variant, n, rel.item())  # AdamW steps of bf16 gradients


def trainer_torchrun(engine, nproc, out, *extra):
    """trainer_run.py under torchrun: 4 Trainer steps of a bs model, checkpoints every 2."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "trainer_run.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += [script, engine, str(out), "4", *extra]  # --standalone: a free port, no race
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if "restore data location of torch.storage.UntypedStorage (tagged with cpu:0)" in done.stderr:
        # the Trainer's own optimizer load, after the adapter's checkpoint loaded (transformers
        # 5.17 gives torch.load map_location=torch.device("cpu", 0) under torchrun with use_cpu)
        pytest.skip(f"transformers {transformers.__version__} cannot resume a use_cpu DDP run")
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-6000:]}"


def assert_resumed_run_equals_the_full_one(tmp_path, engine, nproc, exact):
    trainer_torchrun(engine, nproc, tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoint-2"
    weights = [f for f in os.listdir(ckpt) if f.startswith(("model", "pytorch_model"))]
    assert weights, sorted(os.listdir(ckpt))
    model_bytes = sum(p.numel() * p.element_size() for p in make("llama").parameters())  # 109 kB
    for f in weights:  # the adapter (17 kB of tensors), not the model
        assert os.path.getsize(ckpt / f) < model_bytes / 2, (f, os.path.getsize(ckpt / f))
    trainer_torchrun(engine, nproc, tmp_path / "resumed", str(ckpt))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert os.path.getsize(tmp_path / "full" / "final" / "model.safetensors") < 30_000
    back = reslora.ResLoRAModel.from_pretrained(make("llama"), str(tmp_path / "full" / "final"))
    assert back.reslora_config.variant == "bs"
    trained = [blk.lora_B.abs().max().item() for blk in back.blocks.values()]
    assert all(t > 0 for t in trained), trained  # B starts at zero: every block trained


def test_hf_trainer_under_torchrun_saves_adapter_checkpoints_and_resumes(tmp_path):
    assert_resumed_run_equals_the_full_one(tmp_path, "ddp", WORLD, exact=True)


@pytest.mark.gpu  # accelerate's FSDP2 needs CUDA
def test_hf_trainer_with_accelerates_fsdp2_saves_adapter_checkpoints_and_resumes(tmp_path):
    # the Trainer's own fsdp arguments (accelerate's FSDP2, each decoder layer sharded and
    # resharded after its forward), on the GPUs there are (one is enough for the code path)
    assert_resumed_run_equals_the_full_one(tmp_path, "fsdp2", torch.cuda.device_count(), exact=False)
