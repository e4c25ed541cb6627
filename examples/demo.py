"""The main job: wrap a small Llama-style model with LoRA and each ResLoRA variant, train them on
the same task, compare loss curves, merge the shortcuts away, export PEFT adapters, reload them
with PEFT and check that the outputs match.

    python examples/demo.py [--steps 300] [--out build/demo] [--device cpu]
"""

import argparse
import copy
import os
import time

import torch

import reslora

VARIANTS = [("lora", 1), ("is", 1), ("bs", 1), ("ms", 1)]


def base_model(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def task_batch(gen, vocab, batch=16, length=24):
    """Sequences x_{t+1} = (x_t + step) mod vocab, the step drawn per sequence from {1, 2, 3}:
    the model must read the step off the prefix and continue the progression."""
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    step = torch.randint(1, 4, (batch, 1), generator=gen)
    ids = (start + step * torch.arange(length)) % vocab
    return {"input_ids": ids, "labels": ids}


def train(variant, pre_num, base, args):
    from tqdm import tqdm

    cfg = reslora.ResLoRAConfig(
        variant=variant,
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        pre_num=pre_num,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
    )
    model = reslora.get_reslora_model(copy.deepcopy(base), cfg).to(args.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)  # the same batches for every variant
    losses = []
    model.train()
    for _ in tqdm(range(args.steps), desc=f"{variant:>4}", ncols=80):
        batch = {k: v.to(args.device) for k, v in task_batch(gen, args.vocab).items()}
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return model, losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=os.path.join("build", "demo"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vocab", type=int, default=96)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from peft import PeftModel

    print(f"reslora {reslora.__version__} | torch {torch.__version__} | device {args.device}")
    base = base_model(args.vocab)
    curves, models = {}, {}
    for variant, pre_num in VARIANTS:
        t0 = time.time()
        models[variant], curves[variant] = train(variant, pre_num, base, args)
        print(f"  {variant}: {time.time() - t0:.1f} s, final loss {curves[variant][-1]:.4f}")

    names = [v for v, _ in VARIANTS]
    print("\nloss curves (mean over windows of 10 steps)")
    print("  step " + "".join(f"{n:>10}" for n in names))
    for s in range(0, args.steps, max(args.steps // 10, 1)):
        row = [sum(curves[n][s : s + 10]) / len(curves[n][s : s + 10]) for n in names]
        print(f"{s:6d} " + "".join(f"{v:10.4f}" for v in row))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for n in names:
        ax.plot(curves[n], label=n if n == "lora" else f"ResLoRA {n}", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("LoRA vs ResLoRA on a small Llama")
    fig.tight_layout()
    plot = os.path.join(args.out, "loss_curves.png")
    fig.savefig(plot, dpi=120)
    print(f"\nplot: {plot}")

    print("\nmerge, export to PEFT, reload with PEFT")
    print("  a merge's cost is the held-out loss it adds (merge error: the relative change of a")
    print("  block's output on a probe batch); is / ms try every merge and export the best")
    gen = torch.Generator().manual_seed(123)
    held_out = [{k: v.to(args.device) for k, v in task_batch(gen, args.vocab).items()} for _ in range(4)]
    probe = held_out[0]["input_ids"]
    gen = torch.Generator().manual_seed(7)
    calibration = [{"input_ids": task_batch(gen, args.vocab)["input_ids"].to(args.device)} for _ in range(8)]

    def loss_on(model):
        with torch.no_grad():
            return sum(model(**b).loss.item() for b in held_out) / len(held_out)

    ok = True
    for n in names:
        trained = models[n]
        unmerged = loss_on(trained)
        options = {}
        for merge in reslora.config.MERGES[n]:
            m = copy.deepcopy(trained)
            if merge == "fit":
                m.merge_to_lora(inputs=calibration, merge="fit", eval_inputs={"input_ids": probe})
            else:
                m.merge_to_lora(inputs={"input_ids": probe}, merge=merge)
            options[merge] = (loss_on(m) - unmerged, m)
        best = min(options, key=lambda k: options[k][0])
        model = options[best][1]
        costs = ", ".join(f"{k} {v[0]:+.4f}" for k, v in options.items())
        errs = [e for e in model.merge_errors.values() if e is not None]
        with torch.no_grad():
            merged = model(input_ids=probe).logits
        d = os.path.join(args.out, f"adapter_{n}")
        model.save_pretrained(d)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base).to(args.device), d).eval()
        with torch.no_grad():
            reloaded = peft_model(input_ids=probe).logits
        diff = (reloaded - merged).abs().max().item()
        match = diff < 1e-4
        ok &= match
        print(
            f"  {n:>4}: held-out loss {unmerged:.4f}, change by merge: {costs} -> exported {best} "
            f"(merge error max {max(errs):.2e}) | PEFT reload vs merged: max |diff| {diff:.2e} "
            f"{'MATCH' if match else 'MISMATCH'} | adapter: {d}"
        )
    if not ok:
        raise SystemExit("reloaded PEFT adapters do not match the merged models")
    print("\nall PEFT adapters reproduce the merged models")


if __name__ == "__main__":
    main()
