"""Prove that LoRA fine-tuning on the embedded default job works, with plain transformers + PEFT only.

No kt-sft code is imported: this is the reference that `kt-sft train` (no arguments) is held to.
Reads the job directory written by make_default_job.py, measures greedy exact match on the held-out
split, LoRA-tunes attention q/k/v/o (modules) and the experts' gate_up_proj / down_proj (3-D
parameters) with the hyperparameters of job.json, measures again and checks:

- mean loss of the last 10% of steps <= 0.6 x mean loss of the first 10%,
- held-out exact match before < 10% and after > 50%.

Exits 1 when a check fails. `--record` writes the measured numbers into the job's README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_JOB_DIR = Path(__file__).resolve().parents[1] / "src" / "kt_sft_train" / "default_job"
LOSS_RATIO_MAX = 0.6
ACCURACY_BEFORE_MAX = 0.10
ACCURACY_AFTER_MIN = 0.50
README_BEGIN, README_END = "<!-- check:begin -->", "<!-- check:end -->"

Example = dict[str, str]


def read_jsonl(path: Path) -> list[Example]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise ValueError(f"{path}:{number}: expected string fields 'prompt' and 'completion'")
    return rows


def collate(tokenizer: PreTrainedTokenizerBase, rows: list[Example], max_len: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion + eos, loss on the completion and eos only."""
    sequences, label_rows = [], []
    for row in rows:
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        answer_ids = [
            *tokenizer(row["completion"], add_special_tokens=False)["input_ids"],
            tokenizer.eos_token_id,
        ]
        if len(prompt_ids) + len(answer_ids) > max_len:
            raise ValueError(f"example longer than max_seq_len={max_len}: {row}")
        sequences.append(prompt_ids + answer_ids)
        label_rows.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(s) for s in sequences)
    batch = {
        "input_ids": torch.full((len(rows), width), tokenizer.pad_token_id),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), -100),
    }
    for i, (sequence, labels) in enumerate(zip(sequences, label_rows, strict=True)):
        batch["input_ids"][i, : len(sequence)] = torch.tensor(sequence)
        batch["attention_mask"][i, : len(sequence)] = 1
        batch["labels"][i, : len(sequence)] = torch.tensor(labels)
    return batch


@torch.no_grad()
def greedy_exact_match(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[Example],
    max_new_tokens: int,
    batch_size: int = 100,
) -> float:
    """Fraction of held-out prompts whose greedy continuation, up to eos, equals the completion."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        inputs = tokenizer(
            [r["prompt"] for r in chunk], add_special_tokens=False, padding=True, return_tensors="pt"
        )
        generated = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, new_ids in zip(chunk, generated[:, inputs["input_ids"].shape[1] :], strict=True):
            ids = new_ids.tolist()
            if tokenizer.eos_token_id not in ids:
                continue
            answer = tokenizer.decode(ids[: ids.index(tokenizer.eos_token_id)])
            correct += answer == row["completion"]
    model.train(was_training)
    return correct / len(rows)


def learning_rate(step: int, peak: float, warmup_steps: int) -> float:
    return peak * min(1.0, (step + 1) / max(1, warmup_steps))


def finetune(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, train_rows: list[Example], train_cfg: dict
) -> list[float]:
    steps, batch_size = train_cfg["steps"], train_cfg["batch_size"]
    if train_cfg["optimizer"] != "adamw" or train_cfg["lr_schedule"] != "linear_warmup_constant":
        raise ValueError(f"optimizer/schedule not supported by this check: {train_cfg}")
    order_rng = random.Random(train_cfg["seed"])
    order: list[int] = []
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=train_cfg["learning_rate"],
        weight_decay=train_cfg["weight_decay"],
    )
    losses = []
    model.train()
    for step in range(steps):
        if len(order) < batch_size:  # next epoch, freshly shuffled
            epoch = list(range(len(train_rows)))
            order_rng.shuffle(epoch)
            order += epoch
        batch_rows = [train_rows[i] for i in order[:batch_size]]
        del order[:batch_size]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, train_cfg["learning_rate"], train_cfg["warmup_steps"])
        loss = model(**collate(tokenizer, batch_rows, train_cfg["max_seq_len"])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def mean_of_tenth(losses: list[float], last: bool) -> float:
    count = max(1, len(losses) // 10)
    part = losses[-count:] if last else losses[:count]
    return sum(part) / len(part)


def seconds_since_process_start() -> float:
    """Wall time since this Python process started, imports included (Linux /proc)."""
    fields_after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    start_ticks = int(fields_after_name[19])  # field 22 of stat: start time in clock ticks after boot
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def record(job_dir: Path, environment: dict, result: dict, control: dict) -> None:
    readme = job_dir / "README.md"
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_BEGIN} ... {README_END} section")
    env = environment
    section = f"""{README_BEGIN}
