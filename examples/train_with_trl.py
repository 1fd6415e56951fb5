"""Supervised fine-tuning of a MoE model with TRL's `SFTTrainer`, the routed experts on the CPU kernels.

    python examples/train_with_trl.py                          # the embedded default job's model and data
    python examples/train_with_trl.py --model DIR --data FILE.jsonl --max-steps 100
    torchrun --nproc-per-node 2 examples/train_with_trl.py         # 2 processes, one expert owner

TRL does the tokenization (prompt/completion records: loss on the completion; `messages` records: the
chat template) and wraps the model with PEFT itself from `peft_config`. kt-sft only loads the model
(`load_kt_model`) and builds the LoraConfig with expert LoRA (`kt_lora_config`); `HostOwnerTrainerMixin`
adds what several processes need with one expert owner per host (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from kt_sft_train import KTConfig, kt_lora_config
from kt_sft_train.app.options import default_job_dir
from kt_sft_train.integrations import HostOwnerTrainerMixin, KTTimeSplitCallback, host_owner_config
from kt_sft_train.model import load_kt_model
from transformers import AutoTokenizer, set_seed
from trl import SFTConfig, SFTTrainer


class KTSFTTrainer(HostOwnerTrainerMixin, SFTTrainer):
    """TRL's SFTTrainer, also on several processes with host-owner experts."""


def read_records(path: str, conversational: bool) -> Dataset:
    """The JSONL as a Dataset TRL understands. With a chat template, prompt/completion text pairs become
    conversational pairs, so TRL renders them through the template (as `kt-sft train` does)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    if "messages" in records[0]:
        return Dataset.from_list([{"messages": r["messages"]} for r in records])
    if conversational:
        return Dataset.from_list(
            [
                {
                    "prompt": [{"role": "user", "content": r["prompt"]}],
                    "completion": [{"role": "assistant", "content": r["completion"]}],
                }
                for r in records
            ]
        )
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in records])


def main() -> None:
    job = default_job_dir()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(job / "model"), help="local HF checkpoint directory")
    parser.add_argument(
        "--data", default=str(job / "train.jsonl"), help="JSONL: prompt/completion or messages"
    )
    parser.add_argument("--output", default="trl-output")
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the experts and torch")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available()

    config = SFTConfig(
        output_dir=args.output,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        max_length=args.max_seq_len,
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to=[],
        bf16=on_gpu,
        use_cpu=not on_gpu,
        dataloader_pin_memory=on_gpu,
    )
    set_seed(config.seed)  # the LoRA init draws from the global RNG: the same on every rank and run
    dtype = torch.bfloat16 if on_gpu else torch.float32
    kt = host_owner_config(config, KTConfig(threads=args.threads))  # several processes: one expert owner
    model = load_kt_model(args.model, kt, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    timing = KTTimeSplitCallback()
    trainer = KTSFTTrainer(
        model=model,
        args=config,
        train_dataset=read_records(args.data, conversational=bool(tokenizer.chat_template)),
        processing_class=tokenizer,
        peft_config=kt_lora_config(model, r=8, target_modules="attention"),
        callbacks=[timing],
    )
    trainer.train()

    adapter = Path(args.output) / "adapter"
    trainer.save_model(str(adapter))
    if trainer.is_world_process_zero():
        print(f"losses: {[h['loss'] for h in trainer.state.log_history if 'loss' in h]}")
        print(f"adapter saved to {adapter}; mean step split: {timing.summary()}")


if __name__ == "__main__":
    main()
