"""LoRA fine-tuning of a MoE model with `transformers.Trainer`, the routed experts on the CPU kernels.

    python examples/train_with_trainer.py                      # the embedded default job's model and data
    python examples/train_with_trainer.py --model DIR --data FILE.jsonl --max-steps 100
    torchrun --nproc-per-node 2 examples/train_with_trainer.py     # 2 processes, one expert owner

The only kt-sft specific lines are `load_kt_model` (experts streamed into the CPU kernels, everything
else placed on the GPU, or the CPU without one) and `kt_lora_config` (a PEFT LoraConfig with expert LoRA
for the detected family); `KTTrainer` is the stock Trainer plus what several processes need with one
expert owner per host (docs/distributed.md). PEFT and the saved adapter are stock.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from kt_sft_train import KTConfig, kt_lora_config
from kt_sft_train.app.data import Formatter, collate, read_jsonl, tokenize_records
from kt_sft_train.app.options import default_job_dir
from kt_sft_train.integrations import KTTimeSplitCallback, KTTrainer, host_owner_config
from kt_sft_train.model import load_kt_model
from peft import get_peft_model
from transformers import AutoTokenizer, TrainingArguments, set_seed


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
    parser.add_argument(
        "--save-steps", type=int, default=0, help="write a checkpoint every N steps (0: none)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --output"
    )
    parser.add_argument("--fsdp2", action="store_true", help="several processes: dense part under FSDP2")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available()

    training_args = TrainingArguments(
        output_dir=args.output,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        bf16=on_gpu,
        use_cpu=not on_gpu,
        dataloader_pin_memory=on_gpu,
        # FSDP2 with host-owner experts: no checkpoints yet (keep --save-steps 0), no
        # cpu_ram_efficient_loading, and on CPU the unfused AdamW (docs/distributed.md).
        **(fsdp2_arguments(on_gpu) if args.fsdp2 else {}),
    )

    # 1. The model: routed experts in kt-sft's CPU kernels, the rest on the GPU (or CPU). Under torchrun
    #    with several processes, one process per host owns the experts (host_owner_config).
    set_seed(training_args.seed)  # the LoRA init draws from the global RNG: the same on every rank and run
    dtype = torch.bfloat16 if on_gpu else torch.float32
    kt = host_owner_config(training_args, KTConfig(threads=args.threads))
    model = load_kt_model(args.model, kt, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    # 2. Plain PEFT: LoRA on attention (GPU) and on the routed experts (run by the CPU kernels).
    model = get_peft_model(model, kt_lora_config(model, r=8, target_modules="attention"))
    model.print_trainable_parameters()

    # 3. Data: prompt-masked labels (the chat template when the tokenizer has one).
    formatter = Formatter(tokenizer)
    train_set = tokenize_records(read_jsonl(args.data), formatter, args.max_seq_len)

    # 4. The Trainer; the callback adds the CPU-experts / GPU time split to the logs.
    timing = KTTimeSplitCallback()
    trainer = KTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        data_collator=lambda batch: collate(batch, formatter.pad_token_id),
        callbacks=[timing],
    )
    trainer.train(resume_from_checkpoint=args.resume or None)  # also with several processes

    # 5. ONE standard PEFT adapter (from the expert owner): PeftModel.from_pretrained(plain_hf_model, path).
    adapter = Path(args.output) / "adapter"
    trainer.save_model(str(adapter))
    if trainer.is_world_process_zero():
        print(f"dense part: {type(trainer.model_wrapped).__name__}")
        print(f"losses: {[h['loss'] for h in trainer.state.log_history if 'loss' in h]}")
        print(f"adapter saved to {adapter}; mean step split: {timing.summary()}")


def fsdp2_arguments(on_gpu: bool) -> dict:
    fsdp_config = {"fsdp_version": 2, "cpu_ram_efficient_loading": False}
    return {"fsdp": "full_shard", "fsdp_config": fsdp_config, **({} if on_gpu else {"optim": "adamw_torch"})}


if __name__ == "__main__":
    main()
