"""`kt-sft bench` without a source checkout: a short timing of one CPU experts layer with LoRA.

Times forward + backward of a KTExperts layer (kernels) against the same layer in plain PyTorch
(reference backend, a per-expert loop) on random data, and reports tokens/s and achieved TFLOP/s with the
FLOP count of DESIGN.md §7. A quick look, not the benchmark suite (benchmarks/bench_moe.py).
"""

from __future__ import annotations

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


def run(
    shape: LayerShape, *, repeat: int, threads: int | None, include_reference: bool
) -> list[dict[str, Any]]:
    rows = []
    backends = ["kernels"] + (["reference"] if include_reference else [])
    for backend in backends:
        seconds = time_layer(shape, backend, repeat=repeat, threads=threads)
        rows.append(
            {
                "backend": backend,
                "seconds": seconds,
                "tokens_per_s": shape.tokens / seconds,
                "tflops": shape.flops_per_step() / seconds / 1e12,
            }
        )
    return rows


def render(shape: LayerShape, rows: list[dict[str, Any]], tier: str) -> str:
    lines = [
        f"one MoE experts layer, forward + backward with LoRA: T={shape.tokens} E={shape.experts} "
        f"top-{shape.top_k} H={shape.hidden} I={shape.intermediate} r={shape.rank}; kernel tier {tier}",
        f"{'backend':<22} {'ms/step':>9} {'tokens/s':>10} {'TFLOP/s':>8}",
    ]
    for row in rows:
        name = "kt-sft kernels" if row["backend"] == "kernels" else "PyTorch (reference)"
        lines.append(
            f"{name:<22} {row['seconds'] * 1e3:>9.2f} {row['tokens_per_s']:>10,.0f} {row['tflops']:>8.3f}"
        )
    return "\n".join(lines)
