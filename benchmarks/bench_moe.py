#!/usr/bin/env python3
"""One MoE layer (LoRA fine-tuning step), every backend side by side in one run on the same inputs.

    python benchmarks/bench_moe.py --shape qwen3-30b --tokens 512 --out _out/bench

Backends: our kernels (kt_sft_kernels) at every ISA tier the host supports; PyTorch on CPU in bf16
(naive per-expert loop with autograd, sorted per-expert matmuls, torch._grouped_mm); kt-kernel 0.7.2's
SFT MoE (bf16, and int8 / int4 where it loads) from an unpacked wheel folder. `--weight-dtype
bf16,int8,int4` adds our frozen quantized bases (a row per tier and dtype; `--group-size` for int4).
Quantized runs (ours and kt's) are checked against the reference on the weights dequantized by OUR
quantizer (testing.quantize); their error against the bf16 weights is recorded beside it
(`errors_vs_bf16`). kt quantizes with its own rule, so its distance from our dequantized reference
includes the difference of the two quantizations. Each backend runs in its own
process (clean peak RSS, no competing thread pools, crashes reported). Every result is checked against a
float64 reference; one that fails DESIGN.md §7 is printed as FAILED, never as a time. Ceilings (matmul
peak through torch, memory triad) are measured in the same run. Writes results.json, results.md and
bench_moe.png (+ scaling.png with --scaling) into --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_inputs as inputs
import _bench_kt
import _bench_machine
import _bench_reference
import _bench_report
from _bench_inputs import Problem, Shape

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_bench_worker.py"
TORCH_BACKENDS = ("torch-loop", "torch-sorted", "torch-grouped_mm", "torch-sorted-fp32")
ALL_BACKENDS = ("ours", *TORCH_BACKENDS, "kt", "kt-int8", "kt-int4")
KT_WEIGHT_TYPES = {"kt": "bf16", "kt-int8": "int8", "kt-int4": "int4"}
WEIGHT_DTYPES = ("bf16", "int8", "int4")
BATCHED_TORCH = ("torch-sorted", "torch-grouped_mm")
VARIANTS = ("fma", "bf16dot")  # kernel variants of our avx512_bf16 tier (ADR 0902)

# Rough resident memory per backend, in multiples of the layer's bf16 expert weights (inputs + packed
# copies); used only to skip what cannot fit instead of swapping the machine to death.
MEMORY_FACTOR = {"ours": 2.3, "torch": 2.3, "kt": 3.5}


def parse_shape(text: str) -> Shape:
    if text in inputs.SHAPES:
        return inputs.SHAPES[text]
    if text.startswith("custom:"):
        e, h, i, k = (int(v) for v in text.removeprefix("custom:").split("x"))
        return Shape(f"E{e}-H{h}-I{i}-k{k}", e, h, i, k)
    raise argparse.ArgumentTypeError(
        f"--shape: {text!r} is not one of {sorted(inputs.SHAPES)} or custom:ExHxIxk"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--shape",
        default="qwen3-30b",
        help="comma list of qwen3-30b, qwen3-235b, deepseek-v3 "
        "or custom:ExHxIxk, e.g. custom:8x256x128x2 (default qwen3-30b)",
    )
    ap.add_argument("--tokens", default="512", help="comma list of token counts T (default 512)")
    ap.add_argument(
        "--backends", default=",".join(ALL_BACKENDS), help=f"comma list of {', '.join(ALL_BACKENDS)}"
    )
    ap.add_argument(
        "--tiers", default=None, help="our ISA tiers to run (default: every tier the host supports)"
    )
    ap.add_argument(
        "--variants",
        default=None,
        help="kernel variants of our avx512_bf16 tier, one row each: comma list of fma, bf16dot "
        "(default: the library's choice for this CPU, ADR 0902)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for every backend (default: ours = its default pool, torch = all CPUs, "
        "kt = best of CPUs-1 and CPUs)",
    )
    ap.add_argument(
        "--numa-shards",
        default="1",
        help="comma list of MoEConfig.numa_shards for our layer, one row each (e.g. 1,2: the cost of "
        "sharding; shards > 1 use the shard layout of kt_sft_kernels.shard_layout(), not --threads)",
    )
    ap.add_argument("--kt-threads", default=None, help="comma list of kt thread counts to try (overrides)")
    ap.add_argument(
        "--kt-kernel-path",
        type=Path,
        default=None,
        help="unpacked kt-kernel wheel folder (default <repo>/.kt_kernel/py3XX for this Python)",
    )
    ap.add_argument(
        "--kt-bb",
        choices=("shared", "persistent", "both"),
        default="shared",
        help="kt share_backward_bb: shared = its trainer's default for bf16 (per-step repack of "
        "transposed weights), persistent = a second resident transposed copy",
    )
    ap.add_argument(
        "--kt-force",
        action="store_true",
        help="run kt even where its build lacks the class (to see what happens)",
    )
    ap.add_argument(
        "--weight-dtype",
        default="bf16",
        help="comma list of our base weight dtypes: bf16, int8, int4 (default bf16)",
    )
    ap.add_argument("--group-size", type=int, default=128, help="our int4 group size: 32, 64 or 128")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--repeats", type=int, default=5, help="timed steps per backend (median and best reported)"
    )
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="stop timing a backend once its timed steps exceed this (at least one step runs)",
    )
    ap.add_argument("--check-tokens", type=int, default=64, help="token rows checked against the reference")
    ap.add_argument("--check-experts", type=int, default=8, help="experts whose LoRA grads are checked")
    ap.add_argument(
        "--timeout", type=float, default=4 * 3600, help="seconds before a backend process is killed"
    )
    ap.add_argument(
        "--scaling",
        action="store_true",
        help="only run our best tier at threads 1, 2, 4, ..., CPUs and plot the scaling",
    )
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "_out" / "bench")
    ap.add_argument(
        "--render",
        type=Path,
        default=None,
        help="only rewrite results.md and the plots from this results.json",
    )
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    args.weight_dtypes = args.weight_dtype.split(",")
    unknown = set(args.weight_dtypes) - set(WEIGHT_DTYPES)
    if unknown:
        ap.error(f"--weight-dtype: unknown {sorted(unknown)}; choose from {', '.join(WEIGHT_DTYPES)}")
    if args.group_size not in (32, 64, 128):
        ap.error(f"--group-size must be 32, 64 or 128, got {args.group_size}")
    if args.variants:
        bad = [v for v in args.variants.split(",") if v not in VARIANTS]
        if bad:
            ap.error(f"--variants: {', '.join(bad)} not among {', '.join(VARIANTS)}")
    try:
        args.numa_shards = [int(n) for n in args.numa_shards.split(",")]
    except ValueError:
        ap.error(f"--numa-shards: {args.numa_shards!r} is not a comma list of integers")
    if any(n < 1 for n in args.numa_shards):
        ap.error("--numa-shards: every shard count must be >= 1")
    return args


class Harness:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.counter = 0
        self.machine = _bench_machine.machine_info()
        self.cpus = self.machine["cpus"]
        self.ceilings: dict[str, Any] = {}
        self.probe: dict[str, Any] = {}
        self.kt_path = args.kt_kernel_path or _bench_kt.default_path(REPO_ROOT)

    def child(self, spec: dict[str, Any], label: str) -> dict[str, Any]:
        """Run one worker task in a fresh Python process and return its result."""
        self.counter += 1
        spec = {
            **spec,
            "result_path": str(self.work / f"r{self.counter}.json"),
            "arrays_path": str(self.work / f"a{self.counter}.npz"),
        }
        started = time.monotonic()
        spec_path = self.work / f"s{self.counter}.json"
        spec_path.write_text(json.dumps(spec))
        log_path = self.work / f"log{self.counter}.txt"
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run(
                    [sys.executable, str(WORKER), str(spec_path)],
                    stdout=log,
                    stderr=log,
                    timeout=self.args.timeout,
                    cwd=WORKER.parent,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                return {"ok": False, "error": f"timed out after {self.args.timeout:.0f} s"}
        result_path = Path(spec["result_path"])
        if proc.returncode != 0 or not result_path.exists():
            tail = log_path.read_text()[-1500:]
            how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
            if proc.returncode == -4:
                how += " (SIGILL: an instruction this CPU lacks)"
            print(f"  [{label}] process {how}; log tail:\n{tail}", file=sys.stderr)
            return {"ok": False, "error": f"process {how}", "crashed": True}
        result = json.loads(result_path.read_text())
        result["arrays_path"] = spec["arrays_path"]
        print(f"  [{label}] process {time.monotonic() - started:.0f} s", flush=True)
        return result

    # ----- what to run -----

    def tiers(self) -> list[str]:
        ours = self.probe.get("ours", {})
        if "tiers" not in ours:
            return []
        if self.args.tiers:
            wanted = self.args.tiers.split(",")
            return [t for t in wanted if t in ours["tiers"]]
        return list(ours["tiers"])

    def kt_threads(self) -> list[int]:
        if self.args.kt_threads:
            return [int(t) for t in self.args.kt_threads.split(",")]
        if self.args.threads:
            return [self.args.threads]
        return _bench_kt.thread_candidates(self.cpus)

    def backend_specs(self, wanted: list[str]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(backend spec for the worker, run record skeleton); unavailable ones get a record only."""
        specs: list[tuple[dict[str, Any], dict[str, Any]]] = []
        torch_threads = self.args.threads or self.cpus
        if "ours" in wanted:
            if "tiers" not in self.probe.get("ours", {}):
                specs.append(
                    (
                        {},
                        {
                            "kind": "ours",
                            "label": "ours",
                            "status": "unavailable",
                            "reason": self.probe.get("ours", {}).get("error", "?"),
                        },
                    )
                )
            for weight_dtype in self.args.weight_dtypes:
                suffix = "" if weight_dtype == "bf16" else f" {weight_dtype}"
                if weight_dtype == "int4":
                    suffix += f" g{self.args.group_size}"
                for tier in self.tiers():
                    variants = self.args.variants.split(",") if self.args.variants else [None]
                    for variant, shards in itertools.product(
                        variants if tier == "avx512_bf16" else [None], self.args.numa_shards
                    ):
                        sharded = f" numa_shards={shards}" if len(self.args.numa_shards) > 1 else ""
                        threads = self.args.threads if shards == 1 else None
                        label = f"ours {tier}{suffix}" + (f" ({variant})" if variant else "") + sharded
                        specs.append(
                            (
                                {
                                    "kind": "ours",
                                    "tier": tier,
                                    "variant": variant,
                                    "threads": threads,
                                    "weight_dtype": weight_dtype,
                                    "group_size": self.args.group_size,
                                    "numa_shards": shards,
                                },
                                {
                                    "kind": "ours",
                                    "label": label,
                                    "threads": threads or "default",
                                    "weight_type": weight_dtype,
                                },
                            )
                        )
        for name in TORCH_BACKENDS:
            if name not in wanted:
                continue
            torch_probe = self.probe.get("torch", {})
            reason = torch_probe.get("error") or (
                torch_probe.get("grouped_mm") if name == "torch-grouped_mm" else None
            )
            dtype = "" if name.endswith("fp32") else " bf16"
            record = {"kind": "torch", "label": f"{name}{dtype}", "threads": torch_threads}
            if reason:
                specs.append(({}, {**record, "status": "unavailable", "reason": reason}))
            else:
                specs.append(({"kind": name, "threads": torch_threads}, record))
        for name, weight_type in KT_WEIGHT_TYPES.items():
            if name not in wanted:
                continue
            kt_probe = self.probe.get("kt", {"error": "not probed"})
            reason = _bench_kt.unavailable_reason(kt_probe, weight_type)
            variant = kt_probe.get("variant", "?")
            record = {"kind": "kt", "label": f"kt-kernel {weight_type}", "weight_type": weight_type}
            if reason and not (self.args.kt_force and "variant" in kt_probe):
                specs.append(({}, {**record, "status": "unavailable", "reason": reason}))
                continue
            modes = {"shared": [True], "persistent": [False], "both": [True, False]}[self.args.kt_bb]
            if weight_type != "bf16":
                modes = [True]  # kt's trainer requires share_backward_bb for its quantized classes
            bb_name = {True: "shared", False: "persistent"}
            for shared in modes:
                for threads in self.kt_threads():
                    specs.append(
                        (
                            {
                                "kind": "kt",
                                "threads": threads,
                                "kt_path": str(self.kt_path),
                                "variant": variant,
                                "weight_type": weight_type,
                                "share_backward_bb": shared,
                            },
                            {
                                **record,
                                "label": f"kt-kernel {weight_type} ({variant}, bb {bb_name[shared]})",
                                "threads": threads,
                                "variant": variant,
                            },
                        )
                    )
        return specs

    # ----- running one case -----

    def memory_ok(self, p: Problem, kind: str) -> str | None:
        need = MEMORY_FACTOR.get(kind, 2.5) * p.shape.num_experts * p.expert_weight_bytes() / 2**30
        have = _bench_machine.mem_available_gb()
        if need > 0.9 * have:
            return f"needs ~{need:.0f} GB, {have:.0f} GB available"
        return None

    def run_case(
        self,
        p: Problem,
        specs: list[tuple[dict[str, Any], dict[str, Any]]],
        cases: list[dict[str, Any]],
        written: Callable[[], None],
    ) -> None:
        """Runs every backend of case p into a new last entry of `cases`, calling `written` after each
        (the entry fills in place, so whatever `written` saves holds the rows finished so far)."""
        title = (
            f"{p.shape.name} (E{p.shape.num_experts} H{p.shape.hidden} I{p.shape.intermediate} "
            f"k{p.shape.top_k}), T={p.tokens}"
        )
        print(f"\n== {title}", flush=True)
        case: dict[str, Any] = {"title": title, "problem": p.to_dict(), "runs": []}
        cases.append(case)
        common = {
            "problem": p.to_dict(),
            "check_tokens": self.args.check_tokens,
            "check_experts": self.args.check_experts,
        }
        reference = self.child({"task": "reference", **common}, "reference")
        if not reference.get("ok"):
            print(f"  reference failed: {reference.get('error')}", file=sys.stderr)
            case["reference_error"] = reference.get("error")
            written()
            return
        case["reference"] = {
            k: reference[k]
            for k in ("reference", "seconds", "checked_tokens", "checked_experts", "active_experts")
        }
        print(
            f"  reference ({reference['reference']}): {reference['seconds']:.1f} s "
            f"({reference['checked_tokens']} rows, {reference['checked_experts']} experts' LoRA grads)",
            flush=True,
        )
        case["floor"] = _bench_report.streaming_floor(p, reference["active_experts"], self.ceilings)
        expected = {"bf16": dict(np.load(reference["arrays_path"]))}
        for weight_type in sorted(
            {r.get("weight_type", "bf16") for s, r in specs if "status" not in r} - {"bf16"}
        ):
            quantized = self.child(
                {
                    "task": "reference",
                    "weight_dtype": weight_type,
                    "group_size": self.args.group_size,
                    **common,
                },
                f"reference {weight_type}",
            )
            if not quantized.get("ok"):
                print(f"  {weight_type} reference failed: {quantized.get('error')}", file=sys.stderr)
                continue
            expected[weight_type] = dict(np.load(quantized["arrays_path"]))
            case.setdefault("quantized_references", {})[weight_type] = quantized["reference"]
            print(f"  reference ({quantized['reference']}): {quantized['seconds']:.1f} s", flush=True)
        for spec, record in specs:
            run = dict(record)
            if "status" not in run and record.get("weight_type", "bf16") not in expected:
                run.update(status="error", reason=f"no {record['weight_type']} reference")
            elif "status" not in run:
                run.update(self.run_backend(p, spec, record, expected, common, reference["active_experts"]))
            case["runs"].append(run)
            print("  " + one_line(run), flush=True)
            mark_best(case["runs"])
            written()

    def run_backend(
        self, p: Problem, spec: dict, record: dict, expected: dict, common: dict, active_experts: int
    ) -> dict[str, Any]:
        too_big = self.memory_ok(p, record["kind"])
        if too_big:
            return {"status": "skipped", "reason": too_big}
        result = self.child(
            {
                "task": "backend",
                "backend": spec,
                "warmup": self.args.warmup,
                "repeats": self.args.repeats,
                "max_seconds": self.args.max_seconds,
                **common,
            },
            record["label"],
        )
        if not result.get("ok"):
            return {"status": "error", "reason": result.get("error", "?")}
        got = dict(np.load(result["arrays_path"]))
        os.unlink(result["arrays_path"])
        weight_type = record.get("weight_type", "bf16")
        errors = _bench_reference.errors(got, expected[weight_type])
        passed, err_out, err_grad = _bench_report.verdict(errors, weight_type)
        run: dict[str, Any] = {
            "errors": errors,
            "errors_vs_bf16": _bench_reference.errors(got, expected["bf16"])
            if weight_type != "bf16"
            else errors,
            "err_out": err_out,
            "err_grad": err_grad,
            "info": result["info"],
            "one_time": result["setup"],
            "peak_rss_gb": result["rss_mb"]["peak"] / 1024,
            "rss_mb": result["rss_mb"],
            "steps": len(result["samples_ms"]["fwd_bwd"]),
            "warmup_counted": result["warmup_counted"],
            "load_average": result["load_average"],
            "cpu_per_wall": result["cpu_per_wall"],
        }
        if not passed:
            run.update(
                status="FAILED", reason="error above DESIGN.md §7", rejected_median_ms=result["median_ms"]
            )
            return run
        median = result["median_ms"]
        run.update(
            status="ok",
            fwd_ms=median["fwd"],
            bwd_ms=median["bwd"],
            between_ms=median["between"],
            fwd_bwd_ms=median["fwd_bwd"],
            samples_ms=result["samples_ms"],
        )
        run.update(_bench_report.derive(p, median, active_experts, self.ceilings))
        return run


