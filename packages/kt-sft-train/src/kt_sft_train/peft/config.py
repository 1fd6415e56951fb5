"""kt_lora_config: a peft.LoraConfig with expert LoRA for the detected MoE family (DESIGN.md §4.4)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..arch import MOEArchConfig, get_moe_arch_config


def kt_lora_config(
    model_or_arch: nn.Module | MOEArchConfig | Any,
    *,
    r: int = 16,
    lora_alpha: float | None = None,
    alpha: float | None = None,
    target_modules: str | Iterable[str] | None = "attention",
    experts: bool = True,
    use_rslora: bool = False,
    lora_dropout: float = 0.0,
    **kwargs: Any,
) -> Any:
    """A peft.LoraConfig with expert LoRA (`target_parameters`) for the detected MoE family.

    target_modules: "attention" (the Linear layers of the decoder layers outside their MLP/MoE block,
        found by structure), an explicit list of module names, or None for expert LoRA only.
    experts: put LoRA on the routed experts' gate_up_proj and down_proj (run by the CPU kernels).
    lora_alpha (or its short name alpha): defaults to 2 * r.
    Other keyword arguments go to LoraConfig unchanged.
    """
    from peft import LoraConfig

    arch = model_or_arch if isinstance(model_or_arch, MOEArchConfig) else get_moe_arch_config(model_or_arch)
    if alpha is not None and lora_alpha is not None and alpha != lora_alpha:
        raise ValueError(f"kt_lora_config: alpha={alpha} and lora_alpha={lora_alpha} disagree; give one")
    lora_alpha = alpha if lora_alpha is None else lora_alpha
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"kt_lora_config: r must be a positive integer, got {r!r}")
    if experts and lora_dropout:
        raise ValueError(
            f"kt_lora_config: lora_dropout={lora_dropout} is not supported on the expert parameters: PEFT "
            "cannot apply dropout to the input of a targeted nn.Parameter (ParamWrapper rejects it). Use "
            "lora_dropout=0, or experts=False for attention-only LoRA"
        )
    for option in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if experts and kwargs.get(option):
            raise ValueError(
                f"kt_lora_config: {option}=True is not supported by PEFT on the expert parameters"
            )
    if target_modules == "attention":
        modules = list(arch.dense_target_modules)
    elif target_modules is None:
        modules = []
    elif isinstance(target_modules, str):
        raise ValueError(
            f"kt_lora_config: target_modules={target_modules!r}; use 'attention', None or a list of "
            "module names"
        )
    else:
        modules = list(target_modules)
    if not experts and not modules:
        raise ValueError("kt_lora_config: nothing to train (experts=False and no target_modules)")
    return LoraConfig(
        r=r,
        lora_alpha=2 * r if lora_alpha is None else lora_alpha,
        lora_dropout=lora_dropout,
        use_rslora=use_rslora,
        target_modules=modules,
        target_parameters=list(arch.lora_target_parameters) if experts else None,
        **kwargs,
    )
