"""The model side of a run: the LoRA config its options ask for, dense LoRA dropout, and the lines that
describe the loaded model and the experts' kernel tier."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import KTConfig
from .options import OptionsError, TrainOptions, lora_target_list


def lora_config_for(model: nn.Module, options: TrainOptions) -> Any:
    from ..peft import kt_lora_config

    targets = lora_target_list(options.lora_targets)
    experts = "experts" in targets
    modules = [t for t in targets if t not in ("experts", "attention")]
    if "attention" in targets:
        from ..arch import get_moe_arch_config

        modules = list(get_moe_arch_config(model).dense_target_modules) + modules
    return kt_lora_config(
        model,
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        target_modules=modules or None,
        experts=experts,
    )


def apply_dense_lora_dropout(peft_model: nn.Module, probability: float) -> int:
    """Dropout on the input of every LoRA-wrapped nn.Linear (attention/dense targets); returns how many.

    PEFT's LoraConfig has one lora_dropout for all targets and rejects a nonzero one on parameter targets
    (the experts), so the config keeps 0 and the dense layers' dropout slots are filled here.
    """
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), nn.Linear):
            for adapter in module.lora_dropout:
                module.lora_dropout[adapter] = nn.Dropout(p=probability)
                count += 1
    if count == 0:
        raise OptionsError("--lora-dropout needs attention/dense LoRA targets (see --lora-targets)")
    return count


def describe_model(model: nn.Module) -> str:
    from ..arch import get_moe_arch_config

    arch = get_moe_arch_config(model)
    return (
        f"{arch.model_type}, {len(arch.layers)} MoE layers x {arch.num_experts} experts (top-{arch.top_k}), "
        f"hidden {arch.hidden_size}, expert intermediate {arch.intermediate_size}"
    )


def experts_memory_line(model: nn.Module, path: str, kt: KTConfig) -> str | None:
    """Estimated (from config.json) vs actual (the loaded kernel layers) host bytes of the frozen experts."""
    from ..memory import estimate_checkpoint, format_bytes, measure_experts

    measured = measure_experts(model)
    if measured is None:
        return None
    estimate = next(e for e in estimate_checkpoint(path, kt) if e.weight_dtype == kt.weight_dtype)
    group = f", group {estimate.group_size}" if estimate.group_size else ""
    return (
        f"memory    experts base {kt.weight_dtype}{group}: estimated {format_bytes(estimate.bytes)}, "
        f"actual {format_bytes(measured.base_bytes)} on the host after load ({measured.layers} layers)"
    )


def kernel_tier(kt: KTConfig) -> str:
    if kt.backend != "kernels":
        return f"{kt.backend} (PyTorch)"
    from .._kernels import load_kernels

    return f"kernels/{load_kernels().active_isa()}"
