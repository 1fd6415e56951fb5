"""Memory safety of the kernel API (issue 16 item 8): arrays whose storage moves after they were
handed over, and the up-front size check of forward/backward.

A LoRA, LoRAGrads or ForwardHandle keeps the caller's objects and imports them again at every call:
storage that moved (here: NumPy `resize(refcheck=False)`, which frees the old buffer) is followed to
its new memory; a changed shape or dtype raises ValueError naming the array. Each test compares a run
whose arrays moved (and then got new values) with a run whose arrays got the same values in place:
reading the freed buffer, or writing into it, would make the two differ.
"""

from __future__ import annotations

from collections.abc import Callable

import kt_sft_kernels as kk
import numpy as np
import pytest
from kt_sft_kernels.testing import (
    BF16,
    KernelResult,
    MoECase,
    build_layer,
    kernel_lora,
    make_case,
    nan_array,
    run_backward,
)


def move_storage(a: np.ndarray) -> None:
    """Re-allocates `a`'s buffer in place (the old one is freed), keeping its shape and values."""
    shape, values, before = a.shape, a.copy(), a.ctypes.data
    grow = 4
    while a.ctypes.data == before:
        a.resize((a.size * grow,), refcheck=False)
        grow *= 4
    a.resize(shape, refcheck=False)
    a[...] = values
    assert a.ctypes.data != before


