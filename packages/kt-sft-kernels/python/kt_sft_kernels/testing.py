"""Float64 NumPy reference of the MoE math (DESIGN.md §2) and random test cases.

The reference computes in float64 from exactly the bf16 values the kernels see, and rounds to bf16
exactly where the kernels round (docs/kernels.md, "Rounding points"):

- R0  x is rounded to bf16 (a no-op for bf16 input); every use of x sees the rounded value.
- R1  gu = W_gu x + s_gu B_gu (A_gu x) is rounded to bf16 (it is cached in that form).
- R2  h = silu(g) * u is rounded to bf16 (the down GEMM operand, also used by A_d h and dA_d).
- R3  out is rounded once to its dtype.
- R4  grad_out is rounded to bf16 (a no-op for bf16 input); every use sees the rounded value.
- R5  dgu = [dg; du] is rounded to bf16 (the dx GEMM operand, also used by B_gu^T dgu and dB_gu).
- R6  grad_x, grad_weights and the LoRA gradients are rounded once to their dtypes.
LoRA intermediates (A_gu x, A_d h, B_d^T G, B_gu^T dgu) stay unrounded.

Needs NumPy and ml_dtypes (the test extra); importing kt_sft_kernels itself needs neither.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
F64 = np.float64


def round_bf16(a: np.ndarray) -> np.ndarray:
    """Round to the nearest bf16 (ties to even), returned as float64."""
    return np.asarray(a, dtype=np.float32).astype(BF16).astype(F64)


def as_f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(F64)


def cast_to(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 values rounded once to `dtype` (bf16 or float32), as float64."""
    return np.asarray(a, dtype=np.float32).astype(dtype).astype(F64)


def sigmoid(g: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * g))


@dataclass
class LoRAWeights:
    """LoRA arrays as the kernel receives them (f32 or bf16); a pair may be None."""

    a_gu: np.ndarray | None
    b_gu: np.ndarray | None
    a_d: np.ndarray | None
    b_d: np.ndarray | None
    scale_gu: float = 0.0
    scale_d: float = 0.0

    @property
    def dtype(self) -> np.dtype:
        first = self.a_gu if self.a_gu is not None else self.a_d
        assert first is not None
        return first.dtype


@dataclass
class MoECase:
    """One random problem: weights, inputs and the upstream gradient."""

    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    gate_up: np.ndarray  # [E, 2I, H] bf16
    down: np.ndarray  # [E, H, I] bf16
    x: np.ndarray  # [T, H] bf16 or f32
    ids: np.ndarray  # [T, k] i32 or i64
    weights: np.ndarray  # [T, k] f32 or bf16
    grad_out: np.ndarray  # [T, H] same dtype as x
    lora: LoRAWeights | None = None
    idle_experts: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return int(self.x.shape[0])


