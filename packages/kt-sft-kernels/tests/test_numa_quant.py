"""numa_shards = N with quantized bases (int8, int4; ADR 0701 "Quantized bases").

The layer quantizes (or load_quantized takes) the WHOLE matrices and gives each shard its slice of
the quantized values and scales: gate/up rows (per-row int8 scales and int4 groups along H are per
row), down columns with the full rows' int8 scale and int4 groups that never straddle a shard
(slices are multiples of group_size). So a sharded layer computes with exactly the dequantized
weights of the unsharded one: results equal N = 1 at the same-rounding bound of DESIGN.md §7 (only
the fp32 summation order differs) and the float64 dequantized reference at the int8 / int4 bounds.
"""

from __future__ import annotations

from typing import Any

import kt_sft_kernels as kk
import numpy as np
import pytest
from kt_sft_kernels import testing as kt
from kt_sft_kernels.testing import tier
from test_moe_quant import check_quantized, read_back
from test_numa_shards import LORA_KINDS, assert_close_to

TIERS = kt.tier_names()  # the avx512_bf16 tier once per kernel variant
BF16 = kt.BF16
F32 = np.dtype(np.float32)

# (weight dtype, group size, intermediate, LoRA kind). The intermediates give uneven splits:
# 160 = 5 x 32 over 3 shards is 32 / 64 / 64; 192 = 3 x 64 over 2 int4-g64 shards is 64 / 128.
VARIANTS = [
    ("int8", 128, 160, "f32"),
    ("int8", 128, 160, "bf16"),
    ("int4", 32, 160, "f32"),
    ("int4", 32, 160, "frozen"),
    ("int4", 64, 192, "bf16"),
    ("int4", 64, 192, "down_only"),
]


def make(intermediate: int, kind: str, seed: int = 11) -> kt.MoECase:
    return kt.make_case(
        tokens=37,
        num_experts=6,
        top_k=3,
        hidden=128,
        intermediate=intermediate,
        idle_experts=1,
        invalid_ids=2,
        seed=seed,
        **LORA_KINDS[kind],
    )


