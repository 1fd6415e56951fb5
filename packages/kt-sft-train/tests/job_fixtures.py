"""Stand-in job directories for the CLI / examples tests: a tiny random Qwen3-MoE, a character-level
tokenizer built locally (no download) and a small string task, in the layout of the embedded default job
(model/, train.jsonl, heldout.jsonl, job.json)."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

import torch

ALPHABET = string.ascii_lowercase + string.digits + " :=+-,."
SPECIALS = ("<pad>", "<eos>", "<unk>")
# A minimal chat template: "<|user|>...\n<|assistant|>...<eos>" (rendered as plain characters).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}U:{{ m['content'] }}\n"
    "{% else %}A:{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


def char_tokenizer(chat_template: str | None = None) -> Any:
    """A character-level PreTrainedTokenizerFast: one id per character, specials first."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS)}
    for char in ALPHABET + "\nUA":
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def tiny_qwen3_moe(vocab_size: int, seed: int, *, layers: int = 2, experts: int = 8) -> Any:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=experts,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config).eval()


def reverse_records(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        records.append({"prompt": f"rev:{word}=", "completion": word[::-1]})
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_job(
    directory: Path,
    *,
    seed: int = 0,
    chat_template: str | None = None,
    job: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a stand-in job directory; returns it.

    bf16 weights on disk, like the embedded job: kt-sft streams experts in bf16, so vanilla transformers
    and kt-sft then compute with identical weight values."""
    tokenizer = char_tokenizer(chat_template)
    model = tiny_qwen3_moe(len(tokenizer), seed)
    model_dir = directory / "model"
    model.to(dtype).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_jsonl(directory / "train.jsonl", reverse_records(64, seed + 1))
    write_jsonl(directory / "heldout.jsonl", reverse_records(8, seed + 2))
    settings = {
        "description": "stand-in job: reverse a word",
        "seed": seed,
        "steps": 12,
        "batch_size": 8,
        "max_seq_len": 32,
        "lr": 0.01,
        "lora_r": 4,
        "eval_max_new_tokens": 8,
        "eval_limit": 8,
    }
    settings.update(job or {})
    (directory / "job.json").write_text(json.dumps(settings, indent=1), encoding="utf-8")
    return directory
