"""The amx tier's tuning knobs (src/isa/amx/amx_tier.hpp, set through the testing-only
`_core._testing.set_amx_tuning`) are prefetch distances and levels, loop orders and chunkings over
exact accumulations: no setting may change a single bit of a layer's results, bf16 or int8 base.
benchmarks/tune_sweep.py times them on the AMX machine and relies on this.

Routing is fixed so that the experts get 1, 17, 33 and 70 rows (one m-tile, a tile tail, three
m-tiles: the int8 NT/NN chunking starts above two, and five), one expert 19, one none; H = 640 is
10 int8 reduction steps (two chunks of 8, the second short) and 20 bf16 ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import kt_sft_kernels as kk
import numpy as np
import pytest
from kt_sft_kernels import testing as kt
from kt_sft_kernels._core import _testing

POOL = kk.ThreadPool(threads=2)
pytestmark = pytest.mark.skipif(not kk.isa_supported("amx"), reason="this host has no amx tier")

ROWS_PER_EXPERT = (1, 17, 33, 70, 19, 0)  # 140 routed pairs = 70 tokens x top-2

# Each knob's values other than the default, the extremes of its useful range included.
KNOB_VALUES: dict[str, list[object]] = {
    "prefetch": [False],
    "kc_steps": [1, 3, 32],
    "act_prefetch_steps": [0, 1, 16],
    "nt_panel_in_l2_bytes": [0, 1 << 30],
    "weight_prefetch_items": [2, 3, 8],
    "weight_prefetch_l2": [True],
    "nn_single_pair_kc_steps": [1, 5],
    "weight_prefetch_burst": [True],
    "weight_prefetch_first": [True],
    "int8_strip_prefetch_groups": [0, 1, 16],
    "int8_strip_prefetch_l2": [False],
    "int8_strip_far_groups": [1, 32, 64],
    "int8_nt_prefetch_pairs": [0, 2, 5],
    "int8_nt_prefetch_l2": [False],
    "int8_nt_prefetch_burst": [True],
}

# Several knobs together (the sweep's settings combine them).
COMBINED: list[dict[str, object]] = [
    {
        "weight_prefetch_items": 2,
        "weight_prefetch_l2": True,
        "weight_prefetch_burst": True,
        "weight_prefetch_first": True,
        "int8_strip_prefetch_groups": 8,
        "int8_strip_prefetch_l2": True,
        "int8_strip_far_groups": 32,
        "int8_nt_prefetch_pairs": 2,
        "int8_nt_prefetch_burst": True,
        "kc_steps": 3,
    },
    {"int8_nt_prefetch_burst": True, "int8_nt_prefetch_l2": False, "weight_prefetch_first": True},
]

SETTINGS = [{name: value} for name, values in KNOB_VALUES.items() for value in values] + COMBINED


@pytest.fixture(autouse=True)
def _restore_tuning() -> Iterator[None]:
    saved = _testing.amx_tuning()
    yield
    _testing.set_amx_tuning(**saved)


def _case() -> kt.MoECase:
    case = kt.make_case(
        tokens=70, num_experts=6, top_k=2, hidden=640, intermediate=160, rank_gu=16, rank_d=8, seed=11
    )
    rng = np.random.default_rng(12)
    # Expert 3 is every token's first choice; the second choices give the others their rows.
    second = np.repeat([0, 1, 2, 4], [ROWS_PER_EXPERT[e] for e in (0, 1, 2, 4)])
    ids = np.stack([np.full(70, 3), rng.permutation(second)], axis=1).astype(np.int32)
    swap = rng.random(70) < 0.5  # the slot order varies too
    ids[swap] = ids[swap, ::-1]
    case.ids = ids
    counts = np.bincount(ids.ravel(), minlength=6)
    assert tuple(counts) == ROWS_PER_EXPERT
    return case


def _results(layer: object, case: kt.MoECase) -> list[bytes]:
    with kt.tier("amx"):
        return kt.result_bytes(kt.run_kernels(layer, case))


@pytest.mark.parametrize("weight_dtype", ["bf16", "int8"])
def test_every_tuning_setting_gives_the_default_bits(weight_dtype: str) -> None:
    case = _case()
    layer = kt.build_layer(case, POOL, weight_dtype=weight_dtype)
    with kt.tier("amx"):
        default = kt.run_kernels(layer, case)
    for name, arr in [("out", default.out), ("grad_x", default.grad_x), *default.lora_grads.items()]:
        assert np.all(np.isfinite(np.asarray(arr, np.float32))), f"default {name} has non-finite values"
    want = kt.result_bytes(default)
    defaults = _testing.amx_tuning()
    assert set(defaults) == set(KNOB_VALUES), "a knob without values to test (or a stale one)"
    for setting in SETTINGS:
        _testing.set_amx_tuning(**defaults)
        _testing.set_amx_tuning(**setting)
        got = _results(layer, case)
        _testing.set_amx_tuning(**defaults)
        assert got == want, f"{weight_dtype}: tuning {setting} changes the results"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"no_such_knob": 1}, "unknown knob 'no_such_knob'"),
        ({"small_m": 4}, "unknown knob 'small_m'"),  # it selects another summation path: not a tuning
        ({"kc_steps": 0}, r"kc_steps must be an int in \[1, 32\]"),
        ({"kc_steps": 33}, r"kc_steps must be an int in \[1, 32\]"),
        ({"kc_steps": 2**70}, r"kc_steps must be an int in \[1, 32\]"),
        ({"kc_steps": True}, r"kc_steps must be an int"),
        ({"int8_nt_prefetch_pairs": 1.0}, r"int8_nt_prefetch_pairs must be an int in \[0, 64\]"),
        ({"int8_strip_far_groups": -1}, r"int8_strip_far_groups must be an int"),
        ({"prefetch": 1}, "prefetch must be True or False"),
        ({"weight_prefetch_burst": None}, "weight_prefetch_burst must be True or False"),
    ],
)
def test_set_amx_tuning_rejects_bad_names_and_values_and_changes_nothing(
    fields: dict[str, object], message: str
) -> None:
    before = _testing.amx_tuning()
    with pytest.raises(ValueError, match=message):
        _testing.set_amx_tuning(**{"act_prefetch_steps": 9, **fields})  # a good knob beside the bad one
    assert _testing.amx_tuning() == before


def test_set_amx_tuning_sets_only_the_named_knobs() -> None:
    before = _testing.amx_tuning()
    _testing.set_amx_tuning(int8_strip_far_groups=32, int8_nt_prefetch_l2=False)
    after = _testing.amx_tuning()
    assert after == {**before, "int8_strip_far_groups": 32, "int8_nt_prefetch_l2": False}
