"""Frozen quantized bases (int8, int4; issue 11) on every tier this host runs.

The reference is testing.moe_reference on the DEQUANTIZED weights (testing.dequantized_case: the
independent NumPy quantizer of testing.py), with the kernels' bf16 rounding points. Bounds (DESIGN.md §7):
int8 forward <= 2e-2, every gradient <= 3e-2; int4 3e-2 / 4e-2 (relative Frobenius), and per token row /
per expert slice at the bf16 tests' ratios (x3 for the output, x1.5 for gradients).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import kt_sft_kernels as kk
import numpy as np
import pytest
from kt_sft_kernels import testing as kt
from kt_sft_kernels.testing import tier

TIERS = kt.tier_names()  # the avx512_bf16 tier once per kernel variant
SIMD_TIERS = [t for t in TIERS if t != "portable"]
BF16 = kt.BF16
F32 = np.dtype(np.float32)
POOL = kk.ThreadPool(threads=2)

# weight dtype -> (forward bound, gradient bound)
BOUNDS = {"int8": (2e-2, 3e-2), "int4": (3e-2, 4e-2)}


@dataclass(frozen=True)
class QShape:
    weight_dtype: str
    group_size: int
    tokens: int
    experts: int
    k: int
    hidden: int
    intermediate: int
    rank_gu: int
    rank_d: int
    lora_dtype: Any = F32
    x_dtype: Any = BF16
    idle: int = 1
    invalid: int = 0

    def case(self) -> kt.MoECase:
        return kt.make_case(
            tokens=self.tokens,
            num_experts=self.experts,
            top_k=self.k,
            hidden=self.hidden,
            intermediate=self.intermediate,
            rank_gu=self.rank_gu,
            rank_d=self.rank_d,
            lora_dtype=self.lora_dtype,
            x_dtype=self.x_dtype,
            idle_experts=self.idle,
            invalid_ids=self.invalid,
            seed=zlib.crc32(str(self).encode()),
        )

    def __str__(self) -> str:
        lora = "frozen" if not (self.rank_gu or self.rank_d) else f"r{self.rank_gu}-{self.rank_d}"
        lora += "" if lora == "frozen" else f"-{np.dtype(self.lora_dtype).name}"
        return (
            f"{self.weight_dtype}g{self.group_size}-T{self.tokens}-E{self.experts}-k{self.k}"
            f"-H{self.hidden}-I{self.intermediate}-{lora}-x{np.dtype(self.x_dtype).name}"
        )


SHAPES = [
    QShape("int8", 128, 1, 4, 1, 96, 160, 8, 8),
    QShape("int8", 128, 15, 12, 8, 160, 96, 16, 8, BF16, F32, idle=3, invalid=3),
    QShape("int8", 128, 16, 6, 1, 96, 160, 0, 0, idle=2),  # frozen experts, k = 1
    QShape("int8", 128, 17, 10, 8, 96, 160, 8, 0, BF16, BF16, idle=2),
    QShape("int8", 128, 33, 8, 2, 224, 160, 0, 16, F32, BF16, idle=1, invalid=2),
    QShape("int8", 128, 200, 8, 2, 96, 160, 16, 16, BF16, BF16, idle=1),
    QShape("int4", 32, 1, 4, 1, 96, 160, 8, 8),
    QShape("int4", 32, 15, 12, 8, 160, 96, 16, 8, BF16, F32, idle=3, invalid=3),
    QShape("int4", 32, 16, 6, 1, 96, 160, 0, 0, idle=2),  # frozen experts, k = 1
    QShape("int4", 64, 17, 10, 8, 128, 192, 8, 16, BF16, BF16, idle=2),
    QShape("int4", 64, 33, 8, 2, 192, 128, 0, 0, F32, F32, idle=1, invalid=2),  # frozen
    QShape("int4", 128, 33, 8, 2, 128, 256, 16, 8, F32, BF16, idle=1),
    QShape("int4", 128, 200, 8, 2, 256, 128, 16, 16, BF16, BF16, idle=1),
]


def check_quantized(
    res: kt.KernelResult, ref: kt.ReferenceResult, case: kt.MoECase, weight_dtype: str
) -> None:
    fwd, grad = BOUNDS[weight_dtype]
    checks = {"out": (res.out, ref.out, fwd, 3 * fwd), "grad_x": (res.grad_x, ref.grad_x, grad, 1.5 * grad)}
    for name, (got, want, bound, row_bound) in checks.items():
        fro = kt.rel_fro(got, want)
        assert fro <= bound, f"{name}: relative Frobenius error {fro:.3g} > {bound}"
        rows = kt.max_rel_rows(got, want)
        assert rows <= row_bound, f"{name}: worst token row relative error {rows:.3g} > {row_bound}"
    gw = kt.rel_fro(res.grad_weights, ref.grad_weights)
    assert gw <= grad, f"grad_weights: relative Frobenius error {gw:.3g} > {grad}"
    skipped = (case.ids < 0) | (case.ids >= case.num_experts)
    assert np.all(kt.as_f64(res.grad_weights)[skipped] == 0.0)
    assert set(res.lora_grads) == set(ref.lora_grads)
    for name, got in res.lora_grads.items():
        want = ref.lora_grads[name]
        fro = kt.rel_fro(got, want)
        assert fro <= grad, f"{name}: relative Frobenius error {fro:.3g} > {grad}"
        per_expert = kt.max_rel_rows(got, want)
        assert per_expert <= 1.5 * grad, f"{name}: worst expert slice error {per_expert:.3g} > {1.5 * grad}"
        for e in case.idle_experts:
            assert np.all(kt.as_f64(got[e]) == 0.0), f"{name}[{e}]: expert without tokens must be exactly 0"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("isa", TIERS)
def test_quantized_forward_backward_match_dequantized_reference(isa: str, shape: QShape) -> None:
    case = shape.case()
    with tier(isa):
        layer = kt.build_layer(case, POOL, weight_dtype=shape.weight_dtype, group_size=shape.group_size)
        res = kt.run_kernels(layer, case)
    ref = kt.moe_reference(kt.dequantized_case(case, shape.weight_dtype, shape.group_size))
    check_quantized(res, ref, case, shape.weight_dtype)


@pytest.mark.parametrize(("weight_dtype", "group_size"), [("int8", 128), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("isa", SIMD_TIERS)
def test_quantized_tier_matches_portable(isa: str, weight_dtype: str, group_size: int) -> None:
    """Same rounding points on every tier: within 2e-3 of portable (DESIGN.md §7)."""
    case = kt.make_case(
        tokens=70,
        num_experts=6,
        top_k=2,
        hidden=256,
        intermediate=128,
        rank_gu=16,
        rank_d=8,
        invalid_ids=3,
        seed=11,
    )
    results = {}
    for name in ("portable", isa):
        with tier(name):
            layer = kt.build_layer(case, POOL, weight_dtype=weight_dtype, group_size=group_size)
            results[name] = kt.run_kernels(layer, case)
    kt.assert_results_close(results[isa], results["portable"], 2e-3, f"{isa} vs portable")


@pytest.mark.parametrize(("weight_dtype", "group_size"), [("int8", 128), ("int4", 64)])
@pytest.mark.parametrize("isa", TIERS)
def test_quantized_bitwise_deterministic_across_threads(isa: str, weight_dtype: str, group_size: int) -> None:
    case = kt.make_case(
        tokens=90,
        num_experts=6,
        top_k=4,
        hidden=128,
        intermediate=192,
        rank_gu=8,
        rank_d=16,
        lora_dtype=BF16,
        seed=5,
    )
    with tier(isa):
        runs = [
            kt.result_bytes(
                kt.run_kernels(
                    kt.build_layer(
                        case, kk.ThreadPool(threads=n), weight_dtype=weight_dtype, group_size=group_size
                    ),
                    case,
                )
            )
            for n in (1, 2, 3, 2)
        ]
    assert all(r == runs[0] for r in runs[1:])


# ---- the quantizer: one rule, the same bits in NumPy and in the kernels ---------------------------


def quant_outputs(cfg: Any) -> tuple[np.ndarray, ...]:
    E, H, inter = cfg.num_experts, cfg.hidden, cfg.intermediate
    if cfg.weight_dtype == "int8":
        return (
            np.zeros((E, 2 * inter, H), np.int8),
            np.full((E, 2 * inter), np.nan, np.float32),
            np.zeros((E, H, inter), np.int8),
            np.full((E, H), np.nan, np.float32),
        )
    g = cfg.group_size
    return (
        np.zeros((E, 2 * inter, H // 2), np.uint8),
        np.full((E, 2 * inter, H // g), np.nan, np.float32),
        np.zeros((E, H, inter // 2), np.uint8),
        np.full((E, H, inter // g), np.nan, np.float32),
    )


def read_back(layer: Any) -> tuple[np.ndarray, ...]:
    outs = quant_outputs(layer.config)
    layer.read_quantized(*outs)
    return outs


def make_cfg(
    weight_dtype: str, group_size: int = 128, *, experts: int = 3, hidden: int = 128, intermediate: int = 256
) -> Any:
    return kk.MoEConfig(
        num_experts=experts,
        top_k=2,
        hidden=hidden,
        intermediate=intermediate,
        weight_dtype=weight_dtype,
        group_size=group_size,
    )


@pytest.mark.parametrize("source", [BF16, F32])
@pytest.mark.parametrize(
    ("weight_dtype", "group_size"), [("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128)]
)
def test_kernel_quantizer_equals_numpy_quantizer(weight_dtype: str, group_size: int, source: Any) -> None:
    """load_weights quantizes bf16 and fp32 sources bit-exactly as testing.quantize does, for both
    overloads (gate_up, or gate and up)."""
    rng = np.random.default_rng(7)
    cfg = make_cfg(weight_dtype, group_size)
    E, H, inter = cfg.num_experts, cfg.hidden, cfg.intermediate
    gate_up = (rng.standard_normal((E, 2 * inter, H)) * H**-0.5).astype(np.float32).astype(source)
    down = (rng.standard_normal((E, H, inter)) * inter**-0.5).astype(np.float32).astype(source)
    gate_up[0, 3] = 0  # an all-zero row (scale 0)
    want = (*kt.quantize(gate_up, weight_dtype, group_size), *kt.quantize(down, weight_dtype, group_size))
    for separate in (False, True):
        layer = kk.MoELayer(cfg, pool=POOL)
        if separate:
            layer.load_weights(
                gate=np.ascontiguousarray(gate_up[:, :inter]),
                up=np.ascontiguousarray(gate_up[:, inter:]),
                down=down,
            )
        else:
            layer.load_weights(gate_up=gate_up, down=down)
        for got, exp, name in zip(
            read_back(layer), want, ("gate_up_q", "gate_up_scale", "down_q", "down_scale"), strict=True
        ):
            np.testing.assert_array_equal(got, exp, err_msg=name)


def test_quantization_error_is_bounded() -> None:
    """The quantization itself (dequantized vs original), for weights of the tests' magnitudes."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((4, 256, 512)) * 512**-0.5).astype(np.float32).astype(BF16)
    errors = {
        "int8": kt.quantization_error(w, "int8"),
        "int4 g32": kt.quantization_error(w, "int4", 32),
        "int4 g64": kt.quantization_error(w, "int4", 64),
        "int4 g128": kt.quantization_error(w, "int4", 128),
    }
    print("quantization error (relative Frobenius):", {k: f"{v:.4f}" for k, v in errors.items()})
    assert errors["int8"] <= 1e-2
    assert errors["int4 g64"] <= 1e-1
    assert errors["int4 g32"] < errors["int4 g64"] < errors["int4 g128"]  # finer groups, smaller error


