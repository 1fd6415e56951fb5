"""LoRA fine-tuning of a MoE model with `transformers.Trainer`, the routed experts on the CPU kernels.

    python examples/train_with_trainer.py                      # the embedded default job's model and data
    python examples/train_with_trainer.py --model DIR --data FILE.jsonl --max-steps 100

The only kt-sft specific lines are `load_kt_model` (experts streamed into the CPU kernels, everything
else placed on the GPU, or the CPU without one) and `kt_lora_config` (a PEFT LoraConfig with expert LoRA
for the detected family). The Trainer, PEFT and the saved adapter are stock.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from kt_sft_train import KTConfig, kt_lora_config
from kt_sft_train.app.data import Formatter, collate, read_jsonl, tokenize_records
from kt_sft_train.app.options import default_job_dir
from kt_sft_train.integrations import KTTimeSplitCallback
from kt_sft_train.model import load_kt_model
from peft import get_peft_model
from transformers import AutoTokenizer, Trainer, TrainingArguments


def main() -> None:
    job = default_job_dir()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(job / "model"), help="local HF checkpoint directory")
    parser.add_argument(
        "--data", default=str(job / "train.jsonl"), help="JSONL: prompt/completion or messages"
    )
    parser.add_argument("--output", default="trainer-output")
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the experts and torch")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available()

    # 1. The model: routed experts in kt-sft's CPU kernels, the rest on the GPU (or CPU).
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = load_kt_model(args.model, KTConfig(threads=args.threads), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    # 2. Plain PEFT: LoRA on attention (GPU) and on the routed experts (run by the CPU kernels).
    model = get_peft_model(model, kt_lora_config(model, r=8, target_modules="attention"))
    model.print_trainable_parameters()

    # 3. Data: prompt-masked labels (the chat template when the tokenizer has one).
    formatter = Formatter(tokenizer)
    train_set = tokenize_records(read_jsonl(args.data), formatter, args.max_seq_len)

    # 4. A stock Trainer; the callback adds the CPU-experts / GPU time split to the logs.
    timing = KTTimeSplitCallback()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            logging_steps=max(1, args.max_steps // 10),
            save_strategy="no",
            report_to=[],
            bf16=on_gpu,
            use_cpu=not on_gpu,
            dataloader_pin_memory=on_gpu,
        ),
        train_dataset=train_set,
        data_collator=lambda batch: collate(batch, formatter.pad_token_id),
        callbacks=[timing],
    )
    trainer.train()

    # 5. A standard PEFT adapter: PeftModel.from_pretrained(plain_hf_model, path) loads it.
    adapter = Path(args.output) / "adapter"
    model.save_pretrained(adapter)
    print(f"adapter saved to {adapter}; mean step split: {timing.summary()}")


if __name__ == "__main__":
    main()
