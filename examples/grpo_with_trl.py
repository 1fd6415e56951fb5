"""Reinforcement learning (GRPO) of a MoE model with TRL's stock `GRPOTrainer`, the routed experts on the
CPU kernels.

    python examples/grpo_with_trl.py                      # the embedded default job's model and prompts
    python examples/grpo_with_trl.py --model DIR --data FILE.jsonl --max-steps 100

The reward is the share of characters of a sampled completion that match the record's reference
completion (a verifiable reward; any Python function of the completions works). TRL samples with
`model.generate` on the kt-sft model, wraps it with PEFT from `peft_config` and, with beta > 0, uses the
adapter-disabled model as the reference policy. The example checks that adapter-disabled logits equal the
base model's and prints the result as one JSON line (tests/e2e/test_examples.py reads it). On a machine
without a GPU: `bf16=False` and `use_cpu=True` (as below).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from kt_sft_train import KTConfig, kt_lora_config
from kt_sft_train.app.options import default_job_dir
from kt_sft_train.model import load_kt_model
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer


def completion_text(completion: Any) -> str:
    # Conversational datasets give a list of messages per completion, plain ones a string.
    return completion[-1]["content"] if isinstance(completion, list) else completion


def char_match_reward(completions: list[Any], reference: list[str], **_: Any) -> list[float]:
    """Share of the reference's characters that the completion has at the same position."""
    rewards = []
    for completion, answer in zip(completions, reference, strict=True):
        text = completion_text(completion).strip()
        rewards.append(sum(a == b for a, b in zip(text, answer, strict=False)) / max(1, len(answer)))
    return rewards


def main() -> None:
    job = default_job_dir()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(job / "model"), help="local HF checkpoint directory")
    parser.add_argument("--data", default=str(job / "train.jsonl"), help="JSONL of prompt/completion records")
    parser.add_argument("--output", default="grpo-output")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help="completions per step (4 per prompt)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the experts and torch")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available()

    model = load_kt_model(
        args.model, KTConfig(threads=args.threads), dtype=torch.bfloat16 if on_gpu else torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    conversational = bool(tokenizer.chat_template)
    lines = Path(args.data).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}] if conversational else r["prompt"],
                "reference": r["completion"],
            }
            for r in records
        ]
    )

    probe = tokenizer(lines[:2], return_tensors="pt", padding=True)  # any text: logits compared as they are
    probe = {k: v.to(model.device) for k, v in probe.items()}
    with torch.no_grad():
        base_logits = model(**probe).logits.float().cpu()

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=char_match_reward,
        args=GRPOConfig(
            output_dir=args.output,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            num_generations=4,
            max_completion_length=8,
            temperature=1.0,
            beta=0.04,  # a KL term against the adapter-disabled model
            learning_rate=args.lr,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            bf16=on_gpu,  # False on CPU-only machines
            use_cpu=not on_gpu,
            dataloader_pin_memory=on_gpu,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=kt_lora_config(model, r=8, target_modules="attention"),
    )
    trainer.train()
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    rewards = [entry["reward"] for entry in history if "reward" in entry]

    tuned_model = trainer.model.eval()
    with torch.no_grad():
        tuned = tuned_model(**probe).logits.float().cpu()
        with tuned_model.disable_adapter():
            disabled = tuned_model(**probe).logits.float().cpu()
    adapter = Path(args.output) / "adapter"
    trainer.save_model(str(adapter))
    result = {
        "losses": losses,
        "rewards": rewards,
        "adapter_effect": float((tuned - base_logits).abs().max()),
        "disabled_vs_base": float((disabled - base_logits).abs().max()),
        "adapter": str(adapter),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
