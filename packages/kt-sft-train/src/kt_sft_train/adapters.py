"""Adapter files: atomic saves, validated loads, and exports for serving (DESIGN.md §4.4, §5).

- ``save_adapter(peft_model, directory)``: PEFT's own ``save_pretrained`` into a staging directory,
  fsynced, then swapped into place (an atomic exchange where the OS has one), so a crash mid-save leaves
  the previous adapter intact.
- ``load_adapter(model, directory)``: checks every key, shape and dtype of the adapter file against the
  LoRA layers PEFT would create (built on a meta-device copy of the model), and only then lets PEFT load
  it. A bad adapter leaves the model untouched.
- ``export_merged_checkpoint(base, adapter, out)``: W + ΔW for every LoRA target, streamed shard by shard
  from the base safetensors checkpoint (float8 weights are dequantized), written as a plain checkpoint.
- ``export_per_expert_adapter(adapter, out, base_dir=...)``: the fused expert LoRA of PEFT
  (``lora_A [r·E, in]``, ``lora_B [out, r·E]`` per 3-D parameter) rewritten as one LoRA per expert
  projection (``...experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``, named as in the base
  checkpoint), the layout serving engines load. Exact: gate and up share the expert's A.

Layout and decisions: docs/design/0103-adapter-files.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .arch import get_moe_arch_config
from .peft.layout import per_expert_factors
from .quantization import PACKED_SUFFIXES, dequantize, pack_quantized_scheme, packed_int4_to_kernel
from .weights import (
    CheckpointError,
    CheckpointKeyMapper,
    ExpertLayerPlan,
    OpenShards,
    SafetensorsCheckpoint,
    fp8_block_size,
    plan_expert_layers,
    read_matrix,
    scale_key_for,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class AdapterError(ValueError):
    """An adapter that does not fit the model or cannot be read; the message says which keys."""


# --------------------------------------------------------------------------------------------------
# Atomic directory writes
# --------------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(directory) / name)
        _fsync_path(Path(directory))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the OS cannot."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name, use_errno=True) if libc_name else None
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(code, f"exchanging {first} and {second}: {os.strerror(code)}")


def previous_copy_path(target: Path) -> Path:
    """Where the previous version waits during a non-atomic replace (only on OSes without exchange)."""
    return target.parent / f".{target.name}.previous"


def _replace_directory(staging: Path, target: Path) -> None:
    """Put the complete ``staging`` directory at ``target``; the old ``target`` survives any crash."""
    if not target.exists():
        os.rename(staging, target)
    elif not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    elif _exchange(staging, target):
        _fsync_path(target.parent)
        shutil.rmtree(staging)
    else:
        # No atomic exchange: a crash between the two renames leaves the previous version complete at
        # previous_copy_path(target) (load_adapter names it when target is missing).
        previous = previous_copy_path(target)
        if previous.exists():
            shutil.rmtree(previous)
        os.rename(target, previous)
        os.rename(staging, target)
        _fsync_path(target.parent)
        shutil.rmtree(previous)
    _fsync_path(target.parent)


def current_umask() -> int:
    # os.umask can only be read by setting it; set it straight back (process-wide, but only for an instant).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Give the staged tree the modes a plain ``open()``/``mkdir()`` would (0644/0755 under umask 022).

    mkdtemp makes the staging directory 0700 and safetensors writes 0600 files; a serving process of another
    user must be able to read saved weights like the JSON beside them.
    """
    mask = current_umask()
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o666 & ~mask)


@contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``target`` atomically, else it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        yield staging
        _apply_umask(staging)
        _fsync_tree(staging)
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_adapter(model: nn.Module, directory: str | os.PathLike[str], **save_kwargs: Any) -> Path:
    """``model.save_pretrained(directory, **save_kwargs)`` (a PeftModel), written atomically."""
    if not hasattr(model, "peft_config"):
        raise TypeError(f"save_adapter needs a peft.PeftModel, got {type(model).__name__}")
    with atomic_directory(directory) as staging:
        model.save_pretrained(staging, **save_kwargs)
    return Path(directory)


# --------------------------------------------------------------------------------------------------
# Reading and validating adapters
# --------------------------------------------------------------------------------------------------


