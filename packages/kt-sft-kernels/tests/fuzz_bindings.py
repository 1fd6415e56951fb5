"""Hypothesis fuzzing of every public kernel entry point (DESIGN.md §5, issue 16 "What to build" 1).

Not collected by pytest directly: tests/test_fuzz.py runs it in a subprocess (a crash there is a test
failure naming the seed, not the end of the test run), as `python -X faulthandler tests/fuzz_bindings.py`
with KT_SFT_FUZZ_EXAMPLES and KT_SFT_FUZZ_SEED. Every call either succeeds — and then equals the float64
NumPy reference where its inputs are valid — or raises one of the documented exceptions:
TypeError / ValueError (bad arguments), RuntimeError (consumed handle, layer not loaded),
NotImplementedError (features not built), MemoryError (more memory than available).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kt_sft_kernels as kk
import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from kt_sft_kernels import testing as kt

DOCUMENTED = (TypeError, ValueError, RuntimeError, NotImplementedError, MemoryError)
EXAMPLES = int(os.environ.get("KT_SFT_FUZZ_EXAMPLES", "150"))
SEED = int(os.environ.get("KT_SFT_FUZZ_SEED", "0"))
POOL = kk.ThreadPool(threads=2)
BF16 = kt.BF16
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # never writes into the working directory
    suppress_health_check=list(HealthCheck),
    derandomize=False,
)

# dtypes a caller might pass; only some are accepted for each argument
ANY_DTYPES = [BF16, np.float32, np.float64, np.float16, np.int32, np.int64, np.int8, np.bool_]
# uint16 arrays are taken as bf16 bits (a documented convenience), so only the LoRA fuzz passes them
LORA_DTYPES = [*ANY_DTYPES, np.uint16]


OUTCOMES: Counter[str] = Counter()  # what the calls gave, reported at the end (docs/reliability.md)


def call(fn: Callable[[], Any]) -> tuple[bool, Any]:
    """(succeeded, result or exception); anything but a documented exception propagates."""
    try:
        result = fn()
    except DOCUMENTED as e:
        assert str(e), f"{type(e).__name__} without a message"
        assert "\n" not in str(e).strip(), f"multi-line error: {e}"
        OUTCOMES[type(e).__name__] += 1
        return False, e
    OUTCOMES["ok"] += 1
    return True, result


@dataclass
class Mutation:
    """How one argument is spoilt (or "none")."""

    kind: str  # none, dtype, shape, rank, noncontiguous, readonly, alias, nan, inf
    dtype: Any = None


def mutations(output: bool) -> st.SearchStrategy[Mutation]:
    kinds = ["none"] * 30 + ["dtype", "shape", "rank", "noncontiguous", "nan", "inf"]
    if output:
        kinds += ["readonly", "alias"]
    return st.builds(Mutation, st.sampled_from(kinds), st.sampled_from(ANY_DTYPES))


def spoil(a: np.ndarray, m: Mutation, rng: np.random.Generator) -> tuple[Any, bool]:
    """(the argument to pass, whether that alone makes the call invalid). Shape and rank changes are
    judged by the caller (the arguments' shapes must agree with each other)."""
    if m.kind == "dtype":
        with np.errstate(all="ignore"):
            return a.astype(m.dtype), False  # judged by the caller: each argument accepts its own dtypes
    if m.kind == "shape":
        shape = list(a.shape)
        i = int(rng.integers(len(shape)))
        shape[i] += 1 if shape[i] == 0 or rng.random() < 0.5 else -1
        return np.zeros(shape, a.dtype), False
    if m.kind == "rank":
        return (a.reshape(-1) if a.ndim > 1 else a[None]), False
    if m.kind == "noncontiguous":
        view = np.repeat(a, 2, axis=-1)[..., ::2]
        return view, view.size > 1 and not view.flags.c_contiguous
    if m.kind == "readonly":
        b = a.copy()
        b.flags.writeable = False
        return b, True
    floating = a.dtype == BF16 or np.issubdtype(a.dtype, np.floating)
    if m.kind in ("nan", "inf") and a.size and floating:
        b = a.copy()
        b.reshape(-1)[int(rng.integers(a.size))] = np.nan if m.kind == "nan" else -np.inf
        return b, False
    return a, False


def shapes_agree(x: Any, ids: Any, weights: Any, out: Any, k: int, H: int) -> bool:
    if x.ndim != 2 or x.shape[1] != H:
        return False
    T = x.shape[0]
    return ids.shape == (T, k) and weights.shape == (T, k) and out.shape == (T, H)


# ---- strategies ---------------------------------------------------------------------------------------


@st.composite
def layer_cases(draw: st.DrawFn) -> kt.MoECase:
    E = draw(st.integers(2, 6))
    k = draw(st.integers(1, min(E, 3)))
    T = draw(st.sampled_from([0, 1, 2, 15, 16, 17, 33]))
    rank_gu = draw(st.sampled_from([0, 1, 4]))
    rank_d = draw(st.sampled_from([0, 2, 4]))
    lora_dtype = draw(st.sampled_from([np.float32, BF16]))
    x_dtype = draw(st.sampled_from([np.float32, BF16]))
    case = kt.make_case(
        tokens=max(T, 1),
        num_experts=E,
        top_k=k,
        hidden=draw(st.sampled_from([32, 64])),
        intermediate=draw(st.sampled_from([32, 64])),
        rank_gu=rank_gu,
        rank_d=rank_d,
        lora_dtype=lora_dtype,
        x_dtype=x_dtype,
        id_dtype=draw(st.sampled_from([np.int32, np.int64])),
        weight_dtype=draw(st.sampled_from([np.float32, BF16])),
        idle_experts=0,
        seed=draw(st.integers(0, 2**16)),
    )
    # ids: negative, >= E and duplicates within a token
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if draw(st.booleans()):
        mask = rng.random(case.ids.shape) < 0.3
        case.ids[mask] = rng.integers(-3, E + 3, size=int(mask.sum()))
    if T == 0:
        case.x, case.ids, case.weights, case.grad_out = (
            case.x[:0],
            case.ids[:0],
            case.weights[:0],
            case.grad_out[:0],
        )
    return case


LAYERS: dict[tuple[int, int, int, int, bytes], kk.MoELayer] = {}


def layer_for(case: kt.MoECase) -> kk.MoELayer:
    key = (case.num_experts, case.top_k, case.hidden, case.intermediate, case.gate_up.tobytes()[:64])
    if key not in LAYERS:
        if len(LAYERS) > 16:
            LAYERS.clear()
        LAYERS[key] = kt.build_layer(case, POOL)
    return LAYERS[key]


def assert_matches_reference(case: kt.MoECase, got: kt.KernelResult, *, backward: bool) -> None:
    with np.errstate(all="ignore"):
        ref = kt.moe_reference(case)
    pairs = [("out", got.out, ref.out, 1e-2)]
    if backward:
        pairs += [
            ("grad_x", got.grad_x, ref.grad_x, 2e-2),
            ("grad_weights", got.grad_weights, ref.grad_weights, 3e-2),
        ]
        pairs += [(n, got.lora_grads[n], ref.lora_grads[n], 3e-2) for n in ref.lora_grads]
    for name, g, r, tol in pairs:
        g64, r64 = kt.as_f64(g), kt.as_f64(r)
        np.testing.assert_array_equal(
            np.isfinite(g64), np.isfinite(r64), err_msg=f"non-finite pattern of {name}"
        )
        finite = np.isfinite(r64)
        err = kt.rel_fro(np.where(finite, g64, 0.0), np.where(finite, r64, 0.0))
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


# ---- the fuzz tests ---------------------------------------------------------------------------------


@seed(SEED)
@SETTINGS
@given(case=layer_cases(), data=st.data())
def fuzz_forward_backward(case: kt.MoECase, data: st.DataObject) -> None:
    layer = layer_for(case)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    T, H = case.x.shape
    names = ["x", "ids", "weights", "out"]
    accepted = {"x": (np.float32, BF16), "ids": (np.int32, np.int64), "weights": (np.float32, BF16)}
    accepted["out"] = accepted["x"]
    base = {"x": case.x, "ids": case.ids, "weights": case.weights, "out": kt.nan_array((T, H), case.x.dtype)}
    args: dict[str, Any] = {}
    must_fail = False
    poisoned = False  # a NaN/Inf was put in: the policy tests (test_reliability.py) check those values
    reshaped = False  # a shape changed: the reference would need other inputs; success is enough
    for n in names:
        m = data.draw(mutations(output=n == "out"), label=n)
        if n == "ids" and m.kind in ("nan", "inf"):
            m = Mutation("none")
        arg, refused = spoil(base[n], m, rng)
        if m.kind == "dtype":
            refused = np.dtype(m.dtype) not in [np.dtype(d) for d in accepted[n]]
            if not refused and n != "out":
                base[n] = arg  # an accepted dtype: the reference sees the same values
        if m.kind == "alias" and T > 0:
            same = base["x"].dtype == base["out"].dtype
            arg, refused = (base["x"], True) if same else (base["out"], False)
        if m.kind in ("nan", "inf"):
            base[n], poisoned = arg, True
        reshaped |= m.kind in ("shape", "rank")
        must_fail |= refused
        args[n] = arg
    must_fail |= not shapes_agree(args["x"], args["ids"], args["weights"], args["out"], case.top_k, H)
    case.x, case.ids, case.weights = base["x"], base["ids"], base["weights"]
    lora = kt.kernel_lora(case)
    save = data.draw(st.booleans(), label="save")
    ok, result = call(
        lambda: layer.forward(args["x"], args["ids"], args["weights"], args["out"], lora=lora, save=save)
    )
    if must_fail:
        assert not ok, "a spoilt argument was accepted"
        return
    assert ok, f"valid forward refused: {result!r}"
    if not save:
        if not (poisoned or reshaped) and args["out"].dtype == case.x.dtype:
            assert_matches_reference(case, kt.KernelResult(out=args["out"]), backward=False)
        return
    handle = result
    got = kt.KernelResult(out=args["out"])
    # backward: grad arrays possibly spoilt, and the handle possibly misused
    misuse = data.draw(st.sampled_from(["none"] * 4 + ["foreign", "not_a_handle", "no_grads", "extra_grads"]))
    grads = None
    if case.lora is not None:
        for gname, like in (
            ("da_gu", case.lora.a_gu),
            ("db_gu", case.lora.b_gu),
            ("da_d", case.lora.a_d),
            ("db_d", case.lora.b_d),
        ):
            if like is not None:
                got.lora_grads[gname] = kt.nan_array(like.shape, like.dtype)
        grads = kk.LoRAGrads(**got.lora_grads)
    got.grad_x = kt.nan_array((T, H), case.x.dtype)
    got.grad_weights = kt.nan_array(case.weights.shape, case.weights.dtype)
    grad_m = data.draw(mutations(output=False), label="grad_out")
    grad_out, bad = spoil(case.grad_out, grad_m, rng)
    if grad_m.kind == "dtype":
        bad = np.dtype(grad_m.dtype) not in (np.dtype(np.float32), np.dtype(BF16))
        if not bad:
            case.grad_out = grad_out
    if grad_m.kind in ("nan", "inf"):
        case.grad_out, poisoned = grad_out, True
    bad |= grad_m.kind in ("shape", "rank")
    saved: Any = handle
    if misuse == "foreign":
        other = kt.build_layer(case, POOL)
        saved = other.forward(case.x, case.ids, case.weights, kt.nan_array((T, H), case.x.dtype), save=True)
    elif misuse == "not_a_handle":
        saved = object()
    elif misuse == "no_grads":
        bad |= grads is not None
        grads = None
    elif misuse == "extra_grads" and grads is None:
        grads = kk.LoRAGrads(np.zeros((1, 1, 1), np.float32), np.zeros((1, 1, 1), np.float32))
        bad = True
    bad |= misuse in ("foreign", "not_a_handle")
    ok, err = call(lambda: layer.backward(saved, grad_out, got.grad_x, got.grad_weights, lora_grads=grads))
    if bad:
        assert not ok, "a spoilt backward was accepted"
        assert not handle.consumed  # a refused backward leaves the handle usable
        return
    assert ok, f"valid backward refused: {err!r}"
    assert handle.consumed
    again, err = call(
        lambda: layer.backward(handle, grad_out, got.grad_x, got.grad_weights, lora_grads=grads)
    )
    assert not again and isinstance(err, RuntimeError)
    if not (poisoned or reshaped) and args["out"].dtype == case.x.dtype:
        assert_matches_reference(case, got, backward=True)
        OUTCOMES["compared with the reference (forward+backward)"] += 1


@seed(SEED)
@SETTINGS
@given(
    shapes=st.lists(
        st.one_of(st.none(), st.lists(st.integers(0, 5), min_size=1, max_size=4)), min_size=4, max_size=4
    ),
    dtype=st.sampled_from(LORA_DTYPES),
    scales=st.tuples(
        st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
        st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    ),
)
def fuzz_lora_and_grads(shapes: list, dtype: Any, scales: tuple) -> None:
    arrays = [None if s is None else np.ones(s, dtype) for s in shapes]
    call(lambda: kk.LoRA(*arrays, *scales))
    call(lambda: kk.LoRAGrads(*arrays))


@seed(SEED)
@SETTINGS
@given(
    E=st.integers(-2, 70),
    k=st.integers(-2, 70),
    H=st.sampled_from([-32, 0, 16, 32, 33, 64]),
    inter=st.sampled_from([-32, 0, 16, 32, 40, 64]),
    wd=st.sampled_from(["bf16", "int8", "int4", "fp8", ""]),
    threads=st.integers(-3, 4),
    shape_delta=st.integers(-1, 1),
    load_dtype=st.sampled_from([BF16, np.float32, np.uint16]),
)
def fuzz_config_pool_and_load(
    E: int, k: int, H: int, inter: int, wd: str, threads: int, shape_delta: int, load_dtype: Any
) -> None:
    ok, cfg = call(
        lambda: kk.MoEConfig(num_experts=E, top_k=k, hidden=H, intermediate=inter, weight_dtype=wd)
    )
    ok_pool, pool = call(lambda: kk.ThreadPool(threads=threads))
    if not ok or not ok_pool:
        return
    ok, layer = call(lambda: kk.MoELayer(cfg, pool=pool))
    if not ok or E > 8:
        return
    gate_up = np.zeros((E, 2 * inter + shape_delta, H), load_dtype)
    down = np.zeros((E, H, inter), load_dtype)
    ok, _ = call(lambda: layer.load_weights(gate_up=gate_up, down=down))
    quantized = wd != "bf16"  # quantized layers take bf16 or f32 sources
    assert ok == (shape_delta == 0 and (quantized or np.dtype(load_dtype) != np.float32))
    x = np.zeros((3, H), np.float32)
    ok, _ = call(lambda: layer.forward(x, np.zeros((3, k), np.int32), np.zeros((3, k), np.float32), x.copy()))
    assert ok == layer.loaded


@seed(SEED)
@SETTINGS
@given(tokens=st.sampled_from([4096, 8192]), limit=st.sampled_from([0, 1000, 100000]))
def fuzz_huge_calls_raise_memory_error(tokens: int, limit: int) -> None:
    case = kt.make_case(
        tokens=tokens, num_experts=4, top_k=2, hidden=32, intermediate=32, rank_gu=0, rank_d=0
    )
    layer = kt.build_layer(case, kk.ThreadPool(threads=1))  # a fresh pool: nothing reserved yet
    os.environ["KT_SFT_TEST_MEM_LIMIT"] = str(limit)
    try:
        ok, err = call(
            lambda: layer.forward(case.x, case.ids, case.weights, np.empty_like(case.x), save=True)
        )
    finally:
        del os.environ["KT_SFT_TEST_MEM_LIMIT"]
    assert not ok and isinstance(err, MemoryError) and "tokens per call" in str(err)


@seed(SEED)
@SETTINGS
@given(drop=st.sampled_from(["handle", "pending", "layer", "pool"]), n=st.integers(1, 3))
def fuzz_dropped_objects(drop: str, n: int) -> None:
    case = kt.make_case(tokens=9, num_experts=4, top_k=2, hidden=32, intermediate=32, rank_gu=2, rank_d=2)
    pool = kk.ThreadPool(threads=2)
    layer = kt.build_layer(case, pool)
    lora = kt.kernel_lora(case)
    outs = [np.empty_like(case.x) for _ in range(n)]
    pendings = [layer.forward_async(case.x, case.ids, case.weights, o, lora=lora, save=True) for o in outs]
    if drop == "pending":
        pendings.clear()
    elif drop == "handle":
        handles = [p.wait() for p in pendings]
        del handles
    elif drop in ("layer", "pool"):
        del layer, pool
        for p in pendings:
            assert isinstance(p.wait(), kk.ForwardHandle)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


@seed(SEED)
@SETTINGS
@given(
    wd=st.sampled_from(["int8", "int4"]),
    group=st.sampled_from([32, 64, 128]),
    spoilt=st.sampled_from([None, None, 0, 1, 2, 3]),
    wrong_dtype=st.sampled_from([np.int8, np.uint8, np.float32, BF16, np.float64]),
    scale_dtype=st.sampled_from([np.float32, BF16]),
    delta=st.sampled_from([0, -1, 1]),
    isa=st.sampled_from([None, "portable", "avx2", "avx512", "avx512_bf16", "amx", "sse9", ""]),
)
def fuzz_quantized_bases(
    wd: str, group: int, spoilt: int | None, wrong_dtype: Any, scale_dtype: Any, delta: int, isa: str | None
) -> None:
    E, H, inter = 2, 128, 128
    cfg = kk.MoEConfig(
        num_experts=E, top_k=1, hidden=H, intermediate=inter, weight_dtype=wd, group_size=group
    )
    layer = kk.MoELayer(cfg, pool=POOL)
    assert call(layer.memory_report)[0]
    packed = 1 if wd == "int8" else 2
    shapes = [
        (E, 2 * inter, H // packed),
        (E, 2 * inter) if wd == "int8" else (E, 2 * inter, H // group),
        (E, H, inter // packed),
        (E, H) if wd == "int8" else (E, H, inter // group),
    ]
    q_dtype = np.int8 if wd == "int8" else np.uint8
    arrays = [np.ones(shape, dtype) for shape, dtype in zip(shapes, [q_dtype, scale_dtype] * 2, strict=True)]
    must_fail = False
    if spoilt is not None:  # one array of another dtype, or of a wrong last extent
        shape = (*shapes[spoilt][:-1], shapes[spoilt][-1] + delta)
        dtype = np.dtype(wrong_dtype if delta == 0 else arrays[spoilt].dtype)
        accepted = [np.dtype(q_dtype)] if spoilt % 2 == 0 else [np.dtype(np.float32), np.dtype(BF16)]
        must_fail = delta != 0 or dtype not in accepted
        arrays[spoilt] = np.ones(shape, dtype)
    ok, _ = call(lambda: layer.load_quantized(*arrays))
    assert ok != must_fail and layer.loaded == ok
    outputs = [np.empty(shape, q_dtype if i % 2 == 0 else np.float32) for i, shape in enumerate(shapes)]
    assert call(lambda: layer.read_quantized(*outputs))[0] == ok
    if ok:
        assert all(np.array_equal(o, a.astype(o.dtype)) for o, a in zip(outputs, arrays, strict=True))
    call(lambda: kk.set_max_isa(isa))
    try:
        x = np.ones((5, H), np.float32)
        ok, _ = call(
            lambda: layer.forward(x, np.zeros((5, 1), np.int64), np.ones((5, 1), np.float32), x.copy())
        )
        assert ok == layer.loaded
    finally:
        kk.set_max_isa(None)


FUZZERS = [
    fuzz_quantized_bases,
    fuzz_lora_and_grads,
    fuzz_config_pool_and_load,
    fuzz_forward_backward,
    fuzz_huge_calls_raise_memory_error,
    fuzz_dropped_objects,
]

if __name__ == "__main__":
    for fuzzer in FUZZERS if len(sys.argv) < 2 else [f for f in FUZZERS if f.__name__ in sys.argv[1:]]:
        print(f"{fuzzer.__name__} (seed {SEED}, {EXAMPLES} examples)", flush=True)
        fuzzer()
    print(f"fuzz: all passed; call outcomes: {dict(sorted(OUTCOMES.items()))}", flush=True)
