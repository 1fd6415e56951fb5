#!/usr/bin/env python3
"""A/B of kernel builds in ONE process, interleaved round-robin, for noisy shared machines.

    bash benchmarks/ab_build.sh 12ae68f base      # -> _out/ab-build/base/_core*.so (own nanobind domain)
    python benchmarks/ab_inprocess.py --core base=_out/ab-build/base/_core*.so \
        --core new=build/dev/_core*.so --tokens 128,512,4096 --threads 1,2 --rounds 7

Every `--core` is one build of the `_core` extension, loaded under its own module name; all builds
but one must come from their own nanobind domains (benchmarks/ab_build.sh does that), so their
types do not clash. Each (threads, T) cell builds one Qwen3-30B-A3B layer per build on the same bf16
weights (quantized by each build for --weight-dtype int8/int4) and inputs, then times fwd+bwd steps
build after build, `--rounds` times, after one warm-up
each; reports the median and best ms per build and the median of the per-round ratios to the first
build, in wall time and in process CPU time (robust to other jobs on the machine at 1 thread; at
more threads it includes the workers' spinning). A tiny layer (E8 H256 I128 k2, T=64) shows the
per-call overhead. --profile prints each build's stage profile of one more step. --json PATH writes
every cell's medians and ratios, --plot PNG draws the ratios (one bar per build and cell); with several
--weight-dtype values every cell is run once per dtype.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import statistics
import time
from types import ModuleType

import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16
SHAPES = {"qwen3-30b": (128, 2048, 768, 8), "tiny": (8, 256, 128, 2)}  # E, H, I, top-k


def load_core(label: str, path: str) -> ModuleType:
    name = f"kt_ab_{label}._core"  # the init symbol is PyInit__core whatever the package
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def make_inputs(shape: str, t: int, r: int, rng: np.random.Generator) -> dict:
    e, h, i, k = SHAPES[shape]
    distinct = np.arange(e) % 4  # 4 random experts repeated: timing needs no more entropy
    return {
        "dims": (e, h, i, k),
        "gate_up": (rng.standard_normal((4, 2 * i, h), dtype=np.float32) * h**-0.5).astype(BF16)[distinct],
        "down": (rng.standard_normal((4, h, i), dtype=np.float32) * i**-0.5).astype(BF16)[distinct],
        "x": rng.standard_normal((t, h), dtype=np.float32).astype(BF16),
        "g": rng.standard_normal((t, h), dtype=np.float32).astype(BF16),
        "ids": np.argsort(-rng.standard_normal((t, e)), axis=1)[:, :k].astype(np.int32),
        "w": rng.uniform(0.1, 1, (t, k)).astype(np.float32),
        "lora": [
            rng.standard_normal(s, dtype=np.float32) * f
            for s, f in (
                ((e, r, h), h**-0.5),
                ((e, 2 * i, r), r**-0.5),
                ((e, r, i), i**-0.5),
                ((e, h, r), r**-0.5),
            )
        ],
    }


class Runner:
    """One build's layer on one input set; step() returns fwd+bwd wall seconds."""

    def __init__(
        self,
        core: ModuleType,
        tier: str,
        threads: int,
        d: dict,
        weight_dtype: str,
        pool: object = None,
        numa_shards: int = 1,
        evict_mb: int = 0,
    ) -> None:
        """pool: the layer's thread pool (None: a new one of `threads` threads); numa_shards > 1 runs on
        this machine's shard layout (ADR 0701), whatever `threads`; evict_mb > 0: that many MB are written
        between the forward and the backward, untimed, so the backward finds none of the forward's weights
        in the last-level cache (as in a deep model, where other layers run in between)."""
        core.set_max_isa(tier)
        e, h, i, k = d["dims"]
        t = d["x"].shape[0]
        self.core, self.tier, self.d = core, tier, d
        self.layer = core.MoELayer(
            core.MoEConfig(
                num_experts=e,
                top_k=k,
                hidden=h,
                intermediate=i,
                weight_dtype=weight_dtype,
                numa_shards=numa_shards,
            ),
            pool=pool if pool is not None else core.ThreadPool(threads=threads),
        )
        self.layer.load_weights(gate_up=d["gate_up"], down=d["down"])
        self.lora = core.LoRA(*d["lora"], 2.0, 2.0)
        self.grad_arrays = [np.empty_like(a) for a in d["lora"]]
        self.grads = core.LoRAGrads(*self.grad_arrays)
        self.out, self.dx = np.empty((t, h), BF16), np.empty((t, h), BF16)
        self.gw = np.empty((t, k), np.float32)
        self.cpu_s: list[float] = []  # process CPU seconds of each step (all threads of the process)
        self.evict = np.zeros(evict_mb << 20, np.uint8) if evict_mb > 0 else None

    def step(self) -> float:
        self.core.set_max_isa(self.tier)  # each build has its own runtime state; keep both on the tier
        d = self.d
        a, cpu = time.perf_counter(), time.process_time()
        handle = self.layer.forward(d["x"], d["ids"], d["w"], self.out, lora=self.lora, save=True)
        forward_s, forward_cpu = time.perf_counter() - a, time.process_time() - cpu
        if self.evict is not None:
            self.evict += 1
        b, cpu = time.perf_counter(), time.process_time()
        self.layer.backward(handle, d["g"], self.dx, self.gw, lora_grads=self.grads)
        self.cpu_s.append(forward_cpu + time.process_time() - cpu)
        return forward_s + time.perf_counter() - b

    def results(self) -> list[np.ndarray]:
        return [self.out, self.dx, self.gw, *self.grad_arrays]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--core", action="append", required=True, help="LABEL=PATH of a _core extension build")
    ap.add_argument("--tier", default="amx")
    ap.add_argument(
        "--weight-dtype", default="bf16", help="expert base of every build: bf16, int8, int4 (comma list)"
    )
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b")
    ap.add_argument("--tokens", default="128,512,4096")
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--numa-shards", default="1", help="numa_shards of the layers (comma list: a cell each)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tiny-calls", type=int, default=300, help="per-call overhead calls per build (0: skip)")
    ap.add_argument("--profile", action="store_true", help="print each build's stage profile of one step")
    ap.add_argument("--json", help="write every cell's medians and ratios here")
    ap.add_argument("--plot", help="draw the per-round median ratios to the first build into this PNG")
    args = ap.parse_args()
    builds = []
    for spec in args.core:
        label, sep, path = spec.partition("=")
        if not sep or not label.isidentifier():
            ap.error(f"--core: expected LABEL=PATH with an identifier LABEL, got {spec!r}")
        builds.append((label, load_core(label, path)))
    rng = np.random.default_rng(0)
    if args.tiny_calls:
        tiny_overhead(builds, args, rng)
    cells: list[dict] = []
    for wd in args.weight_dtype.split(","):
        for shards in (int(s) for s in args.numa_shards.split(",")):
            for threads in (int(s) for s in args.threads.split(",")):
                for t in (int(s) for s in args.tokens.split(",")):
                    cells.append(run_cell(builds, args, wd, threads, t, rng, shards))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"shape": args.shape, "tier": args.tier, "rounds": args.rounds, "cells": cells}, f, indent=1
            )
    if args.plot:
        plot(
            cells,
            [label for label, _ in builds],
            f"{args.shape}, {args.tier}, {args.rounds} rounds",
            args.plot,
        )


