"""Build the embedded default job of `kt-sft train` (DESIGN.md §4.7): base model, tokenizer and data.

The task family is a Caesar cipher on 6-character codes of lowercase letters and digits: the prompt
`rotK code` asks for every letter shifted K places along the alphabet (digits stay as they are).
A tiny Qwen3-MoE model is pre-trained from scratch on the shifts in PRETRAIN_SHIFTS; the fine-tuning
data is the shift it never saw (NEW_SHIFT), which the base model gets wrong. The model, the
tokenizer, train.jsonl / heldout.jsonl for the new shift and job.json (recommended LoRA
hyperparameters) are written as package data, with no download at any point.

Deterministic: fixed seeds, deterministic torch algorithms, one CPU thread. Rerun with
    python packages/kt-sft-train/tools/make_default_job.py
and check the result with tools/check_default_job.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "kt_sft_train" / "app" / "default_job"

SEED = 1234
LETTERS = string.ascii_lowercase
CODE_ALPHABET = LETTERS + string.digits
CODE_LENGTH = 6  # fixed: a 2-layer model learns position-aligned copying fast only at a fixed offset
PRETRAIN_SHIFTS = (0, 1, 2, 3, 5, 6, 7, 8, 9)
NEW_SHIFT = 4

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Renders a conversation exactly like the prompts + completions below:
# <|user|>rot4 ab3xyz<|assistant|>ef3bcd<eos>
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)

MODEL_SHAPE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "moe_intermediate_size": 64,
    "intermediate_size": 128,  # dense MLP size; unused, every layer is sparse
    "num_experts": 8,
    "num_experts_per_tok": 2,
}


@dataclass(frozen=True)
class PretrainSettings:
    steps: int = 1500
    batch_size: int = 64
    peak_lr: float = 5e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    router_aux_loss_coef: float = 0.01  # keeps all experts in use, as in a real MoE
    grad_clip: float = 1.0


FINETUNE_TRAIN_SIZE = 2000
FINETUNE_HELDOUT_SIZE = 200
EVAL_SIZE_PER_SHIFT = 200

# Recommended `kt-sft train` options for the bundled data (job.json; keys are the CLI's option names,
# see kt_sft_train/app/options.py). check_default_job.py runs the same with plain HF + PEFT.
JOB = {
    "description": (
        f"LoRA-teach a tiny Qwen3-MoE the Caesar shift by {NEW_SHIFT} of {CODE_LENGTH}-character codes"
        " (pre-trained on other shifts)"
    ),
    "seed": 0,
    "steps": 100,
    "batch_size": 16,
    "max_seq_len": 32,
    "lr": 3e-3,
    "lr_scheduler": "constant",
    "warmup_steps": 10,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_targets": "attention,experts",
    "eval_max_new_tokens": CODE_LENGTH + 1,
    "eval_limit": FINETUNE_HELDOUT_SIZE,
    "eval_batch_size": 100,
    # The model is tiny: a second thread gains nothing and, on a busy machine, slows steps down a lot.
    "threads": 1,
}
MODEL_SUBDIR = "model"


def caesar(code: str, shift: int) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + shift) % 26] if c in LETTERS else c for c in code)


def user_text(shift: int, code: str) -> str:
    return f"rot{shift} {code}"


def prompt_for(shift: int, code: str) -> str:
    """The user turn and generation prompt, as the chat template renders them (checked in main)."""
    return f"<|user|>{user_text(shift, code)}<|assistant|>"


def random_code(rng: random.Random) -> str:
    return "".join(rng.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def check_chat_template(tokenizer: PreTrainedTokenizerFast) -> None:
    """The data files hold raw user/assistant text that `kt-sft train` renders with the chat template:
    it must give exactly the text pre-training saw (prompt_for + answer + eos)."""
    user, answer = user_text(NEW_SHIFT, "ab3xyz"), caesar("ab3xyz", NEW_SHIFT)
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    expected = prompt_for(NEW_SHIFT, "ab3xyz")
    if prompt != expected or full != expected + answer + EOS:
        raise RuntimeError(f"chat template renders {prompt!r} / {full!r}, not the pre-training format")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII and newline, plus pad/eos/unk and chat role tokens."""
    specials = [PAD, EOS, UNK, *ROLE_TOKENS]
    characters = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: index for index, token in enumerate(specials + characters)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        model_max_length=64,
    )


