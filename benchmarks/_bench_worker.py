"""One measurement in its own process: ceilings, the reference, or one backend's timed runs.

Every backend runs in a fresh process so that its peak RSS is its own, its thread pool never competes
with another's, a crash (e.g. an illegal instruction) is reported instead of ending the benchmark, and
torch is never imported next to our torch-free kernels.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Protocol

import _bench_inputs as inputs
import numpy as np
from _bench_inputs import Problem


class Runner(Protocol):
    def setup_costs(self) -> dict[str, float]: ...
    def prepare_step(self) -> None: ...
    def forward(self) -> None: ...
    def between(self) -> None: ...
    def backward(self) -> None: ...
    def checked(self, tokens: np.ndarray, experts: np.ndarray) -> dict[str, np.ndarray]: ...


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _make_runner(p: Problem, backend: dict[str, Any]) -> tuple[Runner, dict[str, Any]]:
    kind = backend["kind"]
    threads = backend.get("threads")
    if kind == "ours":
        import _bench_ours

        ours = _bench_ours.Ours(
            p,
            threads,
            backend["tier"],
            backend.get("weight_dtype", "bf16"),
            backend.get("group_size", 128),
            backend.get("variant"),
            backend.get("numa_shards", 1),
        )
        info = {"isa": ours.active_isa, "variant": ours.variant, "version": _bench_ours.library_version()}
        return ours, info | ({"shards": ours.shards} if ours.shards else {})
    if kind.startswith("torch-"):
        import _bench_machine
        import _bench_torch

        runner = _bench_torch.BACKENDS[kind](p, threads)
        return runner, _bench_machine.torch_info()
    if kind == "kt":
        import _bench_kt

        kt = _bench_kt.KtKernel(
            p,
            threads,
            Path(backend["kt_path"]),
            backend["variant"],
            backend["weight_type"],
            backend["share_backward_bb"],
        )
        return kt, {"isa": kt.variant}
    raise ValueError(f"unknown backend kind {kind!r}")


def _timed_steps(
    runner: Runner, warmup: int, repeats: int, max_seconds: float
) -> tuple[dict[str, list[float]], bool]:
    """Per-phase milliseconds of each timed fwd(+between)+bwd step, and whether the warm-up steps had
    to serve as the measurement (a step slower than the whole budget is not repeated)."""
    timed: dict[str, list[float]] = {"fwd": [], "between": [], "bwd": [], "fwd_bwd": []}
    warm: dict[str, list[float]] = {k: [] for k in timed}
    phase_start = time.perf_counter()
    for iteration in range(warmup + repeats):
        if iteration == warmup:
            phase_start = time.perf_counter()
        runner.prepare_step()  # untimed: the optimizer's zero_grad, not the layer's work
        t0 = time.perf_counter()
        runner.forward()
        t1 = time.perf_counter()
        runner.between()
        t2 = time.perf_counter()
        runner.backward()
        t3 = time.perf_counter()
        target = warm if iteration < warmup else timed
        for key, seconds in (("fwd", t1 - t0), ("between", t2 - t1), ("bwd", t3 - t2), ("fwd_bwd", t3 - t0)):
            target[key].append(1e3 * seconds)
        if t3 - phase_start > max_seconds:
            if iteration < warmup:
                return warm, True
            break
    return timed, False


def run_backend(spec: dict[str, Any]) -> dict[str, Any]:
    p = Problem.from_dict(spec["problem"])
    rss_start = _rss_mb()
    setup_start = time.perf_counter()
    runner, info = _make_runner(p, spec["backend"])
    setup_s = time.perf_counter() - setup_start
    rss_ready = _rss_mb()

    load_before = os.getloadavg()[0]
    cpu_before, wall_before = _cpu_seconds(), time.perf_counter()
    samples, warmup_counted = _timed_steps(runner, spec["warmup"], spec["repeats"], spec["max_seconds"])
    cpu_used, wall_used = _cpu_seconds() - cpu_before, time.perf_counter() - wall_before
    rss_end = _rss_mb()

    ids, _ = inputs.routing(p)
    tokens = inputs.check_tokens(p, spec["check_tokens"])
    experts = inputs.check_experts(p, ids, spec["check_experts"])
    np.savez(spec["arrays_path"], **runner.checked(tokens, experts))
    return {
        "info": info,
        "setup": {"process_setup_s": setup_s, **runner.setup_costs()},
        "samples_ms": samples,
        "warmup_counted": warmup_counted,
        # Other work on the machine shows here: load average, and CPU-seconds per wall-second we got.
        "load_average": [load_before, os.getloadavg()[0]],
        "cpu_per_wall": cpu_used / wall_used,
        "median_ms": {k: statistics.median(v) for k, v in samples.items() if v},
        "rss_mb": {"start": rss_start, "ready": rss_ready, "end": rss_end, "peak": _peak_rss_mb()},
    }


def run_reference(spec: dict[str, Any]) -> dict[str, Any]:
    import _bench_reference

    p = Problem.from_dict(spec["problem"])
    ids, _ = inputs.routing(p)
    tokens = inputs.check_tokens(p, spec["check_tokens"])
    experts = inputs.check_experts(p, ids, spec["check_experts"])
    weight_dtype, group_size = spec.get("weight_dtype", "bf16"), spec.get("group_size", 128)
    start = time.perf_counter()
    expected = _bench_reference.reference(p, tokens, experts, weight_dtype, group_size)
    np.savez(spec["arrays_path"], **expected)
    return {
        "reference": _bench_reference.reference_name(weight_dtype, group_size),
        "seconds": time.perf_counter() - start,
        "checked_tokens": len(tokens),
        "checked_experts": len(experts),
        "active_experts": inputs.active_experts(p, ids),
    }


def run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """What this environment offers: our library's tiers, torch's version and _grouped_mm support."""
    result: dict[str, Any] = {}
    try:
        import _bench_ours

        result["ours"] = {
            "tiers": _bench_ours.supported_tiers(),
            "avx512_bf16_variant": _bench_ours.variant_choice(),
            "version": _bench_ours.library_version(),
            "build": _bench_ours.build_info(),
        }
    except Exception as error:
        result["ours"] = {"error": f"{type(error).__name__}: {error}"}
    try:
        import _bench_kt

        result["kt"] = _bench_kt.probe(Path(spec["kt_path"]))
    except Exception as error:
        result["kt"] = {"error": f"{type(error).__name__}: {error}"}
    try:
        import _bench_machine
        import _bench_torch

        result["torch"] = {**_bench_machine.torch_info(), "grouped_mm": _bench_torch.grouped_mm_available()}
    except Exception as error:
        result["torch"] = {"error": f"{type(error).__name__}: {error}"}
    return result


def run_ceilings(spec: dict[str, Any]) -> dict[str, Any]:
    import _bench_machine

    return _bench_machine.ceilings(spec["threads"])


TASKS = {"backend": run_backend, "reference": run_reference, "probe": run_probe, "ceilings": run_ceilings}


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = {"ok": True, **TASKS[spec["task"]](spec)}
    except Exception as error:
        result = {
            "ok": False,
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(),
        }
    Path(spec["result_path"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
