"""Prove that LoRA fine-tuning on the embedded default job works, with plain transformers + PEFT only.

No kt-sft code is imported: this is the reference that `kt-sft train` (no arguments) is held to. It
reads a job directory the way the CLI does (kt_sft_train/app/options.py, app/data.py): the checkpoint and
tokenizer in model/, raw prompt/completion records rendered with the chat template (loss on the
assistant part), job.json holding `kt-sft train` option values. It measures greedy held-out exact
match, LoRA-tunes attention q/k/v/o (modules) and the routed experts' gate_up_proj / down_proj (3-D
parameters), measures again, saves the adapter and reloads it with vanilla PEFT, and checks:

- mean loss of the last 10% of steps <= 0.6 x mean loss of the first 10%,
- held-out exact match before < 10% and after > 50%,
- the reloaded adapter scores the same as the tuned model.

Exits 1 when a check fails. `--record` also runs the same job on a random-init base (the control)
and writes both into the job's README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_JOB_DIR = Path(__file__).resolve().parents[1] / "src" / "kt_sft_train" / "app" / "default_job"
LOSS_RATIO_MAX = 0.6
ACCURACY_BEFORE_MAX = 0.10
ACCURACY_AFTER_MIN = 0.50
README_BEGIN, README_END = "<!-- check:begin -->", "<!-- check:end -->"
IGNORE_INDEX = -100
# What the CLI's lora_targets names mean for a Qwen3-MoE model.
TARGETS = {
    "attention": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "experts": {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]},
}
# job.json keys this check runs; any other key means a run this check cannot reproduce.
JOB_KEYS = {
    "description",
    "seed",
    "steps",
    "batch_size",
    "max_seq_len",
    "lr",
    "lr_scheduler",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "eval_max_new_tokens",
    "eval_limit",
    "eval_batch_size",
    "threads",
}

Record = dict[str, str]


def load_job(job_dir: Path) -> dict:
    job = json.loads((job_dir / "job.json").read_text())
    unknown = sorted(set(job) - JOB_KEYS)
    if unknown:
        raise ValueError(f"{job_dir / 'job.json'}: keys this check does not reproduce: {unknown}")
    missing = sorted(JOB_KEYS - {"description", "threads"} - set(job))
    if missing:
        raise ValueError(f"{job_dir / 'job.json'}: missing keys {missing}")
    return job


def model_dir(job_dir: Path) -> Path:
    return job_dir / "model" if (job_dir / "model" / "config.json").is_file() else job_dir


def read_jsonl(path: Path) -> list[Record]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise ValueError(f"{path}:{number}: expected string fields 'prompt' and 'completion'")
    return rows


def chat_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool
) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, record: Record) -> list[int]:
    return chat_ids(tokenizer, [{"role": "user", "content": record["prompt"]}], generation_prompt=True)


def encode(tokenizer: PreTrainedTokenizerBase, record: Record, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that keep only the assistant part."""
    messages = [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["completion"]},
    ]
    ids = chat_ids(tokenizer, messages, generation_prompt=False)
    prompt = prompt_ids(tokenizer, record)
    if ids[: len(prompt)] != prompt:
        raise ValueError(
            f"chat template: the generation prompt is not a prefix of the conversation: {record}"
        )
    if len(ids) > max_len:
        raise ValueError(f"example longer than max_seq_len={max_len}: {record}")
    return ids, [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]


def collate(encoded: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in encoded)
    batch = {
        "input_ids": torch.full((len(encoded), width), pad_token_id),
        "attention_mask": torch.zeros((len(encoded), width), dtype=torch.long),
        "labels": torch.full((len(encoded), width), IGNORE_INDEX),
    }
    for row, (ids, labels) in enumerate(encoded):
        batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][row, : len(ids)] = 1
        batch["labels"][row, : len(ids)] = torch.tensor(labels)
    return batch