def make_case(
    *,
    tokens: int,
    num_experts: int = 8,
    top_k: int = 2,
    hidden: int = 96,
    intermediate: int = 160,
    rank_gu: int = 8,
    rank_d: int = 8,
    lora_dtype: Any = np.float32,
    x_dtype: Any = BF16,
    id_dtype: Any = np.int32,
    weight_dtype: Any = np.float32,
    idle_experts: int = 1,
    invalid_ids: int = 0,
    seed: int = 0,
) -> MoECase:
    """A random case. rank 0 = no LoRA on that projection. `idle_experts` experts get no token;
    `invalid_ids` routing slots get ids outside [0, E) (-1 and >= E alternately).

    Magnitudes: x ~ N(0, 1); W rows ~ N(0, 1/fan_in); A ~ N(0, 1/fan_in), B ~ N(0, 1/r) and the
    scales near 1, so that |s B A x| is of the order of |W x| and a dropped or mis-scaled LoRA
    cannot hide inside the tolerance.
    """
    rng = np.random.default_rng(seed)
    E, k, H, inter = num_experts, top_k, hidden, intermediate
    idle = (
        sorted(rng.choice(E, size=min(idle_experts, E - k), replace=False).tolist()) if idle_experts else []
    )
    busy = np.array([e for e in range(E) if e not in idle])
    if len(busy) < k:
        raise ValueError("make_case: need at least top_k experts that receive tokens")

    def normal(shape: tuple[int, ...], std: float, dtype: Any) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32).astype(dtype)

    gate_up = normal((E, 2 * inter, H), H**-0.5, BF16)
    down = normal((E, H, inter), inter**-0.5, BF16)
    x = normal((tokens, H), 1.0, x_dtype)
    ids = np.zeros((tokens, k), dtype=id_dtype)
    for t in range(tokens):
        ids[t] = rng.choice(busy, size=k, replace=False)
    if invalid_ids:
        slots = rng.choice(tokens * k, size=min(invalid_ids, tokens * k), replace=False)
        for n, s in enumerate(slots):
            ids.flat[s] = -1 if n % 2 == 0 else E + n
    weights = rng.uniform(0.1, 1.0, size=(tokens, k)).astype(np.float32).astype(weight_dtype)
    grad_out = normal((tokens, H), 1.0, x_dtype)
    lora = None
    if rank_gu or rank_d:
        lora = LoRAWeights(
            a_gu=normal((E, rank_gu, H), H**-0.5, lora_dtype) if rank_gu else None,
            b_gu=normal((E, 2 * inter, rank_gu), rank_gu**-0.5, lora_dtype) if rank_gu else None,
            a_d=normal((E, rank_d, inter), inter**-0.5, lora_dtype) if rank_d else None,
            b_d=normal((E, H, rank_d), rank_d**-0.5, lora_dtype) if rank_d else None,
            scale_gu=0.75 if rank_gu else 0.0,
            scale_d=1.25 if rank_d else 0.0,
        )
    return MoECase(E, k, H, inter, gate_up, down, x, ids, weights, grad_out, lora, idle)


# ---- quantized bases: the independent NumPy quantizer (docs/kernels.md, "Quantized bases") -------
#
# int8: per row, scale = fp32(max|w| / 127), q = round_half_even(fp32(w / scale)) in [-127, 127].
# int4: per group of G values along the row, scale = fp32(max|w_g| / 8), q likewise in [-8, 7];
#       packed two a byte, element k in byte k // 2, low nibble = even k, two's complement nibbles.
# Dequantized weight (RQ, the one rounding point of a quantized base): int8 fp32(q * scale), not
# rounded further (the amx tier multiplies the int8 values themselves: ADR 0603); int4
# bf16(fp32(q * scale)).


