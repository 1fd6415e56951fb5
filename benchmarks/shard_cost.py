"""The cost of NUMA shards on one node (issue 13, ADR 0701 "One-node cost"), in one process.

Variants of one random problem, timed interleaved round-robin (medians of the wall time of fwd and
fwd+bwd, and of the process's CPU time for fwd+bwd: the work done, which on a shared box is steadier
than wall time; it includes the pool's brief spin-waits):
  1 shard x all threads   (the plain layer on ThreadPool(threads))
  N shards                (numa_shards=N on this machine's shard layout; on one node the shards run
                           one after another, each on all the threads: ADR 0701 "Execution")
  1 shard x all, pinned   (ThreadPool(threads, pin=True): shard sub-pools are pinned, the plain pool is not)
  1 shard x 1 thread and one shard's slice alone on 1 thread (--alone: what each shard's layer costs)
then `--repeats` profiled forward+backward runs per variant: the threads' busy and idle time from the
profiler's Chrome trace (idle = threads x wall - busy: serial sections, pool threads waiting for a
phase, shards waiting for each other; shard_barrier: the drivers' waits for each other) and the
kk.profiler stage totals (shard_* stages included), medians.

    python benchmarks/shard_cost.py --experts 32 --tokens 128,1024 --repeats 5

E = 32 with T = 128 / 1024 is a quarter of Qwen3-30B-A3B (E = 128) at T = 512 / 4096: same rows per
expert, same H and I, every per-pair and per-expert cost / 4. Run with the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

import kt_sft_kernels as kk
import ml_dtypes
import numpy as np
from kt_sft_kernels import testing

BF16 = np.dtype(ml_dtypes.bfloat16)


class Variant:
    def __init__(
        self,
        name: str,
        case: testing.MoECase,
        *,
        shards: int,
        threads: int | None,
        inter: int,
        pin: bool = False,
    ) -> None:
        self.name = name
        sliced = case
        if inter != case.intermediate:  # one shard's slice alone: gate/up rows and down columns [0, inter)
            gu = np.concatenate(
                [case.gate_up[:, :inter], case.gate_up[:, case.intermediate : case.intermediate + inter]], 1
            )
            lo = case.lora
            assert lo is not None and lo.b_gu is not None and lo.a_d is not None
            b_gu = np.concatenate(
                [lo.b_gu[:, :inter], lo.b_gu[:, case.intermediate : case.intermediate + inter]], 1
            )
            lora = testing.LoRAWeights(
                lo.a_gu,
                np.ascontiguousarray(b_gu),
                np.ascontiguousarray(lo.a_d[:, :, :inter]),
                lo.b_d,
                lo.scale_gu,
                lo.scale_d,
            )
            sliced = testing.MoECase(
                case.num_experts,
                case.top_k,
                case.hidden,
                inter,
                np.ascontiguousarray(gu),
                np.ascontiguousarray(case.down[:, :, :inter]),
                case.x,
                case.ids,
                case.weights,
                case.grad_out,
                lora,
            )
        self.case = sliced
        self.pool = kk.ThreadPool(threads=threads, pin=pin) if threads else None
        self.layer = testing.build_layer(sliced, self.pool, numa_shards=shards)
        self.lora = testing.kernel_lora(sliced)
        lo = sliced.lora
        assert lo is not None
        T, H = case.x.shape
        self.out = np.empty((T, H), BF16)
        self.grad_x = np.empty((T, H), BF16)
        self.grad_w = np.empty(case.weights.shape, np.float32)
        arrays = {n: np.empty(getattr(lo, n).shape, lo.dtype) for n in ("a_gu", "b_gu", "a_d", "b_d")}
        self.grads = kk.LoRAGrads(arrays["a_gu"], arrays["b_gu"], arrays["a_d"], arrays["b_d"])
        self.fwd: list[float] = []
        self.step: list[float] = []
        self.cpu: list[float] = []

    def run(self) -> tuple[float, float, float]:
        """Wall ms of the forward and of forward + backward, and the process's CPU ms for both."""
        c = self.case
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        handle = self.layer.forward(c.x, c.ids, c.weights, self.out, lora=self.lora, save=True)
        t1 = time.perf_counter()
        self.layer.backward(handle, c.grad_out, self.grad_x, self.grad_w, lora_grads=self.grads)
        t2 = time.perf_counter()
        return 1e3 * (t1 - t0), 1e3 * (t2 - t0), 1e3 * (time.process_time() - cpu0)


def profile(v: Variant) -> dict[str, Any]:
    """Stage stats of one profiled fwd+bwd, plus "_lanes": what its Chrome trace says about the threads."""
    kk.profiler.reset()
    kk.profiler.enable()
    v.run()
    kk.profiler.disable()
    stats = kk.profiler.stats()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        kk.profiler.dump_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e["ph"] == "X"]
    stats["_lanes"] = lanes(events)
    return stats