def one_line(run: dict[str, Any]) -> str:
    head = f"{run['label']:<48} thr {run.get('threads', '-')!s:>7}"
    errs = f"err out {run['err_out']:.1e} grads {run['err_grad']:.1e}" if "errors" in run else ""
    if run["status"] != "ok":
        return f"{head}  {run['status']}: {run.get('reason', '')} {errs}"
    extra = f" (repack {run['between_ms']:.0f} ms incl.)" if run.get("between_ms", 0) > 0.5 else ""
    best = min(run["samples_ms"]["fwd_bwd"])
    best_fwd = min(run["samples_ms"]["fwd"])
    variant = run["info"].get("variant")
    variant_note = f" variant {variant}" if variant and run["info"].get("isa") == "avx512_bf16" else ""
    return (
        f"{head}  fwd {run['fwd_ms']:9.1f} (best {best_fwd:.1f}) ms  fwd+bwd {run['fwd_bwd_ms']:9.1f} "
        f"(best {best:.1f}) ms{extra}{variant_note}  "
        f"{run['tokens_per_s']:8.0f} tok/s  {run['tflops']:.3f} TFLOP/s ({run['pct_ceiling']:.0f}% ceil)  "
        f"{run['weight_gbps']:.1f} GB/s  RSS {run['peak_rss_gb']:.2f} GB  {errs}  [{run['steps']} steps, "
        f"load {run['load_average'][0]:.1f}, {run['cpu_per_wall']:.2f} CPU/s]"
    )


