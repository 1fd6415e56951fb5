"""Supervised fine-tuning data: JSONL records -> token ids with prompt-masked labels, batches, prompts.

A record is either ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}``
ending with an assistant turn. With a chat template (the tokenizer's, ``chat_template="auto"``) both are
rendered as a conversation and the loss covers the assistant turns; without one a prompt/completion pair
is ``prompt + completion + eos`` with the loss on ``completion + eos``. The layout contract the embedded
default job follows is /work/notes/default-job-contract.md (mirrored in docs/user-guide.md).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
CHAT_TEMPLATE_MODES = ("auto", "off")

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file or record that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_label_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class PromptExample:
    """A prompt rendered for generation and the text the model should answer."""

    prompt_ids: list[int]
    reference: str


# -- reading --------------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and validate a JSONL file of prompt/completion or messages records."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg})") from None
            validate_record(record, where)
            records.append(record)
    if not records:
        raise DataError(f"data file {path} has no records")
    return records


def validate_record(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for index, message in enumerate(messages):
            if (
                not isinstance(message, dict)
                or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)
            ):
                raise DataError(
                    f"{where}: messages[{index}] must be an object with string 'role' and 'content'"
                )
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must have role 'assistant' (the text to learn)")
        return
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return
    if "prompt" in record and "completion" in record:
        types = {key: type(record[key]).__name__ for key in ("prompt", "completion")}
        wrong = ", ".join(f"{key!r} is {name}" for key, name in types.items() if name != "str")
        raise DataError(f"{where}: 'prompt' and 'completion' must be strings ({wrong})")
    raise DataError(
        f"{where}: expected {{'prompt': str, 'completion': str}} or {{'messages': [...]}}, got keys "
        f"{sorted(record)}"
    )


def as_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    return [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["completion"]},
    ]


# -- formatting -----------------------------------------------------------------------------------------


class Formatter:
    """Turns records into training token ids (with labels) and generation prompts, one consistent way."""

    def __init__(self, tokenizer: Any, chat_template: str = "auto") -> None:
        if chat_template not in CHAT_TEMPLATE_MODES:
            raise ValueError(
                f"chat_template must be one of {list(CHAT_TEMPLATE_MODES)}, got {chat_template!r}"
            )
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos_token: the model could not learn where an answer ends")
        self.tokenizer = tokenizer
        self.use_chat_template = chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )

    @property
    def mode(self) -> str:
        return "chat template" if self.use_chat_template else "prompt + completion + eos"

    def encode(self, record: dict[str, Any], max_seq_len: int) -> TokenizedExample:
        if self.use_chat_template:
            ids, labels = self._encode_chat(as_messages(record))
        elif "messages" in record:
            raise DataError(
                "'messages' records need a chat template, and the tokenizer has none (or --chat-template "
                "off); use prompt/completion records"
            )
        else:
            prompt = self._plain_ids(record["prompt"], first=True)
            answer = [*self._plain_ids(record["completion"], first=False), self.tokenizer.eos_token_id]
            ids = prompt + answer
            labels = [IGNORE_INDEX] * len(prompt) + answer
        return TokenizedExample(ids[:max_seq_len], labels[:max_seq_len])

    def prompt(self, record: dict[str, Any]) -> PromptExample:
        messages = as_messages(record)
        reference = messages[-1]["content"]
        if self.use_chat_template:
            return PromptExample(self._chat_ids(messages[:-1], generation_prompt=True), reference)
        if "messages" in record:
            raise DataError("'messages' records need a chat template, and the tokenizer has none")
        return PromptExample(self._plain_ids(record["prompt"], first=True), reference)

    def _plain_ids(self, text: str, *, first: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=first)["input_ids"])

    def _chat_ids(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_chat(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        ids = self._chat_ids(messages, generation_prompt=False)
        labels = [IGNORE_INDEX] * len(ids)
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self._chat_ids(messages[:index], generation_prompt=True))
            upto = self._chat_ids(messages[: index + 1], generation_prompt=False)
            if ids[: len(upto)] != upto or len(upto) < start:
                raise DataError(
                    "the tokenizer's chat template does not render a conversation as a prefix of its "
                    "continuation, so assistant tokens cannot be located; use --chat-template off"
                )
            labels[start : len(upto)] = upto[start:]
        return ids, labels


def tokenize_records(
    records: Sequence[dict[str, Any]], formatter: Formatter, max_seq_len: int, *, name: str = "data"
) -> list[TokenizedExample]:
    """Tokenize every record; records left with no label token after truncation are dropped (logged)."""
    examples = [formatter.encode(record, max_seq_len) for record in records]
    kept = [example for example in examples if example.num_label_tokens > 0]
    dropped = len(examples) - len(kept)
    if not kept:
        raise DataError(
            f"{name}: every record is truncated to no answer tokens at max_seq_len={max_seq_len}; raise it"
        )
    if dropped:
        logger.warning(
            "%s: %d of %d records have no answer tokens within max_seq_len=%d and are skipped",
            name,
            dropped,
            len(examples),
            max_seq_len,
        )
    return kept


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels tensors."""
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# -- deterministic order --------------------------------------------------------------------------------


class BatchSchedule:
    """Which examples form micro-batch m, for any m: a function of (seed, m) only, so a resumed run sees
    exactly the batches an uninterrupted one would have. Each epoch is a fresh seeded permutation."""

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        if num_examples < 1:
            raise ValueError("BatchSchedule needs at least one example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = -(-num_examples // batch_size)
        self._epoch_cache: tuple[int, list[int]] | None = None

    def epoch_of(self, micro_batch: int) -> int:
        return micro_batch // self.batches_per_epoch

    def indices(self, micro_batch: int) -> list[int]:
        epoch, position = divmod(micro_batch, self.batches_per_epoch)
        order = self._permutation(epoch)
        return order[position * self.batch_size : (position + 1) * self.batch_size]

    def _permutation(self, epoch: int) -> list[int]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch_cache = (epoch, torch.randperm(self.num_examples, generator=generator).tolist())
        return self._epoch_cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        micro_batch = 0
        while True:
            yield self.indices(micro_batch)
            micro_batch += 1
