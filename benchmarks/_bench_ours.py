"""Our kernels (kt_sft_kernels) at one ISA tier, driven from NumPy (no torch in this process)."""

from __future__ import annotations

import time
from typing import Any

import _bench_inputs as inputs
import ml_dtypes
import numpy as np
from _bench_inputs import Problem

TIERS = ("portable", "avx2", "avx512", "avx512_bf16", "amx")


def _bf16(bits: np.ndarray) -> np.ndarray:
    return bits.view(ml_dtypes.bfloat16)


def _nan_bf16(shape: tuple[int, ...]) -> np.ndarray:
    """Outputs start as NaN, so anything a kernel leaves unwritten fails the error check."""
    return np.full(shape, np.nan, dtype=ml_dtypes.bfloat16)


def supported_tiers() -> list[str]:
    import kt_sft_kernels as kk

    return [tier for tier in TIERS if kk.isa_supported(tier)]


def variant_choice() -> str:
    """The avx512_bf16 tier's kernel variant this CPU gets, and why (ADR 0902)."""
    import kt_sft_kernels as kk

    if not hasattr(kk, "kernel_variant"):
        return "n/a (library without kernel variants)"
    return f"{kk.kernel_variant()} (from {kk.kernel_variant_source()}: {kk.kernel_variant_reason()})"


def library_version() -> str:
    import kt_sft_kernels as kk

    return str(getattr(kk, "__version__", "unknown"))


def build_info() -> dict:
    import kt_sft_kernels as kk

    return dict(kk.build_info()) if hasattr(kk, "build_info") else {}


class Ours:
    name = "ours"

    def __init__(
        self,
        p: Problem,
        threads: int | None,
        tier: str,
        weight_dtype: str = "bf16",
        group_size: int = 128,
        variant: str | None = None,
        numa_shards: int = 1,
    ) -> None:
        import kt_sft_kernels as kk

        self.kk = kk
        kk.set_max_isa(tier)
        self.active_isa = str(kk.active_isa())
        if self.active_isa != tier:
            raise RuntimeError(f"asked for ISA tier {tier!r} but the library chose {self.active_isa!r}")
        if variant:  # the avx512_bf16 tier's kernel variant (ADR 0902); None = the library's choice
            kk.set_kernel_variant(variant)
        self.variant = str(kk.kernel_variant())
        sh = p.shape
        self.p = p
        cfg = kk.MoEConfig(
            num_experts=sh.num_experts,
            top_k=sh.top_k,
            hidden=sh.hidden,
            intermediate=sh.intermediate,
            weight_dtype=weight_dtype,
            group_size=group_size,
            numa_shards=numa_shards,
        )
        pool = kk.ThreadPool(threads=threads) if threads else None
        self.layer = kk.MoELayer(cfg, pool=pool)

        gate_up, down = inputs.fused_weights(p)
        start = time.perf_counter()
        self.layer.load_weights(gate_up=_bf16(gate_up), down=_bf16(down))  # int8/int4: quantized here
        self.load_ms = 1e3 * (time.perf_counter() - start)
        del gate_up, down  # the layer packed its own copy
        self.memory = dict(self.layer.memory_report())
        # numa_shards > 1: each shard's slice, CPUs and bytes (shards pin their own sub-pools).
        self.shards: list[dict[str, Any]] = self.layer.shard_report() if numa_shards > 1 else []

        lora = inputs.lora_weights(p)
        self.lora = kk.LoRA(
            _bf16(lora.a_gu), _bf16(lora.b_gu), _bf16(lora.a_d), _bf16(lora.b_d), p.scale, p.scale
        )
        self.lora_grads_arrays = [_nan_bf16(a.shape) for a in (lora.a_gu, lora.b_gu, lora.a_d, lora.b_d)]
        self.lora_grads = kk.LoRAGrads(*self.lora_grads_arrays)

        self.x = _bf16(inputs.hidden_states(p))
        self.grad_out = _bf16(inputs.grad_output(p))
        self.ids, self.weights = inputs.routing(p)
        self.out = _nan_bf16(self.x.shape)
        self.grad_x = _nan_bf16(self.x.shape)
        self.grad_w = np.full(self.ids.shape, np.nan, dtype=np.float32)
        self.handle: Any = None

    def setup_costs(self) -> dict[str, float]:
        return {
            "load_weights_ms": self.load_ms,
            "packed_weight_gb": (self.memory["weights"] + self.memory["scales"]) / 1e9,
        }

    def prepare_step(self) -> None:
        """Nothing: our gradients are written, never accumulated."""

    def forward(self) -> None:
        self.handle = self.layer.forward(self.x, self.ids, self.weights, self.out, lora=self.lora, save=True)

    def between(self) -> None:
        """Nothing runs between forward and backward here."""

    def backward(self) -> None:
        self.layer.backward(
            self.handle, self.grad_out, self.grad_x, grad_weights=self.grad_w, lora_grads=self.lora_grads
        )
        self.handle = None

    def checked(self, tokens: np.ndarray, experts: np.ndarray) -> dict[str, np.ndarray]:
        da_gu, db_gu, da_d, db_d = (a.astype(np.float32) for a in self.lora_grads_arrays)
        return {
            "out": self.out[tokens].astype(np.float32),
            "dx": self.grad_x[tokens].astype(np.float32),
            "grad_w": self.grad_w[tokens],
            "da_gu": da_gu[experts],
            "db_gu": db_gu[experts],
            "da_d": da_d[experts],
            "db_d": db_d[experts],
        }
