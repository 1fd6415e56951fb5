"""PEFT-native expert LoRA (DESIGN.md §4.4).

Users write ordinary PEFT: `get_peft_model(model, LoraConfig(target_parameters=[".../gate_up_proj",
".../down_proj"], target_modules=[...attention...]))`. PEFT wraps each KTExperts in a chain of
`ParamWrapper`s (one per targeted parameter) whose forward would materialize W + ΔW for the whole
expert stack. kt-sft takes the wrappers over as PEFT attaches them (a module-registration hook that
only acts on ParamWrappers whose base is a KTExperts): the outermost wrapper's forward reads lora_A /
lora_B of the whole chain and hands them to the CPU experts in the kernel layout, and the wrappers'
`_apply` keeps the expert LoRA on the host. Everything else about PEFT is untouched, so
`save_pretrained` writes a standard PEFT adapter.

The layout of the 3-D LoRA factors is decoded in kt_sft_train.peft.layout (one place).
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any

import torch
from torch import nn

from ..experts import KTExperts, add_experts_created_hook
from ..reference import ExpertLoRA
from .layout import per_expert_factors

_PEFT_LAYER_MODULE = "peft.tuners.lora.layer"
_hook_lock = threading.Lock()
_hook_handle: Any = None


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
    # A host-owner proxy runs on its owner, which holds the expert LoRA.
    lora = expert_lora(chain, experts) if experts.owns_experts else None
    return experts.run(hidden_states, top_k_index, top_k_weights, lora)


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
    a, b = per_expert_factors(weight_a, weight_b, num_experts)
    return a, b.contiguous(), float(wrapper.scaling[adapter])


# Every KTExperts built from now on makes sure the takeover hook is in place (experts.py offers the hook
# and knows nothing of PEFT).
add_experts_created_hook(ensure_peft_takeover)
