"""Timeline of one training step: CPU experts calls, kernel stages, micro-batch phases and GPU kernels in
one Chrome trace (Perfetto / chrome://tracing open it), plus the busy/overlap split it implies.

``StepTrace(model)`` wraps every KTExperts layer in a recording proxy (thread, start, end of each
forward/backward, and the host bytes each saved forward retains until its backward), listens to the
micro-batch phases of kt_sft_train.overlap, enables the kernel profiler (kt_sft_kernels.profiler) and,
where CUDA is available, torch.profiler for the GPU kernels. ``write(path)`` merges them:

- our events use time.perf_counter; torch.profiler's are aligned by an anchor ``record_function`` whose
  perf_counter time is known (error: microseconds);
- the kernel profiler's trace states its origin on steady_clock (CLOCK_MONOTONIC, which perf_counter
  reads on Linux); a trace without it is placed at the start of the first experts call of the step.

``summary()``: step wall time, CPU-busy (union of the experts calls), GPU-busy (union of GPU kernels;
None without CUDA), their overlap, each as a fraction of the step, and the retained host bytes.
Tracing costs time (profilers, and no transfer observer is installed): trace one step apart from the
throughput measurement.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import overlap
from .experts import KTExperts

ANCHOR = "kt_sft_trace_anchor"
PIDS = {"kt-sft threads": 1, "CPU kernel stages": 2, "GPU": 3}  # Chrome trace processes


@dataclass(frozen=True)
class Span:
    name: str
    thread: int
    start_s: float
    end_s: float
    args: dict[str, Any]


class _TracedLayer:
    """Delegates to an experts layer and records each call as a Span."""

    def __init__(self, inner: Any, trace: StepTrace, label: str) -> None:
        self.inner = inner
        self.trace = trace
        self.label = label

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, lora: Any, save: bool
    ) -> Any:
        start = time.perf_counter()
        out, handle = self.inner.forward(x, ids, weights, lora, save)
        end = time.perf_counter()
        retained = retained_bytes(self.inner, x, ids, weights, lora) if handle is not None else 0
        self.trace._record(f"experts fwd {self.label}", start, end, tokens=int(x.shape[0]), retained=retained)
        if handle is not None:
            self.trace._retain(id(handle), retained)
        return out, handle

    def backward(self, handle: Any, grad_out: torch.Tensor) -> Any:
        start = time.perf_counter()
        grads = self.inner.backward(handle, grad_out)
        end = time.perf_counter()
        self.trace._release(id(handle))
        self.trace._record(f"experts bwd {self.label}", start, end, tokens=int(grad_out.shape[0]))
        return grads

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def retained_bytes(layer: Any, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, lora: Any) -> int:
    """Host bytes a saving forward keeps until its backward: the inputs it references (x, ids, weights:
    the host copies autograd.HostCopy made) plus, for the kernel layer, its activation cache per routed
    pair (gate/up output bf16 [2I], LoRA A·x and A_d·h fp32 [r each], routing ids/weights/rows).
    The cache part is computed from the cache layout of kt_sft_kernels (src/moe/layer.cpp)."""
    total = sum(t.numel() * t.element_size() for t in (x, ids, weights))
    if getattr(layer, "backend", None) != "kernels":
        return total
    pairs = int(ids.numel())
    rank_gu = 0 if lora is None or lora.a_gu is None else int(lora.a_gu.shape[-2])
    rank_d = 0 if lora is None or lora.a_d is None else int(lora.a_d.shape[-2])
    per_pair = 2 * layer.intermediate * 2 + 4 * (rank_gu + rank_d) + 3 * 4
    return total + pairs * per_pair


class StepTrace:
    """Records one (or more) steps of `model` for a Chrome trace; a context manager."""

    def __init__(self, model: nn.Module, *, torch_profiler: bool | None = None) -> None:
        """torch_profiler: run torch.profiler for the GPU kernels (default: when CUDA is available)."""
        self.model = model
        self.use_torch_profiler = torch.cuda.is_available() if torch_profiler is None else torch_profiler
        self._lock = threading.Lock()
        self._spans: list[Span] = []
        self._outstanding: dict[int, int] = {}
        self.peak_retained_bytes = 0
        self._retained_total = 0
        self._wrapped: list[KTExperts] = []
        self._previous_observer: overlap.PhaseObserver | None = None
        self._profiler: Any = None
        self._kernels: Any = None
        self._start_s = 0.0
        self._end_s = 0.0
        self._anchor_s = 0.0
        self._gpu_trace_path: str | None = None
        self._gpu_cache: list[dict[str, Any]] | None = None
        self._gpu_unaligned = False  # torch.profiler's trace had no anchor event: GPU times unknown

    # -- installation -------------------------------------------------------------------------------------

    def __enter__(self) -> StepTrace:
        experts = [m for m in self.model.modules() if isinstance(m, KTExperts)]
        if not experts:
            raise ValueError("StepTrace: the model has no KTExperts (wrap it or load it with load_kt_model)")
        for number, module in enumerate(experts):
            if isinstance(module.layer, _TracedLayer):
                raise RuntimeError(f"{module.name or 'a KTExperts'} is already traced")
            module.layer = _TracedLayer(module.layer, self, str(number))
        self._wrapped = experts
        self._previous_observer = overlap.set_phase_observer(self._phase)
        if experts[0].backend == "kernels":
            from ._kernels import load_kernels

            self._kernels = load_kernels()
            self._kernels.profiler.reset()
            self._kernels.profiler.enable()
        if self.use_torch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()
            with torch.profiler.record_function(ANCHOR):
                self._anchor_s = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start_s = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._end_s = time.perf_counter()
        for module in self._wrapped:
            if isinstance(module.layer, _TracedLayer):
                module.layer = module.layer.inner
        self._wrapped = []
        overlap.set_phase_observer(self._previous_observer)
        if self._kernels is not None:
            self._kernels.profiler.disable()
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            handle, self._gpu_trace_path = tempfile.mkstemp(suffix=".json", prefix="kt-sft-gpu-trace-")
            os.close(handle)
            self._profiler.export_chrome_trace(self._gpu_trace_path)

    # -- recording (any thread) ------------------------------------------------------------------------------

    def _record(self, name: str, start: float, end: float, **args: Any) -> None:
        with self._lock:
            self._spans.append(Span(name, threading.get_ident(), start, end, args))

    def _phase(self, phase: str, microbatch: int, start: float, end: float) -> None:
        self._record(f"micro-batch {microbatch} {phase}", start, end, microbatch=microbatch)

    def _retain(self, key: int, size: int) -> None:
        with self._lock:
            self._outstanding[key] = size
            self._retained_total += size
            self.peak_retained_bytes = max(self.peak_retained_bytes, self._retained_total)

    def _release(self, key: int) -> None:
        with self._lock:
            self._retained_total -= self._outstanding.pop(key, 0)

    # -- results --------------------------------------------------------------------------------------------

    def _gpu_events(self) -> list[dict[str, Any]]:
        """torch.profiler's GPU kernel / memcpy events, shifted onto the perf_counter clock (µs)."""
        if self._gpu_trace_path is None:
            return []
        if self._gpu_cache is not None:
            return self._gpu_cache
        events = json.loads(Path(self._gpu_trace_path).read_text()).get("traceEvents", [])
        anchor = next((e for e in events if e.get("name") == ANCHOR and "ts" in e), None)
        if anchor is None:
            self._gpu_cache = []
            self._gpu_unaligned = True
            return []
        shift = self._anchor_s * 1e6 - float(anchor["ts"])
        gpu = []
        for event in events:
            if event.get("ph") == "X" and event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
                gpu.append(
                    {
                        **event,
                        "ts": float(event["ts"]) + shift,
                        "pid": PIDS["GPU"],
                        "tid": event.get("tid", 0),
                    }
                )
        self._gpu_cache = gpu
        return gpu

    def summary(self) -> dict[str, Any]:
        step = max(self._end_s - self._start_s, 1e-12)
        cpu = _union([(s.start_s, s.end_s) for s in self._spans if s.name.startswith("experts ")])
        gpu_events = self._gpu_events()
        gpu = _union([(e["ts"] / 1e6, (e["ts"] + e.get("dur", 0.0)) / 1e6) for e in gpu_events])
        tokens = sum(s.args.get("tokens", 0) for s in self._spans if s.name.startswith("experts fwd"))
        retained = sum(s.args.get("retained", 0) for s in self._spans if s.name.startswith("experts fwd"))
        result: dict[str, Any] = {
            "step_s": step,
            "cpu_busy_s": _length(cpu),
            "cpu_busy_fraction": _length(cpu) / step,
            "retained_host_bytes_peak": self.peak_retained_bytes,
            "retained_host_bytes_per_layer_token": retained / tokens if tokens else 0.0,
        }
        if self._profiler is not None and not self._gpu_unaligned:
            both = _length(_intersection(cpu, gpu))
            result.update(
                gpu_busy_s=_length(gpu),
                gpu_busy_fraction=_length(gpu) / step,
                overlap_s=both,
                overlap_fraction=both / step,
            )
        else:
            result.update(gpu_busy_s=None, gpu_busy_fraction=None, overlap_s=None, overlap_fraction=None)
            if self._gpu_unaligned:
                result["gpu_note"] = f"torch.profiler's trace has no {ANCHOR} event: GPU times not aligned"
        return result

    def write(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Write the merged Chrome trace to `path`; returns summary()."""
        origin = self._start_s * 1e6
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}
            for name, pid in PIDS.items()
        ]
        for span in self._spans:
            events.append({"name": span.name, "ph": "X", "pid": PIDS["kt-sft threads"], "tid": span.thread,
                           "ts": span.start_s * 1e6 - origin, "dur": (span.end_s - span.start_s) * 1e6,
                           "args": span.args})  # fmt: skip
        events += self._kernel_events(origin)
        for event in self._gpu_events():
            events.append({**event, "ts": event["ts"] - origin})
        summary = self.summary()
        out = {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"kt_sft_step": summary}}
        Path(path).write_text(json.dumps(out))
        return summary

    def _kernel_events(self, origin: float) -> list[dict[str, Any]]:
        if self._kernels is None:
            return []
        calls = [s.start_s for s in self._spans if s.name.startswith("experts ")]
        if not calls:
            return []
        with tempfile.TemporaryDirectory() as scratch:
            dumped = Path(scratch) / "kernels.json"
            self._kernels.profiler.dump_chrome_trace(str(dumped))
            data = json.loads(dumped.read_text())
        kernel = data.get("traceEvents", [])
        # The trace's first event is the oldest its bounded ring kept, not necessarily the step's first:
        # place it by its steady_clock origin (= perf_counter's clock on Linux) where the kernels say it.
        start_s = data.get("otherData", {}).get("origin_steady_s") or min(calls)
        shift = start_s * 1e6 - origin
        return [
            {**event, "ts": float(event["ts"]) + shift, "pid": PIDS["CPU kernel stages"]}
            for event in kernel
            if event.get("ph") == "X"
        ]


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _length(spans: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in spans)
