#!/usr/bin/env python3
"""Sweep of the amx tier's prefetch knobs (src/isa/amx/amx_tier.hpp) in ONE process (issue 11, ADR 0603).

    python3 benchmarks/tune_sweep.py --rounds 5            # the AMX machine, default pool
    python3 benchmarks/tune_sweep.py --tokens 128 --rounds 1 --settings default,nt_burst   # a quick check
    python3 benchmarks/tune_sweep.py --tokens 512 --settings default,default_aa --evict-mb 1024
        # 1 GB written between each forward and backward (untimed): no weights left in the L3 for the
        # backward, as in a deep model, where a layer-by-layer benchmark would otherwise reuse them

On the 16-thread AMX machine the weight stream of the Qwen3-30B-A3B layer at T = 512 runs at 27-41
GB/s of the host's 85, every thread streaming only 2-3 GB/s: per-thread memory-level parallelism
(prefetch distance and placement), not compute, bounds it. This builds one layer per weight dtype and
T (bf16 and int8 on the same bf16 weights, inputs as benchmarks/ab_inprocess.py makes them), then
for each tuning setting (through the testing-only kt_sft_kernels._core._testing.set_amx_tuning) times
fwd+bwd steps: one warm-up step per layer, then --rounds rounds, each running every T, setting and
dtype once (settings interleaved round-robin, so machine drift hits them all alike; each T block of
a round starts with an untimed step per dtype, and each round with the next setting). It prints per
(T, setting): bf16 and int8 median ms, int8's speed-up over bf16 of the same setting, and each dtype's
speed-up over the default setting (median of the per-round ratios), and checks that every step's
results are bitwise equal to the default setting's (no knob may change a value: tests/test_amx_tuning.py).
The knobs keep their defaults afterwards; nothing is written.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import kt_sft_kernels as kk
import numpy as np
from ab_inprocess import Runner, make_inputs, profile
from kt_sft_kernels import _core
from kt_sft_kernels._core import _testing

DTYPES = ("bf16", "int8")

# name -> knobs changed from the defaults ("default" first: every ratio is against it).
SETTINGS: dict[str, dict[str, object]] = {
    "default": {},
    "default_aa": {},  # the default again (an A/A control): its ratios show the run's noise
    # int8 NN: the per-call VNNI strip build (prefetch distance in 4-row groups, L1 or L2; extra far L2)
    "strip8": {"int8_strip_prefetch_groups": 8},
    "strip16": {"int8_strip_prefetch_groups": 16},
    "strip4_l1": {"int8_strip_prefetch_l2": False},  # the default before session 6's device sweep
    "strip4_l2": {"int8_strip_prefetch_l2": True},
    "strip8_l2": {"int8_strip_prefetch_groups": 8, "int8_strip_prefetch_l2": True},
    "strip16_l2": {"int8_strip_prefetch_groups": 16, "int8_strip_prefetch_l2": True},
    "far16": {"int8_strip_far_groups": 16},
    "far32": {"int8_strip_far_groups": 32},
    "far64": {"int8_strip_far_groups": 64},
    # int8 NT: the next W pair (32 rows), pairs ahead / order / all at once / level
    "nt2": {"int8_nt_prefetch_pairs": 2},
    "nt_burst": {"int8_nt_prefetch_burst": True},
    "nt_l1": {"int8_nt_prefetch_l2": False},
    "far64_nt_l1": {"int8_strip_far_groups": 64, "int8_nt_prefetch_l2": False},
    # both dtypes: the call's first weights at entry (nothing prefetches them otherwise)
    "first": {"weight_prefetch_first": True},
    # bf16 NT/NN: weight items ahead, L2, all at once
    "wp1_l2": {"weight_prefetch_l2": True},
    "wp2": {"weight_prefetch_items": 2},
    "wp2_l2": {"weight_prefetch_items": 2, "weight_prefetch_l2": True},
    "wp3_l2": {"weight_prefetch_items": 3, "weight_prefetch_l2": True},
    "burst": {"weight_prefetch_burst": True},
    # the most aggressive combination of the above, for both dtypes
    "all_far": {
        "weight_prefetch_first": True,
        "weight_prefetch_items": 2,
        "weight_prefetch_l2": True,
        "int8_strip_prefetch_groups": 8,
        "int8_strip_far_groups": 32,
    },
}


def results_equal(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x.view(np.uint8), y.view(np.uint8)) for x, y in zip(a, b, strict=True))


def parse_settings(text: str | None) -> list[str]:
    names = list(SETTINGS) if text is None else [s for s in text.split(",") if s]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"--settings: unknown {', '.join(unknown)} (known: {', '.join(SETTINGS)})")
    return ["default"] + [n for n in names if n != "default"]  # the baseline of every ratio always runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="512,4096", help="comma-separated T values")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=None, help="threads of the layers' pool (default: default pool)"
    )
    ap.add_argument("--settings", default=None, help=f"comma-separated subset of: {', '.join(SETTINGS)}")
    ap.add_argument("--shape", choices=("qwen3-30b", "tiny"), default="qwen3-30b")
    ap.add_argument(
        "--evict-mb",
        type=int,
        default=0,
        help="MB written between each step's forward and backward, untimed (0: none): the backward then "
        "finds no weights of the forward in the last-level cache, as in a deep model",
    )
    ap.add_argument(
        "--profile", action="store_true", help="stage profile of one step per (T, setting, dtype)"
    )
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.evict_mb < 0:
        ap.error("--evict-mb must be >= 0")
    try:
        tokens = [int(s) for s in args.tokens.split(",")]
    except ValueError:
        ap.error(f"--tokens: expected comma-separated integers, got {args.tokens!r}")
    if any(t < 1 for t in tokens):
        ap.error("--tokens must all be >= 1")
    names = parse_settings(args.settings)
    if not kk.isa_supported("amx"):
        raise SystemExit("tune_sweep: this host has no amx tier (the knobs are the amx tier's)")
    defaults = _testing.amx_tuning()
    pool = _core.default_pool() if args.threads is None else _core.ThreadPool(threads=args.threads)
    start = time.perf_counter()
    print(
        f"tune_sweep: {args.shape}, T {tokens}, {pool.threads} threads, {args.rounds} rounds, settings:",
        flush=True,
    )
    for name in names:
        print(f"  {name:11s} {SETTINGS[name] or '(today: ' + str(defaults) + ')'}", flush=True)

    rng = np.random.default_rng(0)
    runners: dict[tuple[int, str], Runner] = {}
    reference: dict[tuple[int, str], list[np.ndarray]] = {}
    for t in tokens:
        d = make_inputs(args.shape, t, 16, rng)
        for dtype in DTYPES:
            run = Runner(_core, "amx", pool.threads, d, dtype, pool=pool, evict_mb=args.evict_mb)
            run.step()  # warm-up (workspaces, page faults), at the default setting
            reference[t, dtype] = [a.copy() for a in run.results()]
            runners[t, dtype] = run
        del d
        print(f"  built T={t} layers ({time.perf_counter() - start:.1f} s)", flush=True)

    times = {key: {name: [] for name in names} for key in runners}
    differ: set[tuple[int, str, str]] = set()
    try:
        for rnd in range(args.rounds):
            for t in tokens:
                for dtype in DTYPES:  # untimed: the first step after another T's layers runs cold
                    runners[t, dtype].step()
                # Each round starts one setting later: no setting always runs first (or right after
                # a given other one).
                for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
                    _testing.set_amx_tuning(**{**defaults, **SETTINGS[name]})
                    for dtype in DTYPES:
                        run = runners[t, dtype]
                        times[t, dtype][name].append(run.step())
                        if not results_equal(run.results(), reference[t, dtype]):
                            differ.add((t, dtype, name))
                    _testing.set_amx_tuning(**defaults)
            print(f"  round {rnd + 1}/{args.rounds} done ({time.perf_counter() - start:.1f} s)", flush=True)
        for t in tokens:
            report(t, names, {dtype: times[t, dtype] for dtype in DTYPES}, differ)
        if args.profile:
            for t in tokens:
                for name in names:
                    _testing.set_amx_tuning(**{**defaults, **SETTINGS[name]})
                    for dtype in DTYPES:
                        profile(f"T={t} {name} {dtype}", runners[t, dtype])
                    _testing.set_amx_tuning(**defaults)
    finally:
        _testing.set_amx_tuning(**defaults)
    verdict = "bitwise equal to the default setting's" if not differ else f"DIFFER in {sorted(differ)}"
    print(f"results of every step: {verdict}", flush=True)
    print(f"tune_sweep: {time.perf_counter() - start:.1f} s", flush=True)
    if differ:
        sys.exit(1)


def report(t: int, names: list[str], times: dict[str, dict[str, list[float]]], differ: set) -> None:
    """One table per T: medians, int8 vs bf16 of the same setting, each dtype vs the default setting."""

    def vs_default(dtype: str, name: str) -> float:  # > 1: faster than the default in the same round
        base = times[dtype]["default"]
        return statistics.median(b / x for b, x in zip(base, times[dtype][name], strict=True))

    print(
        f"\nT={t}: fwd+bwd wall ms (medians); speed-ups: int8/bf16 = bf16 ms / int8 ms of the setting,",
        flush=True,
    )
    print("  'vs default' = median over rounds of (default ms / setting ms) of the same dtype", flush=True)
    print(
        f"  {'setting':11s} {'bf16 ms':>8s} {'int8 ms':>8s} {'int8/bf16':>9s} {'bf16 vs def':>11s} "
        f"{'int8 vs def':>11s}  results",
        flush=True,
    )
    for name in names:
        bf, i8 = statistics.median(times["bf16"][name]), statistics.median(times["int8"][name])
        same = not any((t, dtype, name) in differ for dtype in DTYPES)
        print(
            f"  {name:11s} {1e3 * bf:8.2f} {1e3 * i8:8.2f} {bf / i8:9.3f} {vs_default('bf16', name):11.3f} "
            f"{vs_default('int8', name):11.3f}  {'equal' if same else 'DIFFER'}",
            flush=True,
        )


if __name__ == "__main__":
    main()
