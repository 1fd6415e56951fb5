"""kk.profiler (DESIGN.md §3.5): stage stats, Chrome trace, bounded ring, disabled = nothing recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import kt_sft_kernels as kk
import ml_dtypes
import numpy as np
import pytest

BF16 = ml_dtypes.bfloat16
E, H, INTER, K, T, R = 4, 64, 32, 2, 40, 4
POOL = kk.ThreadPool(threads=2)
FORWARD_PHASES = {"gate_up", "down", "combine", "lora_a_gu", "lora_a_d"}
BACKWARD_PHASES = {"bwd_down", "bwd_gate_up", "bwd_combine", "bwd_lora_bt", "bwd_lora_bt_gu"}


class Step:
    """One small layer with LoRA: step() runs forward + backward once."""

    def __init__(self) -> None:
        rng = np.random.default_rng(7)
        config = kk.MoEConfig(num_experts=E, top_k=K, hidden=H, intermediate=INTER)
        self.layer = kk.MoELayer(config, pool=POOL)
        self.layer.load_weights(
            gate_up=(rng.standard_normal((E, 2 * INTER, H)) * 0.1).astype(BF16),
            down=(rng.standard_normal((E, H, INTER)) * 0.1).astype(BF16),
        )
        self.x = rng.standard_normal((T, H)).astype(BF16)
        self.ids = np.argsort(rng.standard_normal((T, E)), axis=1)[:, :K].astype(np.int32)
        self.w = rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)
        shapes = ((E, R, H), (E, 2 * INTER, R), (E, R, INTER), (E, H, R))
        arrays = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in shapes]
        self.lora = kk.LoRA(*arrays, 1.0, 1.0)
        self.grads = kk.LoRAGrads(*(np.empty_like(a) for a in arrays))

    def step(self) -> None:
        out = np.empty((T, H), BF16)
        handle = self.layer.forward(self.x, self.ids, self.w, out, lora=self.lora, save=True)
        self.layer.backward(
            handle, self.x, np.empty((T, H), BF16), np.empty((T, K), np.float32), lora_grads=self.grads
        )


@pytest.fixture
def fresh_profiler() -> Iterator[None]:
    kk.profiler.disable()
    kk.profiler.reset()
    yield
    kk.profiler.disable()
    kk.profiler.reset()


def test_disabled_records_nothing(fresh_profiler: None) -> None:
    Step().step()
    assert not kk.profiler.is_enabled()
    assert kk.profiler.stats() == {}


def test_stats_keys_and_counts(fresh_profiler: None) -> None:
    s = Step()
    kk.profiler.enable()
    for _ in range(3):
        s.step()
    stats = kk.profiler.stats()
    assert set(stats) <= set(kk.profiler.stage_names())
    assert FORWARD_PHASES | BACKWARD_PHASES | {"forward", "backward", "route"} <= set(stats)
    for name in FORWARD_PHASES | BACKWARD_PHASES | {"forward", "backward"}:
        st = stats[name]
        assert set(st) == {"calls", "total_s", "mean_s", "imbalance", "tasks", "busy_s", "threads"}
        assert st["calls"] == 3, name
        assert st["total_s"] > 0 and st["mean_s"] == pytest.approx(st["total_s"] / 3)
    for name in FORWARD_PHASES | BACKWARD_PHASES:
        st = stats[name]
        assert st["tasks"] >= 3 and 1 <= st["threads"] <= 2
        assert st["imbalance"] >= 1.0 - 1e-9
    # Phases run inside the whole call.
    assert stats["gate_up"]["total_s"] < stats["forward"]["total_s"]
    assert 1e8 < kk.profiler.tsc_hz() < 1e11
    kk.profiler.disable()
    s.step()
    assert kk.profiler.stats()["forward"]["calls"] == 3


def test_chrome_trace_is_valid_json(fresh_profiler: None, tmp_path: Path) -> None:
    s = Step()
    kk.profiler.enable()
    s.step()
    path = tmp_path / "trace.json"
    n = kk.profiler.dump_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == n > 0
    names = set(kk.profiler.stage_names())
    for e in spans:
        assert e["name"] in names and e["cat"] in ("phase", "task")
        assert e["ts"] >= 0 and e["dur"] >= 0 and isinstance(e["tid"], int)
    assert {"forward", "backward", "gate_up"} <= {e["name"] for e in spans}
    assert trace["otherData"]["tsc_hz"] > 0


def test_ring_is_bounded_and_stats_stay_exact(fresh_profiler: None, tmp_path: Path) -> None:
    s = Step()
    kk.profiler.enable()
    s.step()
    per_step = sum(v["calls"] + v["tasks"] for v in kk.profiler.stats().values())
    ring = kk.profiler.ring_events_per_thread()
    steps = 2 * ring // per_step + 1  # at least twice the ring's capacity, all threads together
    for _ in range(steps - 1):
        s.step()
    before = time.perf_counter()
    s.step()
    after = time.perf_counter()
    stats = kk.profiler.stats()
    assert stats["forward"]["calls"] == steps + 1  # counters are exact even after the ring wrapped
    path = tmp_path / "trace.json"
    n = kk.profiler.dump_chrome_trace(str(path))
    spans = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    threads = {e["tid"] for e in spans}
    assert n == len(spans) <= ring * len(threads)
    assert n < (steps + 1) * per_step  # events were dropped, not kept
    # The origin is stated on perf_counter's clock (steady_clock), so the last step's phases sit inside
    # the last step's wall-clock window although the ring dropped the run's first events.
    origin = json.loads(path.read_text())["otherData"]["origin_steady_s"]
    assert origin > 0
    last = max((e for e in spans if e["name"] == "forward"), key=lambda e: e["ts"])
    start = origin + last["ts"] / 1e6
    assert before - 1e-3 <= start <= start + last["dur"] / 1e6 <= after + 1e-3


def test_env_var_writes_a_trace_at_exit(tmp_path: Path) -> None:
    path = tmp_path / "env_trace.json"
    here = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {here!r}); import test_profiler as t; t.Step().step()"
    env = dict(os.environ, KT_SFT_PROFILE=str(path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    spans = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert {"forward", "backward"} <= {e["name"] for e in spans}
