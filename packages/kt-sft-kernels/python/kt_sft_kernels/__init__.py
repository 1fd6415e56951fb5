"""kt-sft-kernels: CPU MoE expert kernels with LoRA forward/backward. Never imports torch.

Arrays cross as DLPack / buffer-protocol arrays (NumPy, torch, ...), zero copy. bf16 arrays may be
torch.bfloat16 tensors, ml_dtypes.bfloat16 NumPy arrays, or uint16 NumPy arrays holding bf16 bits.
"""

from __future__ import annotations

import atexit
import os

from ._core import (
    ForwardHandle,
    LoRA,
    LoRAGrads,
    MoEConfig,
    MoELayer,
    Pending,
    ThreadPool,
    active_isa,
    affinity_cpus,
    auto_kernel_variant,
    best_isa,
    bf16dot_probe_ratio,
    build_info,
    cpu_feature_names,
    cpu_features,
    cpu_model,
    default_pool,
    default_thread_count,
    default_thread_reason,
    estimate_layer_bytes,
    format_cpu_list,
    isa_cap,
    isa_cap_source,
    isa_compiled,
    isa_names,
    isa_supported,
    kernel_variant,
    kernel_variant_names,
    kernel_variant_reason,
    kernel_variant_source,
    physical_cores,
    profiler,
    set_kernel_variant,
    set_max_isa,
    shard_layout,
    shards_run_in_turn,
    topology,
)
from ._lora_layout import separate_gate_up_lora, split_gate_up_lora_grads

__version__ = "0.1.0"

if build_info()["version"] != __version__:
    raise ImportError(
        f"kt_sft_kernels: the native module was built for version {build_info()['version']}, but the Python "
        f"package is {__version__}; reinstall the wheel"
    )

# KT_SFT_PROFILE=path: profile the whole run and write a Chrome trace there at exit.
_profile_path = os.environ.get("KT_SFT_PROFILE")
if _profile_path:
    profiler.enable()
    atexit.register(profiler.dump_chrome_trace, _profile_path)

__all__ = [
    "ForwardHandle",
    "LoRA",
    "LoRAGrads",
    "MoEConfig",
    "MoELayer",
    "Pending",
    "ThreadPool",
    "__version__",
    "active_isa",
    "affinity_cpus",
    "auto_kernel_variant",
    "best_isa",
    "bf16dot_probe_ratio",
    "build_info",
    "cpu_feature_names",
    "cpu_features",
    "cpu_model",
    "default_pool",
    "default_thread_count",
    "default_thread_reason",
    "estimate_layer_bytes",
    "format_cpu_list",
    "isa_cap",
    "isa_cap_source",
    "isa_compiled",
    "isa_names",
    "isa_supported",
    "kernel_variant",
    "kernel_variant_names",
    "kernel_variant_reason",
    "kernel_variant_source",
    "physical_cores",
    "profiler",
    "separate_gate_up_lora",
    "set_kernel_variant",
    "set_max_isa",
    "shard_layout",
    "shards_run_in_turn",
    "split_gate_up_lora_grads",
    "topology",
]