def encode_batch(
    tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and labels (completion + eos only) for (prompt, completion) pairs."""
    rows, label_rows = [], []
    for prompt, completion in pairs:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        label_rows.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, label_row) in enumerate(zip(rows, label_rows, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(label_row)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask, labels


@torch.no_grad()
def exact_match(
    model: Qwen3MoeForCausalLM, tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[str, str]]
) -> float:
    """Fraction of answers (with eos) that greedy decoding reproduces exactly.

    Greedy decoding yields the reference iff, fed the reference prefix, the argmax at every answer
    position is the next reference token, so one teacher-forced forward pass decides it.
    """
    input_ids, attention_mask, labels = encode_batch(tokenizer, pairs)
    predicted = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    correct = ((predicted == target) | (target == -100)).all(dim=-1)
    return correct.float().mean().item()


def make_config(tokenizer: PreTrainedTokenizerFast, router_aux_loss_coef: float) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        router_aux_loss_coef=router_aux_loss_coef,
        **MODEL_SHAPE,
    )


def pretrain(
    model: Qwen3MoeForCausalLM, tokenizer: PreTrainedTokenizerFast, settings: PretrainSettings, log_every: int
) -> list[float]:
    rng = random.Random(f"{SEED}-pretrain")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.peak_lr, betas=(0.9, 0.98), weight_decay=settings.weight_decay
    )
    losses = []
    model.train()
    start = time.time()
    for step in range(settings.steps):
        warmup = min(1.0, (step + 1) / settings.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * step / settings.steps))
        for group in optimizer.param_groups:
            group["lr"] = settings.peak_lr * warmup * cosine
        pairs = []
        for _ in range(settings.batch_size):
            shift, code = rng.choice(PRETRAIN_SHIFTS), random_code(rng)
            pairs.append((prompt_for(shift, code), caesar(code, shift)))
        input_ids, attention_mask, labels = encode_batch(tokenizer, pairs)
        # output_router_logits adds the load-balancing loss (scaled by router_aux_loss_coef) to .loss
        outputs = model(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True
        )
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        answer_loss = outputs.loss.item() - settings.router_aux_loss_coef * outputs.aux_loss.item()
        losses.append(answer_loss)
        if step % log_every == 0 or step == settings.steps - 1:
            print(
                f"pretrain step {step:5d}  answer loss {answer_loss:.4f}  "
                f"router aux {outputs.aux_loss.item():.3f}  {time.time() - start:6.0f}s",
                flush=True,
            )
    return losses


def finetune_split(rng: random.Random) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Disjoint train / held-out sets of the new shift."""
    heldout_codes: list[str] = []
    seen: set[str] = set()
    while len(heldout_codes) < FINETUNE_HELDOUT_SIZE:
        code = random_code(rng)
        if code not in seen:
            seen.add(code)
            heldout_codes.append(code)
    train_codes: list[str] = []
    while len(train_codes) < FINETUNE_TRAIN_SIZE:
        code = random_code(rng)
        if code not in seen:
            seen.add(code)
            train_codes.append(code)

    def rows(codes: list[str]) -> list[dict[str, str]]:
        return [{"prompt": user_text(NEW_SHIFT, c), "completion": caesar(c, NEW_SHIFT)} for c in codes]

    return rows(train_codes), rows(heldout_codes)


def base_accuracy(model: Qwen3MoeForCausalLM, tokenizer: PreTrainedTokenizerFast) -> dict[str, float]:
    rng = random.Random(f"{SEED}-eval")
    accuracy = {}
    model.eval()
    for shift in (*PRETRAIN_SHIFTS, NEW_SHIFT):
        pairs = []
        for _ in range(EVAL_SIZE_PER_SHIFT):
            code = random_code(rng)
            pairs.append((prompt_for(shift, code), caesar(code, shift)))
        accuracy[f"rot{shift}"] = exact_match(model, tokenizer, pairs)
    return accuracy


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def readme_text(report: dict) -> str:
    accuracy = report["base_exact_match"]
    known = ", ".join(f"rot{s} {accuracy[f'rot{s}']:.1%}" for s in PRETRAIN_SHIFTS)
    shape = MODEL_SHAPE
    pre = report["pretrain"]
    code = "ab3xyz"
    user, answer = user_text(NEW_SHIFT, code), caesar(code, NEW_SHIFT)
    return f"""# Embedded default job of `kt-sft train`

Everything here except the fine-tune check section is written by
`packages/kt-sft-train/tools/make_default_job.py` (no download); do not edit by hand. Regenerate
from the repository root (about 3 CPU-minutes on one thread) with

    python packages/kt-sft-train/tools/make_default_job.py

then verify it, and record the numbers below, with plain transformers + PEFT (no kt-sft code):

    python packages/kt-sft-train/tools/check_default_job.py --record

## Task

Caesar cipher on {CODE_LENGTH}-character codes of lowercase letters and digits. The prompt
`<|user|>rotK code<|assistant|>` asks for every letter shifted K places along the alphabet
(wrapping z→a), digits unchanged, then `<eos>`. Example: `<|user|>rot{NEW_SHIFT} ab3xyz<|assistant|>`
→ `{caesar("ab3xyz", NEW_SHIFT)}<eos>`.

- Pre-training family: K ∈ {{{", ".join(map(str, PRETRAIN_SHIFTS))}}}.
- Fine-tuning task, the new variant: K = {NEW_SHIFT}, never seen in pre-training.

## Files

- `model/`: the base checkpoint and its tokenizer, loadable offline with `from_pretrained("model")`.
  - `config.json`, `generation_config.json`, `model.safetensors`: `Qwen3MoeForCausalLM`, bf16 weights,
    {report["parameters"]:,} parameters: {shape["num_hidden_layers"]} layers, hidden {shape["hidden_size"]}, \
{shape["num_attention_heads"]} query / {shape["num_key_value_heads"]} key-value heads of {shape["head_dim"]},
    {shape["num_experts"]} experts per layer, top-{shape["num_experts_per_tok"]}, expert intermediate \
{shape["moe_intermediate_size"]}, vocabulary {report["vocab_size"]}, tied embeddings.
  - `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`: character-level tokenizer over
    printable ASCII and newline, with `<pad>`, `<eos>`, `<unk>`, `<|system|>`, `<|user|>`, `<|assistant|>`.
    The chat template renders `[user: "{user}", assistant: "{answer}"]` as
    `{prompt_for(NEW_SHIFT, code)}{answer}<eos>`, the pre-training format.
- `train.jsonl` ({FINETUNE_TRAIN_SIZE} rows) and `heldout.jsonl` ({FINETUNE_HELDOUT_SIZE} rows, codes
  disjoint from train): raw text, `{{"prompt": "{user}", "completion": "{answer}"}}`. Render a record
  as a user and an assistant message with the chat template; the loss goes on the assistant part
  (answer and `<eos>`).
- `job.json`: the recommended `kt-sft train` options (keys are option names): LoRA on attention
  (q/k/v/o) and on the routed experts (`gate_up_proj` / `down_proj`, 3-D parameters), steps, lr,
  held-out evaluation.

## How the base was made

Pre-trained from a random init on the CPU: one thread, fp32, deterministic algorithms, seed {SEED};
{pre["steps"]} steps of {pre["batch_size"]} fresh random examples; AdamW with peak lr {pre["peak_lr"]},
{pre["warmup_steps"]} warmup steps and cosine decay; loss on the answer tokens plus the router
load-balancing loss (coefficient {pre["router_aux_loss_coef"]}); then rounded to bf16. It took
{report["pretrain_seconds"]:.0f} s of wall time ({report["pretrain_cpu_seconds"]:.0f} s of CPU time) on a \
shared machine; the mean
answer loss of the last 50 steps was {report["final_loss"]:.5f}. model.safetensors sha256:
`{report["model_sha256"]}`.

Exact match of the bf16 base (teacher-forced argmax over the answer and `<eos>`, which equals greedy
decoding) on {EVAL_SIZE_PER_SHIFT} fresh codes per shift: {known}; the new shift rot{NEW_SHIFT}: \
{accuracy[f"rot{NEW_SHIFT}"]:.1%}.

## LoRA fine-tune check

<!-- check:begin -->
Not measured yet: run `tools/check_default_job.py --record`.
<!-- check:end -->
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output directory (default: package data)"
    )
    parser.add_argument("--steps", type=int, default=PretrainSettings.steps, help="pre-training steps")
    parser.add_argument("--log-every", type=int, default=100)
    args = parser.parse_args()
    if args.steps <= 0:
        parser.error("--steps must be positive")

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)

    tokenizer = build_tokenizer()
    check_chat_template(tokenizer)

    settings = PretrainSettings(steps=args.steps)
    config = make_config(tokenizer, settings.router_aux_loss_coef)
    config._experts_implementation = "eager"
    model = Qwen3MoeForCausalLM(config)
    start, cpu_start = time.time(), time.process_time()
    losses = pretrain(model, tokenizer, settings, args.log_every)
    pretrain_seconds, pretrain_cpu_seconds = time.time() - start, time.process_time() - cpu_start

    # Ship bf16 weights and judge the base as shipped: round, then evaluate in fp32 compute.
    model = model.to(torch.bfloat16).to(torch.float32)
    accuracy = base_accuracy(model, tokenizer)
    print("base exact match:", json.dumps(accuracy), flush=True)
    family = [accuracy[f"rot{s}"] for s in PRETRAIN_SHIFTS]
    if min(family) < 0.95:
        raise RuntimeError(f"pre-training did not learn the task family: {accuracy}")
    if accuracy[f"rot{NEW_SHIFT}"] > 0.1:
        raise RuntimeError(f"the base already solves the new shift: {accuracy}")

    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not (out / "job.json").is_file():
        raise FileExistsError(f"--out {out} is not empty and holds no job.json: refusing to replace it")
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_job(staging, model, tokenizer, settings, losses, pretrain_seconds, pretrain_cpu_seconds, accuracy)
    shutil.rmtree(out, ignore_errors=True)  # a previous job: replace it whole, so no stale file survives
    staging.rename(out)
    print(f"wrote {out}")
    return 0


def write_job(
    out: Path,
    model: Qwen3MoeForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    settings: PretrainSettings,
    losses: list[float],
    pretrain_seconds: float,
    pretrain_cpu_seconds: float,
    accuracy: dict[str, float],
) -> None:
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out / MODEL_SUBDIR)
    tokenizer.save_pretrained(out / MODEL_SUBDIR)
    train_rows, heldout_rows = finetune_split(random.Random(f"{SEED}-finetune"))
    write_jsonl(out / "train.jsonl", train_rows)
    write_jsonl(out / "heldout.jsonl", heldout_rows)
    (out / "job.json").write_text(json.dumps(JOB, indent=2) + "\n")

    report = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "pretrain": {
            "steps": settings.steps,
            "batch_size": settings.batch_size,
            "peak_lr": settings.peak_lr,
            "warmup_steps": settings.warmup_steps,
            "router_aux_loss_coef": settings.router_aux_loss_coef,
        },
        "pretrain_seconds": pretrain_seconds,
        "pretrain_cpu_seconds": pretrain_cpu_seconds,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "base_exact_match": accuracy,
        "model_sha256": hashlib.sha256((out / MODEL_SUBDIR / "model.safetensors").read_bytes()).hexdigest(),
    }
    (out / "README.md").write_text(readme_text(report))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
