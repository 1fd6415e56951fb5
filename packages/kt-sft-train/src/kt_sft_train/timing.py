"""Step-time split of a KT model: CPU experts vs host<->device transfers vs everything else.

``StepTimer(model)`` wraps every KTExperts' layer (kernels or reference) in a timing proxy and, while
installed, times the staging copies of ``kt_sft_train.autograd`` through its public transfer observer
(``set_transfer_observer``). The rest
of a step's wall time is the dense part: attention, routers, embeddings, LM head, optimizer — on the GPU
when there is one, else on the CPU. With CUDA tensors each transfer is bracketed by a synchronize so a
copy is not charged with the GPU work queued before it; that serializes copies that could otherwise
overlap, so measure throughput without a timer (benchmarks/e2e_train.py does) and the split with one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .autograd import set_transfer_observer
from .experts import KTExperts

_patch_lock = threading.Lock()
_active_timer: StepTimer | None = None


@dataclass(frozen=True)
class StepSplit:
    """Seconds of one step (or a sum of steps), split by where the time went."""

    total_s: float
    experts_cpu_s: float
    transfer_s: float

    @property
    def dense_s(self) -> float:
        return max(0.0, self.total_s - self.experts_cpu_s - self.transfer_s)

    def shares(self) -> dict[str, float]:
        total = self.total_s if self.total_s > 0 else 1.0
        return {
            "experts_cpu": self.experts_cpu_s / total,
            "transfer": self.transfer_s / total,
            "dense": self.dense_s / total,
        }

    def as_dict(self) -> dict[str, float]:
        return {
            "step_time_s": self.total_s,
            "experts_cpu_s": self.experts_cpu_s,
            "transfer_s": self.transfer_s,
            "dense_s": self.dense_s,
        }

    def __add__(self, other: StepSplit) -> StepSplit:
        return StepSplit(
            self.total_s + other.total_s,
            self.experts_cpu_s + other.experts_cpu_s,
            self.transfer_s + other.transfer_s,
        )


class _TimedLayer:
    """Delegates to an experts layer and charges its forward/backward to the timer."""

    def __init__(self, inner: Any, timer: StepTimer) -> None:
        self.inner = inner
        self.timer = timer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.inner.forward(*args, **kwargs)
        finally:
            self.timer._add_experts(time.perf_counter() - start)

    def backward(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.inner.backward(*args, **kwargs)
        finally:
            self.timer._add_experts(time.perf_counter() - start)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class StepTimer:
    """Accumulates the CPU-experts and transfer time of a model between ``start_step`` and ``end_step``.

    Use as a context manager (or ``install`` / ``remove``). One timer can be installed at a time.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._experts_s = 0.0
        self._transfer_s = 0.0
        self._step_start: float | None = None
        self._wrapped: list[KTExperts] = []

    # -- installation -----------------------------------------------------------------------------------

    def install(self) -> StepTimer:
        global _active_timer
        with _patch_lock:
            if _active_timer is not None:
                raise RuntimeError("a StepTimer is already installed; remove it first")
            experts = [m for m in self.model.modules() if isinstance(m, KTExperts)]
            if not experts:
                raise ValueError(
                    "StepTimer: the model has no KTExperts (wrap it or load it with load_kt_model)"
                )
            for module in experts:
                if isinstance(module.layer, _TimedLayer):
                    raise RuntimeError(
                        f"{module.name or 'a KTExperts'} is already timed by another StepTimer"
                    )
                module.layer = _TimedLayer(module.layer, self)
            self._wrapped = experts
            set_transfer_observer(self._add_transfer)
            _active_timer = self
        return self

    def remove(self) -> None:
        global _active_timer
        with _patch_lock:
            if _active_timer is not self:
                return
            for module in self._wrapped:
                if isinstance(module.layer, _TimedLayer):
                    module.layer = module.layer.inner
            self._wrapped = []
            set_transfer_observer(None)
            _active_timer = None

    def __enter__(self) -> StepTimer:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- measuring --------------------------------------------------------------------------------------

    def start_step(self) -> None:
        with self._lock:
            self._experts_s = 0.0
            self._transfer_s = 0.0
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self._step_start = time.perf_counter()

    def end_step(self) -> StepSplit:
        if self._step_start is None:
            raise RuntimeError("StepTimer.end_step without start_step")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        total = time.perf_counter() - self._step_start
        self._step_start = None
        with self._lock:
            return StepSplit(total, self._experts_s, self._transfer_s)

    def _add_experts(self, seconds: float) -> None:
        with self._lock:
            self._experts_s += seconds

    def _add_transfer(self, seconds: float) -> None:
        with self._lock:
            self._transfer_s += seconds
