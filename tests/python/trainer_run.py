"""The HF Trainer, unchanged, on a ResLoRA model: run by torchrun from test_distributed.py.
Arguments: the engine ("ddp": DDP on CPU processes; "fsdp2": accelerate's FSDP2, per decoder
layer, on CUDA), output directory, steps, and a checkpoint to resume from."""

import os
import sys
import warnings

warnings.simplefilter("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import transformers  # noqa: E402

import reslora  # noqa: E402

from hf_models import batch, make  # noqa: E402

# accelerate's FSDP2 through the Trainer's own arguments: each decoder layer sharded, resharded
# after its forward; checkpoints as one full state dict (the adapter's)
FSDP2 = dict(
    fsdp="full_shard auto_wrap",
    fsdp_config={
        "version": 2,
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "reshard_after_forward": True,
        "state_dict_type": "FULL_STATE_DICT",
    },
)


def main(engine, out, steps, resume=None):
    data = [{k: v[0] for k, v in batch("llama", seed=i, n=1).items()} for i in range(16)]
    model = reslora.get_reslora_model(
        make("llama"),
        reslora.ResLoRAConfig(
            variant="bs",
            pre_num=-1,
            r=4,
            lora_alpha=8,
            lora_dropout=0.1,
            target_modules=["q_proj", "v_proj", "up_proj"],
        ),
    )
    args = transformers.TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=2,
        max_steps=steps,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=engine == "ddp",
        **FSDP2 if engine == "fsdp2" else {},
        seed=0,
        learning_rate=1e-2,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=resume)
    wrapped = type(trainer.model_wrapped).__name__
    assert wrapped == "DistributedDataParallel" if engine == "ddp" else wrapped.startswith("FSDP"), wrapped
    trainer.save_model(os.path.join(out, "final"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
