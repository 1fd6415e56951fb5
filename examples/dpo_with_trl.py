"""Preference tuning (DPO) of a MoE model with TRL's stock `DPOTrainer`, the routed experts on CPU kernels.

    python examples/dpo_with_trl.py                       # the embedded default job's model and data
    python examples/dpo_with_trl.py --model DIR --data FILE.jsonl --max-steps 100

Pairs come from prompt/completion records: the record's completion is "chosen", another record's
completion "rejected". TRL wraps the model with PEFT from `peft_config` and uses the model with its
adapter disabled as the reference policy, so `disable_adapter()` must reach the expert LoRA inside the
CPU kernels; the example checks that (adapter-disabled logits == the base model's) and that
`model.generate` works, and prints the result as one JSON line (tests/e2e/test_examples.py reads it).
On a machine without a GPU: `bf16=False` and `use_cpu=True` (as below).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from kt_sft_train import KTConfig, kt_lora_config
from kt_sft_train.app.options import default_job_dir
from kt_sft_train.model import load_kt_model
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer


def preference_pairs(path: str, conversational: bool) -> Dataset:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    rows = []
    for index, record in enumerate(records):
        wrong = records[(index + 1) % len(records)]["completion"]
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": record["prompt"]}],
                    "chosen": [{"role": "assistant", "content": record["completion"]}],
                    "rejected": [{"role": "assistant", "content": wrong}],
                }
            )
        else:
            rows.append({"prompt": record["prompt"], "chosen": record["completion"], "rejected": wrong})
    return Dataset.from_list(rows)


def main() -> None:
    job = default_job_dir()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(job / "model"), help="local HF checkpoint directory")
    parser.add_argument("--data", default=str(job / "train.jsonl"), help="JSONL of prompt/completion records")
    parser.add_argument("--output", default="dpo-output")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
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
    dataset = preference_pairs(args.data, conversational)

    texts = [line for line in Path(args.data).read_text(encoding="utf-8").splitlines()[:2]]
    probe = tokenizer(texts, return_tensors="pt", padding=True)  # any text: logits are compared as they are
    probe = {k: v.to(model.device) for k, v in probe.items()}
    with torch.no_grad():
        base_logits = model(**probe).logits.float().cpu()

    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(
            output_dir=args.output,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            beta=0.1,
            max_length=64,
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
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    tuned_model = trainer.model.eval()
    with torch.no_grad():
        tuned = tuned_model(**probe).logits.float().cpu()
        with tuned_model.disable_adapter():
            disabled = tuned_model(**probe).logits.float().cpu()
    prompt = tokenizer(
        tokenizer.apply_chat_template(dataset[0]["prompt"], tokenize=False, add_generation_prompt=True)
        if conversational
        else dataset[0]["prompt"],
        return_tensors="pt",
    ).to(tuned_model.device)
    generated = tuned_model.generate(**prompt, max_new_tokens=8, do_sample=False)
    adapter = Path(args.output) / "adapter"
    trainer.save_model(str(adapter))
    result = {
        "losses": losses,
        "adapter_effect": float((tuned - base_logits).abs().max()),
        "disabled_vs_base": float((disabled - base_logits).abs().max()),
        "generated": tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True),
        "adapter": str(adapter),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
