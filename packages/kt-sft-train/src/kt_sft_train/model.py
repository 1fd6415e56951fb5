"""Load a Hugging Face MoE checkpoint with its routed experts streamed into CPU kernel layers.

``load_kt_model(path, kt=KTConfig(...), **hf_kwargs)``:

1. Reads the config, builds the model skeleton on the meta device and asks the architecture registry
   where the routed-experts modules are (an unsupported family fails here, before any weight is read).
2. Indexes the safetensors shards and plans every expert tensor against the model's shapes (a missing
   shard or a shape mismatch fails here too, naming the file and the layer).
3. Runs the ordinary ``from_pretrained`` with every routed-experts module replaced at construction by
   a parameter-free placeholder, so transformers loads, converts and places everything else but never
   reads or allocates an expert weight.
4. Streams each layer's experts from the shards into a ``KTExperts`` and drops the host copy.

Peak host memory is about the final footprint plus one layer's experts (docs/design/0102-load-memory-plan.md).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import get_moe_arch_config
from .config import KTConfig
from .experts import KTExperts, attach_kt, replace_module, wrap_moe_layers_with_kt_wrapper
from .quantization import PackQuantizedScheme, pack_quantized_scheme
from .quantized_cache import QUANTIZED_CACHE_ATTR, QuantizedExpertCache
from .weights import (
    CheckpointError,
    ExpertLayerPlan,
    SafetensorsCheckpoint,
    StagingBuffers,
    fp8_block_size,
    is_packed_int4,
    plan_expert_layers,
    read_expert_layer,
)

__all__ = [
    "CheckpointError",
    "build_kt_device_map",
    "load_kt_model",
    "wrap_moe_layers_with_kt_wrapper",
]

# from_pretrained's class-level ignore list is patched for the duration of one load.
_LOAD_LOCK = threading.Lock()


def _routed_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every routed-experts module, from the architecture registry.

    Raises the registry's UnsupportedModelError (one message naming what is unsupported).
    """
    return [(path, model.get_submodule(path)) for path in get_moe_arch_config(model).experts_paths]


KERNEL_SIZE_MULTIPLE = 32  # the CPU kernels' tile width for the hidden and intermediate sizes