def run_cell(
    builds: list,
    args: argparse.Namespace,
    wd: str,
    threads: int,
    t: int,
    rng: np.random.Generator,
    shards: int = 1,
) -> dict:
    """One (dtype, shards, threads, T) cell: a layer per build, warm-up, bitwise check, interleaved rounds."""
    d = make_inputs(args.shape, t, 16, rng)
    runners = [(label, Runner(core, args.tier, threads, d, wd, numa_shards=shards)) for label, core in builds]
    for _, run in runners:
        run.step()  # warm-up: workspaces, page faults
    ref = [a.copy() for a in runners[0][1].results()]
    same = {}
    for label, run in runners[1:]:
        same[label] = all(
            np.array_equal(a.view(np.uint8), b.view(np.uint8))
            for a, b in zip(ref, run.results(), strict=True)
        )
        print(f"  {label} vs {runners[0][0]}: results {'bitwise equal' if same[label] else 'DIFFER'}")
    times: dict[str, list[float]] = {label: [] for label, _ in runners}
    for _, run in runners:
        run.cpu_s.clear()
    for _ in range(args.rounds):
        for label, run in runners:
            times[label].append(run.step())
    title = f"{args.shape} {args.tier} {wd} numa_shards={shards} threads={threads} T={t}"
    cell = {"weight_dtype": wd, "numa_shards": shards, "threads": threads, "tokens": t, "bitwise_equal": same}
    cell["wall"] = report(title, times)
    cell["cpu"] = report("  process CPU time", {label: run.cpu_s for label, run in runners})
    if args.profile:
        for label, run in runners:
            profile(label, run)
    return cell


