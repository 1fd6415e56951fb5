"""int8 bases on the amx tier's AMX-INT8 path (src/isa/amx/amx_int8.cpp, ADR 0603): TDPBSSD on the
stored int8 weights, activations quantized per row into two int8 digits (rounding point RA, a second,
data-dependent one). test_moe_quant.py covers the tile-tail shapes, idle experts, tier vs portable
and determinism on every tier; here: activations with outliers (one value 100x the RMS of its row;
the row's digits then resolve its other values only to max|row| / 65024, ~1.5e-3 of their RMS). Such
rows end 1.9-2.7e-3 from portable (ADR 0603 has the table), so: every array against the float64
reference on the dequantized weights at the int8 bounds (DESIGN.md §7: 2e-2 output, 3e-2
gradients; one digit fails them), and the rows WITHOUT an outlier against portable at 2e-3.
"""

from __future__ import annotations

import copy

import kt_sft_kernels as kk
import numpy as np
import pytest
from kt_sft_kernels import testing as kt

POOL = kk.ThreadPool(threads=2)
pytestmark = pytest.mark.skipif(not kk.isa_supported("amx"), reason="this host has no amx tier")


def _with_outliers(case: kt.MoECase, seed: int, factor: float = 100.0) -> kt.MoECase:
    """Every 5th token row of x and grad_out gets one value `factor` x the row's RMS."""
    rng = np.random.default_rng(seed)
    out = copy.copy(case)
    for name in ("x", "grad_out"):
        a = np.array(getattr(case, name))
        for t in range(0, a.shape[0], 5):
            rms = float(np.sqrt(np.mean(a[t].astype(np.float64) ** 2)))
            a[t, int(rng.integers(a.shape[1]))] = np.float32(factor * rms * rng.choice([-1.0, 1.0]))
        setattr(out, name, a)
    return out


def _run(case: kt.MoECase, isa: str) -> kt.KernelResult:
    kk.set_max_isa(isa)
    try:
        assert kk.active_isa() == isa
        return kt.run_kernels(kt.build_layer(case, POOL, weight_dtype="int8"), case)
    finally:
        kk.set_max_isa(None)


def _arrays(res: kt.KernelResult | kt.ReferenceResult) -> dict[str, np.ndarray | None]:
    return {"out": res.out, "grad_x": res.grad_x, "grad_weights": res.grad_weights, **res.lora_grads}


@pytest.mark.parametrize(("tokens", "hidden", "intermediate"), [(33, 256, 128), (70, 224, 160)])
def test_int8_amx_with_outlier_rows_matches_portable_and_reference(
    tokens: int, hidden: int, intermediate: int
) -> None:
    case = _with_outliers(
        kt.make_case(
            tokens=tokens,
            num_experts=6,
            top_k=2,
            hidden=hidden,
            intermediate=intermediate,
            rank_gu=16,
            rank_d=8,
            idle_experts=1,
            seed=tokens,
        ),
        seed=tokens,
    )
    amx, portable = _run(case, "amx"), _run(case, "portable")
    ref = kt.moe_reference(kt.dequantized_case(case, "int8"))
    for name, got in _arrays(amx).items():
        bound = 2e-2 if name == "out" else 3e-2
        err = kt.rel_fro(got, _arrays(ref)[name])
        assert err <= bound, f"{name}: amx vs float64 reference relative error {err:.3g} > {bound}"
    plain = np.arange(tokens) % 5 != 0  # token rows without an outlier (in x and in grad_out)
    for name in ("out", "grad_x"):
        got, want = getattr(amx, name)[plain], getattr(portable, name)[plain]
        err = kt.rel_fro(got, want)
        assert err <= 2e-3, f"{name}: amx vs portable on rows without an outlier: {err:.3g} > 2e-3"


def test_int8_amx_rows_of_zeros_give_zeros() -> None:
    """A token whose x is all zero: its output is exactly zero (s = 0, no division by zero)."""
    case = kt.make_case(
        tokens=20, num_experts=4, top_k=2, hidden=128, intermediate=96, rank_gu=0, rank_d=0, seed=3
    )
    case.x[3] = 0
    res = _run(case, "amx")
    assert np.all(kt.as_f64(res.out[3]) == 0.0)
    assert np.all(np.isfinite(kt.as_f64(res.out)))
