"""Routed-expert weights straight from safetensors shards, one MoE layer at a time.

Output per experts module: ``gate_up [E, 2I, H]`` and ``down [E, H, I]``, bf16, CPU, contiguous —
exactly the tensors transformers would put in the module's ``gate_up_proj`` / ``down_proj``.

Checkpoint layouts understood (see docs/design/0101-expert-checkpoint-loading.md):
- per-expert keys (``...experts.{e}.gate_proj.weight`` / ``up_proj`` / ``down_proj``, Mixtral's
  ``w1``/``w3``/``w2``, or whatever the family's transformers conversion mapping names);
- fused keys (``...experts.gate_up_proj [E,2I,H]``, ``...experts.down_proj [E,H,I]``);
- float8 weights with per-block ``weight_scale_inv`` (DeepSeek-V3 style), dequantized to bf16 here
  (to fp32 for an int8/int4 base, which the kernels quantize: no bf16 rounding in between);
- compressed-tensors int4 "pack-quantized" per-expert weights (``weight_packed`` / ``weight_scale`` /
  ``weight_shape``), converted bit-exactly into the kernels' int4 storage (quantization.py).

Key names are mapped to the model's parameters by transformers' own conversion mapping (the renames
and ``WeightConverter`` patterns it uses in ``from_pretrained``); only the tensor assembly is done
here, in place, so peak host memory stays at one layer plus one expert slice.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .quantization import PACKED_SUFFIXES, packed_int4_to_kernel

EXPERT_PARAM_NAMES = ("gate_up_proj", "down_proj")
DEFAULT_FP8_BLOCK = (128, 128)
_FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_PLAIN_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_SCALE_SUFFIXES = ("_scale_inv", "activation_scale", "input_scale", *(f".{s}" for s in PACKED_SUFFIXES[1:]))
_PACKED_KEY = ".weight_packed"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file, key and layer."""


class MissingShardError(CheckpointError, FileNotFoundError):
    """A safetensors shard listed by the checkpoint index does not exist."""


# --------------------------------------------------------------------------------------------------
# Checkpoint files and tensor headers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """Where a checkpoint tensor lives and what its header says (no data read)."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]


