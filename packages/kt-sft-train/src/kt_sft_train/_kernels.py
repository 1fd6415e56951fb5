"""The only module that imports the kernel wheel (`kt_sft_kernels`); everything else goes through here.

`KernelLayer` adapts one `kt_sft_kernels.MoELayer` to the interface `reference.ReferenceLayer` also
implements: CPU tensors in, caller-visible CPU tensors out, a handle from a saving forward consumed by the
backward. torch tensors cross into the kernels zero-copy (DLPack).
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from .config import KTConfig
from .quantization import effective_group_size, kernel_weights, storage_layout
from .reference import ExpertGrads, ExpertLoRA

KERNELS_MODULE = "kt_sft_kernels"
# The kernel wheel versions this training wheel was built against (major.minor).
COMPATIBLE_KERNEL_SERIES = ("0.1",)

_lock = threading.Lock()
_module: ModuleType | None = None
_pools: dict[int, Any] = {}


def kernels_available() -> bool:
    """True when kt_sft_kernels imports and is a compatible version."""
    try:
        load_kernels()
    except ImportError:
        return False
    return True


def load_kernels() -> ModuleType:
    """Import kt_sft_kernels once and check its version; ImportError says what to do otherwise."""
    global _module
    with _lock:
        if _module is not None:
            return _module
        try:
            module = importlib.import_module(KERNELS_MODULE)
        except ImportError as error:
            raise ImportError(
                f"the CPU expert kernels ({KERNELS_MODULE}) cannot be imported ({error}); install the "
                "kt-sft-kernels wheel, or use KTConfig(backend='reference') for the slow PyTorch experts"
            ) from error
        version = str(getattr(module, "__version__", "unknown"))
        if ".".join(version.split(".")[:2]) not in COMPATIBLE_KERNEL_SERIES:
            raise ImportError(
                f"{KERNELS_MODULE} {version} is not compatible with this kt-sft-train (needs "
                f"{' or '.join(s + '.x' for s in COMPATIBLE_KERNEL_SERIES)})"
            )
        _module = module
        return module


def kernels_version() -> str:
    return str(load_kernels().__version__)


def apply_config(kt: KTConfig) -> None:
    """Apply the process-wide kernel settings of a config (called when an experts layer is built)."""
    kk = load_kernels()
    if kt.max_isa is not None:
        kk.set_max_isa(kt.max_isa)


def thread_pool(threads: int | None) -> Any:
    """The pool for `threads` workers (one per distinct count), or None for the kernel's default pool."""
    if threads is None:
        return None
    kk = load_kernels()
    with _lock:
        if threads not in _pools:
            _pools[threads] = kk.ThreadPool(threads=threads)
        return _pools[threads]


def kernel_config(kt: KTConfig, num_experts: int, top_k: int, hidden: int, intermediate: int) -> Any:
    """The kernels' MoEConfig of one layer (int4: KTConfig.group_size, or the largest that divides)."""
    kk = load_kernels()
    int4 = kt.weight_dtype == "int4"
    group = effective_group_size(kt.group_size, hidden, intermediate) if int4 else 128
    return kk.MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        hidden=hidden,
        intermediate=intermediate,
        weight_dtype=kt.weight_dtype,
        group_size=group,
        numa_shards=numa_shard_count(kk, kt.numa_shards, intermediate, group if int4 else 32),
    )


def estimate_layer_bytes(kt: KTConfig, num_experts: int, top_k: int, hidden: int, intermediate: int) -> int:
    """Host bytes of one loaded layer's base (weights + scales), from the kernels' own estimate."""
    config = kernel_config(kt, num_experts, top_k, hidden, intermediate)
    return int(load_kernels().estimate_layer_bytes(config)["total"])


