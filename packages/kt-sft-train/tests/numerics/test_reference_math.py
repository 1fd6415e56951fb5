"""reference.moe_forward: DESIGN.md §2 against a per-(token, slot) loop over merged weights, gradcheck,
skipped ids, and the ReferenceLayer handle rules."""

from __future__ import annotations

import pytest
import torch
from kt_sft_train.reference import ExpertLoRA, ReferenceLayer, moe_forward
from torch.nn import functional as F

E, K, H, INTER, R = 5, 2, 6, 4, 3


def _inputs(tokens: int = 7, seed: int = 0, dtype: torch.dtype = torch.float64):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g, dtype=dtype)
    ids = torch.randint(0, E, (tokens, K), generator=g)
    ids[1, 0] = -1  # padding slot
    ids[2, 1] = E  # an expert served elsewhere
    weights = torch.rand(tokens, K, generator=g, dtype=dtype)
    gate_up = torch.randn(E, 2 * INTER, H, generator=g, dtype=dtype) / H**0.5
    down = torch.randn(E, H, INTER, generator=g, dtype=dtype) / INTER**0.5
    lora = ExpertLoRA(
        a_gu=torch.randn(E, R, H, generator=g, dtype=dtype) / H**0.5,
        b_gu=torch.randn(E, 2 * INTER, R, generator=g, dtype=dtype) * 0.5,
        a_d=torch.randn(E, R, INTER, generator=g, dtype=dtype) / INTER**0.5,
        b_d=torch.randn(E, H, R, generator=g, dtype=dtype) * 0.5,
        scale_gu=1.7,
        scale_d=0.6,
    )
    return x, ids, weights, gate_up, down, lora


def _naive(x, ids, weights, gate_up, down, lora):  # type: ignore[no-untyped-def]
    """out[t] = sum_j w[t,j] * (W_d' silu(g) * u), W' = W + s B A per expert (merged weights)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < gate_up.shape[0]:
                continue
            w_gu = gate_up[e] + lora.scale_gu * lora.b_gu[e] @ lora.a_gu[e]
            w_d = down[e] + lora.scale_d * lora.b_d[e] @ lora.a_d[e]
            gate, up = (w_gu @ x[t]).chunk(2)
            out[t] += weights[t, j] * (w_d @ (F.silu(gate) * up))
    return out


def test_forward_matches_merged_weight_loop() -> None:
    x, ids, weights, gate_up, down, lora = _inputs()
    torch.testing.assert_close(
        moe_forward(x, ids, weights, gate_up, down, lora),
        _naive(x, ids, weights, gate_up, down, lora),
        rtol=1e-12,
        atol=1e-12,
    )


def test_lora_is_significant_in_these_inputs() -> None:
    x, ids, weights, gate_up, down, lora = _inputs()
    with_lora = moe_forward(x, ids, weights, gate_up, down, lora)
    without = moe_forward(x, ids, weights, gate_up, down, None)
    assert (with_lora - without).norm() > 0.3 * without.norm()


def test_gradcheck() -> None:
    x, ids, weights, gate_up, down, lora = _inputs(tokens=5, seed=1)
    leaves = [t.requires_grad_() for t in (x, weights, *lora.tensors())]

    def fn(x, weights, a_gu, b_gu, a_d, b_d):  # type: ignore[no-untyped-def]
        return moe_forward(x, ids, weights, gate_up, down, ExpertLoRA(a_gu, b_gu, a_d, b_d, 1.7, 0.6))

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_skipped_ids_contribute_nothing_and_get_zero_weight_grad() -> None:
    x, ids, weights, gate_up, down, lora = _inputs()
    weights.requires_grad_()
    out = moe_forward(x, ids, weights, gate_up, down, lora)
    out.sum().backward()
    assert weights.grad[1, 0] == 0 and weights.grad[2, 1] == 0
    assert (weights.grad[ids.ge(0) & ids.lt(E)] != 0).all()
    only_valid = ids.clone()
    only_valid[1, 0] = only_valid[1, 1]
    changed = weights.detach().clone()
    changed[1, 0] = 0.0
    reference = moe_forward(x, only_valid, changed, gate_up, down, lora)
    torch.testing.assert_close(out.detach(), reference, rtol=1e-12, atol=1e-12)


def test_lora_on_one_projection_only() -> None:
    x, ids, weights, gate_up, down, lora = _inputs()
    gate_up_only = ExpertLoRA(lora.a_gu, lora.b_gu, None, None, lora.scale_gu, 1.0)
    zero_down = ExpertLoRA(lora.a_gu, lora.b_gu, torch.zeros_like(lora.a_d), lora.b_d, lora.scale_gu, 1.0)
    torch.testing.assert_close(
        moe_forward(x, ids, weights, gate_up, down, gate_up_only),
        moe_forward(x, ids, weights, gate_up, down, zero_down),
    )


def test_bf16_inputs_accumulate_in_fp32() -> None:
    x, ids, weights, gate_up, down, lora = _inputs(dtype=torch.float32)
    out = moe_forward(x.bfloat16(), ids, weights, gate_up.bfloat16(), down.bfloat16(), lora)
    expected = moe_forward(
        x.bfloat16().double(),
        ids,
        weights.double(),
        gate_up.bfloat16().double(),
        down.bfloat16().double(),
        ExpertLoRA(*(t.double() for t in lora.tensors()), lora.scale_gu, lora.scale_d),
    )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    ("arg", "bad", "message"),
    [
        ("x", torch.zeros(3, H + 1), "x must be|gate_up must be"),
        ("ids", torch.zeros(3, K), "ids must be an integer"),
        ("weights", torch.zeros(3, K + 1), "weights must have the shape"),
        ("down", torch.zeros(E, H, INTER + 1), "down must be"),
    ],
)
def test_bad_shapes_name_the_argument(arg: str, bad: torch.Tensor, message: str) -> None:
    x, ids, weights, gate_up, down, _ = _inputs(tokens=3, dtype=torch.float32)
    args = {"x": x, "ids": ids, "weights": weights, "gate_up": gate_up, "down": down}
    args[arg] = bad
    with pytest.raises((ValueError, TypeError), match=message):
        moe_forward(**args)


def test_reference_layer_handle_rules() -> None:
    x, ids, weights, gate_up, down, lora = _inputs()
    layer = ReferenceLayer(E, K, H, INTER)
    with pytest.raises(RuntimeError, match="not loaded"):
        layer.forward(x, ids, weights, lora, True)
    layer.load_weights(gate_up, down)
    out, handle = layer.forward(x, ids, weights, lora, True)
    torch.testing.assert_close(out, moe_forward(x, ids, weights, gate_up, down, lora))
    other = ReferenceLayer(E, K, H, INTER)
    other.load_weights(gate_up, down)
    with pytest.raises(ValueError, match="another layer"):
        other.backward(handle, torch.ones_like(out))
    grads = layer.backward(handle, torch.ones_like(out))
    assert grads.grad_x.shape == x.shape and all(g is not None for g in grads.lora)
    with pytest.raises(RuntimeError, match="already consumed"):
        layer.backward(handle, torch.ones_like(out))
