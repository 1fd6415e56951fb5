"""PEFT-native expert LoRA (DESIGN.md §4.4).

Users write ordinary PEFT: `get_peft_model(model, LoraConfig(target_parameters=[".../gate_up_proj",
".../down_proj"], target_modules=[...attention...]))`. PEFT wraps each KTExperts in a chain of
`ParamWrapper`s (one per targeted parameter) whose forward would materialize W + ΔW for the whole
expert stack. kt-sft takes the wrappers over as PEFT attaches them (a module-registration hook that
only acts on ParamWrappers whose base is a KTExperts): the outermost wrapper's forward reads lora_A /
lora_B of the whole chain and hands them to the CPU experts in the kernel layout, and the wrappers'
`_apply` keeps the expert LoRA on the host. Everything else about PEFT is untouched, so
`save_pretrained` writes a standard PEFT adapter.

PEFT layout of a 3-D parameter with E experts and rank r (peft 0.21, ParamWrapper.get_delta_weight):
lora_A.weight [r*E, in] is expert-major (row e*r + i), lora_B.weight [out, r*E] is rank-major
(column i*E + e), and ΔW[e] = scaling * B_e @ A_e with B_e [out, r], A_e [r, in]. For gate_up_proj
[E, 2I, H]: in = H, out = 2I; for down_proj [E, H, I]: in = I, out = H.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .arch import MOEArchConfig, get_moe_arch_config
from .experts import KTExperts
from .reference import ExpertLoRA

_PEFT_LAYER_MODULE = "peft.tuners.lora.layer"
_hook_lock = threading.Lock()
_hook_handle: Any = None


# -- the LoraConfig helper ---------------------------------------------------------------------------------


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


# -- taking over PEFT's ParamWrappers around KTExperts -------------------------------------------------------


def ensure_peft_takeover() -> None:
    """Install (once per process) the hook that takes over ParamWrappers around KTExperts."""
    global _hook_handle
    with _hook_lock:
        if _hook_handle is None:
            _hook_handle = nn.modules.module.register_module_module_registration_hook(_on_module_registered)


def _on_module_registered(parent: nn.Module, name: str, submodule: nn.Module | None) -> None:
    # Runs for every submodule registration in the process: keep the common path to two lookups.
    peft_layer = sys.modules.get(_PEFT_LAYER_MODULE)
    if peft_layer is None or not isinstance(submodule, peft_layer.ParamWrapper):
        return None
    chain, experts = wrapper_chain(submodule)
    if experts is not None:
        _take_over_chain(chain)
    return None


def wrapper_chain(wrapper: nn.Module) -> tuple[list[nn.Module], KTExperts | None]:
    """The ParamWrappers from `wrapper` inwards, and the KTExperts at the bottom (None if another module)."""
    peft_layer = sys.modules.get(_PEFT_LAYER_MODULE)
    chain: list[nn.Module] = []
    module: Any = wrapper
    while peft_layer is not None and isinstance(module, peft_layer.ParamWrapper):
        chain.append(module)
        module = module.base_layer
    return chain, module if isinstance(module, KTExperts) and chain else None


def take_over_peft_wrappers(model: nn.Module) -> int:
    """Take over every ParamWrapper chain around a KTExperts in `model`; returns how many KTExperts."""
    seen: set[int] = set()
    for module in list(model.modules()):
        chain, experts = wrapper_chain(module)
        if experts is not None:
            _take_over_chain(chain)
            seen.add(id(experts))
    return len(seen)


def is_taken_over(wrapper: nn.Module) -> bool:
    return bool(wrapper.__dict__.get("_kt_taken_over", False))


def _take_over_chain(chain: list[nn.Module]) -> None:
    for wrapper in chain:
        if is_taken_over(wrapper):
            continue
        wrapper.__dict__["forward"] = types.MethodType(_wrapper_forward, wrapper)
        wrapper.__dict__["_apply"] = types.MethodType(_wrapper_apply, wrapper)
        wrapper.__dict__["merge"] = types.MethodType(_wrapper_merge, wrapper)
        wrapper.__dict__["_kt_taken_over"] = True


def _wrapper_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    **kwargs: Any,
) -> torch.Tensor:
    # Replaces ParamWrapper.forward: no parametrization, no W + ΔW; the LoRA goes to the CPU experts.
    if kwargs.get("adapter_names") is not None:
        raise ValueError("mixed adapter batches (adapter_names=...) are not supported on CPU experts")
    chain, experts = wrapper_chain(self)
    if experts is None:
        raise RuntimeError("kt-sft took over a PEFT wrapper whose base is no longer a KTExperts")
    return experts.run(hidden_states, top_k_index, top_k_weights, expert_lora(chain, experts))


def _wrapper_apply(self: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
    # Device/dtype moves of the model leave the expert LoRA (and its KTExperts) on the host, as is.
    return self


def _wrapper_merge(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise NotImplementedError(
        "merging the expert LoRA into the CPU kernel weights is not implemented yet; save the adapter "
        "(save_pretrained) and merge it on the plain transformers model with "
        "PeftModel.from_pretrained(...).merge_and_unload()"
    )


def expert_lora(chain: list[nn.Module], experts: KTExperts) -> ExpertLoRA | None:
    """The active expert LoRA of a wrapper chain in the kernel layout (differentiable views/copies)."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for wrapper in chain:
        if wrapper.disable_adapters:
            continue
        active = [name for name in wrapper.active_adapters if name in wrapper.lora_A]
        if not active:
            continue
        if len(active) > 1:
            raise NotImplementedError(
                f"{len(active)} active adapters ({active}) on the CPU experts: several simultaneously active "
                "expert adapters are not implemented yet; activate one with set_adapter"
            )
        parameter = wrapper.parameter_name
        if parameter in factors:
            raise ValueError(f"the expert parameter {parameter!r} is wrapped twice by PEFT")
        factors[parameter] = _kernel_factors(wrapper, active[0], experts)
    if not factors:
        return None
    unknown = set(factors) - {"gate_up_proj", "down_proj"}
    if unknown:
        raise ValueError(f"PEFT targets {sorted(unknown)} of a KTExperts; only gate_up_proj/down_proj exist")
    present = [t for a, b, _ in factors.values() for t in (a, b)]
    # The kernels take one LoRA dtype; mixed dtypes meet in the wider one (autograd casts grads back).
    if len({t.dtype for t in present}) > 1:
        common = torch.float64 if any(t.dtype == torch.float64 for t in present) else torch.float32
        factors = {k: (a.to(common), b.to(common), s) for k, (a, b, s) in factors.items()}
    a_gu, b_gu, scale_gu = factors.get("gate_up_proj", (None, None, 1.0))
    a_d, b_d, scale_d = factors.get("down_proj", (None, None, 1.0))
    return ExpertLoRA(a_gu, b_gu, a_d, b_d, float(scale_gu), float(scale_d))