class SafetensorsCheckpoint:
    """The safetensors files of a local checkpoint directory and the header of every tensor.

    Only headers are read here. A shard named by ``model.safetensors.index.json`` but absent on disk,
    or a key the index places in a shard that does not contain it, raises ``MissingShardError``.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint path {str(self.directory)!r} is not a local directory")
        self.tensors: dict[str, TensorInfo] = {}
        for file, expected_keys in self._shards().items():
            self._read_header(file, expected_keys)

    def _shards(self) -> dict[Path, set[str] | None]:
        index_path = self.directory / SAFE_WEIGHTS_INDEX_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index_path}: not a safetensors index ({err})") from err
            shards: dict[Path, set[str] | None] = defaultdict(set)
            for key, file_name in weight_map.items():
                shards[self.directory / file_name].add(key)  # type: ignore[union-attr]
            for file, keys in shards.items():
                if not file.is_file():
                    example = sorted(keys or ())[0]
                    raise MissingShardError(
                        f"checkpoint shard {str(file)!r} listed in {index_path.name} is missing "
                        f"({len(keys or ())} tensors, e.g. {example!r})"
                    )
            return dict(shards)
        single = self.directory / SAFE_WEIGHTS_NAME
        if single.is_file():
            return {single: None}
        raise CheckpointError(
            f"no safetensors checkpoint in {str(self.directory)!r}: expected {SAFE_WEIGHTS_NAME} or "
            f"{SAFE_WEIGHTS_INDEX_NAME} (only local safetensors checkpoints are supported)"
        )

    def _read_header(self, file: Path, expected_keys: set[str] | None) -> None:
        try:
            with safe_open(file, framework="pt", device="cpu") as handle:
                keys = set(handle.keys())
                missing = (expected_keys or set()) - keys
                if missing:
                    raise MissingShardError(
                        f"checkpoint shard {str(file)!r} lacks {len(missing)} tensors that the index places "
                        f"there, e.g. {sorted(missing)[0]!r}"
                    )
                for key in keys if expected_keys is None else expected_keys:
                    view = handle.get_slice(key)
                    self.tensors[key] = TensorInfo(
                        file, key, _safetensors_dtype(view.get_dtype(), file, key), tuple(view.get_shape())
                    )
        except MissingShardError:
            raise
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"cannot read safetensors header of {str(file)!r}: {err}") from err


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


def _safetensors_dtype(name: str, file: Path, key: str) -> torch.dtype:
    dtype = _SAFETENSORS_DTYPES.get(name)
    if dtype is None:
        raise CheckpointError(f"{file}: tensor {key!r} has dtype {name}, which kt-sft cannot read")
    return dtype


# --------------------------------------------------------------------------------------------------
# Planning: which checkpoint tensors make up each expert parameter
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertSlice:
    """One checkpoint tensor that fills rows ``[slot*R, (slot+1)*R)`` of expert ``expert``."""

    tensor: TensorInfo
    scale: TensorInfo | None
    expert: int
    slot: int
    packed_shape: TensorInfo | None = None  # ``weight_shape`` of a packed int4 weight


@dataclass
class ExpertParamPlan:
    """How to assemble one fused expert parameter (``...experts.gate_up_proj`` or ``down_proj``)."""

    target: str
    shape: tuple[int, int, int]
    num_slots: int = 1
    fused: TensorInfo | None = None
    fused_scale: TensorInfo | None = None
    slices: list[ExpertSlice] = field(default_factory=list)


@dataclass
class ExpertLayerPlan:
    """Everything needed to read one experts module: its qualified name and its two parameters."""

    module_name: str
    gate_up: ExpertParamPlan
    down: ExpertParamPlan


def expert_target_shapes(module_name: str, experts: torch.nn.Module) -> dict[str, tuple[int, int, int]]:
    """``{qualified parameter name: shape}`` of an experts module (meta-device modules work)."""
    shapes: dict[str, tuple[int, int, int]] = {}
    for param_name in EXPERT_PARAM_NAMES:
        param = getattr(experts, param_name, None)
        if not isinstance(param, torch.Tensor) or param.dim() != 3:
            raise CheckpointError(
                f"experts module {module_name!r} ({type(experts).__name__}) has no 3-D {param_name!r} "
                "parameter; kt-sft loads gate_up_proj [E,2I,H] / down_proj [E,H,I] experts only"
            )
        shapes[f"{module_name}.{param_name}"] = tuple(param.shape)  # type: ignore[assignment]
    return shapes


class CheckpointKeyMapper:
    """Checkpoint key -> (model parameter name, matched converter) through transformers' own mapping.

    transformers' renamings and ``WeightConverter`` patterns are what ``from_pretrained`` applies; a
    few generic per-expert patterns follow them for families transformers ships no mapping for.
    """

    def __init__(self, model: torch.nn.Module, key_mapping: dict[str, str] | None):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(model, key_mapping=key_mapping, hf_quantizer=None)
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)] + _generic_converters()
        self.base_model_prefix = getattr(model, "base_model_prefix", None) or None

    def map(self, key: str, targets: dict[str, Any]) -> tuple[str, Any, str | None, str]:
        """``(parameter name, converter or None, matched source pattern or None, key after renames)``."""
        from transformers.core_model_loading import rename_source_key

        renamed, _ = rename_source_key(key, self.renamings, [])
        mapped, pattern = rename_source_key(renamed, [], self.converters, self.base_model_prefix, targets)
        converter = None
        if pattern is not None:
            converter = next(c for c in self.converters if pattern in c.source_patterns)
        return mapped, converter, pattern, renamed


def _generic_converters() -> list[Any]:
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    def gate_up(gate: str, up: str) -> Any:
        return WeightConverter(
            source_patterns=[f".experts.*.{gate}.weight$", f".experts.*.{up}.weight$"],
            target_patterns=".experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        )

    def down(name: str) -> Any:
        return WeightConverter(
            source_patterns=f".experts.*.{name}.weight$",
            target_patterns=".experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        )

    return [gate_up("gate_proj", "up_proj"), down("down_proj"), gate_up("w1", "w3"), down("w2")]


def _converter_slots(converter: Any, target: str) -> int:
    """How many row blocks per expert a converter concatenates; rejects op chains we do not stream."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(converter.operations)
    n = len(converter.source_patterns)
    if (
        ops
        and isinstance(ops[0], MergeModulelist)
        and ops[0].dim == 0
        and (
            (len(ops) == 1 and n == 1)
            or (len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim == 1)
        )
    ):
        return n
    names = [type(op).__name__ for op in ops]
    raise NotImplementedError(
        f"not implemented yet: streaming checkpoint conversion {names} into {target!r} "
        f"(sources {converter.source_patterns})"
    )