Measured by `tools/check_default_job.py --record`: transformers {env["transformers"]}, PEFT {env["peft"]},
torch {env["torch"]}, {env["dtype"]} compute, experts implementation `{result["experts_implementation"]}`,
torch threads: {env["threads"]}, on {env["cpu"]} ({env["logical_cpus"]} logical CPUs; 1-minute load average
{env["load_average"]:.1f} at the start, from other jobs sharing them).
LoRA on q/k/v/o and on the experts, {result["trainable_parameters"]:,} trainable parameters,
{result["steps"]} steps × {result["batch_size"]} examples.

| | bundled base | control: random-init base, same job |
|---|---|---|
| mean loss, first 10% of steps | {result["loss_first_10pct"]:.4f} | {control["loss_first_10pct"]:.4f} |
| mean loss, last 10% of steps | {result["loss_last_10pct"]:.4f} | {control["loss_last_10pct"]:.4f} |
| ratio last / first (must be ≤ {LOSS_RATIO_MAX}) | {result["loss_ratio"]:.4f} | {control["loss_ratio"]:.4f} |
| held-out exact match before (must be < {ACCURACY_BEFORE_MAX:.0%}) | {result["accuracy_before"]:.1%} | \
{control["accuracy_before"]:.1%} |
| held-out exact match after (must be > {ACCURACY_AFTER_MIN:.0%}) | {result["accuracy_after"]:.1%} | \
{control["accuracy_after"]:.1%} |
| same, adapter saved and reloaded on a fresh base | {result["accuracy_after_adapter_reload"]:.1%} | \
{control["accuracy_after_adapter_reload"]:.1%} |
| fine-tune time | {result["train_seconds"]:.1f} s | {control["train_seconds"]:.1f} s |
| whole run: load, 3 evaluations, tune, adapter round trip | {result["check_seconds"]:.1f} s | \
{control["check_seconds"]:.1f} s |