def numa_shard_count(kk: ModuleType, numa_shards: int | str, intermediate: int, block: int = 32) -> int:
    """KTConfig.numa_shards as a count: "auto" = the kernel's shard layout (one shard per NUMA node,
    KT_SFT_NUMA overrides), at most what I allows (each shard takes a multiple of `block` rows: 32,
    or an int4 base's group size, ADR 0701 "Quantized bases")."""
    if numa_shards == "auto":
        return max(1, min(len(kk.shard_layout()), intermediate // max(block, 32)))
    return int(numa_shards)


_HOST_DTYPES = {torch.bfloat16: torch.bfloat16, torch.float32: torch.float32, torch.float16: torch.float32}


@dataclass
class KernelHandle:
    """A kernel forward handle plus what the backward needs to allocate its outputs."""

    layer: KernelLayer
    saved: Any
    x_shape: tuple[int, ...]
    x_dtype: torch.dtype
    weights_dtype: torch.dtype
    lora: ExpertLoRA | None


class KernelLayer:
    """One MoE layer's routed experts in kt_sft_kernels (same interface as reference.ReferenceLayer)."""

    backend = "kernels"

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int, kt: KTConfig) -> None:
        kk = load_kernels()
        apply_config(kt)
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden = hidden
        self.intermediate = intermediate
        self.weight_dtype = kt.weight_dtype
        self.config = kernel_config(kt, num_experts, top_k, hidden, intermediate)
        self._kk = kk
        self._layer = kk.MoELayer(self.config, pool=thread_pool(kt.threads))

    def __deepcopy__(self, memo: dict[int, Any]) -> KernelLayer:
        # The packed weights are frozen: a deep-copied model (e.g. a reference model) shares them.
        return self

    def __reduce__(self) -> Any:
        raise TypeError(
            "a KTExperts kernel layer cannot be pickled (its weights live in the kernels); save the PEFT "
            "adapter and reload the model with load_kt_model"
        )

    def host_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Dtype in which activations of `dtype` are handed to the kernels."""
        if dtype not in _HOST_DTYPES:
            raise TypeError(
                f"the CPU expert kernels take bfloat16 or float32 activations, got {dtype}; use "
                "KTConfig(backend='reference') for other dtypes"
            )
        return _HOST_DTYPES[dtype]

    def load_weights(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        # The kernels pack their own copy; staging copies die when this returns. A quantized base takes
        # bf16 or fp32 as given (fp32 from an fp8 checkpoint: quantized with no bf16 rounding first).
        keep = (torch.bfloat16,) if self.weight_dtype == "bf16" else (torch.bfloat16, torch.float32)
        staged = [
            t.detach().to("cpu", t.dtype if t.dtype in keep else keep[-1]).contiguous()
            for t in (gate_up, down)
        ]
        self._layer.load_weights(gate_up=staged[0], down=staged[1])

    def load_quantized(
        self,
        gate_up_q: torch.Tensor,
        gate_up_scale: torch.Tensor,
        down_q: torch.Tensor,
        down_scale: torch.Tensor,
    ) -> None:
        """A pre-quantized base in the kernels' storage (see quantization.py), loaded bit-exactly."""
        if self.weight_dtype == "bf16":
            raise ValueError("load_quantized needs an int8/int4 layer (KTConfig.weight_dtype)")
        # Shapes and dtypes are validated by the kernel layer (its errors name the argument).
        self._layer.load_quantized(
            *(t.detach().to("cpu").contiguous() for t in (gate_up_q, gate_up_scale, down_q, down_scale))
        )

    def quantized_storage(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate_up_q, gate_up_scale, down_q, down_scale): a copy of the int8/int4 base in the storage
        load_quantized takes (kt_sft_train.quantization), so the two round-trip bit-exactly."""
        if self.weight_dtype == "bf16":
            raise ValueError("quantized_storage needs an int8/int4 layer; a bf16 base is its checkpoint")
        group = self.config.group_size if self.weight_dtype == "int4" else None
        layout = storage_layout(self.weight_dtype, self.num_experts, self.hidden, self.intermediate, group)
        arrays = [torch.empty(shape, dtype=dtype) for shape, dtype in layout]
        self._layer.read_quantized(*arrays)
        return arrays[0], arrays[1], arrays[2], arrays[3]

    def dequantized_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) as the kernels compute with them (RQ): int8 fp32(q * scale) as float32,
        int4 bf16(fp32(q * scale)) as bfloat16."""
        if self.weight_dtype == "bf16":
            raise ValueError("dequantized_weights needs an int8/int4 layer; a bf16 base is its checkpoint")
        gate_up_q, gate_up_scale, down_q, down_scale = self.quantized_storage()
        return (
            kernel_weights(gate_up_q, gate_up_scale, self.weight_dtype),
            kernel_weights(down_q, down_scale, self.weight_dtype),
        )

    def memory_report(self) -> dict[str, int]:
        """Host bytes of this layer (the kernels' memory_report: weights, scales, cache_spare, total, ...)."""
        return dict(self._layer.memory_report())

    def forward(
        self,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        lora: ExpertLoRA | None,
        save: bool,
    ) -> tuple[torch.Tensor, KernelHandle | None]:
        # Outputs are pinned when the inputs came through pinned staging, so the copy back is async.
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_pinned())
        kernel_lora = self._kernel_lora(lora)
        saved = self._layer.forward(x, ids, weights, out, lora=kernel_lora, save=save)
        if not save:
            return out, None
        handle = KernelHandle(
            self, saved, tuple(x.shape), x.dtype, weights.dtype, lora if kernel_lora is not None else None
        )
        return out, handle

    def backward(self, handle: KernelHandle, grad_out: torch.Tensor) -> ExpertGrads:
        if not isinstance(handle, KernelHandle):
            raise TypeError(
                f"handle must come from KernelLayer.forward(save=True), got {type(handle).__name__}"
            )
        if handle.layer is not self:
            raise ValueError("handle belongs to another layer")
        pinned = grad_out.is_pinned()
        grad_x = torch.empty(handle.x_shape, dtype=handle.x_dtype, pin_memory=pinned)
        grad_weights = torch.empty(
            (handle.x_shape[0], self.top_k), dtype=handle.weights_dtype, pin_memory=pinned
        )
        lora_grads = tuple(
            None if t is None else torch.empty_like(t) for t in (handle.lora or ExpertLoRA()).tensors()
        )
        kernel_grads = self._kk.LoRAGrads(*lora_grads) if handle.lora is not None else None
        self._layer.backward(handle.saved, grad_out, grad_x, grad_weights, lora_grads=kernel_grads)
        handle.saved = None
        return ExpertGrads(grad_x=grad_x, grad_weights=grad_weights, lora=lora_grads)

    def _kernel_lora(self, lora: ExpertLoRA | None) -> Any:
        if lora is None or all(t is None for t in lora.tensors()):
            return None
        # Shapes and dtypes of the LoRA factors are validated by the kernel layer (one validator; its
        # errors name the factor, e.g. "a_gu: expected dtype bfloat16 ... or float32, got float64").
        return self._kk.LoRA(*lora.tensors(), lora.scale_gu, lora.scale_d)
