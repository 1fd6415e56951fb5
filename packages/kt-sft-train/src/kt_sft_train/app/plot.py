"""The loss-curve PNG of a training run (matplotlib, no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (same length as `values`)."""
    out: list[float] = []
    total = 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def plot_loss(
    steps: Sequence[int],
    losses: Sequence[float],
    path: str | os.PathLike[str],
    *,
    title: str = "kt-sft training loss",
    note: str = "",
) -> Path:
    """Write the loss per step and its moving average to `path` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if len(steps) != len(losses) or not steps:
        raise ValueError(
            f"plot_loss needs as many steps as losses (and at least one), got {len(steps)}/{len(losses)}"
        )
    path = Path(path)
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        axes.plot(steps, losses, color="#9bbbe0", linewidth=1, label="loss")
        window = max(1, len(losses) // 20)
        if window > 1:
            axes.plot(
                steps,
                moving_average(losses, window),
                color="#1f4e8c",
                linewidth=2,
                label=f"moving average ({window} steps)",
            )
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("training loss")
        if min(losses) > 0 and max(losses) / min(losses) > 100:
            axes.set_yscale("log")  # a loss falling by orders of magnitude stays readable
        axes.set_title(f"{title}\n{note}" if note else title, fontsize=11)
        axes.grid(alpha=0.3)
        axes.legend(loc="upper right")
        figure.tight_layout()
        temporary = path.with_name(path.name + ".tmp")
        figure.savefig(temporary, format="png")
        os.replace(temporary, path)
    finally:
        plt.close(figure)
    return path
