"""Held-out exact match: greedy answers to held-out prompts compared with the reference answers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import PromptExample


@dataclass(frozen=True)
class ExactMatch:
    correct: int
    total: int
    seconds: float
    samples: tuple[tuple[str, str], ...]  # (generated, reference) of the first few prompts

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "correct": self.correct,
            "total": self.total,
            "eval_time_s": self.seconds,
            "samples": [{"generated": g, "reference": r} for g, r in self.samples],
        }


@torch.no_grad()
def exact_match(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[PromptExample],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    pad_token_id: int,
    keep_samples: int = 3,
) -> ExactMatch:
    """Greedy-decode every prompt (left-padded batches, stop at eos) and count exact answers (stripped)."""
    from transformers import GenerationConfig

    start = time.perf_counter()
    was_training = model.training
    model.eval()
    generation = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id,
    )
    correct = 0
    samples: list[tuple[str, str]] = []
    try:
        for first in range(0, len(prompts), batch_size):
            chunk = prompts[first : first + batch_size]
            width = max(len(p.prompt_ids) for p in chunk)
            input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, prompt in enumerate(chunk):
                input_ids[row, width - len(prompt.prompt_ids) :] = torch.tensor(prompt.prompt_ids)
                attention_mask[row, width - len(prompt.prompt_ids) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=generation,
            )
            for row, prompt in enumerate(chunk):
                text = tokenizer.decode(output[row, width:].tolist(), skip_special_tokens=True).strip()
                correct += text == prompt.reference.strip()
                if len(samples) < keep_samples:
                    samples.append((text, prompt.reference.strip()))
    finally:
        model.train(was_training)
    return ExactMatch(correct, len(prompts), time.perf_counter() - start, tuple(samples))
