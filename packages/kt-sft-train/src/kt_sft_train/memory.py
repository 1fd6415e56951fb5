"""Host memory of the routed experts: estimated from a checkpoint's config (no weight read) and measured on
a loaded model (the kernel layers' memory_report). Both count the frozen base: packed weights + scales.
The kernels' estimate is the one source of the per-layer numbers (kt_sft_kernels.estimate_layer_bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .config import WEIGHT_DTYPES, KTConfig
from .quantization import pack_quantized_scheme


def format_bytes(count: float) -> str:
    """Bytes for people: 1.50 GiB, 204.00 KiB."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


@dataclass(frozen=True)
class ExpertsEstimate:
    """Estimated host bytes of a model's routed-expert base in one weight dtype."""

    weight_dtype: str
    group_size: int | None  # int4 only
    moe_layers: int
    bytes: int
    loadable: bool  # False: the checkpoint ships int4, this dtype is refused (ADR 0602)


def estimate_experts(config: Any, kt: KTConfig | None = None) -> list[ExpertsEstimate]:
    """Host bytes of the experts of the model of ``config`` in bf16, int8 and int4 (``kt``: threads etc.).

    An int4 checkpoint (compressed-tensors) is estimated with its own group size; bf16/int8 are marked
    not loadable for it.
    """
    from ._kernels import estimate_layer_bytes
    from .arch import get_moe_arch_config
    from .quantization import effective_group_size

    kt = KTConfig() if kt is None else kt
    arch = get_moe_arch_config(config)
    scheme = pack_quantized_scheme(config)
    shape = (arch.num_experts, arch.top_k, arch.hidden_size, arch.intermediate_size)
    rows = []
    for weight_dtype in WEIGHT_DTYPES:
        group = None
        if weight_dtype == "int4":
            wanted = scheme.group_size if scheme is not None else kt.group_size
            group = effective_group_size(wanted, arch.hidden_size, arch.intermediate_size)
        layer_kt = kt.replace(weight_dtype=weight_dtype, group_size=group)
        per_layer = estimate_layer_bytes(layer_kt, *shape)
        loadable = scheme is None or weight_dtype == "int4"
        rows.append(
            ExpertsEstimate(weight_dtype, group, len(arch.layers), per_layer * len(arch.layers), loadable)
        )
    return rows


def estimate_checkpoint(path: str | Path, kt: KTConfig | None = None) -> list[ExpertsEstimate]:
    """estimate_experts for a local checkpoint directory (reads its config.json only)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return estimate_experts(config, kt)


@dataclass(frozen=True)
class ExpertsMeasured:
    """Host bytes the loaded kernel layers hold for their frozen base, and the shared workspace."""

    layers: int
    base_bytes: int  # packed weights + scales, all layers
    workspace_bytes: int  # the thread pools' per-call scratch (counted once per pool)


def measure_experts(model: nn.Module) -> ExpertsMeasured | None:
    """The kernel layers' memory_report summed over a loaded model (None for the reference backend)."""
    from .experts import KTExperts

    layers = [m.layer for m in model.modules() if isinstance(m, KTExperts) and m.backend == "kernels"]
    if not layers:
        return None
    reports = [layer.memory_report() for layer in layers]  # type: ignore[attr-defined]
    return ExpertsMeasured(
        layers=len(layers),
        base_bytes=sum(r["weights"] + r["scales"] for r in reports),
        # Layers of one run share one pool: its scratch is counted once (the largest report of it).
        workspace_bytes=max(r["workspace_shared"] for r in reports),
    )
