"""Quantized frozen expert bases on the training side: group sizes, the kernels' int8/int4 storage in
torch terms, and checkpoints that ship int4 (compressed-tensors "pack-quantized").

The kernels' storage (kt_sft_kernels docs/kernels.md, "Quantized bases"): int8 q [E, N, K] with one
fp32 scale per output row [E, N]; int4 q packed two a byte [E, N, K/2] (element k in byte k // 2, low
nibble = even k, two's-complement nibbles in [-8, 7]) with scales [E, N, K/G]. The kernels compute with
bf16(fp32(q * scale)) (their rounding point RQ, docs/kernels.md); fp32(q * scale) itself is exact (a 4- or
8-bit integer times a bf16/fp32 scale).

compressed-tensors "pack-quantized" (docs/design/0602-quantized-checkpoints.md): per weight
``<name>.weight_packed`` int32 [N, ceil(K*bits/32)], ``<name>.weight_scale`` [N, K/G] and
``<name>.weight_shape`` [2]; 4-bit values are stored with an offset of 8 (nibble u means u - 8),
element k at bits 4*(k % 8) of word k // 8. On a little-endian host the int32 words, viewed as bytes,
put element k in byte k // 2, low nibble for even k — our layout; u - 8 in two's complement is u ^ 8,
so the conversion is one XOR with 0x88 per byte: bit-exact, no arithmetic on the values.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from .config import GROUP_SIZES

PACKED_SUFFIXES = (
    "weight_packed",
    "weight_scale",
    "weight_shape",
    "weight_zero_point",
    "weight_global_scale",
)


class QuantizedCheckpointError(ValueError):
    """A quantized checkpoint (or its quantization_config) kt-sft cannot take as asked."""


def effective_group_size(group_size: int | None, hidden: int, intermediate: int) -> int:
    """The int4 group size: the given one, or the largest of 128/64/32 dividing hidden and intermediate."""
    if group_size is not None:
        return group_size
    for candidate in sorted(GROUP_SIZES, reverse=True):
        if hidden % candidate == 0 and intermediate % candidate == 0:
            return candidate
    raise QuantizedCheckpointError(
        f"int4 experts need hidden ({hidden}) and intermediate ({intermediate}) to be multiples of a group "
        f"size in {list(GROUP_SIZES)}; use weight_dtype='int8' or 'bf16'"
    )


def storage_layout(
    weight_dtype: str, experts: int, hidden: int, intermediate: int, group: int | None
) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of gate_up_q, gate_up_scale, down_q, down_scale in the kernels' int8 / int4 storage."""
    layout: list[tuple[tuple[int, ...], torch.dtype]] = []
    for rows, cols in ((2 * intermediate, hidden), (hidden, intermediate)):
        if weight_dtype == "int8":
            layout += [((experts, rows, cols), torch.int8), ((experts, rows), torch.float32)]
        else:
            assert group is not None
            layout += [
                ((experts, rows, cols // 2), torch.uint8),
                ((experts, rows, cols // group), torch.float32),
            ]
    return layout


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Our int4 packing uint8 [..., K/2] -> int8 values [..., K] in [-8, 7]."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    values = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return torch.where(values >= 8, values - 16, values)


def kernel_weights(q: torch.Tensor, scale: torch.Tensor, weight_dtype: str) -> torch.Tensor:
    """The weights the kernels compute with (rounding point RQ, ADR 0603): int8 fp32(q * scale)
    unrounded (float32), int4 bf16(fp32(q * scale)) (bfloat16)."""
    weights = dequantize(q, scale, weight_dtype)
    return weights if weight_dtype == "int8" else weights.to(torch.bfloat16)


def dequantize(q: torch.Tensor, scale: torch.Tensor, weight_dtype: str) -> torch.Tensor:
    """fp32(q * scale) of the kernels' int8 (q [..., N, K], scale [..., N]) or int4 storage
    (q [..., N, K/2], scale [..., N, K/G])."""
    scale32 = scale.to(torch.float32)
    if weight_dtype == "int8":
        return q.to(torch.float32) * scale32.unsqueeze(-1)
    if weight_dtype != "int4":
        raise ValueError(f"dequantize: weight_dtype must be 'int8' or 'int4', got {weight_dtype!r}")
    values = unpack_int4(q).to(torch.float32)
    group = values.shape[-1] // scale32.shape[-1]
    return values * scale32.repeat_interleave(group, dim=-1)


# -- compressed-tensors pack-quantized -----------------------------------------------------------------


@dataclass(frozen=True)
class PackQuantizedScheme:
    """The one compressed-tensors weight scheme kt-sft streams: int4, symmetric, group-wise."""

    group_size: int
    ignore: tuple[str, ...]


def quant_method(config: Any) -> str | None:
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method))


def pack_quantized_scheme(config: Any) -> PackQuantizedScheme | None:
    """The checkpoint's compressed-tensors int4 scheme, None for other checkpoints; unsupported variants
    (other bit widths, asymmetric, per-channel, activation quantization, several schemes) raise."""
    if quant_method(config) != "compressed-tensors":
        return None
    quant = config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    where = "config.json quantization_config (compressed-tensors)"
    fmt = quant.get("format")
    groups = quant.get("config_groups") or {}
    if fmt != "pack-quantized":
        raise NotImplementedError(
            f"not implemented yet: {where} format {fmt!r} (kt-sft reads 'pack-quantized')"
        )
    if len(groups) != 1:
        raise NotImplementedError(
            f"not implemented yet: {where} with {len(groups)} config_groups (expected one)"
        )
    scheme = next(iter(groups.values()))
    weights = scheme.get("weights") or {}
    wanted = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
    different = {k: weights.get(k) for k, v in wanted.items() if weights.get(k) != v}
    if different or scheme.get("input_activations"):
        raise NotImplementedError(
            f"not implemented yet: {where} weights {different or weights} / input_activations "
            f"{scheme.get('input_activations')} (kt-sft reads symmetric int4 group-wise weights only)"
        )
    group = weights.get("group_size")
    if group not in GROUP_SIZES:
        raise NotImplementedError(
            f"not implemented yet: {where} group_size={group!r} (the kernels take {list(GROUP_SIZES)})"
        )
    return PackQuantizedScheme(int(group), tuple(quant.get("ignore") or ()))


def packed_int4_to_kernel(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """compressed-tensors int32 [N, K/8] (4-bit, offset 8) -> our int4 packing uint8 [N, K/2], bit-exact."""
    if sys.byteorder != "little":
        raise NotImplementedError("not implemented yet: compressed-tensors int4 on a big-endian host")
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise QuantizedCheckpointError(
            f"weight_packed must be 2-D int32, got {packed.dtype} {list(packed.shape)}"
        )
    if columns % 8 or packed.shape[1] != columns // 8:
        raise QuantizedCheckpointError(
            f"weight_packed of shape {list(packed.shape)} does not hold {columns} 4-bit columns"
        )
    as_bytes = packed.contiguous().view(torch.uint8)  # [N, K/2]: little-endian words, element k in byte k//2
    return torch.bitwise_xor(as_bytes, 0x88)
