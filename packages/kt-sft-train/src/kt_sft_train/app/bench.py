"""`kt-sft bench` without a source checkout: a short timing of one CPU experts layer with LoRA.

Times forward + backward of a KTExperts layer (kernels) against the same layer in plain PyTorch
(reference backend, a per-expert loop) on random data, in the same run and with the same thread count,
and reports tokens/s, achieved TFLOP/s (FLOP count of DESIGN.md §7) and the speed-up over PyTorch. So that
the numbers cannot mislead, the output starts with the machine (CPU, vendor, family/model), the kernel
tier and variant chosen and why, the threads, and the load (load average and CPU time other processes
took while we measured). The default is short (the active tier, one shape, < 1 min on 2 cores); `--full`
sweeps every tier (and avx512_bf16 variant) this host runs at three token counts. A quick look, not the
benchmark suite (benchmarks/bench_moe.py).
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LayerShape:
    tokens: int
    experts: int
    top_k: int
    hidden: int
    intermediate: int
    rank: int

    def flops_per_step(self) -> float:
        """Forward + backward FLOPs of frozen-base LoRA experts (DESIGN.md §7)."""
        h, i, r = self.hidden, self.intermediate, self.rank
        lora = 2 * r * (h + 2 * i) + 2 * r * (i + h)
        per_pair = (6 * h * i + lora) + (6 * h * i + 2 * lora)
        return float(per_pair * self.tokens * self.top_k)


def _layer(shape: LayerShape, backend: str, threads: int | None, seed: int) -> tuple[Any, Any]:
    from ..config import KTConfig
    from ..experts import KTExperts
    from ..reference import ExpertLoRA

    generator = torch.Generator().manual_seed(seed)
    e, h, i, r = shape.experts, shape.hidden, shape.intermediate, shape.rank

    def random(*size: int, scale: float) -> torch.Tensor:
        return torch.randn(*size, generator=generator) * scale

    experts = KTExperts(
        num_experts=e,
        top_k=shape.top_k,
        hidden_size=h,
        intermediate_size=i,
        kt=KTConfig(backend=backend, threads=threads),
    )
    experts.load_expert_weights(random(e, 2 * i, h, scale=h**-0.5), random(e, h, i, scale=i**-0.5))
    lora = ExpertLoRA(
        random(e, r, h, scale=h**-0.5).requires_grad_(),
        random(e, 2 * i, r, scale=0.01).requires_grad_(),
        random(e, r, i, scale=i**-0.5).requires_grad_(),
        random(e, h, r, scale=0.01).requires_grad_(),
        1.0,
        1.0,
    )
    return experts, lora


def time_layer(shape: LayerShape, backend: str, *, repeat: int, threads: int | None, seed: int = 0) -> float:
    """Median seconds of one forward + backward of the experts layer."""
    experts, lora = _layer(shape, backend, threads, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape.tokens, shape.hidden, generator=generator).requires_grad_()
    scores = torch.randn(shape.tokens, shape.experts, generator=generator)
    weights, ids = torch.softmax(scores, dim=-1).topk(shape.top_k, dim=-1)
    weights = weights.requires_grad_()
    grad = torch.randn(shape.tokens, shape.hidden, generator=generator)
    times = []
    for _ in range(repeat + 1):  # the first call warms up caches and thread pools
        start = time.perf_counter()
        out = experts.run(x, ids, weights, lora)
        out.backward(grad)
        times.append(time.perf_counter() - start)
    steady = sorted(times[1:])
    return steady[len(steady) // 2]


# The reference backend: fp32 math in a per-expert loop with autograd, converting each expert's bf16
# weights per call. A plain-PyTorch baseline, not PyTorch's fastest (bf16 grouped GEMMs on oneDNN can be
# several times faster): bench_moe.py in a source checkout times those and kt-kernel too.
REFERENCE_LABEL = "PyTorch fp32 per-expert loop"


@dataclass(frozen=True)
class KernelConfig:
    tier: str
    variant: str | None  # the avx512_bf16 tier's kernel variant; None elsewhere

    @property
    def label(self) -> str:
        return f"kt-sft {self.tier}" + (f" ({self.variant})" if self.variant else "")


def kernel_configs(kk: Any, full: bool) -> list[KernelConfig]:
    """The active tier (and variant) only, or with `full` every tier this host runs, each variant."""
    if not full:
        tier = str(kk.active_isa())
        return [KernelConfig(tier, str(kk.kernel_variant()) if tier == "avx512_bf16" else None)]
    configs = []
    for tier in kk.isa_names():
        if not kk.isa_supported(tier):
            continue
        variants = list(kk.kernel_variant_names()) if tier == "avx512_bf16" else [None]
        configs += [KernelConfig(tier, v) for v in variants]
    return configs


def _busy_jiffies() -> int | None:
    """CPU time (all CPUs, USER_HZ ticks) spent busy since boot, from /proc/stat; None where unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime


