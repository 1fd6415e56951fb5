"""The benchmark's float64 reference against an independent one: torch autograd in float64.

The reference decides which timings are reported, so it is checked itself: the forward of DESIGN.md §2
written plainly in torch float64, its backward by autograd (no hand-written gradient formulas), on a
small shape with experts that get no tokens, checked rows and experts that are a strict subset.
Run: python -m pytest benchmarks -q
"""

from __future__ import annotations

import _bench_inputs as inputs
import _bench_reference as reference
import numpy as np
import pytest
from _bench_inputs import Problem, Shape

torch = pytest.importorskip("torch")


def _f64(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(inputs.bf16_bits_to_f32(bits).astype(np.float64))


def _autograd_reference(p: Problem) -> dict[str, torch.Tensor]:
    sh = p.shape
    x = _f64(inputs.hidden_states(p)).requires_grad_(True)
    grad_out = _f64(inputs.grad_output(p))
    ids, weights = inputs.routing(p)
    w = torch.from_numpy(weights.astype(np.float64)).requires_grad_(True)
    gate_up, down = inputs.fused_weights(p)
    lora = inputs.lora_weights(p)
    params = [_f64(a).requires_grad_(True) for a in (lora.a_gu, lora.b_gu, lora.a_d, lora.b_d)]
    a_gu, b_gu, a_d, b_d = params
    out = torch.zeros_like(x)
    for t in range(p.tokens):
        for j in range(sh.top_k):
            e = int(ids[t, j])
            gu = _f64(gate_up[e]) @ x[t] + p.scale * (b_gu[e] @ (a_gu[e] @ x[t]))
            h = torch.nn.functional.silu(gu[: sh.intermediate]) * gu[sh.intermediate :]
            y = _f64(down[e]) @ h + p.scale * (b_d[e] @ (a_d[e] @ h))
            out[t] = out[t] + w[t, j] * y
    out.backward(grad_out)
    return {
        "out": out.detach(),
        "dx": x.grad,
        "grad_w": w.grad,
        "da_gu": a_gu.grad,
        "db_gu": b_gu.grad,
        "da_d": a_d.grad,
        "db_d": b_d.grad,
    }


@pytest.mark.parametrize("tokens", [5, 24])
def test_reference_matches_torch_autograd(tokens: int) -> None:
    p = Problem(Shape("tiny", num_experts=6, hidden=32, intermediate=16, top_k=2), tokens, rank=4, alpha=8.0)
    ids, _ = inputs.routing(p)
    rows = inputs.check_tokens(p, 3)
    experts = inputs.check_experts(p, ids, 3)
    assert len(rows) < tokens and len(experts) < p.shape.num_experts

    ours = reference.numpy_reference(p, rows, experts, round_like_kernel=False)
    expected = _autograd_reference(p)
    for key in ("out", "dx", "grad_w"):
        np.testing.assert_allclose(ours[key], expected[key].numpy()[rows], rtol=1e-10, atol=1e-12)
    for key in ("da_gu", "db_gu", "da_d", "db_d"):
        np.testing.assert_allclose(ours[key], expected[key].numpy()[experts], rtol=1e-10, atol=1e-12)


def test_rounded_reference_stays_close_to_exact() -> None:
    p = Problem(Shape("tiny", num_experts=4, hidden=64, intermediate=32, top_k=2), 16, rank=4, alpha=8.0)
    rows, experts = np.arange(p.tokens), np.arange(p.shape.num_experts)
    exact = reference.numpy_reference(p, rows, experts, round_like_kernel=False)
    rounded = reference.numpy_reference(p, rows, experts, round_like_kernel=True)
    for key in reference.CHECKED_KEYS:
        error = reference.relative_error(rounded[key], exact[key])
        assert 0 < error < 5e-3, key  # rounding happened, and only bf16-sized


def test_relative_error_flags_unwritten_outputs() -> None:
    expected = np.ones((2, 3))
    assert reference.relative_error(np.full((2, 3), np.nan), expected) == float("inf")
    assert reference.relative_error(expected * 1.01, expected) == pytest.approx(0.01)


def test_bf16_rounding_is_nearest_even() -> None:
    values = np.array([1.0, 1.00390625, 1.005859375, -2.5, 3.0e-5], dtype=np.float32)
    bits = inputs.f32_to_bf16_bits(values)
    back = inputs.bf16_bits_to_f32(bits)
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: nearest even is 1.0
    np.testing.assert_array_equal(back[:2], [1.0, 1.0])
    assert back[2] == np.float32(1.0078125)
    assert back[3] == -2.5
    assert abs(back[4] - 3.0e-5) / 3.0e-5 < 2**-8


def test_inputs_are_deterministic_and_layouts_agree() -> None:
    p = Problem(Shape("tiny", num_experts=3, hidden=32, intermediate=16, top_k=2), 4, rank=2)
    gate_up, down = inputs.fused_weights(p)
    gate, up, down_separate = inputs.separate_weights(p)
    np.testing.assert_array_equal(gate_up[:, :16], gate)
    np.testing.assert_array_equal(gate_up[:, 16:], up)
    np.testing.assert_array_equal(down, down_separate)
    np.testing.assert_array_equal(inputs.hidden_states(p), inputs.hidden_states(p))
    ids, weights = inputs.routing(p)
    assert all(len(set(row)) == p.shape.top_k for row in ids.tolist())
    assert np.all(weights > 0)


def test_library_reference_on_subsets_matches_numpy_reference() -> None:
    if not reference.library_available():
        pytest.skip("kt_sft_kernels is not installed")
    p = Problem(Shape("tiny", num_experts=6, hidden=64, intermediate=32, top_k=2), 20, rank=4, alpha=8.0)
    ids, _ = inputs.routing(p)
    rows = inputs.check_tokens(p, 5)
    experts = inputs.check_experts(p, ids, 2)
    lib = reference.library_reference(p, rows, experts)
    mine = reference.numpy_reference(p, rows, experts, round_like_kernel=True)
    for key in reference.CHECKED_KEYS:
        # same rounding points; the library also rounds its results once to bf16
        assert reference.relative_error(lib[key], mine[key]) < 4e-3, key
