"""MoEConfig(numa_shards=N): N logical shards on this machine equal the unsharded layer (ADR 0701).

Every N in 1..5, every tier the host runs, fp32 / bf16 / no LoRA, uneven I splits (I = 160 = 5 x 32
over 3 shards is 32 / 64 / 64). Compared with N = 1 at the tier-vs-portable bound of DESIGN.md §7
(same rounding points: only the fp32 summation order inside each product differs) and with the
float64 reference at the bf16 bounds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import kt_sft_kernels as kk
import numpy as np
import pytest
from kt_sft_kernels import testing as kt
from kt_sft_kernels.testing import tier

TIERS = kt.tier_names()  # every tier this host runs, avx512_bf16 once per kernel variant
BF16 = kt.BF16
F32 = np.dtype(np.float32)
SAME_ROUNDING = 2e-3  # DESIGN.md §7: results with the same rounding points


LORA_KINDS = {
    "f32": dict(rank_gu=8, rank_d=16, lora_dtype=F32),
    "bf16": dict(rank_gu=16, rank_d=8, lora_dtype=BF16, x_dtype=F32, weight_dtype=BF16),
    "frozen": dict(rank_gu=0, rank_d=0),
    "down_only": dict(rank_gu=0, rank_d=8, lora_dtype=BF16, id_dtype=np.int64),
}


def make(kind: str, seed: int = 3, tokens: int = 37) -> kt.MoECase:
    return kt.make_case(
        tokens=tokens,
        num_experts=6,
        top_k=3,
        hidden=96,
        intermediate=160,
        idle_experts=1,
        invalid_ids=2,
        seed=seed,
        **LORA_KINDS[kind],
    )


def outputs(res: kt.KernelResult) -> dict[str, np.ndarray]:
    named = {"out": res.out, "grad_x": res.grad_x, "grad_weights": res.grad_weights}
    return named | res.lora_grads


def assert_close_to(got: kt.KernelResult, want: kt.KernelResult, case: kt.MoECase, label: str) -> None:
    a, b = outputs(got), outputs(want)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        err = kt.rel_fro(a[name], b[name])
        assert err <= SAME_ROUNDING, f"{label} {name}: {err:.3g} from numa_shards=1"
    for name, grad in got.lora_grads.items():
        for e in case.idle_experts:
            assert np.all(kt.as_f64(grad[e]) == 0.0), f"{label} {name}[{e}]: idle expert must be exactly 0"
    skipped = (case.ids < 0) | (case.ids >= case.num_experts)
    assert np.all(kt.as_f64(got.grad_weights)[skipped] == 0.0)


def assert_matches_reference(got: kt.KernelResult, ref: kt.ReferenceResult, label: str) -> None:
    bounds = {"out": 1e-2, "grad_x": 2e-2, "grad_weights": 2e-2}
    want = {"out": ref.out, "grad_x": ref.grad_x, "grad_weights": ref.grad_weights} | ref.lora_grads
    for name, value in outputs(got).items():
        err = kt.rel_fro(value, want[name])
        assert err <= bounds.get(name, 2e-2), f"{label} {name}: {err:.3g} from the float64 reference"


@pytest.mark.parametrize("shared_down", ["1", "0"])  # 0: the multi-node form (each shard its own rows)
@pytest.mark.parametrize("kind", list(LORA_KINDS))
@pytest.mark.parametrize("isa", TIERS)
def test_shards_equal_one_shard(
    isa: str, kind: str, shared_down: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KT_SFT_NUMA_SHARED_DOWN", shared_down)  # read when a sharded layer is built
    case = make(kind)
    ref = kt.moe_reference(case)
    with tier(isa):
        single = kt.run_kernels(kt.build_layer(case), case)
        for n in (2, 3, 4, 5):
            layer = kt.build_layer(case, numa_shards=n)
            got = kt.run_kernels(layer, case)
            assert_close_to(got, single, case, f"{isa} {kind} numa_shards={n}")
            assert_matches_reference(got, ref, f"{isa} {kind} numa_shards={n}")


@pytest.mark.parametrize("isa", TIERS)
def test_one_shard_is_the_plain_layer(isa: str) -> None:
    case = make("f32", seed=4)
    with tier(isa):
        plain = kt.build_layer(case)
        one = kt.build_layer(case, numa_shards=1)
        assert one.shard_report() == []
        a, b = outputs(kt.run_kernels(plain, case)), outputs(kt.run_kernels(one, case))
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_separate_gate_up_and_inference_forward() -> None:
    case = make("bf16", seed=5)
    fused = kt.build_layer(case, numa_shards=3)
    separate = kt.build_layer(case, numa_shards=3, separate_gate_up=True)
    a, b = outputs(kt.run_kernels(fused, case)), outputs(kt.run_kernels(separate, case))
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    infer = kt.run_kernels(fused, case, backward=False)
    assert infer.out.tobytes() == a["out"].tobytes()


def test_uneven_split_report_and_bytes() -> None:
    case = make("f32")
    with tier(TIERS[-1]):
        layer = kt.build_layer(case, numa_shards=3)
        kt.run_kernels(layer, case)
        report = layer.shard_report()
    assert [(s["i0"], s["i1"]) for s in report] == [(0, 32), (32, 96), (96, 160)]
    topo = kk.topology()
    allowed = set(topo["affinity"])
    node_ids = {n["id"] for n in topo["nodes"]}
    E, H = case.num_experts, case.hidden
    for s in report:
        # Each shard owns exactly its slice of gate, up and down (bf16; no packing overhead at
        # multiples of 32), in its own allocation; its partial buffers are its own too.
        assert s["weight_bytes"] == E * 3 * H * (s["i1"] - s["i0"]) * 2
        assert s["buffer_bytes"] > 0
        assert s["cpus"] and set(s["cpus"]) <= allowed
        assert s["nodes"] and set(s["nodes"]) <= node_ids
        assert s["weight_node"] == -1 or s["weight_node"] in s["nodes"]


@pytest.mark.skipif(len(kk.affinity_cpus()) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("base", [("bf16", 128), ("int8", 128), ("int4", 32)], ids=str)
@pytest.mark.parametrize("shared_down", ["1", "0"])
@pytest.mark.parametrize("isa", [TIERS[0], TIERS[-1]])
def test_same_bits_for_any_thread_count(
    isa: str, shared_down: str, base: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a given N the bits do not depend on how many threads each shard has (any base). The shards
    of one node run as one call on all of the layout's CPUs (shared_down); the per-shard
    form runs each on its own list."""
    monkeypatch.setenv("KT_SFT_NUMA_SHARED_DOWN", shared_down)
    case = make("bf16", seed=6, tokens=70)
    cpus = kk.affinity_cpus()
    first, second = cpus[0], cpus[-1]
    layouts = [
        f"{first};{first}",
        f"{first};{second}",
        f"{first},{second};{first},{second}",
        f"{first},{second};{second}",
    ]
    results = []
    with tier(isa):
        for layout in layouts:
            monkeypatch.setenv("KT_SFT_NUMA", layout)
            layer = kt.build_layer(case, numa_shards=2, weight_dtype=base[0], group_size=base[1])
            lists = [sorted({int(c) for c in part.split(",")}) for part in layout.split(";")]
            union = sorted({c for cpus_of in lists for c in cpus_of})
            expected = (
                [union] * 2
                if shared_down == "1"
                else [[int(c) for c in p.split(",")] for p in layout.split(";")]
            )
            assert [s["cpus"] for s in layer.shard_report()] == expected
            results.append({k: v.tobytes() for k, v in outputs(kt.run_kernels(layer, case)).items()})
            again = {k: v.tobytes() for k, v in outputs(kt.run_kernels(layer, case)).items()}
            assert again == results[-1], f"{layout}: second run differs"
    assert results[0] == results[1] == results[2] == results[3]