class LoadMeter:
    """CPUs' worth of time that other processes used between start() and stop() (from /proc/stat minus
    our own CPU time): nonzero means the timings shared the machine."""

    def start(self) -> None:
        self._busy, self._own, self._wall = _busy_jiffies(), _own_cpu_seconds(), time.perf_counter()

    def stop(self) -> float | None:
        busy = _busy_jiffies()
        if busy is None or self._busy is None:
            return None
        wall = time.perf_counter() - self._wall
        others = (busy - self._busy) / os.sysconf("SC_CLK_TCK") - (_own_cpu_seconds() - self._own)
        return max(0.0, others / wall) if wall > 0 else None


def machine_lines(kk: Any, threads: int) -> list[str]:
    """Who measured: CPU, kernel tier and variant (and why), threads, load before the timings."""
    features = kk.cpu_features()
    model = kk.cpu_model()
    tier = kk.active_isa()
    ratio = kk.bf16dot_probe_ratio()
    probe = f", probe VDPBF16PS/FMA FLOP rate {ratio:.2f}" if ratio is not None else ""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    cpus = len(kk.affinity_cpus())
    lines = [
        f"machine: {features['brand'] or '(no brand string)'}; {features['vendor']} family "
        f"{model['family']:#x} model {model['model']:#x}; {cpus} CPUs in the affinity mask, "
        f"{kk.physical_cores()} physical cores",
        f"kernel tier: {tier} (best {kk.best_isa()}, cap {kk.isa_cap() or 'none'}); avx512_bf16 variant "
        f"{kk.kernel_variant()} (from {kk.kernel_variant_source()}: {kk.kernel_variant_reason()}{probe})",
        f"threads: {threads} for kt-sft and for PyTorch (default rule: {kk.default_thread_reason()})",
    ]
    if load is not None:
        busy = "" if load[0] < 0.5 else f" -- the machine is busy: {load[0]:.1f} runnable on {cpus} CPUs"
        lines.append(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min){busy}")
    return lines


def run(
    shape: LayerShape,
    *,
    repeat: int,
    threads: int,
    include_reference: bool,
    configs: list[KernelConfig],
    reference_repeat: int = 1,
) -> list[dict[str, Any]]:
    """Times each kernel config (`repeat` steps), then the PyTorch reference with the same thread count
    (`reference_repeat` steps: at the default shape one step of it costs ~10x one of ours), on one shape."""
    from .._kernels import load_kernels

    kk = load_kernels()
    rows: list[dict[str, Any]] = []

    def record(label: str, seconds: float, others: float | None) -> None:
        rows.append(
            {
                "backend": label,
                "seconds": seconds,
                "tokens_per_s": shape.tokens / seconds,
                "tflops": shape.flops_per_step() / seconds / 1e12,
                "other_cpus": others,
            }
        )

    meter = LoadMeter()
    for config in configs:
        kk.set_max_isa(config.tier)
        if config.variant:
            kk.set_kernel_variant(config.variant)
        try:
            meter.start()
            seconds = time_layer(shape, "kernels", repeat=repeat, threads=threads)
            record(config.label, seconds, meter.stop())
        finally:
            kk.set_max_isa(None)
            kk.set_kernel_variant(None)
    if include_reference:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            meter.start()
            seconds = time_layer(shape, "reference", repeat=reference_repeat, threads=threads)
            record(REFERENCE_LABEL, seconds, meter.stop())
        finally:
            torch.set_num_threads(before)
    return rows


def render(shape: LayerShape, rows: list[dict[str, Any]]) -> str:
    reference = next((r["seconds"] for r in rows if r["backend"] == REFERENCE_LABEL), None)
    lines = [
        f"one MoE experts layer, forward + backward with LoRA: T={shape.tokens} E={shape.experts} "
        f"top-{shape.top_k} H={shape.hidden} I={shape.intermediate} r={shape.rank} (median step)",
        f"{'backend':<28} {'ms/step':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'vs PyTorch':>10} "
        f"{'other CPUs':>10}",
    ]
    for row in rows:
        speedup = f"{reference / row['seconds']:.2f}x" if reference else "-"
        others = "?" if row["other_cpus"] is None else f"{row['other_cpus']:.2f}"
        lines.append(
            f"{row['backend']:<28} {row['seconds'] * 1e3:>9.2f} {row['tokens_per_s']:>10,.0f} "
            f"{row['tflops']:>8.3f} {speedup:>10} {others:>10}"
        )
    if reference:
        lines.append(
            f"'vs PyTorch' is against the {REFERENCE_LABEL} (the reference backend); faster PyTorch "
            "formulations and kt-kernel: benchmarks/bench_moe.py"
        )
    if any(r["other_cpus"] is not None and r["other_cpus"] > 0.25 for r in rows):
        lines.append(
            "note: other processes used CPU time during the timings ('other CPUs'): figures are noisy"
        )
    return "\n".join(lines)