@torch.no_grad()
def greedy_exact_match(
    model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, rows: list[Record], job: dict
) -> float:
    """Share of prompts whose greedy answer (new tokens, no special tokens, stripped) is the reference."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(rows), job["eval_batch_size"]):
        chunk = rows[start : start + job["eval_batch_size"]]
        prompts = [prompt_ids(tokenizer, row) for row in chunk]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):  # left padding: every answer starts at column `width`
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[i, width - len(prompt) :] = 1
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=job["eval_max_new_tokens"],
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, new_ids in zip(chunk, generated[:, width:], strict=True):
            answer = tokenizer.decode(new_ids.tolist(), skip_special_tokens=True).strip()
            correct += answer == row["completion"].strip()
    model.train(was_training)
    return correct / len(rows)


def learning_rate(job: dict, step: int) -> float:
    """Linear warmup, then constant, or linear / cosine decay to 0 at the last step."""
    peak, warmup, steps = job["lr"], job["warmup_steps"], job["steps"]
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    schedules = {
        "constant": 1.0,
        "linear": 1.0 - progress,
        "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
    }
    if job["lr_scheduler"] not in schedules:
        raise ValueError(f"lr_scheduler must be one of {sorted(schedules)}, got {job['lr_scheduler']!r}")
    return peak * schedules[job["lr_scheduler"]]


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Examples of step `step`: each epoch is a fresh seeded permutation (the CLI's batch order)."""
    batches_per_epoch = -(-num_examples // batch_size)
    epoch, position = divmod(step, batches_per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    return order[position * batch_size : (position + 1) * batch_size]


def finetune(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    encoded: list[tuple[list[int], list[int]]],
    job: dict,
) -> list[float]:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=job["lr"], weight_decay=job["weight_decay"])
    losses = []
    model.train()
    for step in range(job["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(job, step)
        indices = batch_indices(len(encoded), job["batch_size"], job["seed"], step)
        loss = model(**collate([encoded[i] for i in indices], tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, job["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def lora_config(job: dict) -> LoraConfig:
    targets: dict[str, list[str]] = {"target_modules": [], "target_parameters": []}
    for name in (part.strip() for part in job["lora_targets"].split(",")):
        if name not in TARGETS:
            raise ValueError(f"lora_targets: this check knows {sorted(TARGETS)}, got {name!r}")
        for key, values in TARGETS[name].items():
            targets[key] += values
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=job["lora_r"],
        lora_alpha=job["lora_alpha"],
        lora_dropout=0.0,  # PEFT requires it for parameter targets
        target_modules=targets["target_modules"],
        target_parameters=targets["target_parameters"] or None,
    )


def load_base(job_dir: Path, dtype: torch.dtype, random_base: bool, seed: int) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(model_dir(job_dir), dtype=dtype)
    if random_base:
        torch.manual_seed(seed)  # the same random init each time, so a saved adapter can be reloaded on it
        model = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    return model


def run_job(job_dir: Path, dtype: torch.dtype, random_base: bool) -> dict:
    """Evaluate, LoRA-tune, evaluate, round-trip the adapter; random_base swaps in a fresh random init."""
    start = time.time()
    job = load_job(job_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir(job_dir))
    if not tokenizer.chat_template:
        raise ValueError(f"{model_dir(job_dir)}: the tokenizer has no chat template")
    model = load_base(job_dir, dtype, random_base, job["seed"])
    encoded = [encode(tokenizer, row, job["max_seq_len"]) for row in read_jsonl(job_dir / "train.jsonl")]
    heldout = read_jsonl(job_dir / "heldout.jsonl")[: job["eval_limit"]]

    accuracy_before = greedy_exact_match(model, tokenizer, heldout, job)
    torch.manual_seed(job["seed"])  # LoRA A init
    model = get_peft_model(model, lora_config(job))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_start = time.time()
    losses = finetune(model, tokenizer, encoded, job)
    train_seconds = time.time() - train_start
    accuracy_after = greedy_exact_match(model, tokenizer, heldout, job)
    with tempfile.TemporaryDirectory() as adapter_dir:
        model.save_pretrained(adapter_dir)
        reloaded = PeftModel.from_pretrained(load_base(job_dir, dtype, random_base, job["seed"]), adapter_dir)
        accuracy_reloaded = greedy_exact_match(reloaded, tokenizer, heldout, job)

    first, last = mean_of_tenth(losses, last=False), mean_of_tenth(losses, last=True)
    return {
        "base": "random init" if random_base else "bundled",
        "experts_implementation": model.base_model.model.config._experts_implementation,
        "trainable_parameters": trainable,
        "steps": job["steps"],
        "batch_size": job["batch_size"],
        "heldout_prompts": len(heldout),
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


def mean_of_tenth(losses: list[float], last: bool) -> float:
    count = max(1, len(losses) // 10)
    part = losses[-count:] if last else losses[:count]
    return sum(part) / len(part)


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
    rows = [
        ("mean loss, first 10% of steps", "loss_first_10pct", "{:.4f}"),
        ("mean loss, last 10% of steps", "loss_last_10pct", "{:.4f}"),
        (f"ratio last / first (must be ≤ {LOSS_RATIO_MAX})", "loss_ratio", "{:.4f}"),
        (f"held-out exact match before (must be < {ACCURACY_BEFORE_MAX:.0%})", "accuracy_before", "{:.1%}"),
        (f"held-out exact match after (must be > {ACCURACY_AFTER_MIN:.0%})", "accuracy_after", "{:.1%}"),
        ("same, adapter saved and reloaded on a fresh base", "accuracy_after_adapter_reload", "{:.1%}"),
        ("fine-tune time", "train_seconds", "{:.1f} s"),
        ("whole run: load, 3 evaluations, tune, adapter round trip", "check_seconds", "{:.1f} s"),
    ]
    table = "\n".join(
        f"| {label} | {fmt.format(result[key])} | {fmt.format(control[key])} |" for label, key, fmt in rows
    )
    section = f"""{README_BEGIN}
Measured by `tools/check_default_job.py --record`: transformers {env["transformers"]}, PEFT {env["peft"]},
torch {env["torch"]}, {env["dtype"]} compute, experts implementation `{result["experts_implementation"]}`,
torch threads: {env["threads"]}, on {env["cpu"]} ({env["logical_cpus"]} logical CPUs; 1-minute load average
{env["load_average"]:.1f} at the start, from other jobs sharing them).
LoRA on q/k/v/o and on the experts, {result["trainable_parameters"]:,} trainable parameters,
{result["steps"]} steps × {result["batch_size"]} examples; {result["heldout_prompts"]} held-out prompts.

| | bundled base | control: random-init base, same job |
|---|---|---|
{table}

The whole check process (Python start and imports included, control excluded) took
{result["process_seconds"]:.1f} s.
{README_END}"""
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(head + section + tail)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--job-dir", type=Path, default=DEFAULT_JOB_DIR)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: job.json's)")
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
    if args.threads is not None and args.threads <= 0:
        parser.error("--threads must be positive")
    if args.record and args.control_random_base:
        parser.error("--record runs the control itself; drop --control-random-base")
    if not (args.job_dir / "job.json").is_file():
        parser.error(f"--job-dir: no job.json in {args.job_dir}")

    threads = args.threads or load_job(args.job_dir).get("threads") or torch.get_num_threads()
    environment = {
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "cpu": cpu_name(),
        "threads": threads,
        "logical_cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
    }
    torch.set_num_threads(threads)
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
