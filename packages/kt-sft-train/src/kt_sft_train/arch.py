"""MoE architecture detection: where a model keeps its routed experts and whether the kernels can run them.

Detection is structural. transformers >= 5 builds the routed experts of ~70 MoE families with
`@use_experts_implementation`, which gives every such module the same call convention
(`experts(hidden, top_k_index, top_k_weights)`), 3-D parameters and four layout flags set on the
instance (`has_gate`, `has_bias`, `is_transposed`, `is_concatenated`). We look for exactly that, and
check the gate numerically (`_apply_gate` must be SiLU(gate) * up), so a new family with the common
layout works without an entry here and a family with an exotic one gets one error naming what differs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")

# Families whose wrapped model is checked against plain transformers + PEFT in this package's tests.
TESTED_FAMILIES = frozenset({"qwen3_moe", "qwen2_moe", "deepseek_v3", "mixtral", "glm4_moe", "olmoe"})


class UnsupportedModelError(ValueError):
    """The model has no routed experts the kernels can run."""


@dataclass(frozen=True)
class MoELayerInfo:
    """One routed-experts module: its path in the (un-wrapped) model and its decoder layer index."""

    experts_path: str
    layer_index: int | None


@dataclass(frozen=True)
class MOEArchConfig:
    """What kt-sft needs to know about a model's routed experts (same for every MoE layer)."""

    model_type: str
    experts_class: str
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: torch.dtype
    layers: tuple[MoELayerInfo, ...]
    experts_suffix: str
    dense_target_modules: tuple[str, ...]  # full paths of the attention blocks' Linears ("attention")

    @property
    def tested(self) -> bool:
        return self.model_type in TESTED_FAMILIES

    @property
    def lora_target_parameters(self) -> tuple[str, str]:
        """PEFT `target_parameters` entries for the expert LoRA of this family."""
        return (f"{self.experts_suffix}.gate_up_proj", f"{self.experts_suffix}.down_proj")

    @property
    def experts_paths(self) -> tuple[str, ...]:
        return tuple(layer.experts_path for layer in self.layers)


def is_experts_module(module: nn.Module) -> bool:
    """True for a routed-experts module built with transformers' `@use_experts_implementation`."""
    if not all(isinstance(getattr(module, flag, None), bool) for flag in LAYOUT_FLAGS):
        return False
    down = getattr(module, "down_proj", None)
    return isinstance(down, torch.Tensor) and down.dim() == 3


def get_moe_arch_config(model_or_config: Any) -> MOEArchConfig:
    """Detect the routed experts of a model (any device, meta included) or of a transformers config.

    Raises UnsupportedModelError, with every unsupported feature named, when the kernels cannot run them.
    """
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
    elif hasattr(model_or_config, "to_dict") and hasattr(model_or_config, "model_type"):
        model = _meta_model(model_or_config)
    else:
        raise TypeError(
            "get_moe_arch_config expects a torch.nn.Module or a transformers PretrainedConfig, "
            f"got {type(model_or_config).__name__}"
        )
    found = _find_experts(model)
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", type(model).__name__))
    if not found:
        raise UnsupportedModelError(
            f"no routed-experts module found in {type(model).__name__} (model_type={model_type!r}): kt-sft "
            "runs transformers>=5 MoE families whose experts are built with @use_experts_implementation "
            "(3-D gate_up_proj/down_proj parameters)"
        )
    first_path, first = found[0]
    problems = layout_problems(first)
    if problems:
        raise UnsupportedModelError(
            f"kt-sft cannot run the routed experts of {model_type!r} ({type(first).__name__} at "
            f"{first_path}): " + "; ".join(problems)
        )
    num_experts, two_i, hidden = first.gate_up_proj.shape
    intermediate = two_i // 2
    for path, module in found[1:]:
        if tuple(module.gate_up_proj.shape) != (num_experts, two_i, hidden) or layout_problems(module):
            raise NotImplementedError(
                f"{model_type!r}: experts modules of different shapes or layouts in one model ({first_path} "
                f"vs {path}) are not implemented yet"
            )
    text_config = _text_config(config)
    layers = tuple(MoELayerInfo(path, _layer_index(path)) for path, _ in found)
    if model_type not in TESTED_FAMILIES:
        logger.warning(
            "kt-sft: %r is detected by structure but not covered by kt-sft's equivalence tests", model_type
        )
    return MOEArchConfig(
        model_type=model_type,
        experts_class=type(first).__name__,
        num_experts=int(num_experts),
        top_k=_top_k(text_config, model, first_path),
        hidden_size=int(hidden),
        intermediate_size=int(intermediate),
        hidden_act=str(getattr(text_config, "hidden_act", type(getattr(first, "act_fn", None)).__name__)),
        dtype=first.gate_up_proj.dtype,
        layers=layers,
        experts_suffix=_experts_suffix(first_path),
        dense_target_modules=_dense_linear_names(model, found),
    )