def _check_kernel_sizes(experts: Sequence[tuple[str, nn.Module]], kt: KTConfig) -> None:
    """Name the first experts layer whose sizes the CPU kernels cannot run (reference runs any size)."""
    if kt.backend != "kernels":
        return
    from .arch import UnsupportedModelError

    for path, module in experts:
        _, two_i, hidden = module.gate_up_proj.shape
        for what, size in (("hidden", int(hidden)), ("intermediate", int(two_i) // 2)):
            if size % KERNEL_SIZE_MULTIPLE:
                raise UnsupportedModelError(
                    f"{path}: expert {what} size {size} is not a multiple of {KERNEL_SIZE_MULTIPLE}, which "
                    "the CPU kernels need (padding is not implemented yet; the reference backend, "
                    "KTConfig(backend='reference') or --backend reference, runs any size)"
                )


def _default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def _meta_model(config: Any, model_class: Any, hf_kwargs: dict[str, Any]) -> nn.Module:
    """The model's architecture on the meta device (an auto class or a concrete PreTrainedModel class)."""
    build_kwargs = {k: hf_kwargs[k] for k in ("trust_remote_code", "attn_implementation") if k in hf_kwargs}
    # Auto classes have from_config; concrete model classes only _from_config.
    build = getattr(model_class, "from_config", None) or model_class._from_config
    with torch.device("meta"):
        return build(config, **build_kwargs)


def build_kt_device_map(
    config: Any,
    kt: KTConfig | None = None,
    device: str | int | torch.device | None = None,
    *,
    model_class: Any = None,
) -> dict[str, str | int | torch.device]:
    """A ``from_pretrained`` device_map with everything on ``device`` except the routed experts ("cpu").

    ``device`` defaults to ``cuda:$LOCAL_RANK`` (or "cpu" without a GPU). Useful with a plain
    ``from_pretrained`` followed by ``wrap_moe_layers_with_kt_wrapper``; ``load_kt_model`` needs none of
    this because it never materializes the experts.
    """
    del kt  # placement does not depend on kernel settings yet; the argument keeps the upstream signature
    device = _default_device() if device is None else device
    arch = (
        get_moe_arch_config(config)
        if model_class is None
        else get_moe_arch_config(_meta_model(config, model_class, {}))
    )
    device_map: dict[str, str | int | torch.device] = {"": device}
    for path in arch.experts_paths:
        device_map[path] = "cpu"
    return device_map


def _auto_causal_lm() -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


class _ExpertsPlaceholder(nn.Module):
    """Stands in for a routed-experts module while transformers loads the rest of the model.

    It owns no parameters, so transformers neither reads nor allocates expert weights; the original
    module (built on the meta device) is kept outside the module tree for its shapes and flags.
    """

    def __init__(self, hf_experts: nn.Module):
        super().__init__()
        object.__setattr__(self, "hf_experts", hf_experts)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(f"{type(self.hf_experts).__name__} weights were never loaded into kt-sft experts")


@contextlib.contextmanager
def _experts_as_placeholders(experts_classes: tuple[type, ...]) -> Iterator[None]:
    """While active, any newly registered module of ``experts_classes`` is replaced by a placeholder.

    Uses torch's global module-registration hook; the model is built on the meta device inside
    ``from_pretrained``, so the replaced module never allocated memory.
    """

    def swap(parent: nn.Module, name: str, child: nn.Module | None) -> nn.Module | None:
        if child is not None and type(child) in experts_classes:
            return _ExpertsPlaceholder(child)
        return None

    handle = torch.nn.modules.module.register_module_module_registration_hook(swap)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _ignored_unexpected_keys(model_class: type, prefixes: Sequence[str]) -> Iterator[None]:
    """Keep the streamed expert keys out of from_pretrained's "UNEXPECTED" load report."""
    extra = [rf"^{re.escape(prefix)}\." for prefix in prefixes]
    had_own = "_keys_to_ignore_on_load_unexpected" in model_class.__dict__
    previous = getattr(model_class, "_keys_to_ignore_on_load_unexpected", None)
    model_class._keys_to_ignore_on_load_unexpected = list(previous or []) + extra
    try:
        yield
    finally:
        if had_own:
            model_class._keys_to_ignore_on_load_unexpected = previous
        else:
            del model_class._keys_to_ignore_on_load_unexpected


def _hf_config(path: Path, hf_kwargs: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    config = hf_kwargs.get("config")
    if config is not None:
        return config
    config_kwargs = {k: hf_kwargs[k] for k in ("trust_remote_code", "revision") if k in hf_kwargs}
    return AutoConfig.from_pretrained(path, local_files_only=True, **config_kwargs)


def _is_fp8_checkpoint(config: Any) -> bool:
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(method) in ("fp8", "QuantizationMethod.FP8")


def load_kt_model(
    path: str | os.PathLike[str],
    kt: KTConfig | None = None,
    *,
    model_class: Any = None,
    **hf_kwargs: Any,
) -> nn.Module:
    """Load a local safetensors MoE checkpoint with routed experts in ``KTExperts`` CPU layers.

    ``hf_kwargs`` go to ``from_pretrained`` (``dtype``, ``attn_implementation``, ``device_map``,
    ``key_mapping``, ...). Non-expert weights land on ``cuda:$LOCAL_RANK`` when a GPU exists, else on
    the CPU, unless ``device_map`` says otherwise. Float8 block-scaled checkpoints are dequantized to
    bf16 (experts by kt-sft, the rest by transformers) unless ``quantization_config`` is given.
    ``model_class`` defaults to ``AutoModelForCausalLM``.
    """
    kt = KTConfig() if kt is None else kt
    if not isinstance(kt, KTConfig):
        raise TypeError(f"load_kt_model: kt must be a KTConfig, got {type(kt).__name__}")
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(
            f"load_kt_model: {str(path)!r} is not a local checkpoint directory (kt-sft loads local "
            "safetensors checkpoints only; download it first, e.g. with `hf download`)"
        )
    hf_kwargs = dict(hf_kwargs)
    model_class = model_class or _auto_causal_lm()
    config = _hf_config(directory, hf_kwargs)

    int4_scheme = pack_quantized_scheme(config)
    kt = _kt_for_checkpoint(kt, int4_scheme, directory)
    skeleton = _meta_model(config, model_class, hf_kwargs)
    experts = _routed_experts(skeleton)
    _check_kernel_sizes(experts, kt)  # before any weight is read
    checkpoint = SafetensorsCheckpoint(directory)
    plans = plan_expert_layers(
        skeleton,
        experts,
        checkpoint,
        key_mapping=hf_kwargs.get("key_mapping"),
        int4_group_size=None if int4_scheme is None else int4_scheme.group_size,
    )
    if int4_scheme is not None:
        _check_only_experts_packed(checkpoint, plans)
        # Every packed tensor is an expert kt-sft streams itself: transformers loads the rest as plain
        # weights (it would otherwise need the compressed-tensors package and decompress the experts).
        del config.quantization_config
    # Only what kt-sft quantizes itself is cached: an int4 checkpoint's experts are taken as shipped.
    cache = None
    if kt.quantized_cache is not None and kt.weight_dtype != "bf16" and int4_scheme is None:
        cache = QuantizedExpertCache(kt.quantized_cache, directory, kt, fp8_block_size(config))
    experts_classes = tuple({type(module) for _, module in experts})
    del skeleton, experts

    hf_kwargs.setdefault("device_map", {"": _default_device()})
    hf_kwargs["local_files_only"] = True
    hf_kwargs.setdefault("config", config)
    if _is_fp8_checkpoint(config) and "quantization_config" not in hf_kwargs:
        from transformers import FineGrainedFP8Config

        hf_kwargs["quantization_config"] = FineGrainedFP8Config(dequantize=True)

    with _LOAD_LOCK:
        concrete_class = _resolve_model_class(model_class, config)
        with (
            _experts_as_placeholders(experts_classes),
            _ignored_unexpected_keys(concrete_class, [plan.module_name for plan in plans]),
        ):
            model = concrete_class.from_pretrained(directory, **hf_kwargs)

    _stream_experts_into_kernels(model, plans, kt, fp8_block_size(config), cache)
    return model


def _kt_for_checkpoint(kt: KTConfig, scheme: PackQuantizedScheme | None, directory: Path) -> KTConfig:
    """The KTConfig an int4 checkpoint is loaded with: its own groups, refused for bf16/int8 bases
    (re-quantizing or rounding the shipped int4 would silently change the weights: ADR 0602)."""
    if scheme is None:
        return kt
    if kt.weight_dtype != "int4":
        raise CheckpointError(
            f"{directory} ships int4 experts (compressed-tensors, group {scheme.group_size}): load it with "
            f"KTConfig(weight_dtype='int4') (--weight-dtype int4); weight_dtype={kt.weight_dtype!r} would "
            "re-round the shipped weights"
        )
    if kt.group_size not in (None, scheme.group_size):
        raise CheckpointError(
            f"{directory} ships int4 experts in groups of {scheme.group_size}; KTConfig.group_size="
            f"{kt.group_size} cannot change them (leave it unset)"
        )
    return kt.replace(group_size=scheme.group_size)


def _check_only_experts_packed(checkpoint: SafetensorsCheckpoint, plans: Sequence[ExpertLayerPlan]) -> None:
    planned = {piece.tensor.key for plan in plans for p in (plan.gate_up, plan.down) for piece in p.slices}
    others = sorted(
        key for key in checkpoint.tensors if key.endswith(".weight_packed") and key not in planned
    )
    if others:
        raise NotImplementedError(
            f"not implemented yet: packed int4 weights outside the routed experts ({len(others)}, e.g. "
            f"{others[0]!r}); kt-sft reads int4 experts only"
        )
    for plan in plans:
        if is_packed_int4(plan) != any(p.tensor.dtype == torch.int32 for p in plan.down.slices):
            raise CheckpointError(f"{plan.module_name}: gate/up and down are not both packed int4")


def _resolve_model_class(model_class: Any, config: Any) -> type:
    """The concrete ``PreTrainedModel`` subclass an auto class would instantiate for ``config``."""
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is None:
        return model_class
    try:
        return mapping[type(config)]
    except KeyError:
        raise ValueError(
            f"{model_class.__name__} has no model class for {type(config).__name__}; pass model_class="
        ) from None


def _stream_experts_into_kernels(
    model: nn.Module,
    plans: Sequence[ExpertLayerPlan],
    kt: KTConfig,
    fp8_block: tuple[int, int],
    cache: QuantizedExpertCache | None,
) -> None:
    placeholders = {
        name: module for name, module in model.named_modules() if isinstance(module, _ExpertsPlaceholder)
    }
    expected = [plan.module_name for plan in plans]
    if sorted(placeholders) != sorted(expected):
        raise RuntimeError(
            f"the loaded experts {sorted(placeholders)} differ from the planned ones {sorted(expected)}"
        )
    loaded: list[KTExperts] = []
    staging = StagingBuffers()
    for plan in plans:
        placeholder = placeholders[plan.module_name]
        experts = KTExperts.like(placeholder.hf_experts, kt, name=plan.module_name)
        if not experts.owns_experts:  # a host-owner proxy reads nothing: its owner holds the weights
            loaded.append(experts)
            replace_module(model, plan.module_name, experts)
            continue
        if cache is not None and (cached := cache.read(plan)) is not None:
            experts.load_quantized_weights(*cached)
            del cached
        else:
            _load_from_checkpoint(experts, plan, kt, fp8_block, staging)
            # A layer's source tensors caught in a reference cycle would otherwise live until the garbage
            # collector happens to run, i.e. sometimes beside the next layer (peak + 1 layer, seen in CI).
            gc.collect()
            if cache is not None:  # read back from the kernels: one quantized layer beside them
                cache.write(plan, experts.layer.quantized_storage())
        replace_module(model, plan.module_name, experts)
        loaded.append(experts)
    attach_kt(model, loaded)
    if cache is not None:
        model.__dict__[QUANTIZED_CACHE_ATTR] = cache.report


def _load_from_checkpoint(
    experts: KTExperts,
    plan: ExpertLayerPlan,
    kt: KTConfig,
    fp8_block: tuple[int, int],
    staging: StagingBuffers,
) -> None:
    weights = read_expert_layer(
        plan,
        fp8_block=fp8_block,
        quantized_base=kt.weight_dtype != "bf16",
        int4_group_size=kt.group_size,
        staging=staging,
    )
    if weights.int4 is not None:
        experts.load_quantized_weights(*weights.int4)
    else:
        assert weights.gate_up is not None and weights.down is not None
        experts.load_expert_weights(weights.gate_up, weights.down)
    # The experts layer holds its own copy (reference) or packed copy (kernels): the staging buffers are
    # free for the next layer.
