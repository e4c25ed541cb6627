"""The HF Trainer, unchanged, on a ResLoRA model: run by torchrun from test_distributed.py
(DDP on CPU processes). Arguments: output directory, steps, and a checkpoint to resume from."""

import os
import sys
import warnings

warnings.simplefilter("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import transformers  # noqa: E402

import reslora  # noqa: E402

from hf_models import batch, make  # noqa: E402


def main(out, steps, resume=None):
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
        use_cpu=True,
        seed=0,
        learning_rate=1e-2,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=resume)
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
    trainer.save_model(os.path.join(out, "final"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