def _expert_index(pattern: str, key: str, target: str) -> int:
    core = pattern.removeprefix("^").removesuffix("$")
    before, star, after = core.partition("*")
    if not star:
        raise CheckpointError(f"converter pattern {pattern!r} for {target!r} has no expert wildcard")
    found = re.search(re.escape(before) + r"(\d+)" + re.escape(after), key)
    if found is None:
        raise CheckpointError(f"cannot read the expert index of checkpoint key {key!r} (pattern {pattern!r})")
    return int(found.group(1))


def scale_key_for(weight_key: str) -> str:
    """Block-scale key of a float8 weight (``a.weight_scale_inv``; ``a_scale_inv`` for a fused ``a``)."""
    if weight_key.endswith(".weight"):
        return weight_key[: -len("weight")] + "weight_scale_inv"
    return weight_key + "_scale_inv"


def plan_expert_layers(
    model: torch.nn.Module,
    experts_modules: Sequence[tuple[str, torch.nn.Module]],
    checkpoint: SafetensorsCheckpoint,
    *,
    key_mapping: dict[str, str] | None = None,
    int4_group_size: int | None = None,
) -> list[ExpertLayerPlan]:
    """Match checkpoint tensors to every experts module and check all shapes, reading no data.

    ``model`` is the full HF model (its experts may be on the meta device); ``experts_modules`` are
    the ``(qualified name, module)`` pairs to load. Raises ``CheckpointError`` naming the file, key
    and layer for a missing expert, a shape mismatch or an ambiguous layout.
    """
    shapes: dict[str, tuple[int, int, int]] = {}
    for name, module in experts_modules:
        shapes.update(expert_target_shapes(name, module))
    plans = {target: ExpertParamPlan(target, shape) for target, shape in shapes.items()}
    mapper = CheckpointKeyMapper(model, key_mapping)

    for key, info in checkpoint.tensors.items():
        if key.endswith(_SCALE_SUFFIXES):
            continue
        packed = key.endswith(_PACKED_KEY)
        # A packed weight is planned under the name of the weight it stands for (``....weight``).
        logical_key = key.removesuffix("_packed") if packed else key
        target, converter, pattern, renamed_key = mapper.map(logical_key, plans)
        plan = plans.get(target)
        if plan is None:
            continue
        if packed and int4_group_size is None:
            raise CheckpointError(
                f"{info.file.name}:{key!r} is a packed weight, but config.json has no compressed-tensors "
                "quantization_config"
            )
        scale = checkpoint.tensors.get(logical_key + "_scale" if packed else scale_key_for(key))
        if converter is None:
            if plan.fused is not None:
                raise CheckpointError(
                    f"{target}: two checkpoint tensors map to it: {plan.fused.key!r}, {key!r}"
                )
            plan.fused, plan.fused_scale = info, scale
            continue
        plan.num_slots = _converter_slots(converter, target)
        slot = converter.source_patterns.index(pattern)
        shape = checkpoint.tensors.get(logical_key + "_shape") if packed else None
        plan.slices.append(ExpertSlice(info, scale, _expert_index(pattern, renamed_key, target), slot, shape))

    for plan in plans.values():
        _validate_plan(plan, int4_group_size)
    return [
        ExpertLayerPlan(name, plans[f"{name}.gate_up_proj"], plans[f"{name}.down_proj"])
        for name, _ in experts_modules
    ]


