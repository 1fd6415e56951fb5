"""Gradient checkpointing with CPU experts (DESIGN.md §4.5).

A checkpointed region runs its forward twice: once without keeping activations, then again during the
backward. Re-running the CPU experts costs a whole extra pass over their weights, so by default the
first pass keeps its kernel activation cache (and output, and routing) in a store owned by the region,
and the recompute reuses them; `activation_policy="recompute"` instead re-runs the experts in the
recompute, with the routing of the first pass.

The region is created by wrapping the checkpoint *function* (`RegionCheckpoint`): the wrapped function
knows whether it runs for the first time or as a recompute, for `use_reentrant=True` and `False` alike,
and the store lives exactly as long as the checkpoint keeps that function, i.e. as long as the graph.
`install_checkpoint_regions(model)` makes `model.gradient_checkpointing_enable(...)` (what Trainer/TRL
call) wrap the functions it installs; `checkpoint(...)` is the drop-in for hand-written loops.
"""

from __future__ import annotations

import itertools
import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

FIRST_PASS = "forward"
RECOMPUTE = "recompute"


@dataclass
class RegionEntry:
    """What one experts call of a region keeps between its first pass and its backward."""

    ids: torch.Tensor | None = None
    output: torch.Tensor | None = None
    handle: Any = None


@dataclass
class CheckpointRegion:
    """The store of one checkpointed call: entries keyed by (experts module, call number in the pass)."""

    entries: dict[tuple[int, int], RegionEntry] = field(default_factory=dict)


@dataclass
class RegionCall:
    region: CheckpointRegion
    key: tuple[int, int]
    phase: str

    @property
    def entry(self) -> RegionEntry:
        return self.region.entries.setdefault(self.key, RegionEntry())


@dataclass
class _Pass:
    region: CheckpointRegion
    phase: str
    calls: dict[int, int] = field(default_factory=dict)


_local = threading.local()


def _stack() -> list[_Pass]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


@contextmanager
def _active(region: CheckpointRegion, phase: str) -> Iterator[None]:
    stack = _stack()
    stack.append(_Pass(region, phase))
    try:
        yield
    finally:
        stack.pop()


def current_call(owner: object) -> RegionCall | None:
    """The region call of `owner` (an experts module) if it runs inside a checkpointed region, else None."""
    stack = _stack()
    if not stack:
        return None
    current = stack[-1]
    number = current.calls.get(id(owner), 0)
    current.calls[id(owner)] = number + 1
    return RegionCall(current.region, (id(owner), number), current.phase)


class RegionCheckpoint:
    """Wraps a checkpoint function so CPU experts inside it know the pass they run in."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            # No backward will come: nothing to keep.
            return self.inner(function, *args, **kwargs)
        region = CheckpointRegion()
        passes = itertools.count()

        def run(*run_args: Any, **run_kwargs: Any) -> Any:
            phase = FIRST_PASS if next(passes) == 0 else RECOMPUTE
            with _active(region, phase):
                return function(*run_args, **run_kwargs)

        return self.inner(run, *args, **kwargs)

    def __repr__(self) -> str:
        return f"RegionCheckpoint({self.inner!r})"


def checkpoint(function: Callable[..., Any], *args: Any, use_reentrant: bool, **kwargs: Any) -> Any:
    """`torch.utils.checkpoint.checkpoint` with CPU-experts regions (same arguments)."""
    return RegionCheckpoint(torch.utils.checkpoint.checkpoint)(
        function, *args, use_reentrant=use_reentrant, **kwargs
    )


def install_checkpoint_regions(model: nn.Module) -> None:
    """Make `gradient_checkpointing_enable` of every transformers model in `model` use checkpoint regions."""
    for module in model.modules():
        if callable(getattr(type(module), "_set_gradient_checkpointing", None)):
            module.__dict__["_set_gradient_checkpointing"] = types.MethodType(
                _set_gradient_checkpointing, module
            )
    wrap_checkpoint_functions(model)


def wrap_checkpoint_functions(model: nn.Module) -> None:
    """Wrap the checkpoint functions already installed on the layers of `model` (idempotent)."""
    for module in model.modules():
        function = module.__dict__.get("_gradient_checkpointing_func")
        if function is not None and not isinstance(function, RegionCheckpoint):
            module.__dict__["_gradient_checkpointing_func"] = RegionCheckpoint(function)


def _set_gradient_checkpointing(self: nn.Module, enable: bool = True, **kwargs: Any) -> None:
    # Instance override of transformers' PreTrainedModel._set_gradient_checkpointing.
    type(self)._set_gradient_checkpointing(self, enable=enable, **kwargs)
    if enable:
        wrap_checkpoint_functions(self)