@dataclass
class AdapterFiles:
    """An adapter directory's config and tensor headers (no tensor data read)."""

    directory: Path
    config: Any  # peft.LoraConfig
    dtypes: dict[str, torch.dtype]
    shapes: dict[str, tuple[int, ...]]

    @property
    def weights_path(self) -> Path:
        return self.directory / ADAPTER_WEIGHTS

    def model_key(self, key: str) -> str:
        """The key without PEFT's ``base_model.model.`` prefix (a module path of the base model)."""
        return key.removeprefix(PEFT_PREFIX)


def read_adapter(directory: str | os.PathLike[str]) -> AdapterFiles:
    """Read a PEFT LoRA adapter's config and safetensors header; raise AdapterError if it is not one."""
    from peft import LoraConfig, PeftConfig

    directory = Path(directory)
    if not directory.is_dir():
        previous = previous_copy_path(directory)
        hint = f" (an interrupted save left the previous adapter at {previous})" if previous.is_dir() else ""
        raise AdapterError(f"adapter directory {str(directory)!r} does not exist{hint}")
    if not (directory / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{directory} has no {ADAPTER_CONFIG}: not a PEFT adapter")
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        legacy = directory / "adapter_model.bin"
        if legacy.is_file():
            raise NotImplementedError(
                f"not implemented yet: pickled adapters ({legacy}); save with safetensors"
            )
        raise AdapterError(f"{directory} has no {ADAPTER_WEIGHTS}")
    try:
        config = PeftConfig.from_pretrained(str(directory))
    except Exception as err:  # PEFT raises several types for a malformed config
        raise AdapterError(f"{directory / ADAPTER_CONFIG}: cannot be read by PEFT ({err})") from err
    if not isinstance(config, LoraConfig):
        raise NotImplementedError(f"not implemented yet: {type(config).__name__} adapters (LoRA only)")
    dtypes: dict[str, torch.dtype] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with safe_open(weights, framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                view = handle.get_slice(key)
                shapes[key] = tuple(view.get_shape())
                dtypes[key] = _dtype_of(view.get_dtype(), weights, key)
    except AdapterError:
        raise
    except Exception as err:
        raise AdapterError(f"cannot read the safetensors header of {weights}: {err}") from err
    return AdapterFiles(directory, config, dtypes, shapes)


_FLOAT_NAMES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _dtype_of(name: str, file: Path, key: str) -> torch.dtype:
    dtype = _FLOAT_NAMES.get(name)
    if dtype is None:
        raise AdapterError(f"{file}: tensor {key!r} has dtype {name}; LoRA factors must be floating point")
    return dtype


def _base_of(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _meta_skeleton(base: nn.Module) -> nn.Module:
    """An empty copy of the base model's architecture on the meta device (routed experts as in HF)."""
    config = getattr(base, "config", None)
    from_config = getattr(type(base), "_from_config", None)
    if config is None or from_config is None:
        raise TypeError(f"load_adapter needs a transformers PreTrainedModel, got {type(base).__name__}")
    with torch.device("meta"):
        return from_config(config)


def expected_adapter_shapes(model: nn.Module, config: Any) -> dict[str, tuple[int, ...]]:
    """``{saved key: shape}`` PEFT would save for ``config`` on ``model`` (computed on a meta copy)."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    skeleton = _meta_skeleton(_base_of(model))
    probe_name = "kt_sft_probe"
    inject_adapter_in_model(config, skeleton, adapter_name=probe_name, low_cpu_mem_usage=True)
    state = get_peft_model_state_dict(skeleton, adapter_name=probe_name)
    return {PEFT_PREFIX + key: tuple(value.shape) for key, value in state.items()}


def validate_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> AdapterFiles:
    """Check an adapter's keys, shapes and dtypes against ``model`` without touching ``model``."""
    adapter = read_adapter(directory)
    try:
        expected = expected_adapter_shapes(model, adapter.config)
    except (ValueError, RuntimeError) as err:
        model_name = type(_base_of(model)).__name__
        raise AdapterError(f"{adapter.directory}: its LoraConfig does not fit {model_name}: {err}") from err
    found = adapter.shapes
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing:
        problems.append(f"{len(missing)} missing tensors, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the model has no place for, e.g. {unexpected[:3]}")
    for key in mismatched[:3]:
        problems.append(f"{key} has shape {list(found[key])}, the model needs {list(expected[key])}")
    if len(mismatched) > 3:
        problems.append(f"... {len(mismatched) - 3} more shape mismatches")
    if problems:
        raise AdapterError(f"adapter {adapter.directory} does not fit the model: " + "; ".join(problems))
    return adapter


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> nn.Module:
    """Validate, then load an adapter onto ``model`` (plain, KT or PeftModel); returns the PeftModel."""
    from peft import PeftModel

    validate_adapter(model, directory)
    if isinstance(model, PeftModel):
        model.load_adapter(str(directory), adapter_name=adapter_name, is_trainable=is_trainable)
        return model
    return PeftModel.from_pretrained(
        model, str(directory), adapter_name=adapter_name, is_trainable=is_trainable
    )


# --------------------------------------------------------------------------------------------------
# LoRA factors of an adapter, per base-model parameter
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRAFactors:
    """LoRA of one base parameter: ΔW = scaling · B @ A (per expert for 3-D parameters).

    Linear: A [r, in], B [out, r]. Experts: PEFT's ParamWrapper layout, decoded by
    kt_sft_train.peft.layout (the one decoder).
    """

    parameter: str
    a_key: str
    b_key: str
    scaling: float
    rank: int
    num_experts: int | None  # None for a Linear weight

    def expert_factors(
        self, a: torch.Tensor, b: torch.Tensor, expert: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.num_experts is not None
        a_experts, b_experts = per_expert_factors(a, b, self.num_experts)
        return a_experts[expert], b_experts[expert]


def _lora_scaling(config: Any) -> tuple[int, float]:
    if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        raise NotImplementedError("not implemented yet: adapters with rank_pattern / alpha_pattern")
    rank = int(config.r)
    alpha = float(config.lora_alpha)
    return rank, alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def adapter_factors(adapter: AdapterFiles, skeleton: nn.Module) -> dict[str, LoRAFactors]:
    """Match every lora_A/lora_B pair of ``adapter`` to the base-model parameter it adapts."""
    rank, scaling = _lora_scaling(adapter.config)
    params = dict(skeleton.named_parameters())
    experts_paths = set(get_moe_arch_config(skeleton).experts_paths)
    pairs: dict[str, dict[str, str]] = {}
    for key in adapter.shapes:
        module, kind = _split_lora_key(adapter.model_key(key), adapter.directory)
        pairs.setdefault(module, {})[kind] = key
    factors: dict[str, LoRAFactors] = {}
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterError(
                f"{adapter.directory}: {module} has {sorted(pair)} but needs lora_A and lora_B"
            )
        a_shape, b_shape = adapter.shapes[pair["lora_A"]], adapter.shapes[pair["lora_B"]]
        owner = re.sub(r"(\.base_layer)+$", "", module)
        if owner in experts_paths:
            parameter = _expert_parameter(owner, a_shape, b_shape, params, adapter.directory)
            num_experts = params[parameter].shape[0]
            if a_shape[0] != rank * num_experts:
                raise AdapterError(
                    f"{pair['lora_A']}: {a_shape[0]} rows, expected r·E = {rank}·{num_experts}"
                )
        else:
            parameter = f"{owner}.weight"
            weight = params.get(parameter)
            if weight is None or weight.dim() != 2:
                raise NotImplementedError(
                    f"not implemented yet: LoRA on {owner} (neither a Linear layer nor routed experts)"
                )
            if (a_shape, b_shape) != ((rank, weight.shape[1]), (weight.shape[0], rank)):
                raise AdapterError(
                    f"{adapter.directory}: {owner} LoRA shapes {a_shape}, {b_shape} do not fit"
                )
            num_experts = None
        if parameter in factors:
            raise AdapterError(f"{adapter.directory}: two LoRA pairs adapt {parameter}")
        factors[parameter] = LoRAFactors(
            parameter, pair["lora_A"], pair["lora_B"], scaling, rank, num_experts
        )
    return factors


def _split_lora_key(key: str, directory: Path) -> tuple[str, str]:
    match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", key)
    if match is None:
        raise NotImplementedError(
            f"not implemented yet: adapter tensor {key!r} in {directory} (LoRA A/B only)"
        )
    return match.group(1), match.group(2)


def _expert_parameter(
    owner: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], params: dict[str, Any], directory: Path
) -> str:
    # PEFT nests one ParamWrapper per targeted parameter and names them by nesting depth only; the
    # shapes tell them apart: gate_up (in H, out 2I) vs down (in I, out H) can never coincide.
    for name in ("gate_up_proj", "down_proj"):
        _, out_features, in_features = params[f"{owner}.{name}"].shape
        if a_shape[1] == in_features and b_shape[0] == out_features:
            return f"{owner}.{name}"
    raise AdapterError(
        f"{directory}: LoRA shapes {a_shape}, {b_shape} at {owner} fit neither expert parameter"
    )


# --------------------------------------------------------------------------------------------------
# Exports
# --------------------------------------------------------------------------------------------------


def _base_skeleton(base_dir: Path) -> tuple[Any, nn.Module]:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir, local_files_only=True)
    with torch.device("meta"):
        return config, AutoModelForCausalLM.from_config(config)


def _expert_plans(skeleton: nn.Module, checkpoint: SafetensorsCheckpoint) -> list[ExpertLayerPlan]:
    experts = [(path, skeleton.get_submodule(path)) for path in get_moe_arch_config(skeleton).experts_paths]
    scheme = pack_quantized_scheme(skeleton.config)
    group = None if scheme is None else scheme.group_size
    return plan_expert_layers(skeleton, experts, checkpoint, int4_group_size=group)


_PACKED_COMPANIONS = tuple(f".{suffix}" for suffix in PACKED_SUFFIXES[1:])


def _read_packed_int4(shards: OpenShards, checkpoint: SafetensorsCheckpoint, key: str) -> torch.Tensor:
    """A compressed-tensors int4 weight (``key`` = its ``.weight_packed``) dequantized: q * scale in fp32
    (exact), the values the int4 kernels compute with."""
    base = key.removesuffix("_packed")
    companions = {name: checkpoint.tensors.get(base + name) for name in ("_scale", "_shape")}
    missing = [base + name for name, info in companions.items() if info is None]
    if missing:
        raise CheckpointError(f"{checkpoint.tensors[key].file.name}:{key!r} has no {missing[0]!r}")
    shape = [int(v) for v in shards.get(companions["_shape"]).get_tensor(base + "_shape").tolist()]
    packed = shards.get(checkpoint.tensors[key]).get_tensor(key)
    scale = shards.get(companions["_scale"]).get_tensor(base + "_scale")
    return dequantize(packed_int4_to_kernel(packed, shape[-1]), scale, "int4")


@dataclass(frozen=True)
class _MergeTarget:
    """How one checkpoint tensor receives a LoRA delta."""

    factors: LoRAFactors
    expert: int | None = None  # per-expert tensor: which expert
    rows: slice | None = None  # per-expert tensor: which rows of the expert's ΔW
    fused: bool = False  # the whole [E, rows, cols] parameter


def _merge_targets(
    skeleton: nn.Module, checkpoint: SafetensorsCheckpoint, factors: dict[str, LoRAFactors]
) -> dict[str, _MergeTarget]:
    targets: dict[str, _MergeTarget] = {}
    for plan in _expert_plans(skeleton, checkpoint):
        for param in (plan.gate_up, plan.down):
            lora = factors.get(param.target)
            if lora is None:
                continue
            if param.fused is not None:
                targets[param.fused.key] = _MergeTarget(lora, fused=True)
            rows = param.shape[1] // param.num_slots
            for piece in param.slices:
                part = slice(piece.slot * rows, (piece.slot + 1) * rows)
                targets[piece.tensor.key] = _MergeTarget(lora, piece.expert, part)
    dense = {name: lora for name, lora in factors.items() if lora.num_experts is None}
    mapper = CheckpointKeyMapper(skeleton, None)
    for key in checkpoint.tensors:
        if key not in targets and not key.endswith(("_scale_inv", *_PACKED_COMPANIONS)):
            parameter = mapper.map(key.removesuffix("_packed"), dense)[0]
            if parameter in dense:
                targets[key] = _MergeTarget(dense[parameter])
    unused = set(factors) - {target.factors.parameter for target in targets.values()}
    if unused:
        raise AdapterError(
            f"the base checkpoint has no tensor for the adapted parameters {sorted(unused)[:5]}"
        )
    return targets


def _delta(target: _MergeTarget, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    lora = target.factors
    if lora.num_experts is None:
        return lora.scaling * (b.to(dtype) @ a.to(dtype))
    if target.fused:
        deltas = [lora.expert_factors(a, b, e) for e in range(lora.num_experts)]
        return lora.scaling * torch.stack([be.to(dtype) @ ae.to(dtype) for ae, be in deltas])
    assert target.expert is not None and target.rows is not None
    a_e, b_e = lora.expert_factors(a, b, target.expert)
    return lora.scaling * (b_e[target.rows].to(dtype) @ a_e.to(dtype))


def _copy_side_files(source: Path, destination: Path, config_edit: dict[str, Any] | None) -> None:
    """Config, tokenizer and the like (every plain file that is not a weight shard or the index)."""
    for path in source.iterdir():
        if (
            not path.is_file()
            or path.suffix == ".safetensors"
            or path.name.endswith(".safetensors.index.json")
        ):
            continue
        if path.name == "config.json" and config_edit is not None:
            (destination / path.name).write_text(json.dumps(config_edit, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(path, destination / path.name)


def export_merged_checkpoint(
    base_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write base + LoRA merged into a plain safetensors checkpoint, one base shard at a time.

    Keys and sharding follow the base checkpoint; float8 weights are dequantized (and the config's
    quantization_config dropped). ``dtype``: output dtype of floating tensors (default: the base's,
    bf16 for float8 weights). ΔW is computed in float32 (float64 when ``dtype`` is float64).

    A compressed-tensors int4 base is merged into its dequantized weights (q * scale, exact in fp32) and
    written as plain ``.weight`` tensors in bf16 (or ``dtype``): merging a LoRA into int4 cannot stay int4
    without re-quantizing, which would change the trained model (docs/design/0602). A base that was
    quantized only in kt-sft (``--weight-dtype int8/int4`` on a bf16/fp8 checkpoint) is merged into the
    checkpoint's own weights, as for any base.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    config, skeleton = _base_skeleton(base_dir)
    checkpoint = SafetensorsCheckpoint(base_dir)
    adapter = read_adapter(adapter_dir)
    factors = adapter_factors(adapter, skeleton)
    targets = _merge_targets(skeleton, checkpoint, factors)
    block = fp8_block_size(config)
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    by_file: dict[Path, list[str]] = {}
    for key, info in checkpoint.tensors.items():
        by_file.setdefault(info.file, []).append(key)
    dequantized_scales = {
        scale_key_for(key) for key, info in checkpoint.tensors.items() if info.dtype in _FLOAT8
    } & set(checkpoint.tensors)
    int4 = pack_quantized_scheme(config) is not None
    if int4:  # the companions of packed weights are folded into their dequantized ``.weight``
        dequantized_scales |= {key for key in checkpoint.tensors if key.endswith(_PACKED_COMPANIONS)}

    weight_map: dict[str, str] = {}
    total_bytes = 0
    with (
        atomic_directory(out_dir) as staging,
        safe_open(adapter.weights_path, "pt", device="cpu") as lora_file,
    ):
        shards = OpenShards()

        # Every expert tensor of a layer needs the same (large) A/B pair: read each pair once.
        @functools.lru_cache(maxsize=4)
        def factors_of(parameter: str) -> tuple[torch.Tensor, torch.Tensor]:
            lora = factors[parameter]
            return lora_file.get_tensor(lora.a_key), lora_file.get_tensor(lora.b_key)

        try:
            for file, keys in by_file.items():
                merged: dict[str, torch.Tensor] = {}
                for key in keys:
                    if key in dequantized_scales:
                        continue
                    info = checkpoint.tensors[key]
                    packed = int4 and key.endswith(".weight_packed")
                    scale = checkpoint.tensors.get(scale_key_for(key)) if info.dtype in _FLOAT8 else None
                    if info.dtype in _FLOAT8 and scale is None:
                        raise CheckpointError(f"{file.name}:{key!r} is float8 without {scale_key_for(key)!r}")
                    if packed:
                        tensor = _read_packed_int4(shards, checkpoint, key)
                    else:
                        tensor = _read_whole(shards, info, scale, block)
                    target = targets.get(key)
                    if target is not None:
                        delta = _delta(target, *factors_of(target.factors.parameter), math_dtype)
                        tensor = tensor.to(math_dtype) + delta
                    out_dtype = dtype if dtype is not None and tensor.is_floating_point() else None
                    if out_dtype is None and (target is not None or info.dtype in _FLOAT8 or packed):
                        out_dtype = torch.bfloat16 if info.dtype in _FLOAT8 or packed else info.dtype
                    out_key = key.removesuffix("_packed") if packed else key
                    merged[out_key] = (tensor if out_dtype is None else tensor.to(out_dtype)).contiguous()
                save_file(merged, staging / file.name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(merged, file.name))
                total_bytes += sum(t.numel() * t.element_size() for t in merged.values())
                del merged
        finally:
            shards.close()
        config_dict = json.loads((base_dir / "config.json").read_text())
        if dequantized_scales or int4:
            config_dict.pop("quantization_config", None)
        if dtype is not None:
            config_dict["dtype"] = str(dtype).removeprefix("torch.")
        _copy_side_files(base_dir, staging, config_dict)
        if (base_dir / "model.safetensors.index.json").is_file():
            index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return out_dir


def _read_whole(shards: OpenShards, info: Any, scale: Any, block: tuple[int, int]) -> torch.Tensor:
    """A checkpoint tensor; float8 ones dequantized to their exact float32 products."""
    if info.dtype not in _FLOAT8:
        return shards.get(info).get_tensor(info.key)
    if len(info.shape) == 2:
        return read_matrix(shards, info, scale, block, None, torch.float32)
    if len(info.shape) == 3:
        return torch.stack(
            [read_matrix(shards, info, scale, block, e, torch.float32) for e in range(info.shape[0])]
        )
    raise NotImplementedError(f"not implemented yet: float8 tensor {info.key!r} of shape {list(info.shape)}")


def export_per_expert_adapter(
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    base_dir: str | os.PathLike[str],
) -> Path:
    """Rewrite the fused expert LoRA as one LoRA per expert projection, named like the base checkpoint.

    Expert e of ``gate_up_proj`` becomes ``gate`` (lora_A = A_e, lora_B = B_e[:I]) and ``up``
    (lora_A = A_e, lora_B = B_e[I:]); ``down_proj`` becomes ``down`` (A_e, B_e). Rank and alpha stay, so
    every ΔW is exactly the fused one. Linear LoRA is copied unchanged.
    """
    base_dir = Path(base_dir)
    _, skeleton = _base_skeleton(base_dir)
    checkpoint = SafetensorsCheckpoint(base_dir)
    adapter = read_adapter(adapter_dir)
    factors = adapter_factors(adapter, skeleton)
    plans = {p.target: p for plan in _expert_plans(skeleton, checkpoint) for p in (plan.gate_up, plan.down)}

    tensors: dict[str, torch.Tensor] = {}
    expert_modules: set[str] = set()
    with safe_open(adapter.weights_path, "pt", device="cpu") as lora_file:
        for parameter, lora in factors.items():
            a, b = lora_file.get_tensor(lora.a_key), lora_file.get_tensor(lora.b_key)
            if lora.num_experts is None:
                tensors[lora.a_key], tensors[lora.b_key] = a, b
                continue
            plan = plans[parameter]
            rows = plan.shape[1] // 2 if parameter.endswith("gate_up_proj") else plan.shape[1]
            for expert in range(lora.num_experts):
                a_e, b_e = lora.expert_factors(a, b, expert)
                for slot, module in enumerate(_expert_module_names(plan, parameter, expert)):
                    prefix = PEFT_PREFIX + module
                    tensors[f"{prefix}.lora_A.weight"] = a_e.clone()
                    tensors[f"{prefix}.lora_B.weight"] = b_e[slot * rows : (slot + 1) * rows].clone()
                    expert_modules.add(module)

    config = json.loads((adapter.directory / ADAPTER_CONFIG).read_text())
    config["target_parameters"] = None
    config["target_modules"] = _combined_target_regex(config.get("target_modules"), expert_modules)
    with atomic_directory(out_dir) as staging:
        save_file(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def _expert_module_names(plan: Any, parameter: str, expert: int) -> list[str]:
    """Module names of one expert's projections for ``parameter``, as the base checkpoint names them."""
    if plan.slices:
        by_slot = {piece.slot: piece.tensor.key for piece in plan.slices if piece.expert == expert}
        return [by_slot[slot].removesuffix(".weight") for slot in range(plan.num_slots)]
    owner = parameter.rpartition(".")[0]
    names = ("gate_proj", "up_proj") if parameter.endswith("gate_up_proj") else ("down_proj",)
    return [f"{owner}.{expert}.{name}" for name in names]


def _combined_target_regex(original: Any, expert_modules: set[str]) -> str:
    """One PEFT target_modules regex (full match): the original targets plus the per-expert modules."""
    patterns = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(m)) for m in expert_modules})
    alternatives = [f"(?:{p})" for p in patterns]
    if isinstance(original, str) and original:
        alternatives.insert(0, f"(?:{original})")
    elif original:
        names = "|".join(re.escape(name) for name in sorted(original))
        alternatives.insert(0, rf"(?:(?:.*\.)?(?:{names}))")
    return "|".join(alternatives)