def _quantize(w: np.ndarray, group: int, divisor: int, qmin: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """q (int8, [..., N, K]) and fp32 scales [..., N, K // group] of w (any float dtype)."""
    w32 = np.asarray(w).astype(np.float32)
    grouped = w32.reshape(*w32.shape[:-1], w32.shape[-1] // group, group)
    scale = (np.max(np.abs(grouped), axis=-1) / np.float32(divisor)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))[..., None]
    with np.errstate(invalid="ignore"):
        ratio = (grouped / safe).astype(np.float32)
    q = np.where(scale[..., None] > 0, np.clip(np.rint(ratio), qmin, qmax), 0).astype(np.int8)
    return q.reshape(w32.shape), scale


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel int8: (q int8 [..., N, K], scale fp32 [..., N])."""
    q, scale = _quantize(w, np.asarray(w).shape[-1], 127, -127, 127)
    return q, scale[..., 0]


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int values in [-8, 7], [..., K] -> uint8 [..., K // 2] (low nibble = even k)."""
    nib = (np.asarray(q).astype(np.int16) & 0xF).astype(np.uint8)
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., K // 2] -> int8 [..., K] in [-8, 7]."""
    p = np.asarray(packed, dtype=np.uint8)
    lo = (p & 0xF).astype(np.int8)
    hi = (p >> 4).astype(np.int8)
    q = np.stack([lo, hi], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
    return np.where(q >= 8, q - 16, q).astype(np.int8)


def quantize_int4(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Group-wise int4 along the last axis: (packed uint8 [..., N, K // 2], scale fp32 [..., N, K // G])."""
    q, scale = _quantize(w, group_size, 8, -8, 7)
    return pack_int4(q), scale


def dequantize(q: np.ndarray, scale: np.ndarray, weight_dtype: str, group_size: int = 128) -> np.ndarray:
    """The dequantized weight (RQ): int8 (q int8, scale [..., N]) fp32(q * scale) as float32; int4
    (q packed uint8, scale [..., N, K // G]) bf16(fp32(q * scale)) as bf16."""
    s = np.asarray(scale).astype(np.float32)  # bf16 scales convert exactly
    if weight_dtype == "int8":
        return np.asarray(q).astype(np.float32) * s[..., None]
    product = unpack_int4(q).astype(np.float32) * np.repeat(s, group_size, axis=-1)
    return product.astype(np.float32).astype(BF16)


def quantize(w: np.ndarray, weight_dtype: str, group_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' quantization rule for one weight stack ([E, N, K])."""
    if weight_dtype == "int8":
        return quantize_int8(w)
    if weight_dtype == "int4":
        return quantize_int4(w, group_size)
    raise ValueError(f"quantize: weight_dtype must be 'int8' or 'int4', got {weight_dtype!r}")


def quantization_error(w: np.ndarray, weight_dtype: str, group_size: int = 128) -> float:
    """Relative Frobenius error of the dequantized weights against the original ones."""
    q, scale = quantize(w, weight_dtype, group_size)
    return rel_fro(dequantize(q, scale, weight_dtype, group_size), w)


def dequantized_case(case: MoECase, weight_dtype: str, group_size: int = 128) -> MoECase:
    """The case with its base weights replaced by their dequantized (RQ) values: the reference a
    quantized layer loaded with case.gate_up / case.down is checked against."""
    if weight_dtype == "bf16":
        return case
    out = copy.copy(case)
    out.gate_up = dequantize(*quantize(case.gate_up, weight_dtype, group_size), weight_dtype, group_size)
    out.down = dequantize(*quantize(case.down, weight_dtype, group_size), weight_dtype, group_size)
    return out


# ---- the reference -------------------------------------------------------------------------------


@dataclass
class ReferenceResult:
    out: np.ndarray  # [T, H] float64, rounded to out_dtype
    grad_x: np.ndarray  # [T, H]
    grad_weights: np.ndarray  # [T, k]
    lora_grads: dict[str, np.ndarray]  # da_gu, db_gu, da_d, db_d (present pairs only)


def _pairs_of(ids: np.ndarray, expert: int) -> tuple[np.ndarray, np.ndarray]:
    """(token, slot) of the pairs routed to `expert`, in (t, j) order: the kernel's sorted order."""
    t, j = np.nonzero(ids == expert)
    return t, j


def moe_reference(case: MoECase, *, out_dtype: Any = None, grad_dtype: Any = None) -> ReferenceResult:
    """Forward and backward of DESIGN.md §2 in float64 with the kernels' rounding points."""
    E, H, inter = case.num_experts, case.hidden, case.intermediate
    T, k = case.ids.shape
    out_dtype = np.dtype(out_dtype or case.x.dtype)
    grad_dtype = np.dtype(grad_dtype or case.x.dtype)
    lo = case.lora
    has_gu = lo is not None and lo.a_gu is not None
    has_d = lo is not None and lo.a_d is not None

    xb = round_bf16(as_f64(case.x))  # R0
    gb = round_bf16(as_f64(case.grad_out))  # R4
    w_all = as_f64(case.weights)
    out = np.zeros((T, H))
    grad_x = np.zeros((T, H))
    grad_w = np.zeros((T, k))
    grads: dict[str, np.ndarray] = {}
    if has_gu:
        grads["da_gu"] = np.zeros(lo.a_gu.shape)
        grads["db_gu"] = np.zeros(lo.b_gu.shape)
    if has_d:
        grads["da_d"] = np.zeros(lo.a_d.shape)
        grads["db_d"] = np.zeros(lo.b_d.shape)

    for e in range(E):
        t, j = _pairs_of(case.ids, e)
        if t.size == 0:
            continue
        x = xb[t]
        g_up = gb[t]
        w = w_all[t, j][:, None]
        w_gu = as_f64(case.gate_up[e])
        w_d = as_f64(case.down[e])
        gu = x @ w_gu.T
        if has_gu:
            a_gu, b_gu = as_f64(lo.a_gu[e]), as_f64(lo.b_gu[e])
            ax = x @ a_gu.T
            gu = gu + lo.scale_gu * (ax @ b_gu.T)
        gu = round_bf16(gu)  # R1
        g, u = gu[:, :inter], gu[:, inter:]
        sig = sigmoid(g)
        silu = g * sig
        h = round_bf16(silu * u)  # R2
        y = h @ w_d.T
        if has_d:
            a_d, b_d = as_f64(lo.a_d[e]), as_f64(lo.b_d[e])
            ad = h @ a_d.T
            y = y + lo.scale_d * (ad @ b_d.T)
        np.add.at(out, t, w * y)

        v = g_up @ w_d
        if has_d:
            bg = g_up @ b_d
            v = v + lo.scale_d * (bg @ a_d)
            grads["db_d"][e] = lo.scale_d * ((w * g_up).T @ ad)
            grads["da_d"][e] = lo.scale_d * ((w * bg).T @ h)
        grad_w[t, j] = np.sum(h * v, axis=1)
        dh = w * v
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        du = dh * silu
        dgu = round_bf16(np.concatenate([dg, du], axis=1))  # R5
        dx = dgu @ w_gu
        if has_gu:
            bgu = dgu @ b_gu
            dx = dx + lo.scale_gu * (bgu @ a_gu)
            grads["db_gu"][e] = lo.scale_gu * (dgu.T @ ax)
            grads["da_gu"][e] = lo.scale_gu * (bgu.T @ x)
        np.add.at(grad_x, t, dx)

    lora_dtype = lo.dtype if lo is not None else np.dtype(np.float32)
    return ReferenceResult(
        out=cast_to(out, out_dtype),  # R3
        grad_x=cast_to(grad_x, grad_dtype),  # R6
        grad_weights=cast_to(grad_w, case.weights.dtype),
        lora_grads={name: cast_to(g, lora_dtype) for name, g in grads.items()},
    )


# ---- running the kernels on a case ------------------------------------------------------------------


@dataclass
class KernelResult:
    out: np.ndarray
    grad_x: np.ndarray | None = None
    grad_weights: np.ndarray | None = None
    lora_grads: dict[str, np.ndarray] = field(default_factory=dict)


def nan_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An output buffer poisoned with NaN, so unwritten elements fail every comparison."""
    return np.full(shape, np.nan, dtype=np.float32).astype(dtype)


def build_layer(
    case: MoECase,
    pool: Any = None,
    *,
    separate_gate_up: bool = False,
    weight_dtype: str = "bf16",
    group_size: int = 128,
    numa_shards: int = 1,
) -> Any:
    """A layer loaded with the case's weights (quantized by the kernels for int8/int4)."""
    import kt_sft_kernels as kk

    cfg = kk.MoEConfig(
        num_experts=case.num_experts,
        top_k=case.top_k,
        hidden=case.hidden,
        intermediate=case.intermediate,
        weight_dtype=weight_dtype,
        group_size=group_size,
        numa_shards=numa_shards,
    )
    layer = kk.MoELayer(cfg, pool=pool)
    if separate_gate_up:
        inter = case.intermediate
        gate = np.ascontiguousarray(case.gate_up[:, :inter])
        up = np.ascontiguousarray(case.gate_up[:, inter:])
        layer.load_weights(gate=gate, up=up, down=case.down)
    else:
        layer.load_weights(gate_up=case.gate_up, down=case.down)
    return layer


def kernel_lora(case: MoECase) -> Any:
    import kt_sft_kernels as kk

    lo = case.lora
    if lo is None:
        return None
    return kk.LoRA(
        lo.a_gu,
        lo.b_gu,
        lo.a_d,
        lo.b_d,
        lo.scale_gu if lo.a_gu is not None else None,
        lo.scale_d if lo.a_d is not None else None,
    )


def run_kernels(
    layer: Any, case: MoECase, *, backward: bool = True, out_dtype: Any = None, grad_dtype: Any = None
) -> KernelResult:
    """forward (and backward) of the kernels on `case`, every output pre-filled with NaN."""
    T, H = case.x.shape
    out = nan_array((T, H), out_dtype or case.x.dtype)
    lora = kernel_lora(case)
    handle = layer.forward(case.x, case.ids, case.weights, out, lora=lora, save=backward)
    result = KernelResult(out=out)
    if backward:
        run_backward(layer, handle, case, result, grad_dtype=grad_dtype)
    return result


def run_backward(
    layer: Any, handle: Any, case: MoECase, result: KernelResult, *, grad_dtype: Any = None
) -> None:
    """backward of the kernels for the forward `handle` of `case`, into NaN-filled outputs on `result`."""
    import kt_sft_kernels as kk

    T, H = case.x.shape
    result.grad_x = nan_array((T, H), grad_dtype or case.x.dtype)
    result.grad_weights = nan_array(case.weights.shape, case.weights.dtype)
    grads = None
    lo = case.lora
    if lo is not None:
        for name, like in (("da_gu", lo.a_gu), ("db_gu", lo.b_gu), ("da_d", lo.a_d), ("db_d", lo.b_d)):
            if like is not None:
                result.lora_grads[name] = nan_array(like.shape, like.dtype)
        grads = kk.LoRAGrads(**result.lora_grads)
    layer.backward(handle, case.grad_out, result.grad_x, result.grad_weights, lora_grads=grads)


# ---- error measures (DESIGN.md §7) ------------------------------------------------------------------


def rel_fro(got: np.ndarray, ref: np.ndarray) -> float:
    """||got - ref|| / ||ref|| (Frobenius); inf if got has non-finite values."""
    got, ref = as_f64(got), as_f64(ref)
    if not np.all(np.isfinite(got)):
        return float("inf")
    denom = np.linalg.norm(ref)
    diff = np.linalg.norm(got - ref)
    if denom == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return float(diff / denom)


def max_rel_rows(got: np.ndarray, ref: np.ndarray, axis_items: int = 0) -> float:
    """max over slices along axis 0 (rows, or experts) of the slice's relative Frobenius error.
    A slice whose reference is exactly zero must be exactly zero."""
    got, ref = as_f64(got), as_f64(ref)
    worst = 0.0
    for n in range(got.shape[axis_items]):
        worst = max(worst, rel_fro(got[n], ref[n]))
    return worst


def assert_results_close(got: KernelResult, base: KernelResult, bound: float, label: str) -> None:
    """Every array of `got` (output, grad_x, grad_weights, each LoRA grad) within `bound` relative
    Frobenius error of `base`; the message names the array and `label` (e.g. "amx vs portable")."""
    for name in ("out", "grad_x", "grad_weights"):
        err = rel_fro(getattr(got, name), getattr(base, name))
        assert err <= bound, f"{name}: {label} relative error {err:.3g} > {bound:g}"
    for name in base.lora_grads:
        err = rel_fro(got.lora_grads[name], base.lora_grads[name])
        assert err <= bound, f"{name}: {label} relative error {err:.3g} > {bound:g}"


def result_bytes(res: KernelResult) -> list[bytes]:
    """The raw bytes of every array of a result, for bitwise comparisons."""
    arrays = [res.out, res.grad_x, res.grad_weights, *(res.lora_grads[n] for n in sorted(res.lora_grads))]
    return [np.ascontiguousarray(a).tobytes() for a in arrays]


def tier_names() -> list[str]:
    """Every tier this host runs, the avx512_bf16 tier once per kernel variant ("avx512_bf16/bf16dot")."""
    from . import isa_names, isa_supported, kernel_variant_names

    return [
        f"{t}/{v}" if t == "avx512_bf16" else t
        for t in isa_names()
        if isa_supported(t)
        for v in (kernel_variant_names() if t == "avx512_bf16" else [""])
    ]


def tier_environment(name: str) -> dict[str, str]:
    """The environment that makes a new process start on tier `name` ("tier" or "tier/variant")."""
    isa, _, variant = name.partition("/")
    return {"KT_SFT_MAX_ISA": isa} | ({"KT_SFT_KERNEL_VARIANT": variant} if variant else {})


@contextmanager
def tier(name: str) -> Iterator[None]:
    """Runs the block with the kernels capped at ISA tier `name` ("tier" or "tier/variant"; it must be
    the active one), then lifts the cap (and the variant choice, where it made one) again."""
    from . import active_isa, kernel_variant, set_kernel_variant, set_max_isa

    isa, _, variant = name.partition("/")
    set_max_isa(isa)
    if variant:
        set_kernel_variant(variant)
    try:
        assert active_isa() == isa
        assert not variant or kernel_variant() == variant
        yield
    finally:
        set_max_isa(None)
        if variant:
            set_kernel_variant(None)