def lanes(events: list[dict[str, Any]]) -> dict[str, float]:
    """Threads' time in one fwd+bwd (ms): the call's wall time (first forward to last backward event),
    busy (per thread, the union of its task events: nested stages counted once), idle = threads x wall
    - busy (serial sections of the calling / driver threads, pool threads waiting for a phase, shards
    waiting for each other), and the shards' barrier waits (shard_barrier, every driver)."""
    calls = [e for e in events if e["name"] in ("forward", "backward")]
    t0 = min(e["ts"] for e in calls)
    t1 = max(e["ts"] + e["dur"] for e in calls)
    busy = 0.0
    threads = sorted({e["tid"] for e in events if e["cat"] == "task"})
    for tid in threads:
        mine = [e for e in events if e["tid"] == tid and e["cat"] == "task"]
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in mine)
        end = float("-inf")
        for a, b in spans:
            busy += max(0.0, b - max(a, end))
            end = max(end, b)
    wall = t1 - t0
    barrier = sum(e["dur"] for e in events if e["name"] == "shard_barrier")
    return {
        "threads": len(threads),
        "wall": wall / 1e3,
        "busy": busy / 1e3,
        "idle": (len(threads) * wall - busy) / 1e3,
        "barrier": barrier / 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", default="128,1024")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="threads of the 1-shard row (0 = physical cores)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--alone", action="store_true", help="add 1 shard x 1 thread and one slice alone on 1 thread"
    )
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    threads = args.threads or kk.ThreadPool().threads
    slice_width = testing_slice(args.intermediate, args.shards)
    for tokens in (int(t) for t in args.tokens.split(",")):
        case = testing.make_case(
            tokens=tokens,
            num_experts=args.experts,
            top_k=args.top_k,
            hidden=args.hidden,
            intermediate=args.intermediate,
            rank_gu=args.rank,
            rank_d=args.rank,
            lora_dtype=BF16,
            idle_experts=0,
            seed=tokens,
        )
        variants = [
            Variant(f"1 shard x {threads} thr", case, shards=1, threads=threads, inter=args.intermediate),
            Variant(f"{args.shards} shards", case, shards=args.shards, threads=None, inter=args.intermediate),
            # The shards' sub-pools are pinned, the plain pool is not: this row separates the cost of
            # pinning (a pinned thread cannot leave a vCPU the hypervisor or another process holds).
            Variant(
                f"1 shard x {threads} pinned",
                case,
                shards=1,
                threads=threads,
                inter=args.intermediate,
                pin=True,
            ),
        ]
        if args.alone:
            variants.append(Variant("1 shard x 1 thr", case, shards=1, threads=1, inter=args.intermediate))
            variants.append(
                Variant(f"slice I={slice_width} x 1 thr", case, shards=1, threads=1, inter=slice_width)
            )
        for v in variants:
            v.run()  # warm-up: workspaces, caches, spare LoRA slices
        for _ in range(args.repeats):
            for v in variants:
                f, s, cpu = v.run()
                v.fwd.append(f)
                v.step.append(s)
                v.cpu.append(cpu)
        base = variants[0]
        print(
            f"T={tokens} E={args.experts} H={args.hidden} I={args.intermediate} k={args.top_k} r={args.rank}"
        )
        for v in variants:
            f, s, cpu = (statistics.median(a) for a in (v.fwd, v.step, v.cpu))
            bf, bs, bcpu = (statistics.median(a) for a in (base.fwd, base.step, base.cpu))
            print(
                f"  {v.name:<24} fwd {f:8.2f} ms ({f / bf:5.3f})   fwd+bwd {s:8.2f} ms ({s / bs:5.3f})"
                f"   cpu {cpu:8.1f} ms ({cpu / bcpu:5.3f})"
            )
        if args.no_profile:
            continue
        print_profile(variants, args.repeats)


def print_profile(variants: list[Variant], repeats: int) -> None:
    """Median busy / wall ms per stage over `repeats` profiled fwd+bwd runs of each variant."""
    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            runs[v.name].append(profile(v))
    print(f"  {'threads: median ms':<22}" + "".join(f"{v.name:>26}" for v in variants))
    for key in ("wall", "busy", "idle", "barrier"):
        cells = [f"{statistics.median(r['_lanes'][key] for r in runs[v.name]):26.2f}" for v in variants]
        print(f"  {key:<22}" + "".join(cells))
    counts = "".join(f"{runs[v.name][0]['_lanes']['threads']:26d}" for v in variants)
    print(f"  {'(threads with tasks)':<22}" + counts)
    stages: list[str] = []
    for v in variants:
        stages += [n for n in runs[v.name][0] if n not in stages and not n.startswith("_")]
    print(f"  {'stage: busy / wall ms':<22}" + "".join(f"{v.name:>26}" for v in variants))
    for stage in stages:
        cells = []
        for v in variants:
            got = [r[stage] for r in runs[v.name] if stage in r]
            if not got:
                cells.append(" " * 26)
                continue
            busy = 1e3 * statistics.median(g["busy_s"] for g in got)
            wall = 1e3 * statistics.median(g["total_s"] for g in got)
            cells.append(f"{busy:14.2f} / {wall:8.2f}")
        print(f"  {stage:<22}" + "".join(cells))


def testing_slice(intermediate: int, shards: int) -> int:
    """Shard 0's width: the slices numa_shards uses (32-row blocks spread evenly)."""
    blocks = intermediate // 32
    return 32 * (blocks // shards)


if __name__ == "__main__":
    main()
