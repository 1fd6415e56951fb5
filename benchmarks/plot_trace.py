"""Timeline picture of one traced training step (the Chrome trace written by `e2e_train.py --trace`).

    python benchmarks/plot_trace.py STEP.json [STEP2.json ...] --out timeline.png
    python benchmarks/plot_trace.py STEP.json --summary        # where a step's time went, as text

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


def summary(events: list[dict[str, Any]]) -> str:
    """Milliseconds per experts call and per layer of each kernel phase.

    Only the part of the step the kernel trace covers counts (its ring keeps the latest events, so in a
    deep model the first calls may have none). "outside the kernel" is the experts calls' time not in a
    kernel forward/backward phase: host staging, output/gradient allocation, conversions in Python.
    """
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    stages = [e for e in complete if e["pid"] == STAGES_PID and e.get("cat") == "phase"]
    covered = min((e["ts"] for e in stages), default=float("inf"))
    calls: dict[str, list[float]] = {"fwd": [], "bwd": []}
    for e in complete:
        # "experts fwd N" calls that end in the covered part
        if e["pid"] == THREADS_PID and e["ts"] + e["dur"] > covered:
            calls[e["name"].split()[1]].append(e["dur"] / 1e3)
    phases: dict[str, float] = {}
    for e in stages:
        phases[e["name"]] = phases.get(e["name"], 0.0) + e["dur"] / 1e3
    span = (max(e["ts"] + e["dur"] for e in complete) - min(e["ts"] for e in complete)) / 1e3
    n_fwd, n_bwd = len(calls["fwd"]), len(calls["bwd"])
    lines = [
        f"step {span:.1f} ms; the kernel trace covers {n_fwd} forward and {n_bwd} backward experts calls"
    ]
    for direction, phase, n in (("fwd", "forward", n_fwd), ("bwd", "backward", n_bwd)):
        if n:
            total, kernel = sum(calls[direction]), phases.get(phase, 0.0)
            lines.append(
                f"  experts {direction} {total / n:8.2f} ms/call   kernel {phase} {kernel / n:8.2f}   "
                f"outside the kernel {(total - kernel) / n:8.2f}"
            )
    for name, ms in sorted(phases.items(), key=lambda kv: -kv[1]):
        n = n_bwd if name.startswith("bwd_") else n_fwd
        if name not in ("forward", "backward", "pack") and n:
            lines.append(f"  {name:24s} {ms / n:8.2f} ms/call")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="timeline picture (PNG)")
    parser.add_argument("--summary", action="store_true", help="print per-layer times instead")
    args = parser.parse_args()
    if args.summary:
        for path in args.traces:
            data = json.loads(path.read_text())
            print(f"{path.name}: {summary(data['traceEvents'] if isinstance(data, dict) else data)}")
        return
    if args.out is None:
        parser.error("--out is required for the picture")

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
