"""Micro-batch overlap: the CPU experts of one micro-batch run while the GPU computes another's dense part.

`run_microbatches(step, microbatches, parameters=..., weights=...)` runs every micro-batch's forward and
backward in its own Python thread (`concurrent=True`, two at a time) or one after the other on the
calling thread (`concurrent=False`, the same arithmetic); `split_batch` and `label_tokens` cut a batch
and weight its parts. Used by `kt-sft train --overlap N` and benchmarks/e2e_train.py (variant kt_sft).
Why threads overlap:
- forward: the kernel call releases the GIL, so while micro-batch A's experts run on the CPU, thread B
  launches its attention / router / dense work on the GPU; the kernel layer runs one call at a time per
  layer and per thread pool (its mutexes), so B's experts queue behind A's.
- backward: PyTorch's engine runs a node on the worker thread of the device its incoming gradients live
  on; CUDA nodes of every concurrent backward share one device thread, CPU nodes run on the thread that
  called backward. The experts node has host inputs and outputs (autograd.HostCopy / DeviceCopy are
  separate nodes), so each micro-batch's CPU experts backward runs on its own thread while the device
  thread serves the other micro-batch's GPU nodes.
- each thread works on its own CUDA stream, so one thread's host<->device copies wait only for its own
  kernels.

Determinism: micro-batches run in waves of two; each wave accumulates into empty `.grad` (for two
gradients a + b == b + a exactly, whichever thread gets there first), and the waves are added in order
onto the previous `.grad`. So the result is bitwise the same with `concurrent` on or off, for any number
of micro-batches, as long as each micro-batch's own arithmetic does not depend on the thread it runs on
(true for the kernel backend, whose results do not depend on thread counts; the dense CPU ops get the
calling thread's intra-op thread count).

Not overlapped: under reentrant gradient checkpointing (`use_reentrant=True`) a region's recompute and
backward run inside its CheckpointFunction node, which has GPU inputs, so on CUDA both micro-batches'
experts backwards run on the device thread (correct, not overlapped): use `use_reentrant=False`. With
activation_policy="recompute" the CPU recompute runs on the thread that unpacks the region first.
Shared experts (DESIGN.md §4.5) are covered by the same mechanism: while A's routed experts run on the
CPU, B's shared experts and attention run on the GPU; a block-level hook that overlaps them within one
micro-batch is not built.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, TypeVar

import torch

Batch = TypeVar("Batch")

# Observers of the micro-batch phases (name, micro-batch index, start, end in time.perf_counter seconds);
# kt_sft_train.trace installs one to draw the step timeline.
PhaseObserver = Callable[[str, int, float, float], None]
_phase_observer: PhaseObserver | None = None


def set_phase_observer(observer: PhaseObserver | None) -> PhaseObserver | None:
    """Install `observer(phase, microbatch, start_s, end_s)`; returns the previous one (None removes)."""
    global _phase_observer
    previous, _phase_observer = _phase_observer, observer
    return previous


def split_batch(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """`batch` (tensors with the batch as dim 0) cut into `parts` micro-batches of consecutive rows."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be a positive integer, got {parts!r}")
    if not batch:
        raise ValueError("batch must hold at least one tensor")
    rows = {int(t.shape[0]) for t in batch.values()}
    if len(rows) != 1:
        raise ValueError(f"batch tensors disagree on the batch size (dim 0): {sorted(rows)}")
    (size,) = rows
    if parts > size:
        raise ValueError(f"cannot split a batch of {size} rows into {parts} micro-batches")
    chunks = {name: tensor.tensor_split(parts, dim=0) for name, tensor in batch.items()}
    return [{name: chunks[name][i] for name in batch} for i in range(parts)]


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens a causal LM's mean loss averages over: shifted labels that are not -100."""
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
    return int((labels[..., 1:] != -100).sum())


IN_FLIGHT = 2  # micro-batches running at once: enough to keep the CPU busy while the GPU works


