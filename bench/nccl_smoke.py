"""One-GPU NCCL run of the distributed code paths: FSDP2 (fully_shard per decoder layer, then the
root) and DDP with a process group of one, every variant, dropout 0.05, against the same model
trained without them (same seeds): the largest parameter difference after 5 AdamW steps, and a
save_pretrained / merge_to_lora through the process group. Writes nccl_smoke.json to --out."""

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))
import reslora

from hf_models import batch, make

CONFIGS = [("lora", 1), ("is", 1), ("bs", 1), ("bs", -1), ("ms", 1), ("ms", -1)]


def model_for(variant, pre_num):
    m = reslora.get_reslora_model(
        make("llama"),
        reslora.ResLoRAConfig(
            variant=variant,
            pre_num=pre_num,
            r=4,
            lora_alpha=8,
            lora_dropout=0.05,
            target_modules=["q_proj", "v_proj", "up_proj"],
        ),
    ).cuda()
    torch.manual_seed(1)
    for blk in m.blocks.values():
        torch.nn.init.normal_(blk.lora_B, std=0.1)
    return m.train()


def train(run, model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(5):
        torch.manual_seed(step)
        b = {k: v.cuda() for k, v in batch("llama", seed=step, n=4).items()}
        run(**b).loss.backward()
        opt.step()
        opt.zero_grad()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from reslora.compat import full as _full

    torch.cuda.set_device(0)
    mesh = init_device_mesh("cuda", (1,))
    scratch = tempfile.mkdtemp()  # the checkpoints (not part of the results)
    out = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": {},
    }
    for variant, pre_num in CONFIGS:
        ref = model_for(variant, pre_num)
        train(ref, ref)
        for engine in ("fsdp2", "ddp"):
            model = model_for(variant, pre_num)
            if engine == "fsdp2":
                for layer in model.get_base_model().model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
                run = model
            else:
                run = torch.nn.parallel.DistributedDataParallel(model)
            train(run, model)
            diff = max((_full(b.lora_A) - ref.blocks[n].lora_A).abs().max().item() for n, b in model.blocks.items())
            ckpt = os.path.join(scratch, f"{engine}-{variant}{pre_num}")
            model.save_pretrained(ckpt)
            back = reslora.ResLoRAModel.from_pretrained(make("llama"), ckpt)
            reload_diff = max(
                (back.blocks[n].lora_A - ref.blocks[n].lora_A.cpu()).abs().max().item() for n in back.blocks
            )
            merged = None
            if not (engine == "fsdp2" and variant == "bs"):
                model.merge_to_lora()
                ref_m = copy.deepcopy(ref).merge_to_lora()
                merged = max(
                    (_full(b.lora_A) - ref_m.blocks[n].lora_A).abs().max().item() for n, b in model.blocks.items()
                )
            out["runs"][f"{engine} {variant} pre_num {pre_num}"] = {
                "max |A - A_single|": diff,
                "reloaded": reload_diff,
                "merged": merged,
            }
            print(engine, variant, pre_num, diff, reload_diff, merged, flush=True)
    dist.destroy_process_group()
    with open(os.path.join(args.out, "nccl_smoke.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
