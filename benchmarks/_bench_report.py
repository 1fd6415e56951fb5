"""Derived metrics (DESIGN.md §7 conventions), the markdown table and the plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from _bench_inputs import Problem

# DESIGN.md §7 tolerances (relative Frobenius), bf16 base; int8 / int4 bases (against the dequantized
# weights of the kernel wheel's quantizer: bench_moe.py computes that reference for quantized runs).
TOLERANCES = {
    "bf16": {"out": 1e-2, "grad": 2e-2},
    "int8": {"out": 2e-2, "grad": 3e-2},
    "int4": {"out": 3e-2, "grad": 4e-2},
}
GRAD_KEYS = ("dx", "grad_w", "da_gu", "db_gu", "da_d", "db_d")


def lora_flops_per_pair(p: Problem) -> int:
    h, i, r = p.shape.hidden, p.shape.intermediate, p.rank
    return 2 * r * (h + 2 * i) + 2 * r * (i + h)


def flops(p: Problem) -> dict[str, float]:
    """§7: per routed pair, forward 6·H·I + LoRA, backward 6·H·I + 2·LoRA (no base-weight grads)."""
    pairs = p.tokens * p.shape.top_k
    base = 6 * p.shape.hidden * p.shape.intermediate
    lora = lora_flops_per_pair(p)
    return {"fwd": pairs * (base + lora), "bwd": pairs * (base + 2 * lora)}


def verdict(errors: dict[str, float], weight_type: str) -> tuple[bool, float, float]:
    tol = TOLERANCES[weight_type]
    err_out = errors["out"]
    err_grad = max(errors[k] for k in GRAD_KEYS)
    return err_out <= tol["out"] and err_grad <= tol["grad"], err_out, err_grad


def derive(p: Problem, median_ms: dict[str, float], active_experts: int, ceilings: dict) -> dict[str, float]:
    f = flops(p)
    fwd_s = median_ms["fwd"] / 1e3
    total_s = median_ms["fwd_bwd"] / 1e3
    weight_bytes = active_experts * p.expert_weight_bytes()
    tflops = (f["fwd"] + f["bwd"]) / total_s / 1e12
    gbps = 2 * weight_bytes / total_s / 1e9  # forward and backward each stream every active expert once
    ceiling = ceilings.get("matmul_ceiling_tflops", math.nan)
    bandwidth = ceilings.get("triad", {}).get("gbps", math.nan)
    return {
        "tokens_per_s": p.tokens / total_s,
        "tflops": tflops,
        "tflops_fwd": f["fwd"] / fwd_s / 1e12,
        "pct_ceiling": 100 * tflops / ceiling,
        "weight_gbps": gbps,
        "weight_gbps_fwd": weight_bytes / fwd_s / 1e9,
        "pct_bandwidth": 100 * gbps / bandwidth,
    }


def streaming_floor(p: Problem, active_experts: int, ceilings: dict) -> dict[str, float]:
    """The weight-streaming floor of one step: every active expert's bf16 weights read once in the
    forward and once in the backward, at the measured triad bandwidth."""
    gigabytes = active_experts * p.expert_weight_bytes() / 1e9
    bandwidth = ceilings.get("triad", {}).get("gbps", math.nan)
    return {"weight_gb": gigabytes, "floor_ms": 1e3 * 2 * gigabytes / bandwidth, "bandwidth_gbps": bandwidth}


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _sig(value: float) -> str:
    """Three significant digits (TFLOP/s on a 2-core machine are thousandths)."""
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"


def _one_time(run: dict) -> str:
    parts = []
    setup = run.get("one_time", {})
    if "load_weights_ms" in setup:
        parts.append(f"load_weights {setup['load_weights_ms']:,.0f} ms")
    if run.get("kind") == "kt" and run.get("between_ms", 0) > 0.5:
        parts.append(f"repack {run['between_ms']:,.0f} ms/step (in fwd+bwd)")
    return "; ".join(parts) or "–"


def machine_lines(machine: dict, ceilings: dict) -> list[str]:
    lines = [
        f"- CPU: {machine['cpu_model']} ({machine.get('cpu_family_model', '')}), {machine['cpus']} CPUs "
        f"({machine['physical_cores']} cores) usable, ISA: {', '.join(machine['isa']) or 'none listed'}, "
        f"{machine['mem_total_gb']} GB RAM{', virtual machine' if machine.get('hypervisor') else ''}",
        f"- Python {machine['python']}, NumPy {machine['numpy']}, torch {ceilings.get('torch', '?')} "
        f"(CPU capability {ceilings.get('torch_cpu_capability', '?')})",
    ]
    if "matmul_bf16" in ceilings:
        bf16, fp32, triad = ceilings["matmul_bf16"], ceilings["matmul_fp32"], ceilings["triad"]
        lines.append(
            f"- Measured ceilings ({bf16['threads']} threads): matmul bf16 {bf16['tflops']:.3f} TFLOP/s "
            f"(n={bf16['n']}), fp32 {fp32['tflops']:.3f} TFLOP/s (n={fp32['n']}) → ceiling used "
            f"{ceilings['matmul_ceiling_tflops']:.3f} TFLOP/s ({ceilings['matmul_ceiling_dtype']}); "
            f"memory triad {triad['gbps']:.1f} GB/s"
        )
    return lines


TABLE_HEADER = (
    "| backend | threads | fwd ms | fwd+bwd ms (median / best) | tokens/s | TFLOP/s | % ceiling "
    "| weight GB/s | % BW | one-time / per-step extras | peak RSS GB | steps; machine load "
    "| err out | err grads |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _steps(run: dict) -> str:
    text = str(run.get("steps", ""))
    if run.get("warmup_counted"):
        text += " (warm-up only)"
    if "load_average" in run:
        text += f"; load {run['load_average'][0]:.1f}, {run['cpu_per_wall']:.2f} CPU/s"
    return text


def table_row(run: dict) -> str:
    has_errors = "errors" in run
    err_out = f"{run['err_out']:.1e}" if has_errors else "–"
    err_grad = f"{run['err_grad']:.1e}" if has_errors else "–"
    name = run["label"] + (" **(best)**" if run.get("best") else "")
    threads = _fmt(run.get("threads"))
    if run["status"] != "ok":
        status = f"**{run['status']}** {run.get('reason', '')}"
        return f"| {name} | {threads} | {status} |||||||||| {err_out} | {err_grad} |"
    return (
        f"| {name} | {threads} | {_fmt(run['fwd_ms'])} | {_fmt(run['fwd_bwd_ms'])} / "
        f"{_fmt(min(run['samples_ms']['fwd_bwd']))} "
        f"| {_sig(run['tokens_per_s'])} | {_sig(run['tflops'])} | {_fmt(run['pct_ceiling'])} "
        f"| {_fmt(run['weight_gbps'])} | {_fmt(run['pct_bandwidth'])} | {_one_time(run)} "
        f"| {_fmt(run['peak_rss_gb'], 2)} | {_steps(run)} | {err_out} | {err_grad} |"
    )


def markdown(results: dict) -> str:
    lines = ["# MoE layer benchmark (bench_moe.py)", ""]
    lines += machine_lines(results["machine"], results["ceilings"])
    s = results["settings"]
    lines += [
        f"- Settings: LoRA r={s['rank']} alpha={s['alpha']} on gate_up and down, uniform random top-k "
        f"routing, seed {s['seed']}, {s['warmup']} warm-up + up to {s['repeats']} timed steps (median), "
        f"budget {s['max_seconds']} s per backend",
        f"- Command: `{results['command']}`",
        "",
        "fwd = forward that saves for backward; fwd+bwd = forward + backward (+ kt's per-step repack when "
        "it has one); median of the timed steps (metrics use it), and the best step. TFLOP/s by the "
        "DESIGN.md §7 convention; % ceiling = of the measured matmul ceiling; "
        "weight GB/s = active experts' bf16 weights streamed once per pass (2 passes); % BW = of the "
        "measured triad. Errors: relative Frobenius vs the float64 reference (out; max over dx, grad_w "
        "and the four LoRA grads). FAILED = error above DESIGN.md §7, so no time is reported. Machine load: "
        "the 1-minute load average when the backend started timing, and the CPU-seconds per wall-second "
        "its process got (ideal: its thread count) — other work on the machine shows there.",
        "",
    ]
    for case in results["cases"]:
        lines += [f"## {case['title']}", ""]
        ref = case.get("reference", {})
        if ref:
            lines.append(
                f"Checked against {ref.get('reference')}: {ref.get('checked_tokens')} token rows, LoRA "
                f"grads of {ref.get('checked_experts')} experts; {ref.get('active_experts')} active experts."
            )
            floor = case.get("floor", {})
            if floor:
                lines[-1] += (
                    f" Weight-streaming floor of a step: {floor['floor_ms']:,.1f} ms (2 passes over "
                    f"{floor['weight_gb']:.2f} GB at {floor['bandwidth_gbps']:.1f} GB/s)."
                )
            lines.append("")
        lines.append(TABLE_HEADER)
        lines += [table_row(run) for run in case["runs"]]
        lines.append("")
    if results.get("scaling"):
        lines += [
            "## Thread scaling (fwd+bwd)",
            "",
            "| case | threads | fwd+bwd ms | tokens/s | speed-up |",
            "|---|---|---|---|---|",
        ]
        for case in results["scaling"]:
            ok = [r for r in case["runs"] if r["status"] == "ok"]
            base = ok[0]["fwd_bwd_ms"] if ok else math.nan
            for run in case["runs"]:
                if run["status"] == "ok":
                    lines.append(
                        f"| {case['title']} {run['label']} | {run['threads']} | {run['fwd_bwd_ms']:,.1f} | "
                        f"{run['tokens_per_s']:,.0f} | {base / run['fwd_bwd_ms']:.2f}× |"
                    )
                else:
                    lines.append(
                        f"| {case['title']} {run['label']} | {run['threads']} | **{run['status']}** |||"
                    )
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in results["cases"] if any(r["status"] == "ok" for r in c["runs"])]
    if not cases:
        return
    fig, axes = plt.subplots(
        len(cases),
        1,
        figsize=(9, 1.2 + 0.45 * max(len(c["runs"]) for c in cases) * len(cases)),
        squeeze=False,
    )
    for ax, case in zip(axes[:, 0], cases, strict=True):
        runs = [r for r in case["runs"] if r["status"] == "ok"]
        labels = [f"{r['label']} ({r['threads']} thr)" for r in runs]
        values = [r["fwd_bwd_ms"] for r in runs]
        bars = ax.barh(
            labels,
            values,
            color=[
                "tab:green" if r["kind"] == "ours" else "tab:orange" if r["kind"] == "kt" else "tab:blue"
                for r in runs
            ],
        )
        for bar, run in zip(bars, runs, strict=True):
            ax.text(
                bar.get_width(),
                bar.get_y() + bar.get_height() / 2,
                f" {run['fwd_bwd_ms']:,.0f} ms, {run['tflops']:.3g} TFLOP/s",
                va="center",
                fontsize=8,
            )
        floor_ms = case.get("floor", {}).get("floor_ms")
        if floor_ms and math.isfinite(floor_ms):
            ax.axvline(floor_ms, color="gray", linestyle="--", linewidth=1)
            values_with_floor = [*values, floor_ms]
        else:
            values_with_floor = values
        if max(values_with_floor) / min(values_with_floor) > 30:
            ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(case["title"], fontsize=10)
        ax.set_xlabel("fwd+bwd ms (median, lower is better); dashed: weight-streaming floor")
        ax.set_xlim(right=max(values) * (8 if ax.get_xscale() == "log" else 1.6))
    fig.suptitle(
        f"MoE layer fwd+bwd, LoRA r={results['settings']['rank']} — {results['machine']['cpu_model']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scaling(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for case in results.get("scaling", []):
        ok = [r for r in case["runs"] if r["status"] == "ok"]
        if not ok:
            continue
        threads = [r["threads"] for r in ok]
        rate = [r["tokens_per_s"] for r in ok]
        ax.plot(threads, rate, "o-", label=f"{case['title']} {ok[0]['label']}")
        ax.plot(threads, [rate[0] * t / threads[0] for t in threads], ":", color="gray")
    ax.set_xlabel("threads")
    ax.set_ylabel("tokens/s (fwd+bwd)")
    ax.set_title("Thread scaling (dotted: linear)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