def _validate_plan(plan: ExpertParamPlan, int4_group_size: int | None) -> None:
    num_experts, rows, cols = plan.shape
    if plan.fused is not None and plan.slices:
        raise CheckpointError(
            f"{plan.target}: the checkpoint has both the fused tensor {plan.fused.key!r} and per-expert "
            f"tensors such as {plan.slices[0].tensor.key!r}"
        )
    if plan.fused is not None:
        if plan.fused.dtype == torch.int32:
            raise NotImplementedError(
                f"not implemented yet: fused packed int4 expert tensor {plan.fused.key!r} (per-expert only)"
            )
        _check_shape(plan.fused, plan.shape, plan.target)
        _check_dtype_and_scale(plan.fused, plan.fused_scale, plan.target, fused_experts=num_experts)
        return
    if not plan.slices:
        raise CheckpointError(
            f"{plan.target}: no checkpoint tensor maps to this parameter (expected a fused tensor of shape "
            f"{list(plan.shape)} or per-expert tensors such as '...experts.0.gate_proj.weight')"
        )
    if rows % plan.num_slots:
        raise CheckpointError(f"{plan.target}: {rows} rows cannot be split into {plan.num_slots} parts")
    seen: dict[tuple[int, int], str] = {}
    if len({piece.tensor.dtype == torch.int32 for piece in plan.slices}) > 1:
        raise CheckpointError(f"{plan.target}: the checkpoint mixes packed int4 and unpacked expert weights")
    for piece in plan.slices:
        if not 0 <= piece.expert < num_experts:
            raise CheckpointError(
                f"{plan.target}: {piece.tensor.file.name}:{piece.tensor.key!r} is expert {piece.expert}, "
                f"but the model has {num_experts} experts"
            )
        previous = seen.setdefault((piece.slot, piece.expert), piece.tensor.key)
        if previous != piece.tensor.key:
            raise CheckpointError(f"{plan.target}: {previous!r} and {piece.tensor.key!r} fill the same rows")
        if piece.tensor.dtype == torch.int32:
            _check_packed(piece, (rows // plan.num_slots, cols), int4_group_size or 0, plan.target)
            continue
        _check_shape(piece.tensor, (rows // plan.num_slots, cols), plan.target)
        _check_dtype_and_scale(piece.tensor, piece.scale, plan.target, fused_experts=None)
    for slot in range(plan.num_slots):
        absent = [e for e in range(num_experts) if (slot, e) not in seen]
        if absent:
            raise CheckpointError(
                f"{plan.target}: the checkpoint lacks part {slot} of experts {absent[:8]}"
                f"{' ...' if len(absent) > 8 else ''} (found e.g. {plan.slices[0].tensor.key!r})"
            )


def _check_packed(piece: ExpertSlice, shape: tuple[int, int], group: int, target: str) -> None:
    """A compressed-tensors int4 expert slice: int32 [R, C/8] values and [R, C/group] scales."""
    rows, cols = shape
    info, scale = piece.tensor, piece.scale
    where = f"{info.file.name}:{info.key!r} (for {target})"
    if cols % 8 or tuple(info.shape) != (rows, cols // 8):
        raise CheckpointError(
            f"shape mismatch for {target}: {where} has shape {list(info.shape)}, 4-bit packing of the "
            f"model's {[rows, cols]} is {[rows, cols // 8]}"
        )
    for name, companion in (("_scale", scale), ("_shape", piece.packed_shape)):
        if companion is None:
            raise CheckpointError(f"{where} has no {info.key.removesuffix('_packed') + name!r}")
    assert scale is not None
    if cols % group or tuple(scale.shape) != (rows, cols // group):
        raise CheckpointError(
            f"{scale.file.name}:{scale.key!r} has shape {list(scale.shape)}; groups of {group} of a "
            f"{[rows, cols]} weight need {[rows, cols // group]}"
        )
    if scale.dtype not in _PLAIN_FLOAT_DTYPES:
        raise CheckpointError(f"{scale.file.name}:{scale.key!r} has dtype {scale.dtype}; expected a float")


def _check_shape(info: TensorInfo, expected: Sequence[int], target: str) -> None:
    if tuple(info.shape) != tuple(expected):
        raise CheckpointError(
            f"shape mismatch for {target}: {info.file.name}:{info.key!r} has shape {list(info.shape)}, "
            f"the model expects {list(expected)}"
        )


def _check_dtype_and_scale(
    info: TensorInfo, scale: TensorInfo | None, target: str, fused_experts: int | None
) -> None:
    where = f"{info.file.name}:{info.key!r} (for {target})"
    if info.dtype in _PLAIN_FLOAT_DTYPES:
        return
    if info.dtype not in _FLOAT8_DTYPES:
        raise NotImplementedError(f"not implemented yet: expert weights of dtype {info.dtype} in {where}")
    if scale is None:
        raise CheckpointError(
            f"{where} is {info.dtype} but the checkpoint has no {scale_key_for(info.key)!r}"
        )
    leading = () if fused_experts is None else (fused_experts,)
    if len(scale.shape) != len(leading) + 2 or tuple(scale.shape[: len(leading)]) != leading:
        raise CheckpointError(
            f"{scale.file.name}:{scale.key!r} has shape {list(scale.shape)}; expected "
            f"{[*leading, 'row blocks', 'col blocks']} block scales for {where}"
        )


# --------------------------------------------------------------------------------------------------
# Reading one layer
# --------------------------------------------------------------------------------------------------


@dataclass
class ExpertLayerWeights:
    """One experts module's weights in the kernel layout (CPU, contiguous): bf16 (fp32 where a quantized
    base is made from fp8/fp16/fp32 weights), or, for a packed int4 checkpoint, ``int4``: the kernels'
    int4 storage (gate_up q [E,2I,H/2] uint8, scale [E,2I,H/G] fp32, down q [E,H,I/2], scale [E,H,I/G])."""

    module_name: str
    gate_up: torch.Tensor | None  # [E, 2I, H]
    down: torch.Tensor | None  # [E, H, I]
    int4: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def dequantize_fp8_blocks(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_FP8_BLOCK,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``weight[i, j] * scale_inv[i // bm, j // bn]`` in fp32, rounded once to ``dtype`` (bf16).

    ``weight`` [R, C] float8 (last row/col blocks may be partial); ``scale_inv`` [ceil(R/bm), ceil(C/bn)].
    """
    rows, cols = weight.shape
    block_rows, block_cols = block
    grid = (math.ceil(rows / block_rows), math.ceil(cols / block_cols))
    if tuple(scale_inv.shape) != grid:
        raise CheckpointError(
            f"block scales of shape {list(scale_inv.shape)} do not match a {rows}x{cols} weight in "
            f"{block_rows}x{block_cols} blocks (expected {list(grid)})"
        )
    scales = scale_inv.to(torch.float32)
    scales = scales.repeat_interleave(block_rows, dim=0)[:rows].repeat_interleave(block_cols, dim=1)[:, :cols]
    return (weight.to(torch.float32) * scales).to(dtype)


class OpenShards:
    """safetensors handles for one layer, read with ``pread`` so no file pages stay mapped."""

    def __init__(self) -> None:
        self._handles: dict[Path, Any] = {}

    def get(self, info: TensorInfo) -> Any:
        handle = self._handles.get(info.file)
        if handle is None:
            if not info.file.is_file():
                raise MissingShardError(f"checkpoint shard {str(info.file)!r} disappeared while loading")
            handle = safe_open(info.file, framework="pt", device="cpu", backend="pread")
            handle.__enter__()
            self._handles[info.file] = handle
        return handle

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


def read_matrix(
    shards: OpenShards,
    info: TensorInfo,
    scale: TensorInfo | None,
    block: tuple[int, int],
    expert: int | None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """One [R, C] matrix in ``dtype``: a whole tensor, or row ``expert`` of a fused [E, R, C] tensor."""
    handle = shards.get(info)
    value = handle.get_tensor(info.key) if expert is None else handle.get_slice(info.key)[expert]
    if info.dtype in _FLOAT8_DTYPES:
        assert scale is not None  # checked by _check_dtype_and_scale
        scale_handle = shards.get(scale)
        scales = (
            scale_handle.get_tensor(scale.key)
            if expert is None
            else scale_handle.get_slice(scale.key)[expert]
        )
        try:
            return dequantize_fp8_blocks(value, scales, block, dtype)
        except CheckpointError as err:
            raise CheckpointError(f"{info.file.name}:{info.key!r}: {err}") from err
    return value.to(dtype)


def _staging_dtype(plan: ExpertParamPlan, quantized_base: bool) -> torch.dtype:
    # A quantized base is made from the checkpoint's exact values: fp8/fp16/fp32 go to the kernels'
    # quantizer in fp32 (no bf16 rounding first); bf16 stays bf16 (half the staging memory).
    sources = [plan.fused] if plan.fused is not None else [piece.tensor for piece in plan.slices]
    if quantized_base and any(info.dtype != torch.bfloat16 for info in sources if info is not None):
        return torch.float32
    return torch.bfloat16


class StagingBuffers:
    """The staging tensors of one parameter role ("gate_up", "down"), reused from layer to layer.

    A fresh tensor per layer costs a page fault per 4 KiB on first write, which took 6x the copy itself
    on the dev box; every layer of a model has the same shapes, so one buffer per role serves all.
    Holding one layer's staging at a time keeps the load peak at final + one layer. The consumers
    (the kernels' packing, the reference layer) copy what they keep.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buffer = self._buffers.get(role)
        if buffer is None or tuple(buffer.shape) != tuple(shape) or buffer.dtype != dtype:
            self._buffers.pop(role, None)  # drop the old one before the new one exists
            buffer = self._buffers[role] = torch.empty(shape, dtype=dtype)
        return buffer


def _fill_param(
    plan: ExpertParamPlan,
    shards: OpenShards,
    block: tuple[int, int],
    quantized_base: bool,
    staging: StagingBuffers,
    role: str,
) -> torch.Tensor:
    dtype = _staging_dtype(plan, quantized_base)
    out = staging.take(role, plan.shape, dtype)
    if plan.fused is not None:
        for expert in range(plan.shape[0]):
            out[expert].copy_(read_matrix(shards, plan.fused, plan.fused_scale, block, expert, dtype))
        return out
    rows = plan.shape[1] // plan.num_slots
    for piece in plan.slices:
        start = piece.slot * rows
        out[piece.expert, start : start + rows].copy_(
            read_matrix(shards, piece.tensor, piece.scale, block, None, dtype)
        )
    return out


def _fill_packed_int4(
    plan: ExpertParamPlan, shards: OpenShards, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed int4 parameter in the kernels' storage: (q uint8 [E, R, C/2], scale fp32 [E, R, C/G])."""
    num_experts, rows_all, cols = plan.shape
    q = torch.empty((num_experts, rows_all, cols // 2), dtype=torch.uint8)
    scale = torch.empty((num_experts, rows_all, cols // group), dtype=torch.float32)
    rows = rows_all // plan.num_slots
    for piece in plan.slices:
        assert piece.scale is not None and piece.packed_shape is not None  # checked by _check_packed
        shape_info = piece.packed_shape
        stored_shape = [int(v) for v in shards.get(shape_info).get_tensor(shape_info.key).tolist()]
        if stored_shape != [rows, cols]:
            raise CheckpointError(
                f"{shape_info.file.name}:{shape_info.key!r} is {stored_shape}, the model expects "
                f"{[rows, cols]}"
            )
        start = piece.slot * rows
        packed = shards.get(piece.tensor).get_tensor(piece.tensor.key)
        q[piece.expert, start : start + rows].copy_(packed_int4_to_kernel(packed, cols))
        scale[piece.expert, start : start + rows].copy_(shards.get(piece.scale).get_tensor(piece.scale.key))
    return q, scale


def is_packed_int4(plan: ExpertLayerPlan) -> bool:
    """True when the layer's experts are compressed-tensors packed int4 in the checkpoint."""
    return any(piece.tensor.dtype == torch.int32 for piece in plan.gate_up.slices)


def read_expert_layer(
    plan: ExpertLayerPlan,
    *,
    fp8_block: tuple[int, int] = DEFAULT_FP8_BLOCK,
    quantized_base: bool = False,
    int4_group_size: int | None = None,
    staging: StagingBuffers | None = None,
) -> ExpertLayerWeights:
    """Read and assemble one experts module. Peak extra host memory: this layer plus one expert slice.

    ``staging``: buffers kept from the previous layer to assemble this one in (the returned tensors are
    then those buffers: the caller copies what it keeps before the next layer is read).

    ``quantized_base``: the kernels will quantize these weights (int8/int4), so non-bf16 checkpoint
    values are staged in fp32. A packed int4 checkpoint layer comes back in ``int4`` (needs its group size).
    """
    shards = OpenShards()
    try:
        if is_packed_int4(plan):
            if int4_group_size is None:
                raise CheckpointError(
                    f"{plan.module_name}: packed int4 experts need the checkpoint's group size"
                )
            gate_up_q, gate_up_scale = _fill_packed_int4(plan.gate_up, shards, int4_group_size)
            down_q, down_scale = _fill_packed_int4(plan.down, shards, int4_group_size)
            return ExpertLayerWeights(
                plan.module_name, None, None, (gate_up_q, gate_up_scale, down_q, down_scale)
            )
        staging = StagingBuffers() if staging is None else staging
        gate_up = _fill_param(plan.gate_up, shards, fp8_block, quantized_base, staging, "gate_up")
        down = _fill_param(plan.down, shards, fp8_block, quantized_base, staging, "down")
    finally:
        shards.close()
    return ExpertLayerWeights(plan.module_name, gate_up, down)


def fp8_block_size(config: Any) -> tuple[int, int]:
    """The checkpoint's fp8 block shape from ``config.quantization_config`` (DeepSeek-V3: 128x128)."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return DEFAULT_FP8_BLOCK
    block = (
        quant.get("weight_block_size")
        if isinstance(quant, dict)
        else getattr(quant, "weight_block_size", None)
    )
    if block is None:
        return DEFAULT_FP8_BLOCK
    if len(block) != 2 or any(int(b) <= 0 for b in block):
        raise CheckpointError(f"quantization_config.weight_block_size={block!r} is not two positive sizes")
    return int(block[0]), int(block[1])