# -- detection internals ----------------------------------------------------------------------------------


def _meta_model(config: Any) -> nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    errors = []
    with torch.device("meta"):
        for auto in (AutoModelForCausalLM, AutoModel):
            try:
                return auto.from_config(config, dtype=getattr(config, "dtype", None))
            except (ValueError, KeyError) as error:
                errors.append(f"{auto.__name__}: {error}")
    raise UnsupportedModelError(
        f"cannot build a {getattr(config, 'model_type', '?')!r} model from its config: " + " | ".join(errors)
    )


def _unwrapped_path(path: str) -> str:
    # PEFT nests wrappers as `<name>.base_layer.base_layer...`; the model-level path has no base_layer.
    return re.sub(r"(\.base_layer)+$", "", path).replace(".base_layer.", ".")


def _find_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if is_experts_module(module):
            found.setdefault(_unwrapped_path(path), module)
    return list(found.items())


def layout_problems(module: nn.Module) -> list[str]:
    """Every feature of an experts module's layout that the kernels cannot run (empty: supported)."""
    problems = []
    if module.has_bias:
        problems.append("biases on the expert projections (has_bias=True)")
    if not module.has_gate:
        problems.append("experts without a gate projection (has_gate=False, up_proj only)")
    if module.is_transposed:
        problems.append("transposed expert weights (is_transposed=True, [E, H, 2I] layout)")
    if not module.is_concatenated:
        problems.append("interleaved gate/up rows (is_concatenated=False)")
    gate_up = getattr(module, "gate_up_proj", None)
    down = module.down_proj
    if not isinstance(gate_up, torch.Tensor) or gate_up.dim() != 3:
        problems.append("no 3-D gate_up_proj parameter")
    elif not problems:
        num_experts, two_i, hidden = gate_up.shape
        if two_i % 2 or tuple(down.shape) != (num_experts, hidden, two_i // 2):
            problems.append(
                f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not "
                "[E, 2I, H] and [E, H, I]"
            )
    if isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3:
        # Checked with the other problems, so the error names every reason at once (gpt_oss: layout and gate).
        two_i = int(gate_up.shape[2] if module.is_transposed else gate_up.shape[1])
        problems.extend(_gate_problems(module, two_i // 2))
    return problems


def _gate_problems(module: nn.Module, intermediate: int) -> list[str]:
    # The kernels compute silu(gate) * up; check what the module would compute on values large enough
    # to expose clamps and scaled sigmoids.
    width = min(intermediate, 64)
    gate = torch.linspace(-30.0, 30.0, 7 * width, dtype=torch.float64).view(7, width)
    up = torch.linspace(25.0, -25.0, 7 * width, dtype=torch.float64).view(7, width)
    expected = nn.functional.silu(gate) * up
    act_fn = getattr(module, "act_fn", None)
    if act_fn is not None:
        try:
            activation_ok = torch.allclose(act_fn(gate), nn.functional.silu(gate), rtol=1e-9, atol=1e-12)
        except Exception as error:  # an activation that cannot run on a CPU float64 probe
            return [f"activation {type(act_fn).__name__} could not be checked ({error})"]
        if not activation_ok:
            act = getattr(_text_config(getattr(module, "config", None)), "hidden_act", type(act_fn).__name__)
            return [f"activation {act!r} (the kernels implement SiLU only)"]
    apply_gate = getattr(module, "_apply_gate", None)
    if apply_gate is None:
        return ["no _apply_gate method (not a transformers>=5 experts module)"]
    # The probe is [gate | up] (or gate/up interleaved) over a narrow intermediate size, which is what
    # _apply_gate splits.
    if module.is_concatenated:
        probe = torch.cat([gate, up], dim=-1)
    else:
        probe = torch.stack([gate, up], dim=-1).flatten(-2)
    try:
        result = apply_gate(probe)
    except Exception as error:
        return [f"custom gating function {type(module).__name__}._apply_gate could not be checked ({error})"]
    if result.shape != expected.shape or not torch.allclose(result, expected, rtol=1e-9, atol=1e-9):
        return [f"custom gating function {type(module).__name__}._apply_gate (not silu(gate) * up)"]
    return []


def experts_top_k(module: nn.Module) -> int:
    """Router top-k of an experts module, from the config transformers stores on it."""
    top_k = _single_top_k(getattr(_text_config(getattr(module, "config", None)), "num_experts_per_tok", None))
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UnsupportedModelError(
            f"cannot find the router top-k (num_experts_per_tok) of {type(module).__name__}"
        )
    return top_k


def _text_config(config: Any) -> Any:
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _single_top_k(top_k: Any) -> Any:
    """One top-k for all layers: a per-layer list (hunyuan_v1_moe's moe_topk) must hold one value."""
    if isinstance(top_k, (list, tuple)):
        values = sorted(set(top_k))
        if len(values) > 1:
            raise UnsupportedModelError(
                f"per-layer router top-k (num_experts_per_tok / moe_topk = {list(top_k)}) is not implemented "
                "yet: kt-sft runs one top-k for all MoE layers"
            )
        return values[0] if values else None
    return top_k


def _top_k(text_config: Any, model: nn.Module, experts_path: str) -> int:
    top_k = _single_top_k(getattr(text_config, "num_experts_per_tok", None))
    if isinstance(top_k, int) and top_k > 0:
        return top_k
    parent = model.get_submodule(experts_path.rpartition(".")[0]) if "." in experts_path else model
    for child in parent.children():
        value = getattr(child, "top_k", None)
        if isinstance(value, int) and value > 0:
            return value
    raise UnsupportedModelError(f"cannot find the router top-k of the experts at {experts_path}")


def _layer_index(path: str) -> int | None:
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def _experts_suffix(path: str) -> str:
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1 :])
    return path


# Leaf names that PEFT's transformers-v5 MoE conversion (peft.utils.transformers_weight_conversion) maps to
# the fused expert parameters or the router of MoE families: a target ending in one of them is re-read as an
# expert target (afmoe's attention output gate `self_attn.gate_proj` made get_peft_model fail). An attention
# Linear with such a name is therefore left out of the "attention" targets.
PEFT_MOE_REMAPPED_NAMES = frozenset({"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})


def is_attention_block(module: nn.Module) -> bool:
    """A decoder layer's softmax-attention block (class name ends in "Attention": Qwen3MoeAttention,
    DeepseekV3Attention, JambaAttention, ...). Mamba mixers, linear attention (Qwen3NextGatedDeltaNet),
    short convolutions (Lfm2MoeShortConv) and MLPs are not."""
    return type(module).__name__.endswith("Attention")


def _dense_linear_names(model: nn.Module, found: list[tuple[str, nn.Module]]) -> tuple[str, ...]:
    """Full module paths of the nn.Linear modules inside the attention blocks of the decoder layers.

    Full paths, not leaf names: a leaf name would also hit same-named Linears elsewhere (dense
    `mlp.gate_proj`s, Mamba `out_proj`s). Names PEFT remaps to experts (PEFT_MOE_REMAPPED_NAMES) are left
    out.
    """
    first_path = found[0][0]
    parts = first_path.split(".")
    digit = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    if digit is None:
        return ()
    container_path = ".".join(parts[:digit])
    container = model.get_submodule(container_path)
    paths: set[str] = set()
    for index, layer in container.named_children():
        for child_name, child in layer.named_children():
            if not is_attention_block(child):
                continue
            for path, module in child.named_modules():
                if not isinstance(module, nn.Linear) or not path or ".lora_" in f".{path}":
                    continue
                # A PEFT-wrapped Linear shows up as `<name>.base_layer`: keep `<name>`.
                path = path.split(".base_layer")[0]
                if path.rpartition(".")[2] in PEFT_MOE_REMAPPED_NAMES:
                    continue
                paths.add(f"{container_path}.{index}.{child_name}.{path}")
    return tuple(sorted(paths, key=_natural_key))


def _natural_key(path: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in path.split(".")]
