"""The Python boundary: argument validation, handles, async calls, dtype plumbing, torch interop.

Numerics against the float64 reference are in test_moe_numerics.py; here results are compared with
the kernels' own results on other argument forms (bitwise), which needs no tolerance.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kt_sft_kernels as kk
import ml_dtypes
import numpy as np
import pytest
from kt_sft_kernels._core import _testing

BF16 = np.dtype(ml_dtypes.bfloat16)
E, K, H, INTER, R = 4, 2, 32, 64, 4


def randn(
    rng: np.random.Generator, shape: tuple[int, ...], std: float = 1.0, dtype: Any = BF16
) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32).astype(dtype)


@dataclass
class Problem:
    layer: kk.MoELayer
    x: np.ndarray
    ids: np.ndarray
    weights: np.ndarray
    grad_out: np.ndarray
    lora: kk.LoRA
    lora_arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

    @property
    def tokens(self) -> int:
        return self.x.shape[0]

    def out(self, dtype: Any = BF16) -> np.ndarray:
        return np.full((self.tokens, H), np.nan, dtype=np.float32).astype(dtype)

    def grads(self) -> tuple[np.ndarray, np.ndarray, kk.LoRAGrads]:
        grad_x = np.full((self.tokens, H), np.nan, dtype=np.float32).astype(BF16)
        grad_w = np.full((self.tokens, K), np.nan, dtype=np.float32)
        lora_grads = kk.LoRAGrads(*(np.full(a.shape, np.nan, dtype=a.dtype) for a in self.lora_arrays))
        return grad_x, grad_w, lora_grads


def make_layer(rng: np.random.Generator, pool: kk.ThreadPool | None = None) -> kk.MoELayer:
    layer = kk.MoELayer(kk.MoEConfig(num_experts=E, top_k=K, hidden=H, intermediate=INTER), pool=pool)
    layer.load_weights(
        gate_up=randn(rng, (E, 2 * INTER, H), H**-0.5), down=randn(rng, (E, H, INTER), INTER**-0.5)
    )
    return layer


def make_problem(tokens: int = 17, seed: int = 0, pool: kk.ThreadPool | None = None) -> Problem:
    rng = np.random.default_rng(seed)
    layer = make_layer(rng, pool)
    x = randn(rng, (tokens, H))
    ids = (
        np.stack([rng.choice(E, size=K, replace=False) for _ in range(tokens)])
        .astype(np.int32)
        .reshape(tokens, K)
    )
    weights = rng.random((tokens, K)).astype(np.float32)
    grad_out = randn(rng, (tokens, H))
    arrays = (
        randn(rng, (E, R, H), H**-0.5, np.float32),
        randn(rng, (E, 2 * INTER, R), R**-0.5, np.float32),
        randn(rng, (E, R, INTER), INTER**-0.5, np.float32),
        randn(rng, (E, H, R), R**-0.5, np.float32),
    )
    return Problem(layer, x, ids, weights, grad_out, kk.LoRA(*arrays, 0.5, 0.25), arrays)


@pytest.fixture
def problem() -> Problem:
    return make_problem()


def run_all(p: Problem, *, x: Any = None, ids: Any = None) -> list[np.ndarray]:
    """forward(save=True) + backward; returns every output (as raw bytes-comparable arrays)."""
    out = p.out()
    handle = p.layer.forward(
        p.x if x is None else x, p.ids if ids is None else ids, p.weights, out, lora=p.lora, save=True
    )
    grad_x, grad_w, lg = p.grads()
    p.layer.backward(handle, p.grad_out, grad_x, grad_w, lora_grads=lg)
    return [out, grad_x, grad_w, lg.da_gu, lg.db_gu, lg.da_d, lg.db_d]


def assert_bitwise_equal(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert u.shape == v.shape
        assert u.tobytes() == v.tobytes()


# ---- MoEConfig ----------------------------------------------------------------------------------


def test_config_fields_and_repr() -> None:
    cfg = kk.MoEConfig(num_experts=8, top_k=2, hidden=64, intermediate=96)
    assert (cfg.num_experts, cfg.top_k, cfg.hidden, cfg.intermediate) == (8, 2, 64, 96)
    assert (cfg.weight_dtype, cfg.group_size, cfg.numa_shards) == ("bf16", 128, 1)
    assert cfg == kk.MoEConfig(num_experts=8, top_k=2, hidden=64, intermediate=96)
    assert cfg != kk.MoEConfig(num_experts=8, top_k=1, hidden=64, intermediate=96)
    assert "num_experts=8" in repr(cfg)


@pytest.mark.parametrize(
    "field", ["num_experts", "top_k", "hidden", "intermediate", "group_size", "numa_shards"]
)
def test_config_rejects_non_positive_fields(field: str) -> None:
    args = dict(num_experts=8, top_k=2, hidden=64, intermediate=96) | {field: 0}
    with pytest.raises(ValueError, match=rf"{field} must be >= 1"):
        kk.MoEConfig(**args)


def test_config_unknown_weight_dtype() -> None:
    with pytest.raises(ValueError, match=r"weight_dtype must be one of 'bf16', 'int8', 'int4', got 'fp8'"):
        kk.MoEConfig(num_experts=8, top_k=2, hidden=64, intermediate=96, weight_dtype="fp8")


def test_config_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        kk.MoEConfig(8, 2, 64, 96)  # type: ignore[misc]


# ---- MoELayer construction and load_weights ----------------------------------------------------


def test_layer_rejects_a_bad_pool_and_config() -> None:
    cfg = kk.MoEConfig(num_experts=E, top_k=K, hidden=H, intermediate=INTER)
    with pytest.raises(TypeError, match=r"pool: expected a kt_sft_kernels.ThreadPool or None, got str"):
        kk.MoELayer(cfg, pool="two")
    with pytest.raises(TypeError):
        kk.MoELayer("config")  # type: ignore[arg-type]


def test_layer_properties() -> None:
    pool = kk.ThreadPool(2)
    layer = kk.MoELayer(kk.MoEConfig(num_experts=E, top_k=K, hidden=H, intermediate=INTER), pool=pool)
    assert layer.pool == pool
    assert layer.config.hidden == H
    assert not layer.loaded
    assert kk.MoELayer(layer.config).pool.is_default


def test_forward_before_load_weights_raises() -> None:
    layer = kk.MoELayer(kk.MoEConfig(num_experts=E, top_k=K, hidden=H, intermediate=INTER))
    with pytest.raises(RuntimeError, match=r"load_weights"):
        layer.forward(
            np.zeros((1, H), BF16),
            np.zeros((1, K), np.int32),
            np.ones((1, K), np.float32),
            np.zeros((1, H), BF16),
        )


def unloaded_layer() -> kk.MoELayer:
    return kk.MoELayer(kk.MoEConfig(num_experts=E, top_k=K, hidden=H, intermediate=INTER))


LOAD_ERRORS: list[tuple[dict[str, Any], type[Exception], str]] = [
    (
        {"gate_up": np.zeros((E, 2 * INTER, H + 1), BF16)},
        ValueError,
        r"gate_up: expected shape \(4, 128, 32\), got \(4, 128, 33\)",
    ),
    (
        {"down": np.zeros((E, H, INTER - 1), BF16)},
        ValueError,
        r"down: expected shape \(4, 32, 64\), got \(4, 32, 63\)",
    ),
    ({"gate_up": np.zeros((E, 2 * INTER, H), np.float32)}, TypeError, "gate_up: expected dtype bfloat16"),
    ({"gate_up": np.zeros((2 * INTER, H), BF16)}, ValueError, "gate_up: expected a 3-d array, got 2-d"),
    (
        {"gate_up": np.zeros((E, H, 2 * INTER), BF16).transpose(0, 2, 1)},
        ValueError,
        "gate_up: must be C-contiguous",
    ),
    ({"gate_up": [[1.0]]}, TypeError, "gate_up: expected an array"),
    ({"down": None}, TypeError, "down: required"),
    ({"gate_up": None}, TypeError, "gate_up: required"),
    ({"gate_up": None, "gate": np.zeros((E, INTER, H), BF16)}, TypeError, "up: required together with gate"),
    (
        {"gate": np.zeros((E, INTER, H), BF16), "up": np.zeros((E, INTER, H), BF16)},
        TypeError,
        "either gate_up, or gate and up",
    ),
    (
        {"gate_up": None, "gate": np.zeros((E, INTER, H), BF16), "up": np.zeros((E, INTER + 1, H), BF16)},
        ValueError,
        r"up: expected shape \(4, 64, 32\)",
    ),
]


@pytest.mark.parametrize(("change", "error", "message"), LOAD_ERRORS)
def test_load_weights_validation(change: dict[str, Any], error: type[Exception], message: str) -> None:
    args: dict[str, Any] = {
        "gate_up": np.zeros((E, 2 * INTER, H), BF16),
        "down": np.zeros((E, H, INTER), BF16),
    } | change
    layer = unloaded_layer()
    with pytest.raises(error, match=message):
        layer.load_weights(**args)
    assert not layer.loaded


def test_separate_gate_up_weights_equal_fused(problem: Problem) -> None:
    rng = np.random.default_rng(5)
    gate_up, down = randn(rng, (E, 2 * INTER, H), H**-0.5), randn(rng, (E, H, INTER), INTER**-0.5)
    problem.layer.load_weights(gate_up=gate_up, down=down)
    fused = run_all(problem)
    problem.layer.load_weights(
        gate=np.ascontiguousarray(gate_up[:, :INTER]), up=np.ascontiguousarray(gate_up[:, INTER:]), down=down
    )
    assert_bitwise_equal(fused, run_all(problem))


# ---- forward argument validation ---------------------------------------------------------------


def forward_args(p: Problem) -> dict[str, Any]:
    return {"x": p.x, "ids": p.ids, "weights": p.weights, "out": p.out(), "lora": p.lora, "save": True}


def read_only(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


T = 17
FORWARD_ERRORS: list[tuple[str, Callable[[Problem], Any], type[Exception], str]] = [
    (
        "x",
        lambda p: np.zeros((T, H - 1), BF16),
        ValueError,
        rf"x: expected shape \(T, {H}\), got \({T}, {H - 1}\)",
    ),
    ("x", lambda p: np.zeros((T, H, 1), BF16), ValueError, "x: expected a 2-d array, got 3-d"),
    (
        "x",
        lambda p: np.zeros((T, H), np.float64),
        TypeError,
        "x: expected dtype bfloat16 .* or float32, got float64",
    ),
    ("x", lambda p: np.zeros((T, H), np.float16), TypeError, "x: expected dtype .* got float16"),
    ("x", lambda p: np.zeros((T, 2 * H), BF16)[:, ::2], ValueError, "x: must be C-contiguous"),
    ("x", lambda p: "not an array", TypeError, "x: expected an array .* got builtins.str"),
    ("x", lambda p: None, TypeError, "x: required, got None"),
    (
        "ids",
        lambda p: p.ids[:-1].copy(),
        ValueError,
        rf"ids: expected shape \({T}, {K}\), got \({T - 1}, {K}\)",
    ),
    ("ids", lambda p: p.ids.astype(np.float32), TypeError, "ids: expected dtype int32 or int64, got float32"),
    ("ids", lambda p: p.ids.astype(np.uint32), TypeError, "ids: expected dtype int32 or int64, got uint32"),
    ("ids", lambda p: p.ids.reshape(-1), ValueError, "ids: expected a 2-d array, got 1-d"),
    ("weights", lambda p: p.weights[:, :1].copy(), ValueError, rf"weights: expected shape \({T}, {K}\)"),
    (
        "weights",
        lambda p: p.weights.astype(np.float64),
        TypeError,
        "weights: expected dtype bfloat16 .* or float32, got float64",
    ),
    (
        "out",
        lambda p: np.zeros((T + 1, H), BF16),
        ValueError,
        rf"out: expected shape \({T}, {H}\), got \({T + 1}, {H}\)",
    ),
    ("out", lambda p: read_only(p.out()), ValueError, "out: is read-only"),
    ("out", lambda p: np.zeros((T, 2 * H), np.float32)[:, :H], ValueError, "out: must be C-contiguous"),
    ("out", lambda p: np.zeros((T, H), np.int32), TypeError, "out: expected dtype"),
    ("out", lambda p: p.x, ValueError, "out: shares memory with x"),
    (
        "out",
        lambda p: p.lora_arrays[1].reshape(-1)[: T * H].reshape(T, H),
        ValueError,
        "out: shares memory with b_gu",
    ),
    ("lora", lambda p: p.lora_arrays, TypeError, "lora: expected a kt_sft_kernels.LoRA or None, got tuple"),
]


@pytest.mark.parametrize(("arg", "make", "error", "message"), FORWARD_ERRORS)
def test_forward_validation(
    problem: Problem, arg: str, make: Callable[[Problem], Any], error: type[Exception], message: str
) -> None:
    args = forward_args(problem) | {arg: make(problem)}
    with pytest.raises(error, match=message):
        problem.layer.forward(**args)
    with pytest.raises(error, match=message):
        problem.layer.forward_async(**args)


def test_forward_with_a_lora_of_other_shapes_names_the_array(problem: Problem) -> None:
    a_gu, b_gu, a_d, b_d = problem.lora_arrays
    rng = np.random.default_rng(1)
    cases = [
        (
            kk.LoRA(
                randn(rng, (E, R, H + 1), dtype=np.float32),
                randn(rng, (E, 2 * INTER, R), dtype=np.float32),
                a_d,
                b_d,
                1.0,
                1.0,
            ),
            rf"a_gu: expected shape \({E}, r, {H}\), got \({E}, {R}, {H + 1}\)",
        ),
        (
            kk.LoRA(
                a_gu,
                b_gu,
                randn(rng, (E + 1, R, INTER), dtype=np.float32),
                randn(rng, (E + 1, H, R), dtype=np.float32),
                1.0,
                1.0,
            ),
            rf"a_d: expected shape \({E}, r, {INTER}\)",
        ),
        (
            kk.LoRA(a_gu, b_gu, a_d, randn(rng, (E, H + 2, R), dtype=np.float32), 1.0, 1.0),
            rf"b_d: expected shape \({E}, {H}, {R}\), got \({E}, {H + 2}, {R}\)",
        ),
    ]
    for lora, message in cases:
        with pytest.raises(ValueError, match=message):
            problem.layer.forward(problem.x, problem.ids, problem.weights, problem.out(), lora=lora)


# ---- LoRA / LoRAGrads construction --------------------------------------------------------------


def test_lora_properties(problem: Problem) -> None:
    lora = kk.LoRA(*problem.lora_arrays, 0.5, 0.25, version=3)
    assert (lora.rank_gate_up, lora.rank_down, lora.dtype) == (R, R, "float32")
    assert (lora.scale_gu, lora.scale_d, lora.version) == (0.5, 0.25, 3)
    lora.version += 1
    assert lora.version == 4
    assert lora.a_gu is problem.lora_arrays[0]
    half = kk.LoRA(None, None, *problem.lora_arrays[2:], None, 2.0)
    assert (half.rank_gate_up, half.rank_down, half.a_gu) == (0, R, None)


LORA_ERRORS: list[tuple[Callable[[tuple[np.ndarray, ...]], tuple[Any, ...]], type[Exception], str]] = [
    (lambda a: (a[0], None, a[2], a[3], 1.0, 1.0), TypeError, "b_gu: required together with a_gu"),
    (lambda a: (None, a[1], a[2], a[3], 1.0, 1.0), TypeError, "a_gu: required together with b_gu"),
    (lambda a: (None, None, None, None, 1.0, 1.0), TypeError, "no arrays given"),
    (
        lambda a: (a[0], a[1], a[2].astype(BF16), a[3].astype(BF16), 1.0, 1.0),
        TypeError,
        "a_d: dtype bfloat16 differs from a_gu's float32",
    ),
    (
        lambda a: (a[0], a[1][:, :, :-1].copy(), a[2], a[3], 1.0, 1.0),
        ValueError,
        "b_gu: expected shape .* to match a_gu",
    ),
    (lambda a: (a[0], a[1][:, :-1].copy(), a[2], a[3], 1.0, 1.0), ValueError, "must be even"),
    (
        lambda a: (a[0][:, :0].copy(), a[1][:, :, :0].copy(), a[2], a[3], 1.0, 1.0),
        ValueError,
        "rank .* must be >= 1",
    ),
    (lambda a: (a[0], a[1], a[2], a[3], None, 1.0), TypeError, "scale_gu: required"),
    (lambda a: (a[0], a[1], a[2], a[3], 1.0, float("nan")), ValueError, "scale_d: must be finite"),
    (
        lambda a: (a[0].astype(np.float64), a[1], a[2], a[3], 1.0, 1.0),
        TypeError,
        "a_gu: expected dtype bfloat16 .* or float32, got float64",
    ),
    (lambda a: (a[0][:, :, ::2], a[1], a[2], a[3], 1.0, 1.0), ValueError, "a_gu: must be C-contiguous"),
]


@pytest.mark.parametrize(("make", "error", "message"), LORA_ERRORS)
def test_lora_validation(
    problem: Problem, make: Callable[..., tuple[Any, ...]], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        kk.LoRA(*make(problem.lora_arrays))


def test_lora_grads_must_be_writable(problem: Problem) -> None:
    with pytest.raises(ValueError, match=r"db_d: is read-only"):
        kk.LoRAGrads(*problem.lora_arrays[:3], read_only(problem.lora_arrays[3]))


# ---- backward argument validation and handles ---------------------------------------------------


def forward_saved(p: Problem, lora: Any = "default") -> kk.ForwardHandle:
    return p.layer.forward(
        p.x, p.ids, p.weights, p.out(), lora=p.lora if lora == "default" else lora, save=True
    )


def test_forward_returns_a_handle_only_when_saving(problem: Problem) -> None:
    assert problem.layer.forward(problem.x, problem.ids, problem.weights, problem.out(), save=False) is None
    handle = forward_saved(problem)
    assert isinstance(handle, kk.ForwardHandle)
    assert (handle.tokens, handle.consumed, handle.has_lora) == (problem.tokens, False, True)


def test_consumed_handle_raises(problem: Problem) -> None:
    handle = forward_saved(problem)
    grad_x, grad_w, lg = problem.grads()
    problem.layer.backward(handle, problem.grad_out, grad_x, grad_w, lora_grads=lg)
    assert handle.consumed
    with pytest.raises(RuntimeError, match=r"already consumed"):
        problem.layer.backward(handle, problem.grad_out, grad_x, grad_w, lora_grads=lg)
    with pytest.raises(RuntimeError, match=r"already consumed"):
        problem.layer.backward_async(handle, problem.grad_out, grad_x, grad_w, lora_grads=lg)


def test_handle_of_another_layer_raises(problem: Problem) -> None:
    other = make_problem(seed=1)
    handle = forward_saved(other)
    grad_x, grad_w, lg = problem.grads()
    with pytest.raises(ValueError, match=r"saved: this ForwardHandle was returned by a different MoELayer"):
        problem.layer.backward(handle, problem.grad_out, grad_x, grad_w, lora_grads=lg)
    assert not handle.consumed


def test_backward_wants_a_handle(problem: Problem) -> None:
    grad_x, grad_w, lg = problem.grads()
    with pytest.raises(TypeError, match=r"saved: expected the ForwardHandle returned by forward"):
        problem.layer.backward(None, problem.grad_out, grad_x, grad_w, lora_grads=lg)
    with pytest.raises(TypeError):
        kk.ForwardHandle()


BACKWARD_ERRORS: list[tuple[str, Callable[[Problem], Any], type[Exception], str]] = [
    ("grad_out", lambda p: np.zeros((T, H + 1), BF16), ValueError, rf"grad_out: expected shape \({T}, {H}\)"),
    ("grad_out", lambda p: np.zeros((T, H), np.int64), TypeError, "grad_out: expected dtype"),
    (
        "grad_x",
        lambda p: np.zeros((T, H - 1), BF16),
        ValueError,
        rf"grad_x: expected shape \({T}, {H}\), got \({T}, {H - 1}\)",
    ),
    ("grad_x", lambda p: read_only(np.zeros((T, H), BF16)), ValueError, "grad_x: is read-only"),
    ("grad_x", lambda p: p.grad_out, ValueError, "grad_x: shares memory with grad_out"),
    ("grad_x", lambda p: p.x, ValueError, "grad_x: shares memory with x"),
    (
        "grad_weights",
        lambda p: np.zeros((T, K + 1), np.float32),
        ValueError,
        rf"grad_weights: expected shape \({T}, {K}\)",
    ),
    (
        "grad_weights",
        lambda p: np.zeros((T, K), np.int32),
        TypeError,
        "grad_weights: expected dtype bfloat16 .* or float32, got int32",
    ),
    (
        "grad_weights",
        lambda p: p.grad_out.reshape(-1).view(np.float32)[: T * K].reshape(T, K),
        ValueError,
        "grad_weights: shares memory with grad_out",
    ),
    ("lora_grads", lambda p: None, TypeError, "lora_grads: required"),
    ("lora_grads", lambda p: p.lora, TypeError, "lora_grads: expected a kt_sft_kernels.LoRAGrads"),
    (
        "lora_grads",
        lambda p: kk.LoRAGrads(*(np.zeros(a.shape, BF16) for a in p.lora_arrays)),
        TypeError,
        "da_gu: expected dtype float32 .the dtype of a_gu., got bfloat16",
    ),
    (
        "lora_grads",
        lambda p: kk.LoRAGrads(*(np.zeros(a.shape, np.float32) for a in p.lora_arrays[:2]), None, None),
        ValueError,
        "lora_grads: da_d is required",
    ),
    (
        "lora_grads",
        lambda p: kk.LoRAGrads(
            np.zeros((E, R + 1, H), np.float32),
            np.zeros((E, 2 * INTER, R + 1), np.float32),
            *(np.zeros(a.shape, np.float32) for a in p.lora_arrays[2:]),
        ),
        ValueError,
        rf"da_gu: expected shape \({E}, {R}, {H}\) .the shape of a_gu.",
    ),
    (
        "lora_grads",
        lambda p: kk.LoRAGrads(p.lora_arrays[0], *(np.zeros(a.shape, np.float32) for a in p.lora_arrays[1:])),
        ValueError,
        "da_gu: shares memory with a_gu",
    ),
]


@pytest.mark.parametrize(("arg", "make", "error", "message"), BACKWARD_ERRORS)
def test_backward_validation(
    problem: Problem, arg: str, make: Callable[[Problem], Any], error: type[Exception], message: str
) -> None:
    handle = forward_saved(problem)
    grad_x, grad_w, lg = problem.grads()
    args = {
        "saved": handle,
        "grad_out": problem.grad_out,
        "grad_x": grad_x,
        "grad_weights": grad_w,
        "lora_grads": lg,
    } | {arg: make(problem)}
    with pytest.raises(error, match=message):
        problem.layer.backward(**args)
    assert not handle.consumed  # a rejected call leaves the handle usable
    grad_x, grad_w, lg = problem.grads()
    problem.layer.backward(handle, problem.grad_out, grad_x, grad_w, lora_grads=lg)


def test_lora_grads_without_forward_lora_raise(problem: Problem) -> None:
    handle = forward_saved(problem, lora=None)
    grad_x, grad_w, lg = problem.grads()
    with pytest.raises(ValueError, match=r"lora_grads: the forward ran without LoRA"):
        problem.layer.backward(handle, problem.grad_out, grad_x, grad_w, lora_grads=lg)
    problem.layer.backward(handle, problem.grad_out, grad_x, grad_w)
    assert np.all(np.isfinite(grad_x.astype(np.float32))) and np.all(np.isfinite(grad_w))


def test_lora_on_one_projection_wants_grads_on_that_one_only(problem: Problem) -> None:
    a_gu, b_gu, a_d, b_d = problem.lora_arrays
    handle = forward_saved(problem, lora=kk.LoRA(None, None, a_d, b_d, None, 0.5))
    grad_x, grad_w, _ = problem.grads()
    extra = kk.LoRAGrads(np.zeros_like(a_gu), np.zeros_like(b_gu), np.zeros_like(a_d), np.zeros_like(b_d))
    with pytest.raises(ValueError, match=r"lora_grads: da_gu must be None"):
        problem.layer.backward(handle, problem.grad_out, grad_x, grad_w, lora_grads=extra)
    lg = kk.LoRAGrads(None, None, np.full_like(a_d, np.nan), np.full_like(b_d, np.nan))
    problem.layer.backward(handle, problem.grad_out, grad_x, grad_w, lora_grads=lg)
    assert np.all(np.isfinite(lg.da_d)) and np.all(np.isfinite(lg.db_d))


# ---- results across argument forms (bitwise) ----------------------------------------------------


def test_empty_batch(problem: Problem) -> None:
    x = np.zeros((0, H), BF16)
    ids, weights, out = np.zeros((0, K), np.int64), np.zeros((0, K), np.float32), np.zeros((0, H), BF16)
    assert problem.layer.forward(x, ids, weights, out) is None
    handle = problem.layer.forward(x, ids, weights, out, lora=problem.lora, save=True)
    assert handle.tokens == 0
    lg = kk.LoRAGrads(*(np.full(a.shape, np.nan, np.float32) for a in problem.lora_arrays))
    problem.layer.backward(
        handle, np.zeros((0, H), BF16), np.zeros((0, H), BF16), np.zeros((0, K), np.float32), lora_grads=lg
    )
    for g in (lg.da_gu, lg.db_gu, lg.da_d, lg.db_d):
        assert np.all(g == 0.0), "LoRA gradients of an empty batch are written as zeros"


def test_ids_int32_and_int64_give_equal_bits(problem: Problem) -> None:
    assert_bitwise_equal(run_all(problem), run_all(problem, ids=problem.ids.astype(np.int64)))


def test_bf16_as_uint16_bits_equals_ml_dtypes(problem: Problem) -> None:
    assert_bitwise_equal(run_all(problem), run_all(problem, x=problem.x.view(np.uint16)))


def test_f32_input_holding_bf16_values_equals_bf16_input(problem: Problem) -> None:
    assert_bitwise_equal(run_all(problem), run_all(problem, x=problem.x.astype(np.float32)))


def test_out_dtypes_and_bf16_routing_weights(problem: Problem) -> None:
    for out_dtype in (np.float32, BF16):
        out = problem.out(out_dtype)
        problem.layer.forward(problem.x, problem.ids, problem.weights.astype(BF16), out, lora=problem.lora)
        assert np.all(np.isfinite(out.astype(np.float32)))


def test_handle_keeps_x_and_lora_alive(problem: Problem) -> None:
    expected = run_all(problem)
    x, lora = problem.x.copy(), kk.LoRA(*(a.copy() for a in problem.lora_arrays), 0.5, 0.25)
    out = problem.out()
    handle = problem.layer.forward(x, problem.ids, problem.weights, out, lora=lora, save=True)
    del x, lora
    gc.collect()
    np.ones((1 << 16,), np.float64)  # reuse freed memory, if any was freed
    grad_x, grad_w, lg = problem.grads()
    problem.layer.backward(handle, problem.grad_out, grad_x, grad_w, lora_grads=lg)
    assert_bitwise_equal(expected, [out, grad_x, grad_w, lg.da_gu, lg.db_gu, lg.da_d, lg.db_d])


def test_dropping_a_handle_frees_it_without_backward(problem: Problem) -> None:
    for _ in range(50):
        forward_saved(problem)
    gc.collect()
    assert_bitwise_equal(run_all(problem), run_all(problem))


# ---- async ---------------------------------------------------------------------------------------


def test_async_equals_sync_bitwise(problem: Problem) -> None:
    expected = run_all(problem)
    out = problem.out()
    pending = problem.layer.forward_async(
        problem.x, problem.ids, problem.weights, out, lora=problem.lora, save=True
    )
    handle = pending.wait()
    assert pending.done()
    assert pending.wait() is handle
    grad_x, grad_w, lg = problem.grads()
    pending_b = problem.layer.backward_async(handle, problem.grad_out, grad_x, grad_w, lora_grads=lg)
    assert handle.consumed
    assert pending_b.wait() is None
    assert_bitwise_equal(expected, [out, grad_x, grad_w, lg.da_gu, lg.db_gu, lg.da_d, lg.db_d])


def test_async_calls_run_in_order_and_dropping_waits(problem: Problem) -> None:
    expected = run_all(problem)[0]
    outs = [problem.out() for _ in range(6)]
    for out in outs:
        problem.layer.forward_async(
            problem.x, problem.ids, problem.weights, out, lora=problem.lora
        )  # dropped
    for out in outs:
        assert out.tobytes() == expected.tobytes()


def test_sync_call_waits_for_queued_async_calls(problem: Problem) -> None:
    # A sync call on an idle pool runs on the caller's thread; with calls queued it must run after them.
    x2 = problem.x[::-1].copy()
    expected = run_all(problem, x=x2)[0]
    out = problem.out()
    pendings = [
        problem.layer.forward_async(problem.x, problem.ids, problem.weights, out, lora=problem.lora)
        for _ in range(6)
    ]
    problem.layer.forward(x2, problem.ids, problem.weights, out, lora=problem.lora)
    assert all(p.done() for p in pendings)
    assert out.tobytes() == expected.tobytes()


def test_sync_calls_on_a_pool_pinned_to_cpus_match_an_unpinned_pool() -> None:
    # Pools from a CPU list run every call on their pinned executor thread, never the caller's.
    cpus = kk.affinity_cpus()[:2]
    expected = run_all(make_problem(pool=kk.ThreadPool(len(cpus))))
    assert_bitwise_equal(expected, run_all(make_problem(pool=kk.ThreadPool(cpus=cpus))))


def test_async_keeps_its_arrays_alive(problem: Problem) -> None:
    expected = run_all(problem)[0]
    out = problem.out()
    pending = problem.layer.forward_async(
        problem.x.copy(),
        problem.ids.copy(),
        problem.weights.copy(),
        out,
        lora=kk.LoRA(*(a.copy() for a in problem.lora_arrays), 0.5, 0.25),
    )
    gc.collect()
    assert pending.wait() is None
    assert out.tobytes() == expected.tobytes()


def test_async_error_is_raised_by_wait_every_time() -> None:
    pending = _testing.failing_pending(kk.ThreadPool(2), "job failed on purpose")
    for _ in range(2):
        with pytest.raises(ValueError, match=r"job failed on purpose"):
            pending.wait()


def test_dropping_a_failed_pending_warns() -> None:
    pending = _testing.failing_pending(kk.default_pool(), "dropped failure")
    with pytest.warns(RuntimeWarning, match=r"dropped without wait.*dropped failure"):
        del pending
        gc.collect()


def test_concurrent_sync_calls_from_python_threads_are_safe() -> None:
    problem = make_problem(pool=kk.ThreadPool(2))
    expected = run_all(problem)
    results: list[list[np.ndarray]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                results.append(run_all(problem))
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 20
    for r in results:
        assert_bitwise_equal(expected, r)


def test_results_do_not_depend_on_the_pool_size() -> None:
    expected = run_all(make_problem(tokens=40, pool=kk.ThreadPool(1)))
    for threads in (2, 3):
        assert_bitwise_equal(expected, run_all(make_problem(tokens=40, pool=kk.ThreadPool(threads))))


# ---- fuzz: random argument forms never crash -----------------------------------------------------


def test_fuzz_forward_arguments(problem: Problem) -> None:
    """Random shapes, dtypes and layouts per argument: a result or ValueError/TypeError, never a crash."""
    rng = np.random.default_rng(123)
    dtypes = [BF16, np.float32, np.float64, np.int32, np.int64, np.uint16, np.float16, np.int8]

    def maybe_wrong(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        kind = int(rng.integers(5))
        if kind == 0:  # off-by-one extents
            shape = tuple(max(0, s + int(rng.integers(-1, 2))) for s in shape)
        elif kind == 1:  # wrong rank
            shape = (*shape, 1) if rng.integers(2) else shape[:1]
        elif kind == 2:  # another dtype
            dtype = dtypes[int(rng.integers(len(dtypes)))]
        a = np.zeros(shape, np.float32).astype(dtype)
        if kind == 3 and a.ndim == 2:  # strided
            a = np.zeros((a.shape[0], 2 * a.shape[1]), dtype)[:, ::2]
        return a

    outcomes = {"ok": 0, "rejected": 0}
    for _ in range(300):
        t = int(rng.integers(0, 5))
        args = {
            "x": maybe_wrong((t, H), BF16),
            "ids": maybe_wrong((t, K), np.int32),
            "weights": maybe_wrong((t, K), np.float32),
            "out": maybe_wrong((t, H), BF16),
        }
        try:
            problem.layer.forward(**args)
            outcomes["ok"] += 1
        except (ValueError, TypeError):
            outcomes["rejected"] += 1
    assert outcomes["ok"] > 0 and outcomes["rejected"] > 0, outcomes


# ---- torch interop (skipped when torch is absent; CI's test env has it) --------------------------


def test_torch_tensors_equal_numpy_bitwise(problem: Problem) -> None:
    torch = pytest.importorskip("torch")
    expected = run_all(problem)

    def t(a: np.ndarray) -> Any:
        return (
            torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
            if a.dtype == BF16
            else torch.from_numpy(a)
        )

    out = torch.full((problem.tokens, H), float("nan"), dtype=torch.bfloat16)
    lora = kk.LoRA(*(t(a) for a in problem.lora_arrays), 0.5, 0.25)
    handle = problem.layer.forward(
        t(problem.x), t(problem.ids), t(problem.weights), out, lora=lora, save=True
    )
    grad_x = torch.full((problem.tokens, H), float("nan"), dtype=torch.bfloat16)
    grad_w = torch.full((problem.tokens, K), float("nan"))
    grads = [torch.full(a.shape, float("nan")) for a in problem.lora_arrays]
    problem.layer.backward(handle, t(problem.grad_out), grad_x, grad_w, lora_grads=kk.LoRAGrads(*grads))
    got = [
        out.view(torch.uint16).numpy().view(BF16),
        grad_x.view(torch.uint16).numpy().view(BF16),
        grad_w.numpy(),
        *(g.numpy() for g in grads),
    ]
    assert_bitwise_equal(expected, got)


def test_torch_errors_are_clear(problem: Problem) -> None:
    torch = pytest.importorskip("torch")
    x = torch.empty((T, H), dtype=torch.bfloat16, device="meta")
    with pytest.raises(
        TypeError, match=r"x: expected an array .*torch.Tensor .its __dlpack__.. raised: .*meta"
    ):
        problem.layer.forward(x, problem.ids, problem.weights, problem.out())
    out = torch.zeros((T, 2 * H), dtype=torch.bfloat16)[:, :H]
    with pytest.raises(ValueError, match=r"out: must be C-contiguous"):
        problem.layer.forward(problem.x, problem.ids, problem.weights, out)
    with pytest.raises(TypeError, match=r"weights: expected dtype bfloat16 .* or float32, got float64"):
        problem.layer.forward(problem.x, problem.ids, torch.zeros((T, K), dtype=torch.float64), problem.out())