def new_values(a: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (
        (rng.standard_normal(a.shape) * float(np.std(a.astype(np.float32))))
        .astype(np.float32)
        .astype(a.dtype)
    )


def run(
    case: MoECase,
    layer: kk.MoELayer,
    *,
    before_forward: Callable[[], None],
    before_backward: Callable[[], None],
) -> KernelResult:
    lora = kernel_lora(case)
    before_forward()
    out = nan_array(case.x.shape, case.x.dtype)
    handle = layer.forward(case.x, case.ids, case.weights, out, lora=lora, save=True)
    result = KernelResult(out=out)
    before_backward()
    run_backward(layer, handle, case, result)
    return result


def fresh_case() -> MoECase:
    return make_case(
        tokens=37, num_experts=4, top_k=2, hidden=64, intermediate=64, rank_gu=4, rank_d=4, seed=3
    )


def assert_same(a: KernelResult, b: KernelResult) -> None:
    np.testing.assert_array_equal(a.out, b.out)
    np.testing.assert_array_equal(a.grad_x, b.grad_x)
    np.testing.assert_array_equal(a.grad_weights, b.grad_weights)
    assert a.lora_grads.keys() == b.lora_grads.keys()
    for name in a.lora_grads:
        np.testing.assert_array_equal(a.lora_grads[name], b.lora_grads[name])


def lora_array(case: MoECase, name: str) -> np.ndarray:
    assert case.lora is not None
    array = getattr(case.lora, name)
    assert array is not None
    return array


# (where the array moves, which array): every public entry point that keeps an array past the call
# that received it.
MOVES = [
    ("before_forward", "a_gu"),  # a LoRA built earlier, used by forward
    ("before_forward", "b_d"),
    ("before_backward", "a_gu"),  # the forward's LoRA, read again by backward through the handle
    ("before_backward", "b_gu"),
    ("before_backward", "a_d"),
    ("before_backward", "b_d"),
    ("before_backward", "x"),  # x, kept by the handle for the backward
]


@pytest.mark.parametrize("numa_shards", [1, 2])  # 2: the shards' own caches follow the move too
@pytest.mark.parametrize(("when", "name"), MOVES)
def test_moved_storage_is_followed(when: str, name: str, numa_shards: int) -> None:
    results = []
    for move in (False, True):
        case = fresh_case()
        layer = build_layer(case, numa_shards=numa_shards)
        array = case.x if name == "x" else lora_array(case, name)
        replacement = new_values(array, seed=11)

        def change(
            array: np.ndarray = array, replacement: np.ndarray = replacement, move: bool = move
        ) -> None:
            if move:
                move_storage(array)
            array[...] = replacement

        hooks = {"before_forward": lambda: None, "before_backward": lambda: None, when: change}
        results.append(run(case, layer, **hooks))
    assert np.isfinite(results[0].out.astype(np.float32)).all()
    assert_same(results[0], results[1])


@pytest.mark.parametrize("name", ["da_gu", "db_gu", "da_d", "db_d"])
def test_moved_gradient_storage_receives_the_gradient(name: str) -> None:
    results = []
    for move in (False, True):
        case = fresh_case()
        layer = build_layer(case)
        out = nan_array(case.x.shape, case.x.dtype)
        handle = layer.forward(case.x, case.ids, case.weights, out, lora=kernel_lora(case), save=True)
        assert case.lora is not None
        grads = {
            g: nan_array(getattr(case.lora, g[1:]).shape, case.lora.dtype)
            for g in ("da_gu", "db_gu", "da_d", "db_d")
        }
        lora_grads = kk.LoRAGrads(**grads)
        if move:
            move_storage(grads[name])
        grad_x = nan_array(case.x.shape, case.x.dtype)
        grad_w = nan_array(case.weights.shape, case.weights.dtype)
        layer.backward(handle, case.grad_out, grad_x, grad_w, lora_grads=lora_grads)
        results.append(grads[name].copy())
    assert np.isfinite(results[0]).all()
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize(
    ("name", "new_shape"),
    [("a_gu", (4, 2, 64)), ("b_d", (4, 64, 2)), ("x", (36, 64)), ("a_d", (4 * 4 * 64,))],
)
def test_changed_shape_is_rejected(name: str, new_shape: tuple[int, ...]) -> None:
    case = fresh_case()
    layer = build_layer(case)
    lora = kernel_lora(case)
    out = nan_array(case.x.shape, case.x.dtype)
    array = case.x if name == "x" else lora_array(case, name)
    if name == "a_gu":  # the LoRA was built with the old shape; forward must refuse the new one
        array.resize(new_shape, refcheck=False)
        with pytest.raises(
            ValueError, match=r"^a_gu: changed after the LoRA was built: it was \(4, 4, 64\) float32"
        ):
            layer.forward(case.x, case.ids, case.weights, out, lora=lora, save=True)
        return
    handle = layer.forward(case.x, case.ids, case.weights, out, lora=lora, save=True)
    grads = kk.LoRAGrads(
        *(nan_array(lora_array(case, n).shape, np.float32) for n in ("a_gu", "b_gu", "a_d", "b_d"))
    )
    array.resize(new_shape, refcheck=False)
    grad_x = nan_array(out.shape, out.dtype)
    grad_w = nan_array(case.weights.shape, case.weights.dtype)
    expected = r"3-d array, got 1-d" if len(new_shape) == 1 else rf"^{name}: changed after the LoRA was built"
    if name == "x":
        expected = r"^x: changed after the forward that saved it: it was \(37, 64\)"
    with pytest.raises(ValueError, match=expected):
        layer.backward(handle, case.grad_out, grad_x, grad_w, lora_grads=grads)
    assert not handle.consumed  # a rejected backward leaves the handle usable


def test_changed_dtype_is_rejected() -> None:
    case = fresh_case()
    layer = build_layer(case)
    lora = kernel_lora(case)
    out = nan_array(case.x.shape, case.x.dtype)
    handle = layer.forward(case.x, case.ids, case.weights, out, lora=lora, save=True)
    assert case.lora is not None
    # A LoRA built from an object whose dtype can change: a holder exposing a swappable array.
    holder = SwappableArray(case.lora.b_d)
    lora2 = kk.LoRA(
        case.lora.a_gu, case.lora.b_gu, case.lora.a_d, holder, case.lora.scale_gu, case.lora.scale_d
    )
    holder.array = case.lora.b_d.astype(np.float64)
    with pytest.raises(TypeError, match=r"^b_d: expected dtype"):
        layer.forward(case.x, case.ids, case.weights, out, lora=lora2)
    holder.array = case.lora.b_d.reshape(4, 32, 8).copy()
    with pytest.raises(
        ValueError, match=r"^b_d: changed after the LoRA was built: it was \(4, 64, 4\) float32"
    ):
        layer.forward(case.x, case.ids, case.weights, out, lora=lora2)
    del handle


class SwappableArray:
    """An object whose buffer (__dlpack__) can be swapped for another array at any time."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __dlpack__(self, **kwargs: object) -> object:
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.array.__dlpack_device__()


def test_swapped_buffer_is_followed() -> None:
    case = fresh_case()
    assert case.lora is not None
    layer = build_layer(case)
    holder = SwappableArray(case.lora.a_gu.copy())
    lora = kk.LoRA(
        holder, case.lora.b_gu, case.lora.a_d, case.lora.b_d, case.lora.scale_gu, case.lora.scale_d
    )
    replacement = new_values(case.lora.a_gu, seed=5)
    holder.array = replacement  # a new buffer; the old one is no longer referenced by anyone
    out = nan_array(case.x.shape, case.x.dtype)
    layer.forward(case.x, case.ids, case.weights, out, lora=lora)
    case.lora.a_gu[...] = replacement
    expected = nan_array(case.x.shape, case.x.dtype)
    layer.forward(case.x, case.ids, case.weights, expected, lora=kernel_lora(case))
    np.testing.assert_array_equal(out, expected)


# ---- the up-front size check (item 8b) --------------------------------------------------------------


def test_available_memory_reading() -> None:
    available, source = kk._core._testing.available_memory()
    assert available > 0
    assert source in {
        "MemAvailable",
        "the cgroup v2 limit memory.max",
        "the cgroup v1 limit memory.limit_in_bytes",
    }


def test_forward_larger_than_memory_raises_memory_error(monkeypatch: pytest.MonkeyPatch) -> None:
    case = make_case(tokens=512, num_experts=4, top_k=2, hidden=64, intermediate=64, rank_gu=4, rank_d=4)
    layer = build_layer(case, pool=kk.ThreadPool(threads=1))  # a fresh pool: a fresh (empty) workspace
    monkeypatch.setenv("KT_SFT_TEST_MEM_LIMIT", "100000")
    assert kk._core._testing.available_memory() == (100000, "KT_SFT_TEST_MEM_LIMIT")
    out = nan_array(case.x.shape, case.x.dtype)
    with pytest.raises(
        MemoryError,
        match=r"^forward: 512 tokens with top_k=2 need about .* \(\d+ bytes\) more for the "
        r"workspace and the activation cache, but only .* \(100000 bytes\) are available "
        r"\(KT_SFT_TEST_MEM_LIMIT\); pass fewer tokens per call \(a smaller micro-batch size",
    ):
        layer.forward(case.x, case.ids, case.weights, out, lora=kernel_lora(case), save=True)
    assert np.isnan(out.astype(np.float32)).all()  # nothing ran
    monkeypatch.delenv("KT_SFT_TEST_MEM_LIMIT")
    handle = layer.forward(case.x, case.ids, case.weights, out, lora=kernel_lora(case), save=True)
    assert np.isfinite(out.astype(np.float32)).all()
    # backward needs more workspace than the forward reserved: the same check, naming backward
    monkeypatch.setenv("KT_SFT_TEST_MEM_LIMIT", "1000")
    result = KernelResult(out=out)
    with pytest.raises(MemoryError, match=r"^backward: 512 tokens with top_k=2 need about"):
        run_backward(layer, handle, case, result)


def test_a_recent_reading_never_approves_a_call_larger_than_memory() -> None:
    # The check reuses a reading for 100 ms (less what it approved since); a call that does not fit
    # that budget must still be refused on a fresh reading of the real limits (no test override).
    available, _ = kk._core._testing.available_memory()
    if available > 64 << 30:
        pytest.skip(
            "needs a machine with at most 64 GiB available (the refused call's weights scale with it)"
        )
    rng = np.random.default_rng(7)
    tokens, hidden = 4096, 64
    # forward(save=True) needs about 8 * I bytes per routed pair (cache, h, packing): twice what is available.
    inter = (2 * available // (8 * tokens) + 31) // 32 * 32
    layer = kk.MoELayer(
        kk.MoEConfig(num_experts=1, top_k=1, hidden=hidden, intermediate=inter), pool=kk.ThreadPool(1)
    )
    layer.load_weights(
        gate_up=rng.standard_normal((1, 2 * inter, hidden), dtype=np.float32).astype(BF16),
        down=rng.standard_normal((1, hidden, inter), dtype=np.float32).astype(BF16),
    )
    ids, weights = np.zeros((tokens, 1), np.int32), np.ones((tokens, 1), np.float32)
    x = rng.standard_normal((tokens, hidden), dtype=np.float32).astype(BF16)
    out = nan_array((tokens, hidden), BF16)
    layer.forward(x[:1], ids[:1], weights[:1], out[:1], save=True)  # a reading, and a budget from it
    with pytest.raises(
        MemoryError, match=r"^forward: 4096 tokens with top_k=1 need about .* are available \((?!KT_SFT)"
    ):
        layer.forward(x, ids, weights, out, save=True)
    assert np.isnan(out[1:].astype(np.float32)).all()  # nothing ran


def test_calls_within_reserved_workspace_need_no_new_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    case = make_case(tokens=64, num_experts=4, top_k=2, hidden=64, intermediate=64, rank_gu=0, rank_d=0)
    layer = build_layer(case, pool=kk.ThreadPool(threads=1))
    out = nan_array(case.x.shape, case.x.dtype)
    layer.forward(case.x, case.ids, case.weights, out)  # reserves the workspace of 64 tokens
    monkeypatch.setenv("KT_SFT_TEST_MEM_LIMIT", "0")
    small = nan_array((8, 64), case.x.dtype)
    layer.forward(case.x[:8], case.ids[:8], case.weights[:8], small)  # fits what is already there
    np.testing.assert_array_equal(small, out[:8])