@pytest.mark.parametrize("shared_down", ["1", "0"])  # 0: the multi-node form (each shard its own rows)
@pytest.mark.parametrize(("weight_dtype", "group_size", "intermediate", "kind"), VARIANTS, ids=str)
@pytest.mark.parametrize("isa", TIERS)
def test_quantized_shards_equal_one_shard(
    isa: str,
    weight_dtype: str,
    group_size: int,
    intermediate: int,
    kind: str,
    shared_down: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KT_SFT_NUMA_SHARED_DOWN", shared_down)  # read when a sharded layer is built
    case = make(intermediate, kind)
    ref = kt.moe_reference(kt.dequantized_case(case, weight_dtype, group_size))
    with tier(isa):
        single = kt.run_kernels(kt.build_layer(case, weight_dtype=weight_dtype, group_size=group_size), case)
        check_quantized(single, ref, case, weight_dtype)
        for n in (2, 3):
            layer = kt.build_layer(case, weight_dtype=weight_dtype, group_size=group_size, numa_shards=n)
            got = kt.run_kernels(layer, case)
            label = f"{isa} {weight_dtype} g{group_size} {kind} numa_shards={n}"
            assert_close_to(got, single, case, label)
            check_quantized(got, ref, case, weight_dtype)


def test_slices_follow_int4_groups() -> None:
    """int4 slices are whole groups (uneven where I / group_size is not a multiple of N); int8 and
    int4 g32 keep the 32-row blocks."""
    want = {
        ("int8", 128, 160, 3): [(0, 32), (32, 96), (96, 160)],
        ("int4", 32, 160, 3): [(0, 32), (32, 96), (96, 160)],
        ("int4", 64, 192, 2): [(0, 64), (64, 192)],
        ("int4", 128, 384, 2): [(0, 128), (128, 384)],
    }
    for (weight_dtype, group_size, intermediate, n), slices in want.items():
        case = make(intermediate, "frozen")
        layer = kt.build_layer(case, weight_dtype=weight_dtype, group_size=group_size, numa_shards=n)
        assert [(s["i0"], s["i1"]) for s in layer.shard_report()] == slices


@pytest.mark.parametrize(
    ("intermediate", "group_size", "shards"), [(128, 64, 3), (256, 128, 3), (384, 128, 4), (64, 32, 3)]
)
def test_misaligned_int4_groups_are_a_clear_error(intermediate: int, group_size: int, shards: int) -> None:
    cfg = kk.MoEConfig(
        num_experts=4,
        top_k=2,
        hidden=128,
        intermediate=intermediate,
        weight_dtype="int4",
        group_size=group_size,
        numa_shards=shards,
    )
    whole = f"at most intermediate / group_size = {intermediate // group_size}"
    whole = whole if group_size > 32 else f"at most intermediate / 32 = {intermediate // 32}"
    with pytest.raises(
        ValueError, match=rf"numa_shards={shards} does not fit intermediate={intermediate}"
    ) as err:
        kk.MoELayer(cfg)
    assert whole in str(err.value)
    if group_size > 32:
        assert f"group_size={group_size}" in str(err.value)
    assert "\n" not in str(err.value)


QUANT = [("int8", 128, 160), ("int4", 32, 160), ("int4", 64, 192)]


@pytest.mark.parametrize("kind", ["f32", "bf16"])  # fp32 / bf16 source weights
@pytest.mark.parametrize(("weight_dtype", "group_size", "intermediate"), QUANT, ids=str)
def test_sharded_quantization_is_the_whole_matrices_quantization(
    weight_dtype: str, group_size: int, intermediate: int, kind: str
) -> None:
    """load_weights (gate_up, or gate and up) on a sharded layer holds exactly the whole matrices'
    quantization (the NumPy quantizer on the full gate_up / down; int8: down's scales over the full
    rows), read back whole; loading those values with load_quantized gives the same bits."""
    case = make(intermediate, kind, seed=5)
    want = (
        *kt.quantize(case.gate_up, weight_dtype, group_size),
        *kt.quantize(case.down, weight_dtype, group_size),
    )
    for n, separate in ((2, False), (3, False), (3, True)):
        layer = kt.build_layer(
            case, weight_dtype=weight_dtype, group_size=group_size, numa_shards=n, separate_gate_up=separate
        )
        for got, exp, name in zip(
            read_back(layer), want, ("gate_up_q", "gate_up_scale", "down_q", "down_scale"), strict=True
        ):
            np.testing.assert_array_equal(got, exp, err_msg=f"numa_shards={n} separate={separate} {name}")
        loaded = kk.MoELayer(layer.config)
        loaded.load_quantized(*want)
        a, b = kt.run_kernels(layer, case), kt.run_kernels(loaded, case)
        for name in ("out", "grad_x", "grad_weights"):
            assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
        assert all(a.lora_grads[k].tobytes() == b.lora_grads[k].tobytes() for k in a.lora_grads)


def random_quantized(
    weight_dtype: str, group_size: int, experts: int, hidden: int, intermediate: int, scale_dtype: Any
) -> list[np.ndarray]:
    """Pre-quantized arrays over the full value ranges (as test_moe_quant's bit-exact test)."""
    rng = np.random.default_rng(13)
    arrays = []
    for rows, cols in ((2 * intermediate, hidden), (hidden, intermediate)):
        shape = (experts, rows, cols)
        if weight_dtype == "int8":
            q = rng.integers(-127, 128, size=shape).astype(np.int8)
            scale = rng.uniform(0.5, 1.5, size=shape[:2]) / (127 * np.sqrt(cols))
        else:
            q = kt.pack_int4(rng.integers(-8, 8, size=shape))
            scale = rng.uniform(0.5, 1.5, size=(*shape[:2], cols // group_size)) / (7 * np.sqrt(cols))
        arrays += [q, scale.astype(np.float32).astype(scale_dtype)]
    return arrays


@pytest.mark.parametrize("scale_dtype", [F32, BF16])
@pytest.mark.parametrize(("weight_dtype", "group_size", "intermediate"), QUANT, ids=str)
def test_load_quantized_round_trip_with_shards(
    weight_dtype: str, group_size: int, intermediate: int, scale_dtype: Any
) -> None:
    """load_quantized then read_quantized on sharded layers is bit-exact, and every tier computes
    with exactly those dequantized values (the float64 reference at the int8 / int4 bounds, N = 1
    at the same-rounding bound)."""
    case = make(intermediate, "f32", seed=9)
    arrays = random_quantized(
        weight_dtype, group_size, case.num_experts, case.hidden, intermediate, scale_dtype
    )
    deq = (
        kt.dequantize(arrays[0], arrays[1], weight_dtype, group_size),
        kt.dequantize(arrays[2], arrays[3], weight_dtype, group_size),
    )
    ref_case = kt.dequantized_case(case, "bf16")
    ref_case = kt.MoECase(**{**ref_case.__dict__, "gate_up": deq[0], "down": deq[1]})
    ref = kt.moe_reference(ref_case)
    cfg = {"weight_dtype": weight_dtype, "group_size": group_size}
    layers = {}
    for n in (1, 2, 3):
        layer = kk.MoELayer(
            kk.MoEConfig(
                num_experts=case.num_experts,
                top_k=case.top_k,
                hidden=case.hidden,
                intermediate=intermediate,
                numa_shards=n,
                **cfg,
            )
        )
        layer.load_quantized(*arrays)
        for got, given in zip(read_back(layer), arrays, strict=True):
            np.testing.assert_array_equal(got, np.asarray(given).astype(got.dtype))
        layers[n] = layer
    for isa in (TIERS[0], TIERS[-1]):
        with tier(isa):
            single = kt.run_kernels(layers[1], case)
            for n in (2, 3):
                got = kt.run_kernels(layers[n], case)
                assert_close_to(got, single, case, f"{isa} {weight_dtype} numa_shards={n}")
                check_quantized(got, ref, case, weight_dtype)


@pytest.mark.parametrize(("weight_dtype", "group_size", "intermediate"), QUANT, ids=str)
def test_memory_report_of_sharded_quantized_layers(
    weight_dtype: str, group_size: int, intermediate: int
) -> None:
    """Each shard reports its slice's values and scales; together the unsharded layer's, except that
    int8 keeps down's full-row scales in every shard (H floats a shard and expert, counted by
    estimate_layer_bytes too)."""
    case = make(intermediate, "f32", seed=6)
    one = kt.build_layer(case, weight_dtype=weight_dtype, group_size=group_size)
    kt.run_kernels(one, case)
    single = one.memory_report()
    E, H = case.num_experts, case.hidden
    for n in (2, 3):
        layer = kt.build_layer(case, weight_dtype=weight_dtype, group_size=group_size, numa_shards=n)
        kt.run_kernels(layer, case)
        report = layer.memory_report()
        shards = report["shards"]
        assert len(shards) == n
        assert report["weights"] == sum(s["weights"] for s in shards) == single["weights"]
        extra = (n - 1) * E * H * 4 if weight_dtype == "int8" else 0
        assert report["scales"] == sum(s["scales"] for s in shards) == single["scales"] + extra
        for s, info in zip(shards, layer.shard_report(), strict=True):
            width = info["i1"] - info["i0"]
            per_value = 1.0 if weight_dtype == "int8" else 0.5
            assert s["weights"] == E * 3 * H * width * per_value
            assert info["weight_bytes"] == s["weights"] + s["scales"]
        estimate = kk.estimate_layer_bytes(layer.config)
        assert (estimate["weights"], estimate["scales"]) == (report["weights"], report["scales"])