def run_microbatches(
    step: Callable[[Batch], torch.Tensor],
    microbatches: Sequence[Batch],
    *,
    parameters: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    concurrent: bool = True,
) -> torch.Tensor:
    """Forward + backward of every micro-batch; returns sum_i weights[i] * step(microbatches[i]) (detached).

    `step(mb)` runs the model and returns a scalar loss; its weighted gradient is accumulated into the
    `.grad` of `parameters` (the trainable tensors) like `loss.backward()` does. `weights` default to
    1 / len(microbatches) (the mean of equal-sized micro-batches' mean losses). Micro-batches run in waves
    of two threads (`concurrent=True`) or one after the other on the calling thread (`concurrent=False`).
    """
    count = len(microbatches)
    if count == 0:
        raise ValueError("microbatches must not be empty")
    if weights is None:
        weights = [1.0 / count] * count
    if len(weights) != count:
        raise ValueError(f"weights has {len(weights)} entries for {count} micro-batches")
    params = list(parameters)
    if not params or not all(isinstance(p, torch.Tensor) and p.requires_grad for p in params):
        raise ValueError("parameters must be a non-empty list of tensors that require grad")

    # Each wave accumulates into empty .grad (autograd's own accumulation: a wave of two is a + b in
    # either order, which is exact), then the waves are summed in order onto the previous .grad.
    # (torch.autograd.grad cannot be used instead: it skips use_reentrant=True checkpoint regions.)
    previous = [p.grad for p in params]
    waves: list[list[torch.Tensor | None]] = []
    losses: list[torch.Tensor] = []
    try:
        for first in range(0, count, IN_FLIGHT):
            for param in params:
                param.grad = None
            indices = list(range(first, min(count, first + IN_FLIGHT)))
            losses += _run_wave(step, microbatches, weights, indices, concurrent, params)
            waves.append([p.grad for p in params])
    finally:
        for param, old in zip(params, previous, strict=True):
            param.grad = old
    for wave in waves:
        for param, grad in zip(params, wave, strict=True):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad + grad
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    return total


def _run_wave(
    step: Callable[[Any], torch.Tensor],
    microbatches: Sequence[Any],
    weights: Sequence[float],
    indices: list[int],
    concurrent: bool,
    params: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Forward + backward of micro-batches `indices`, on threads of their own when concurrent."""
    losses: dict[int, torch.Tensor] = {}
    errors: dict[int, BaseException] = {}
    streams = _streams(params, len(indices)) if concurrent else [None] * len(indices)

    def work(slot: int) -> None:
        index = indices[slot]
        try:
            losses[index] = _one_microbatch(step, microbatches[index], weights[index], index, streams[slot])
        except BaseException as error:  # re-raised on the calling thread
            errors[index] = error

    if concurrent and len(indices) > 1:
        threads = [
            threading.Thread(target=_in_thread(work, slot), name=f"kt-sft-microbatch-{indices[slot]}")
            for slot in range(len(indices))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        for slot in range(len(indices)):
            work(slot)
    _join_streams(streams)
    for index in indices:
        if index in errors:
            raise errors[index]
    return [losses[index] for index in indices]


def _in_thread(work: Callable[[int], None], slot: int) -> Callable[[], None]:
    # Thread-local torch state a new thread does not inherit: grad mode is on by default, but the
    # intra-op thread count is per thread in OpenMP builds; use the caller's so results match.
    threads = torch.get_num_threads()

    def run() -> None:
        torch.set_num_threads(threads)
        work(slot)

    return run


def _one_microbatch(step: Callable[[Any], torch.Tensor], microbatch: Any, weight: float, index: int,
                    stream: Any) -> torch.Tensor:  # fmt: skip
    observer = _phase_observer
    with torch.cuda.stream(stream) if stream is not None else nullcontext():
        start = time.perf_counter()
        loss = step(microbatch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("step must return a scalar loss tensor")
        middle = time.perf_counter()
        scaled = loss * weight
        scaled.backward()
        end = time.perf_counter()
    if observer is not None:
        observer("forward", index, start, middle)
        observer("backward", index, middle, end)
    return scaled.detach()


def _streams(params: list[torch.Tensor], count: int) -> list[Any]:
    """One side stream per micro-batch on the CUDA device of the dense parameters (None on a CPU)."""
    devices = {p.device for p in params if p.device.type == "cuda"}
    if not devices:
        return [None] * count
    (device,) = sorted(devices, key=str)[:1]
    current = torch.cuda.current_stream(device)
    streams = []
    for _ in range(count):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(current)  # the inputs and parameters were written on the current stream
        streams.append(stream)
    return streams


def _join_streams(streams: list[Any]) -> None:
    # The optimizer step runs on the caller's stream: it must see the side streams' gradients. (The
    # gradients were allocated on the side streams; they stay alive in .grad until after the step.)
    for stream in streams:
        if stream is not None:
            torch.cuda.current_stream(stream.device).wait_stream(stream)
