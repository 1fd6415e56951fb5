#!/usr/bin/env python3
"""One MoE layer repeated vs a stack of layers in model order, in ONE process (issue 17's gap).

    python benchmarks/layer_stack.py --layers 8 --tokens 4096 --threads 16
    python benchmarks/layer_stack.py --layers 12 --tokens 512 --weight-dtype bf16,int8   # dtypes side by side

bench_moe.py times one layer: its forward and backward run back to back on the same weights. In a
model, L layers run forward in order (each keeping its activation cache), then backward in reverse,
so between a layer's forward and its backward every other layer's weights pass through the caches.
This runs both patterns on identical Qwen3-30B-A3B layers (own weight and LoRA copies, same values) and the
same inputs and reports, per call: wall ms, the process's minor page faults, and the share of the
process's anonymous memory on transparent huge pages. Timing only; bench_moe.py checks numerics.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import statistics
import time
from pathlib import Path

import kt_sft_kernels as kk
import ml_dtypes
import numpy as np
from ab_inprocess import SHAPES, make_inputs

BF16 = ml_dtypes.bfloat16
E, H, FF, K = SHAPES["qwen3-30b"]  # FF = the experts' intermediate size I
R = 16


def huge_pages_gib() -> tuple[float, float]:
    """(AnonHugePages, Anonymous) of this process in GiB, from smaps_rollup (0, 0 where absent)."""
    fields = {}
    path = Path("/proc/self/smaps_rollup")
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("AnonHugePages", "Anonymous"):
                fields[name] = int(rest.split()[0]) / 2**20
    return fields.get("AnonHugePages", 0.0), fields.get("Anonymous", 0.0)


def minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Layer:
    def __init__(
        self,
        gate_up: np.ndarray,
        down: np.ndarray,
        lora: list[np.ndarray],
        t: int,
        dtype: str,
        pool: kk.ThreadPool,
    ) -> None:
        cfg = kk.MoEConfig(num_experts=E, top_k=K, hidden=H, intermediate=FF, weight_dtype=dtype)
        self.layer = kk.MoELayer(cfg, pool=pool)
        self.layer.load_weights(gate_up=gate_up, down=down)
        self.lora_arrays = [a.copy() for a in lora]  # each layer its own LoRA, as in a model
        self.lora = kk.LoRA(*self.lora_arrays, 2.0, 2.0)
        self.grads = kk.LoRAGrads(*[np.empty_like(a) for a in lora])
        self.out, self.dx = np.empty((t, H), BF16), np.empty((t, H), BF16)
        self.gw = np.empty((t, K), np.float32)


def timed(fn, rec: dict) -> object:
    f0, a = minflt(), time.perf_counter()
    result = fn()
    rec["ms"].append(1e3 * (time.perf_counter() - a))
    rec["faults"].append(minflt() - f0)
    return result


def summary(name: str, rec: dict) -> str:
    ms, faults = rec["ms"], rec["faults"]
    return (
        f"{name:5s} median {statistics.median(ms):8.1f} ms  best {min(ms):8.1f} ms  "
        f"minor faults/call median {statistics.median(faults):9.0f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0, help="0: the default pool")
    ap.add_argument(
        "--weight-dtype",
        default="bf16",
        help="comma-separated (e.g. bf16,int8): one stack each, interleaved pass by pass in this process",
    )
    ap.add_argument("--rounds", type=int, default=2, help="stack passes (and single-layer repeats per layer)")
    ap.add_argument("--profile", action="store_true", help="stage profile of one pass of each kind")
    args = ap.parse_args()
    t = args.tokens
    dtypes = [s for s in args.weight_dtype.split(",") if s]
    d = make_inputs("qwen3-30b", t, R, np.random.default_rng(0))
    x, g, ids, w = d["x"], d["g"], d["ids"], d["w"]
    pool = kk.ThreadPool(threads=args.threads) if args.threads else kk.default_pool()
    stacks: dict[str, list[Layer]] = {}
    for dtype in dtypes:
        a = time.perf_counter()
        stacks[dtype] = [
            Layer(d["gate_up"], d["down"], d["lora"], t, dtype, pool) for _ in range(args.layers)
        ]
        print(
            f"{args.layers} layers of E{E} H{H} I{FF} k{K} ({dtype}), T={t}, "
            f"tier {kk.active_isa()}, pool {pool}; built in {time.perf_counter() - a:.1f} s"
        )
    del d

    def fwd(lay: Layer) -> object:
        return lay.layer.forward(x, ids, w, lay.out, lora=lay.lora, save=True)

    def bwd(lay: Layer, handle: object) -> None:
        lay.layer.backward(handle, g, lay.dx, lay.gw, lora_grads=lay.grads)

    def single_pass(layers: list[Layer], rec: dict) -> None:  # every layer: forward then its backward at once
        for lay in layers:
            handle = timed(lambda lay=lay: fwd(lay), rec["fwd"])
            timed(lambda lay=lay, handle=handle: bwd(lay, handle), rec["bwd"])

    def stack_pass(layers: list[Layer], rec: dict) -> None:  # model order: forwards, then backwards reversed
        handles = [timed(lambda lay=lay: fwd(lay), rec["fwd"]) for lay in layers]
        for lay, handle in zip(reversed(layers), reversed(handles), strict=True):
            timed(lambda lay=lay, handle=handle: bwd(lay, handle), rec["bwd"])

    def fresh() -> dict:
        return {p: {"ms": [], "faults": []} for p in ("fwd", "bwd")}

    passes = {"single": single_pass, "stack": stack_pass}
    for dtype in dtypes:  # warm-up: every layer's workspaces and caches once
        for run in passes.values():
            run(stacks[dtype], fresh())
    recs = {(mode, dtype): fresh() for mode in passes for dtype in dtypes}
    per_round: dict[tuple[str, str], list[float]] = {key: [] for key in recs}  # ms per layer, each pass
    for rnd in range(args.rounds):  # interleaved (each round starts one dtype later): drift hits all alike
        for dtype in dtypes[rnd % len(dtypes) :] + dtypes[: rnd % len(dtypes)]:
            for mode, run in passes.items():
                rec = fresh()
                run(stacks[dtype], rec)
                per_round[mode, dtype].append((sum(rec["fwd"]["ms"]) + sum(rec["bwd"]["ms"])) / args.layers)
                for phase in ("fwd", "bwd"):
                    for field in ("ms", "faults"):
                        recs[mode, dtype][phase][field] += rec[phase][field]
    huge, anon = huge_pages_gib()
    for (mode, dtype), rec in recs.items():
        print(f"{mode} ({dtype}):")
        for phase in ("fwd", "bwd"):
            print("  " + summary(phase, rec[phase]))
        total = statistics.median(rec["fwd"]["ms"]) + statistics.median(rec["bwd"]["ms"])
        print(f"  fwd+bwd median per layer {total:.1f} ms")
    for other in dtypes[1:]:  # speed of each further dtype over the first, pass by pass
        for mode in passes:
            ratios = [a / b for a, b in zip(per_round[mode, dtypes[0]], per_round[mode, other], strict=True)]
            print(
                f"{other}/{dtypes[0]} speed-up, {mode}: median {statistics.median(ratios):.3f} "
                f"(per round {', '.join(f'{r:.3f}' for r in ratios)})"
            )
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print(
        f"anonymous memory {anon:.1f} GiB, on huge pages {huge:.1f} GiB; THP "
        f"{thp.read_text().strip() if thp.exists() else 'n/a'}"
    )
    if args.profile:
        for (mode, run), dtype in itertools.product(passes.items(), dtypes):
            kk.profiler.reset()
            kk.profiler.enable()
            run(stacks[dtype], fresh())
            kk.profiler.disable()
            print(f"profile, {mode} pass, {args.layers} {dtype} layers: stage wall ms per layer (busy ms)")
            for stage, s in kk.profiler.stats().items():
                if s["calls"]:
                    print(
                        f"  {stage:22s} {1e3 * s['total_s'] / args.layers:8.2f} "
                        f"({1e3 * s['busy_s'] / args.layers:8.2f})"
                    )


if __name__ == "__main__":
    main()