@pytest.mark.parametrize("shared_down", ["1", "0"])
def test_a_failing_shard_round_raises_and_the_layer_keeps_working(
    shared_down: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in any round of one shard (forward and backward) reaches the caller instead of
    leaving the other shards at a barrier, and the next call gives the usual bits. On one node a call
    is one round (one call over all shards): "1,<s>" fails it."""
    monkeypatch.setenv("KT_SFT_NUMA_SHARED_DOWN", shared_down)
    case = make("bf16", seed=9)
    layer = kt.build_layer(case, numa_shards=2)
    want = {k: v.tobytes() for k, v in outputs(kt.run_kernels(layer, case)).items()}

    def call(which: str, fault: str) -> None:
        out = kt.nan_array(case.x.shape, case.x.dtype)
        lora = kt.kernel_lora(case)
        if which == "forward":
            monkeypatch.setenv("KT_SFT_NUMA_FAULT", fault)
            layer.forward(case.x, case.ids, case.weights, out, lora=lora, save=True)
            return
        handle = layer.forward(case.x, case.ids, case.weights, out, lora=lora, save=True)
        monkeypatch.setenv("KT_SFT_NUMA_FAULT", fault)
        kt.run_backward(layer, handle, case, kt.KernelResult(out=out))

    def call_in_thread(which: str, fault: str) -> BaseException | None:
        """call() on a daemon thread: a shard left waiting at a barrier fails the test, not the run."""
        raised: list[BaseException] = []

        def run() -> None:
            try:
                call(which, fault)
            except BaseException as exc:  # handed to the test thread
                raised.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive(), f"{which} with KT_SFT_NUMA_FAULT={fault} hangs"
        return raised[0] if raised else None

    rounds = [1] if shared_down == "1" else [1, 2]
    for which in ("forward", "backward"):
        for r, s in ((r, s) for r in rounds for s in (0, 1)):
            fault = f"{r},{s}"
            exc = call_in_thread(which, fault)
            assert isinstance(exc, RuntimeError), f"{which} {fault}: {exc!r}"
            assert f"injected failure in round {r} of shard {s}" in str(exc)
            monkeypatch.delenv("KT_SFT_NUMA_FAULT")
            again = {k: v.tobytes() for k, v in outputs(kt.run_kernels(layer, case)).items()}
            assert again == want, f"{which} after a failure in round,shard {fault}"


def test_empty_batch_and_all_ids_skipped() -> None:
    case = make("f32", seed=7, tokens=5)
    case.ids[:] = -1
    case.idle_experts = list(range(case.num_experts))
    layer = kt.build_layer(case, numa_shards=2)
    res = kt.run_kernels(layer, case)
    for name, value in outputs(res).items():
        assert np.all(kt.as_f64(value) == 0.0), name
    empty = make("f32", seed=7, tokens=0)
    res = kt.run_kernels(layer, empty)
    assert res.out.shape == (0, case.hidden)
    assert all(np.all(kt.as_f64(g) == 0.0) for g in res.lora_grads.values())


def test_async_calls_on_a_sharded_layer() -> None:
    case = make("f32", seed=8)
    layer = kt.build_layer(case, numa_shards=2)
    want = kt.run_kernels(layer, case)
    out = kt.nan_array(case.x.shape, case.x.dtype)
    handle = layer.forward_async(
        case.x, case.ids, case.weights, out, lora=kt.kernel_lora(case), save=True
    ).wait()
    assert out.tobytes() == want.out.tobytes()
    res = kt.KernelResult(out=out)
    kt.run_backward(layer, handle, case, res)
    assert all(outputs(res)[k].tobytes() == v.tobytes() for k, v in outputs(want).items())


def test_bad_shard_counts_are_value_errors() -> None:
    with pytest.raises(
        ValueError, match=r"numa_shards=6 does not fit intermediate=160.*at most intermediate / 32 = 5"
    ):
        kk.MoELayer(kk.MoEConfig(num_experts=2, top_k=1, hidden=64, intermediate=160, numa_shards=6))
    with pytest.raises(ValueError, match="numa_shards must be >= 1"):
        kk.MoEConfig(num_experts=2, top_k=1, hidden=64, intermediate=160, numa_shards=0)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KT_SFT_")} | env
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_shards_under_a_one_cpu_affinity_mask() -> None:
    """taskset-like: one CPU allowed; three shards share it and still equal one shard."""
    cpu = max(os.sched_getaffinity(0))
    code = (
        f"import os; os.sched_setaffinity(0, {{{cpu}}})\n"
        "from kt_sft_kernels import testing as kt\n"
        "import numpy as np\n"
        "case = kt.make_case(tokens=21, num_experts=4, top_k=2, hidden=64, intermediate=96,\n"
        "                    rank_gu=4, rank_d=4)\n"
        "one = kt.run_kernels(kt.build_layer(case), case)\n"
        "layer = kt.build_layer(case, numa_shards=3)\n"
        "three = kt.run_kernels(layer, case)\n"
        "print([s['cpus'] for s in layer.shard_report()])\n"
        "print(max(kt.rel_fro(a, b) for a, b in [(three.out, one.out), (three.grad_x, one.grad_x)]\n"
        "          + [(three.lora_grads[k], one.lora_grads[k]) for k in one.lora_grads]))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    cpus_line, err_line = result.stdout.splitlines()
    assert cpus_line == str([[cpu]] * 3)
    assert float(err_line) <= SAME_ROUNDING


def _threads_of_this_process() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc/self/task")
def test_layers_share_the_shard_runtimes() -> None:
    """Sub-pools and drivers belong to the layout, not to each layer: a model's 48 layers must not
    start 48 pools per shard."""
    case = make("f32", seed=9)
    first = kt.build_layer(case, numa_shards=2)
    before = _threads_of_this_process()
    more = [kt.build_layer(case, numa_shards=2) for _ in range(4)]
    assert _threads_of_this_process() == before
    assert all(m.shard_report()[0]["cpus"] == first.shard_report()[0]["cpus"] for m in more)


def test_interleaved_layers_keep_their_own_caches() -> None:
    """Layers sharing shard runtimes: forwards of two layers, then their backwards in reverse order,
    equal each layer run alone."""
    cases = [make("bf16", seed=10), make("f32", seed=11)]
    layers = [kt.build_layer(c, numa_shards=3) for c in cases]
    alone = [outputs(kt.run_kernels(layer, c)) for layer, c in zip(layers, cases, strict=True)]
    results, handles = [], []
    for layer, c in zip(layers, cases, strict=True):
        out = kt.nan_array(c.x.shape, c.x.dtype)
        handles.append(layer.forward(c.x, c.ids, c.weights, out, lora=kt.kernel_lora(c), save=True))
        results.append(kt.KernelResult(out=out))
    for i in (1, 0):
        kt.run_backward(layers[i], handles[i], cases[i], results[i])
    for got, want in zip(results, alone, strict=True):
        assert all(outputs(got)[k].tobytes() == v.tobytes() for k, v in want.items())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_new_sharded_layer_in_a_forked_child() -> None:
    """The shard runtimes of the parent (threads gone in the child) are not handed to the child's layers."""
    case = make("f32", seed=12)
    parent = kt.build_layer(case, numa_shards=2)  # alive across the fork: its runtimes stay registered
    want = outputs(kt.run_kernels(parent, case))
    pid = os.fork()
    if pid == 0:  # the child: only os._exit, never back into pytest
        code = 2
        try:
            got = outputs(kt.run_kernels(kt.build_layer(case, numa_shards=2), case))
            code = 0 if all(got[k].tobytes() == v.tobytes() for k, v in want.items()) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_memory_report_has_each_shard() -> None:
    case = make("f32", seed=13)
    single = kt.build_layer(case)
    layer = kt.build_layer(case, numa_shards=3)
    kt.run_kernels(layer, case)
    handle = layer.forward(
        case.x, case.ids, case.weights, kt.nan_array(case.x.shape, case.x.dtype), save=True
    )
    assert handle.cache_bytes > 0  # the shards' caches are counted
    del handle
    report = layer.memory_report()
    shards = report["shards"]
    assert len(shards) == 3
    assert report["weights"] == sum(s["weights"] for s in shards) == single.memory_report()["weights"]
    assert [s["weights"] for s in shards] == [r["weight_bytes"] for r in layer.shard_report()]
    assert report["total"] == sum(s["total"] for s in shards)
    assert "shards" not in single.memory_report()
