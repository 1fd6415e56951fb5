"""Timeline picture of one traced training step (the Chrome trace written by `e2e_train.py --trace`).

    python benchmarks/plot_trace.py STEP.json [STEP2.json ...] --out timeline.png

One panel per trace, three lanes each: the CPU experts calls of every micro-batch thread, the kernel
thread pool's busy time (union of the profiler's stage tasks), and the GPU kernels (union). Read the
lanes top to bottom: where a CPU lane and the GPU lane are filled at the same x, the two ran at once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

THREADS_PID, STAGES_PID, GPU_PID = 1, 2, 3  # kt_sft_train.trace.PIDS


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def lanes(events: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Lane name -> merged (start_ms, width_ms) spans, times relative to the first event."""
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    t0 = min(e["ts"] for e in complete)
    raw: dict[str, list[tuple[float, float]]] = {}
    threads: dict[Any, str] = {}
    for e in complete:
        if e["pid"] == THREADS_PID:
            lane = threads.setdefault(e["tid"], f"CPU experts, thread {len(threads) + 1}")
        elif e["pid"] == STAGES_PID:
            lane = "kernel pool busy"
        elif e["pid"] == GPU_PID and e.get("cat") == "kernel":
            lane = "GPU kernels"
        else:
            continue
        start = (e["ts"] - t0) / 1e3
        raw.setdefault(lane, []).append((start, start + e["dur"] / 1e3))
    return {lane: [(s, e - s) for s, e in _union(spans)] for lane, spans in raw.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 1.6 + 2.2 * len(args.traces)
    fig, axes = plt.subplots(len(args.traces), 1, figsize=(12, height), squeeze=False)
    for ax, path in zip(axes[:, 0], args.traces, strict=True):
        data = json.loads(path.read_text())
        by_lane = lanes(data["traceEvents"] if isinstance(data, dict) else data)
        names = sorted(by_lane, key=lambda n: (not n.startswith("CPU"), n != "kernel pool busy", n))
        for row, name in enumerate(names):
            color = "tab:green" if name.startswith("GPU") else "tab:blue"
            ax.broken_barh(by_lane[name], (row - 0.4, 0.8), color=color)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel("ms since the step's first event")
        ax.set_title(path.stem)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
