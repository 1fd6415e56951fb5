"""A run's metrics.jsonl, its progress bar and the summary lines it prints at the end."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..timing import StepSplit
from .reporting import Reporters

METRICS = "metrics.jsonl"


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def resident_mib() -> float | None:
    """This process's resident memory (MiB) from /proc (Linux); None elsewhere. Logged per step, so a leak
    shows in metrics.jsonl (and tests/e2e bound it)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            resident_pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def decile_means(losses: Sequence[float]) -> tuple[float, float]:
    """Mean loss of the first and of the last 10% of steps (at least one step each)."""
    count = max(1, len(losses) // 10)
    return mean(losses[:count]), mean(losses[-count:])


class MetricsLog:
    """metrics.jsonl: appended and flushed per record, so a crash loses at most one line."""

    def __init__(
        self, path: Path, *, keep_steps_upto: int | None, reporters: Reporters | None = None
    ) -> None:
        self.path = path
        self.reporters = reporters  # --report-to sinks, fed the step and eval records
        self.last_step = 0
        if keep_steps_upto is None:
            path.write_text("")
        else:
            self._truncate(keep_steps_upto)
        self._handle = path.open("a", encoding="utf-8")

    def _truncate(self, last_step: int) -> None:
        # A resumed run drops what the interrupted run logged after its last checkpoint (and its end).
        kept = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                is_kept_step = record.get("event") == "step" and record["step"] <= last_step
                is_first_eval = record.get("event") == "eval" and record.get("phase") == "before"
                if is_kept_step or is_first_eval:
                    kept.append(line)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(temporary, self.path)

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()
        if self.reporters is not None and record.get("event") in ("step", "eval"):
            step = int(record.get("step", 0 if record.get("phase") == "before" else self.last_step))
            self.last_step = max(self.last_step, step)
            prefix = "train" if record["event"] == "step" else f"eval_{record['phase']}"
            self.reporters.log(record, step, prefix)

    def step_losses(self) -> list[tuple[int, float]]:
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("event") == "step":
                out.append((int(record["step"]), float(record["loss"])))
        return out

    def close(self) -> None:
        self._handle.close()
        if self.reporters is not None:
            self.reporters.close()


def split_text(split: StepSplit, device: torch.device) -> str:
    shares = split.shares()
    dense = "gpu" if device.type == "cuda" else "dense cpu"
    return (
        f"experts cpu {shares['experts_cpu']:.0%} · {dense} {shares['dense']:.0%} · "
        f"transfers {shares['transfer']:.0%}"
    )


class Progress:
    """A tqdm bar on stderr (or nothing, with --no-progress)."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr
            )

    def update(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"done      {summary['steps']} steps in {summary['wall_time_s']:.1f} s"]
    if summary["first_loss"] is not None:
        lines.append(
            f"loss      first {summary['first_loss']:.4f} -> last {summary['last_loss']:.4f} "
            f"(first 10% mean {summary['first_10pct_loss']:.4f}, last 10% {summary['last_10pct_loss']:.4f})"
        )
    if summary["accuracy_after"] is not None:
        lines.append(
            f"accuracy  held-out exact match {summary['accuracy_before']:.1%} -> "
            f"{summary['accuracy_after']:.1%} ({summary['heldout_examples']} prompts)"
        )
    shares = summary["time_split_share"]
    dense = "gpu" if summary["device"].startswith("cuda") else "dense on cpu"
    lines.append(
        f"speed     {summary['tokens_per_s']:,.0f} tokens/s; step time: experts {summary['experts']} "
        f"{shares['experts_cpu']:.0%}, {dense} {shares['dense']:.0%}, transfers {shares['transfer']:.0%}"
    )
    lines.append(f"adapter   {summary['adapter']} (PEFT; PeftModel.from_pretrained(base, path) loads it)")
    lines.append(f"metrics   {summary['metrics']}; loss plot {summary['loss_plot']}")
    return lines