def plot(cells: list[dict], labels: list[str], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(cells)), 4))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        ratios = [cell["wall"][label]["ratio"] for cell in cells]
        xs = [x + (i - (len(labels) - 1) / 2) * width for x in range(len(cells))]
        ax.bar(xs, ratios, width, label=label)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels(
        [f"{c['weight_dtype']} N={c['numa_shards']}\nT={c['tokens']}, {c['threads']} thr" for c in cells]
    )
    ax.set_ylabel(f"fwd+bwd time / {labels[0]}'s (per-round median)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def tiny_overhead(builds: list, args: argparse.Namespace, rng: np.random.Generator) -> None:
    """Per-call cost: a tiny layer's fwd+bwd, calls interleaved in blocks of 10."""
    d = make_inputs("tiny", 64, 4, rng)
    for threads in (int(s) for s in args.threads.split(",")):
        runners = [(label, Runner(core, args.tier, threads, d, args.weight_dtype)) for label, core in builds]
        times: dict[str, list[float]] = {label: [] for label, _ in runners}
        for _, run in runners:
            for _ in range(20):
                run.step()
            run.cpu_s.clear()
        for _ in range(args.tiny_calls // 10):
            for label, run in runners:
                times[label].extend(run.step() for _ in range(10))
        report(f"tiny (E8 H256 I128 k2, T=64, r=4) {args.tier} threads={threads}", times, unit=1e6, name="us")
        report("  process CPU time", {label: run.cpu_s for label, run in runners}, unit=1e6, name="us")


def report(title: str, times: dict[str, list[float]], unit: float = 1e3, name: str = "ms") -> dict[str, dict]:
    """Prints one line; returns per build its median, best (in `name`) and per-round median ratio."""
    labels = list(times)
    base = times[labels[0]]
    parts = []
    summary = {}
    for label in labels:
        ts = times[label]
        # The per-round ratio pairs each build's call with the first build's call of the same round.
        ratio = statistics.median(b / a for a, b in zip(base, ts, strict=True))
        summary[label] = {"median": unit * statistics.median(ts), "best": unit * min(ts), "ratio": ratio}
        parts.append(
            f"{label} median {unit * statistics.median(ts):.1f} best {unit * min(ts):.1f} {name}"
            + ("" if label == labels[0] else f" (x{ratio:.3f} per-round median)")
        )
    print(f"{title}: " + " | ".join(parts), flush=True)
    return summary


def profile(label: str, run: Runner) -> None:
    prof = run.core.profiler
    prof.reset()
    prof.enable()
    run.step()
    prof.disable()
    stats = prof.stats()
    print(f"  profile of {label}: stage wall ms (busy ms)")
    for stage, s in stats.items():
        if s["calls"]:
            print(f"    {stage:22s} {1e3 * s['total_s']:8.2f} ({1e3 * s['busy_s']:8.2f}) x{s['calls']}")


if __name__ == "__main__":
    main()