def mark_best(runs: list[dict[str, Any]]) -> None:
    """Flag the fastest verified run of the batched PyTorch formulations and of each kt configuration."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        run.pop("best", None)  # called again after every new run
        if run["status"] != "ok":
            continue
        if run["label"].split(" ")[0] in BATCHED_TORCH:
            groups.setdefault("torch-batched", []).append(run)
        elif run["kind"] == "kt":
            groups.setdefault(run["label"], []).append(run)
    for group in groups.values():
        if len(group) > 1:
            min(group, key=lambda r: r["fwd_bwd_ms"])["best"] = True


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    shapes = [parse_shape(s) for s in args.shape.split(",")]
    token_counts = [int(t) for t in args.tokens.split(",")]
    wanted = args.backends.split(",")
    unknown = set(wanted) - set(ALL_BACKENDS)
    if unknown:
        raise SystemExit(f"--backends: unknown {sorted(unknown)}; choose from {ALL_BACKENDS}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        write_outputs(json.loads(args.render.read_text()), args.out)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench_moe_") as tmp:
        h = Harness(args, Path(tmp))
        print(
            f"machine: {h.machine['cpu_model']}, {h.cpus} CPUs, ISA {' '.join(h.machine['isa'])}", flush=True
        )
        h.probe = h.child({"task": "probe", "kt_path": str(h.kt_path)}, "probe")
        for name in ("ours", "torch", "kt"):
            summary = {k: v for k, v in h.probe.get(name, {}).items() if k != "build"}
            print(f"{name}: {summary}", flush=True)
        started = time.time()
        h.ceilings = h.child({"task": "ceilings", "threads": args.threads or h.cpus}, "ceilings")
        for line in _bench_report.machine_lines(h.machine, h.ceilings):
            print(line, flush=True)

        results: dict[str, Any] = {
            "command": "python benchmarks/bench_moe.py " + shlex.join(argv),
            "machine": h.machine,
            "ceilings": h.ceilings,
            "probe": h.probe,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "kt_kernel_path": str(h.kt_path),
            "cases": [],
            "scaling": [],
        }
        bucket = results["scaling" if args.scaling else "cases"]
        for shape in shapes:
            for tokens in token_counts:
                p = Problem(shape, tokens, args.rank, args.alpha, args.seed)
                specs = scaling_specs(h) if args.scaling else h.backend_specs(wanted)
                # What has run so far is written after every backend: a run cut off at a time limit
                # (a device call) still leaves its finished rows.
                h.run_case(p, specs, bucket, lambda: write_outputs(results, args.out, quiet=True))
        results["wall_s"] = time.time() - started

    write_outputs(results, args.out)
    return 0


def write_outputs(results: dict[str, Any], out: Path, quiet: bool = False) -> None:
    for case in results["cases"] + results["scaling"]:
        if "floor" not in case and "reference" in case:
            p = Problem.from_dict(case["problem"])
            case["floor"] = _bench_report.streaming_floor(
                p, case["reference"]["active_experts"], results["ceilings"]
            )
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(_bench_report.markdown(results))
    _bench_report.plot(results, out / "bench_moe.png")
    written = ["results.json", "results.md", "bench_moe.png"]
    if results["scaling"]:
        _bench_report.plot_scaling(results, out / "scaling.png")
        written.append("scaling.png")
    if not quiet:
        print(f"\nwrote {', '.join(written)} in {out}")


def scaling_specs(h: Harness) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    tiers = h.tiers()
    if not tiers:
        return [
            (
                {},
                {
                    "kind": "ours",
                    "label": "ours",
                    "status": "unavailable",
                    "reason": h.probe.get("ours", {}).get("error", "no tier"),
                },
            )
        ]
    best = tiers[-1]
    counts = sorted({1 << n for n in range(h.cpus.bit_length()) if 1 << n <= h.cpus} | {h.cpus})
    return [
        (
            {"kind": "ours", "tier": best, "threads": n},
            {"kind": "ours", "label": f"ours {best}", "threads": n},
        )
        for n in counts
    ]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