@pytest.mark.parametrize("scale_dtype", [F32, BF16])
@pytest.mark.parametrize(("weight_dtype", "group_size"), [("int8", 128), ("int4", 32), ("int4", 128)])
def test_load_quantized_is_bit_exact(weight_dtype: str, group_size: int, scale_dtype: Any) -> None:
    """Pre-quantized values (int4 over the full [-8, 7], int8 over [-127, 127]) and scales load as they
    are: read back bit-exactly, and the layer computes with exactly their dequantized values."""
    case = kt.make_case(
        tokens=33, num_experts=4, top_k=2, hidden=128, intermediate=256, rank_gu=8, rank_d=8, seed=9
    )
    cfg = make_cfg(weight_dtype, group_size, experts=4, hidden=128, intermediate=256)
    rng = np.random.default_rng(1)
    arrays = []
    for rows, cols in ((2 * case.intermediate, case.hidden), (case.hidden, case.intermediate)):
        shape = (case.num_experts, rows, cols)
        if weight_dtype == "int8":
            q = rng.integers(-127, 128, size=shape).astype(np.int8)
            scale = (rng.uniform(0.5, 1.5, size=shape[:2]) / (127 * np.sqrt(cols))).astype(np.float32)
        else:
            q = kt.pack_int4(rng.integers(-8, 8, size=shape))
            scale = rng.uniform(0.5, 1.5, size=(*shape[:2], cols // group_size)) / (7 * np.sqrt(cols))
            scale = scale.astype(np.float32)
        arrays += [q, scale.astype(scale_dtype)]
    layer = kk.MoELayer(cfg, pool=POOL)
    layer.load_quantized(*arrays)
    for got, given in zip(read_back(layer), arrays, strict=True):
        np.testing.assert_array_equal(got, np.asarray(given).astype(got.dtype))
    deq = (
        kt.dequantize(arrays[0], arrays[1], weight_dtype, group_size),
        kt.dequantize(arrays[2], arrays[3], weight_dtype, group_size),
    )
    ref_case = kt.dequantized_case(case, "bf16")
    ref_case = kt.MoECase(**{**ref_case.__dict__, "gate_up": deq[0], "down": deq[1]})
    res = kt.run_kernels(layer, case)
    check_quantized(res, kt.moe_reference(ref_case), case, weight_dtype)
    # After a call the active tier may hold the values in its own order (amx int8: tiles).
    for got, given in zip(read_back(layer), arrays, strict=True):
        np.testing.assert_array_equal(got, np.asarray(given).astype(got.dtype))


@pytest.mark.parametrize(("weight_dtype", "group_size"), [("int8", 128), ("int4", 32)])
def test_one_layer_on_every_tier_in_turn(weight_dtype: str, group_size: int) -> None:
    """A tier that reads the values in its own order (amx int8) re-orders them when it becomes active,
    and back for the others: one layer run at every tier in turn gives, at each, the bits of a layer
    loaded at that tier, and reads back what was loaded."""
    case = kt.make_case(  # 160 and 96 columns: 64-column tiles and a 32-column tail
        tokens=40, num_experts=4, top_k=2, hidden=160, intermediate=96, rank_gu=8, rank_d=8, seed=21
    )
    layer = kt.build_layer(case, POOL, weight_dtype=weight_dtype, group_size=group_size)
    loaded = read_back(layer)
    for name in TIERS + TIERS[::-1]:
        with tier(name):
            fresh = kt.build_layer(case, POOL, weight_dtype=weight_dtype, group_size=group_size)
            want = kt.result_bytes(kt.run_kernels(fresh, case))
            assert kt.result_bytes(kt.run_kernels(layer, case)) == want, f"{name}: differs from a fresh layer"
    for got, given in zip(read_back(layer), loaded, strict=True):
        np.testing.assert_array_equal(got, given)


@pytest.mark.skipif(not kk.isa_supported("avx512_bf16"), reason="needs the avx512_bf16 tier")
@pytest.mark.parametrize(("weight_dtype", "group_size"), [("int8", 128), ("int4", 64)])
def test_kernel_variant_switch_reaches_quantized_products(weight_dtype: str, group_size: int) -> None:
    """avx512_bf16's variants have their own quantized products (bf16dot: VDPBF16PS panels, ADR 0902),
    so switching the variant between calls must switch them too, in either order: "fma" is the avx512
    tier's table, bit for bit, and "bf16dot" sums in another order, so its bits differ from it."""
    case = kt.make_case(
        tokens=64, num_experts=4, top_k=2, hidden=256, intermediate=128, rank_gu=8, rank_d=8, seed=23
    )

    def bits(name: str) -> list[bytes]:
        with tier(name):
            layer = kt.build_layer(case, POOL, weight_dtype=weight_dtype, group_size=group_size)
            return kt.result_bytes(kt.run_kernels(layer, case))

    avx512 = bits("avx512")
    for order in (("bf16dot", "fma"), ("fma", "bf16dot")):
        got = {v: bits(f"avx512_bf16/{v}") for v in order}
        assert got["fma"] == avx512, f"{order}: the fma variant does not run the avx512 tier's products"
        assert got["bf16dot"] != avx512, f"{order}: the bf16dot variant runs the fma variant's products"


def test_load_weights_equals_load_quantized_of_the_same_values() -> None:
    """Quantizing in the kernel and loading NumPy's quantization give bitwise the same results."""
    case = kt.make_case(
        tokens=40, num_experts=4, top_k=2, hidden=128, intermediate=192, rank_gu=8, rank_d=8, seed=4
    )
    for weight_dtype, group_size in (("int8", 128), ("int4", 64)):
        a = kt.build_layer(case, POOL, weight_dtype=weight_dtype, group_size=group_size)
        b = kk.MoELayer(a.config, pool=POOL)
        b.load_quantized(
            *kt.quantize(case.gate_up, weight_dtype, group_size),
            *kt.quantize(case.down, weight_dtype, group_size),
        )
        assert kt.result_bytes(kt.run_kernels(a, case)) == kt.result_bytes(kt.run_kernels(b, case))


# ---- memory ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight_dtype", "per_param", "scale_per_param"),
    [("bf16", 2.0, 0.0), ("int8", 1.0, None), ("int4", 0.5, 4 / 64)],
)
def test_host_bytes_per_expert_parameter(
    weight_dtype: str, per_param: float, scale_per_param: float | None
) -> None:
    """memory_report: weights 2 / 1 / 0.5 bytes per expert parameter (+ fp32 scales), and nothing else
    of the layer grows with E*H*I: layers with 4 and 8 experts run on the same tokens (routed to experts
    0..3) differ only in weights and scales."""
    tokens = kt.make_case(
        tokens=64,
        num_experts=4,
        top_k=2,
        hidden=256,
        intermediate=128,
        rank_gu=0,
        rank_d=0,
        idle_experts=0,
        seed=2,
    )
    reports = []
    for experts in (4, 8):
        case = kt.make_case(
            tokens=64, num_experts=experts, top_k=2, hidden=256, intermediate=128, rank_gu=0, rank_d=0, seed=3
        )
        case.x, case.ids, case.weights, case.grad_out = tokens.x, tokens.ids, tokens.weights, tokens.grad_out
        layer = kt.build_layer(case, kk.ThreadPool(threads=2), weight_dtype=weight_dtype, group_size=64)
        kt.run_kernels(layer, case)
        report = layer.memory_report()
        params = experts * 3 * case.hidden * case.intermediate
        assert report["weights"] / params == per_param
        # int8: one fp32 scale per output row (2I + H rows of length H or I)
        want_scales = (
            scale_per_param * params
            if scale_per_param is not None
            else 4 * experts * (2 * case.intermediate + case.hidden)
        )
        assert report["scales"] == want_scales
        assert report["total"] == report["weights"] + report["scales"] + report["cache_spare"]
        estimate = kk.estimate_layer_bytes(layer.config)
        assert (estimate["weights"], estimate["scales"]) == (report["weights"], report["scales"])
        assert report["workspace_layers"] == 1
        reports.append(report)
    small, big = reports
    assert big["cache_spare"] == small["cache_spare"] > 0
    assert big["workspace_shared"] == small["workspace_shared"] > 0


def test_estimate_layer_bytes_counts_the_activation_cache() -> None:
    cfg = make_cfg("int4", 64, experts=4, hidden=256, intermediate=128)
    case = kt.make_case(
        tokens=50, num_experts=4, top_k=2, hidden=256, intermediate=128, rank_gu=8, rank_d=8, seed=8
    )
    layer = kt.build_layer(case, kk.ThreadPool(threads=1), weight_dtype="int4", group_size=64)
    kt.run_kernels(layer, case)  # the consumed cache stays as the layer's spare
    estimate = kk.estimate_layer_bytes(cfg, tokens=50, lora_rank=8)
    assert estimate["cache"] == layer.memory_report()["cache_spare"] == 50 * 2 * (2 * 128 * 2 + 16 * 4)
    assert estimate["total"] == estimate["weights"] + estimate["scales"] + estimate["cache"]
    # a live handle holds the cache (+ its routing: a few int/float per routed pair), 0 once consumed
    out = kt.nan_array(case.x.shape, case.x.dtype)
    handle = layer.forward(case.x, case.ids, case.weights, out, lora=kt.kernel_lora(case), save=True)
    routing_bound = 2 * (50 * 2 * 16 + (4 + 1) * 12)
    assert estimate["cache"] <= handle.cache_bytes <= estimate["cache"] + routing_bound
    kt.run_backward(layer, handle, case, kt.KernelResult(out=out))
    assert handle.cache_bytes == 0


# ---- bad inputs: one-line errors naming the argument ------------------------------------------------


def test_config_rejects_bad_group_sizes() -> None:
    with pytest.raises(ValueError, match=r"group_size must be 32, 64 or 128, got 48"):
        make_cfg("int4", 48)
    with pytest.raises(
        ValueError, match=r"group_size=128: int4 needs hidden and intermediate to be multiples"
    ):
        make_cfg("int4", 128, hidden=96, intermediate=128)
    with pytest.raises(ValueError, match=r"group_size must be 32, 64 or 128, got 256"):
        make_cfg("int8", 256)


def test_load_quantized_rejects_bad_arrays() -> None:
    cfg8, cfg4 = make_cfg("int8"), make_cfg("int4", 64)
    good8, good4 = quant_outputs(cfg8), quant_outputs(cfg4)
    l8, l4 = kk.MoELayer(cfg8, pool=POOL), kk.MoELayer(cfg4, pool=POOL)
    bad: list[tuple[Any, tuple[Any, ...], type[Exception], str]] = [
        (l8, (good8[0].view(np.uint8), *good8[1:]), TypeError, "gate_up_q: expected dtype int8"),
        (l4, (good4[0].view(np.int8), *good4[1:]), TypeError, "gate_up_q: expected dtype uint8"),
        (l8, (good8[0][:, :-1].copy(), *good8[1:]), ValueError, "gate_up_q: expected shape"),
        (l8, (*good8[:3], good8[3][:, :-1].copy()), ValueError, "down_scale: expected shape"),
        (
            l4,
            (*good4[:1], good4[1][..., :-1].copy(), *good4[2:]),
            ValueError,
            "gate_up_scale: expected shape",
        ),
        (l4, (*good4[:3], good4[3].astype(np.float64)), TypeError, "down_scale"),
        (l8, (*good8[:1], good8[1][..., None].copy(), *good8[2:]), ValueError, "gate_up_scale"),
    ]
    # Scales must be finite (a NaN or infinite scale would make its whole row NaN); dtypes f32 and bf16.
    for layer, good in ((l8, good8), (l4, good4)):
        for scale_dtype in (np.float32, BF16):
            q_gu, s_gu, q_d, s_d = (a.copy() for a in good)
            s_gu, s_d = np.full(s_gu.shape, 0.01, scale_dtype), np.full(s_d.shape, 0.01, scale_dtype)
            for value in (np.nan, np.inf):
                bad_d, bad_gu = s_d.copy(), s_gu.copy()
                bad_d[2, 5], bad_gu[1, 7] = value, -value
                down_bad, gu_bad = (q_gu, s_gu, q_d, bad_d), (q_gu, bad_gu, q_d, s_d)
                bad.append((layer, down_bad, ValueError, "down_scale: non-finite scale in expert 2, row 5"))
                bad.append((layer, gu_bad, ValueError, "gate_up_scale: non-finite scale in expert 1, row 7"))
    for layer, args, exc, text in bad:
        with pytest.raises(exc, match=text) as info:
            layer.load_quantized(*args)
        assert "\n" not in str(info.value)
        assert not layer.loaded


def test_quantized_api_misuse() -> None:
    bf = kk.MoELayer(make_cfg("bf16"), pool=POOL)
    with pytest.raises(ValueError, match=r"load_quantized: this layer's weight_dtype is 'bf16'"):
        bf.load_quantized(*quant_outputs(make_cfg("int8")))
    E, H, inter = 3, 128, 256
    with pytest.raises(TypeError, match=r"down: .*bfloat16"):  # bf16 layers take bf16 only
        bf.load_weights(gate_up=np.zeros((E, 2 * inter, H), BF16), down=np.zeros((E, H, inter), np.float32))
    q = kk.MoELayer(make_cfg("int8"), pool=POOL)
    with pytest.raises(RuntimeError, match=r"load_weights\(\) or load_quantized\(\) first"):
        q.read_quantized(*quant_outputs(q.config))
    rng = np.random.default_rng(5)
    for value in (np.inf, -np.inf, np.nan):  # a NaN must not slip past the row's max (std::max skips it)
        for weight_dtype, dtype in (("int8", np.float32), ("int4", BF16)):
            layer = kk.MoELayer(make_cfg(weight_dtype), pool=POOL)
            gate_up = rng.standard_normal((E, 2 * inter, H)).astype(dtype)
            down = rng.standard_normal((E, H, inter)).astype(dtype)
            gate_up[1, 2, 3] = value
            with pytest.raises(ValueError, match=r"gate_up: non-finite weight in expert 1, row 2"):
                layer.load_weights(gate_up=gate_up, down=down)
            gate_up[1, 2, 3] = 0
            down[2, 5, 0] = value
            with pytest.raises(ValueError, match=r"down: non-finite weight in expert 2, row 5"):
                layer.load_weights(gate_up=gate_up, down=down)
            assert not layer.loaded