def _kernel_factors(
    wrapper: Any, adapter: str, experts: KTExperts
) -> tuple[torch.Tensor, torch.Tensor, float]:
    weight_a = wrapper.lora_A[adapter].weight
    weight_b = wrapper.lora_B[adapter].weight
    rank = int(wrapper.r[adapter])
    num_experts = experts.num_experts
    hidden, intermediate = experts.hidden_dim, experts.intermediate_dim
    in_features, out_features = (
        (hidden, 2 * intermediate) if wrapper.parameter_name == "gate_up_proj" else (intermediate, hidden)
    )
    if tuple(weight_a.shape) != (rank * num_experts, in_features) or tuple(weight_b.shape) != (
        out_features,
        rank * num_experts,
    ):
        raise ValueError(
            f"PEFT LoRA of {wrapper.parameter_name} (adapter {adapter!r}) has lora_A {tuple(weight_a.shape)} "
            "and "
            f"lora_B {tuple(weight_b.shape)}; expected {(rank * num_experts, in_features)} and "
            f"{(out_features, rank * num_experts)}"
        )
    a = weight_a.reshape(num_experts, rank, in_features)
    b = weight_b.reshape(out_features, rank, num_experts).permute(2, 0, 1).contiguous()
    return a, b, float(wrapper.scaling[adapter])