The whole check process (Python start and imports included, control excluded) took
{result["process_seconds"]:.1f} s.
{README_END}"""
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(head + section + tail)


def load_job(job_dir: Path) -> dict:
    job = json.loads((job_dir / "job.json").read_text())
    data_cfg = job["data"]
    if not (
        data_cfg["prompt_is_formatted"] and data_cfg["append_eos"] and data_cfg["loss_on"] == "completion"
    ):
        raise ValueError(f"data conventions not supported by this check: {data_cfg}")
    return job


def load_base(job_dir: Path, dtype: torch.dtype, random_base: bool, seed: int) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(job_dir, dtype=dtype)
    if random_base:
        torch.manual_seed(seed)  # the same random init each time, so a saved adapter can be reloaded on it
        model = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    return model


def run_job(job_dir: Path, dtype: torch.dtype, random_base: bool) -> dict:
    """Evaluate, LoRA-tune and evaluate again; random_base swaps in a fresh random init of the same shape."""
    start = time.time()
    job = load_job(job_dir)
    data_cfg, lora_cfg, train_cfg = job["data"], job["lora"], job["train"]
    tokenizer = AutoTokenizer.from_pretrained(job_dir)
    model = load_base(job_dir, dtype, random_base, train_cfg["seed"])
    train_rows = read_jsonl(job_dir / data_cfg["train"])
    heldout_rows = read_jsonl(job_dir / data_cfg["heldout"])
    max_new_tokens = job["eval"]["max_new_tokens"]

    accuracy_before = greedy_exact_match(model, tokenizer, heldout_rows, max_new_tokens)
    torch.manual_seed(train_cfg["seed"])  # LoRA A init
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_cfg))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_start = time.time()
    losses = finetune(model, tokenizer, train_rows, train_cfg)
    train_seconds = time.time() - train_start
    accuracy_after = greedy_exact_match(model, tokenizer, heldout_rows, max_new_tokens)
    with tempfile.TemporaryDirectory() as adapter_dir:
        model.save_pretrained(adapter_dir)
        fresh_base = load_base(job_dir, dtype, random_base, train_cfg["seed"])
        reloaded = PeftModel.from_pretrained(fresh_base, adapter_dir)
        accuracy_reloaded = greedy_exact_match(reloaded, tokenizer, heldout_rows, max_new_tokens)

    first, last = mean_of_tenth(losses, last=False), mean_of_tenth(losses, last=True)
    return {
        "base": "random init" if random_base else "bundled",
        "experts_implementation": model.base_model.model.config._experts_implementation,
        "trainable_parameters": trainable,
        "steps": train_cfg["steps"],
        "batch_size": train_cfg["batch_size"],
        "loss_first_step": losses[0],
        "loss_last_step": losses[-1],
        "loss_first_10pct": first,
        "loss_last_10pct": last,
        "loss_ratio": last / first,
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "accuracy_after_adapter_reload": accuracy_reloaded,
        "train_seconds": train_seconds,
        "check_seconds": time.time() - start,
    }


def failed_checks(result: dict) -> list[str]:
    failures = []
    if not result["loss_last_10pct"] <= LOSS_RATIO_MAX * result["loss_first_10pct"]:
        failures.append(f"loss ratio {result['loss_ratio']:.3f} > {LOSS_RATIO_MAX}")
    if not result["accuracy_before"] < ACCURACY_BEFORE_MAX:
        failures.append(f"accuracy before {result['accuracy_before']:.1%} >= {ACCURACY_BEFORE_MAX:.0%}")
    if not result["accuracy_after"] > ACCURACY_AFTER_MIN:
        failures.append(f"accuracy after {result['accuracy_after']:.1%} <= {ACCURACY_AFTER_MIN:.0%}")
    if result["accuracy_after_adapter_reload"] != result["accuracy_after"]:
        failures.append(
            f"saved adapter reloaded on a fresh base scores {result['accuracy_after_adapter_reload']:.1%},"
            f" not {result['accuracy_after']:.1%}"
        )
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--job-dir", type=Path, default=DEFAULT_JOB_DIR)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    # One thread by default: the model's matrices are too small to gain from more, and on a shared
    # machine a second spinning thread made the fine-tune 10x slower (131 s vs 13 s, measured).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--record",
        action="store_true",
        help="also run the random-base control and write both into the job's README.md",
    )
    parser.add_argument(
        "--control-random-base",
        action="store_true",
        help="only the control experiment: the same LoRA job on a random-init base (no checks)",
    )
    args = parser.parse_args()
    if args.threads <= 0:
        parser.error("--threads must be positive")
    if args.record and args.control_random_base:
        parser.error("--record runs the control itself; drop --control-random-base")
    if not (args.job_dir / "job.json").is_file():
        parser.error(f"--job-dir: no job.json in {args.job_dir}")

    environment = {
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "cpu": cpu_name(),
        "threads": args.threads,
        "logical_cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
    }
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    dtype = getattr(torch, args.dtype)

    if args.control_random_base:
        print(json.dumps(run_job(args.job_dir, dtype, random_base=True), indent=2))
        print("control run on a random-init base: no checks applied")
        return 0

    result = run_job(args.job_dir, dtype, random_base=False)
    result["process_seconds"] = seconds_since_process_start()
    print(json.dumps(environment | result, indent=2))
    failures = failed_checks(result)
    for failure in failures:
        print("FAIL:", failure, file=sys.stderr)
    if failures:
        return 1
    print("OK: all checks passed")
    if args.record:
        control = run_job(args.job_dir, dtype, random_base=True)
        print("control on a random-init base:", json.dumps(control, indent=2))
        record(args.job_dir, environment, result, control)
    return 0


if __name__ == "__main__":
    sys.exit(main())
