"""KTMoEFunction: the routed experts as one autograd node running on a CPU experts layer.

Three nodes per call: HostCopy (hidden states and routing weights to the host, through pinned staging
buffers when they live on an accelerator), KTMoEFunction (the layer, kernels or reference, on host
tensors only) and DeviceCopy (the output back to the input's device and dtype). The experts node has
host inputs and outputs so that autograd runs its backward on the thread that called backward(), not
on the shared CUDA device thread (see kt_sft_train.overlap). Backward: grad_out comes to the host, the
layer's backward consumes the forward handle, and the grads for the hidden states, the routing weights
and the expert LoRA factors come back. PyTorch accumulates them, so `zero_grad(set_to_none=True)` and
gradient accumulation behave as usual.

Under gradient checkpointing (see checkpointing.py) the handle lives in the region's store instead of on
ctx, so the backward finds it whichever node (first pass or recompute) autograd runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from .checkpointing import FIRST_PASS, RECOMPUTE, RegionCall, current_call
from .reference import ExpertGrads, ExpertLoRA

ACTIVATION_POLICIES = ("retain", "recompute")


class ExpertsLayer(Protocol):
    """What KTMoEFunction needs from a layer (reference.ReferenceLayer, _kernels.KernelLayer)."""

    backend: str
    top_k: int

    def host_dtype(self, dtype: torch.dtype) -> torch.dtype: ...

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, lora: ExpertLoRA | None, save: bool
    ) -> tuple[torch.Tensor, Any]: ...

    def backward(self, handle: Any, grad_out: torch.Tensor) -> ExpertGrads: ...


TransferObserver = Callable[[float], None]
_transfer_observer: TransferObserver | None = None


def set_transfer_observer(observer: TransferObserver | None) -> TransferObserver | None:
    """Install `observer(seconds)`, called after every host<->device staging copy; returns the previous one.

    While one is installed each copy is bracketed by a CUDA synchronize, so a copy is not charged with
    the GPU work queued before it (kt_sft_train.timing.StepTimer installs one). None removes it.
    """
    global _transfer_observer
    previous, _transfer_observer = _transfer_observer, observer
    return previous


def transfer_observer() -> TransferObserver | None:
    """The installed transfer observer, if any."""
    return _transfer_observer


def _synchronize(tensor: torch.Tensor) -> None:
    if tensor.device.type == "cuda":
        torch.cuda.synchronize(tensor.device)


def to_host(tensor: torch.Tensor, dtype: torch.dtype, *, pin_memory: bool, copy: bool) -> torch.Tensor:
    """A contiguous CPU tensor of `dtype`; from an accelerator through a pinned staging buffer.

    Pinned buffers come from PyTorch's caching host allocator, so they are reused across calls once
    their last user (a kernel handle, an in-flight copy) is gone.
    """
    observer = _transfer_observer
    if observer is None:
        return _stage_to_host(tensor, dtype, pin_memory=pin_memory, copy=copy)
    _synchronize(tensor)
    start = time.perf_counter()
    result = _stage_to_host(tensor, dtype, pin_memory=pin_memory, copy=copy)
    observer(time.perf_counter() - start)
    return result


def _stage_to_host(tensor: torch.Tensor, dtype: torch.dtype, *, pin_memory: bool, copy: bool) -> torch.Tensor:
    if tensor.device.type == "cpu":
        return tensor.to(dtype=dtype, copy=copy).contiguous()
    staging = torch.empty(tensor.shape, dtype=dtype, pin_memory=pin_memory and torch.cuda.is_available())
    staging.copy_(tensor)
    return staging


def to_device(host: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`host` moved to `device` and `dtype` (asynchronously from pinned memory)."""
    observer = _transfer_observer
    start = time.perf_counter()
    if device.type == "cpu":
        result = host.to(dtype=dtype)
    else:
        result = host.to(device=device, dtype=dtype, non_blocking=host.is_pinned())
    if observer is not None:
        _synchronize(result)
        observer(time.perf_counter() - start)
    return result


class HostCopy(torch.autograd.Function):
    """x on the host in the layer's dtype; the backward moves the gradient back to x's device and dtype.

    A node of its own (not part of KTMoEFunction) so that autograd places the experts node by host tensors:
    the engine runs a node on the worker thread of the device its incoming gradients live on, so with host
    gradients the CPU experts backward runs on the thread that called backward(), not on the one shared
    CUDA device thread (kt_sft_train.overlap relies on this to overlap two micro-batches' backwards).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, tensor: torch.Tensor, dtype: torch.dtype, pin_memory: bool, copy: bool
    ) -> torch.Tensor:
        ctx.device, ctx.dtype = tensor.device, tensor.dtype
        return to_host(tensor, dtype, pin_memory=pin_memory, copy=copy)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return to_device(grad, ctx.device, ctx.dtype), None, None, None


class DeviceCopy(torch.autograd.Function):
    """A host tensor moved to `device`/`dtype`; the backward stages the gradient back to the host.

    On CUDA the backward copy is asynchronous into pinned memory and records an event in `link`; the
    experts backward (a CPU node, on another thread) waits for that event before it reads the gradient,
    so the shared CUDA device thread is not blocked while the copy drains its stream.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, host: torch.Tensor, device: torch.device, dtype: torch.dtype, link: GradLink
    ) -> torch.Tensor:
        ctx.host_dtype, ctx.link = host.dtype, link
        return to_device(host, device, dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        link: GradLink = ctx.link
        if grad.device.type == "cuda" and link.pin_memory and _transfer_observer is None:
            host = torch.empty(grad.shape, dtype=ctx.host_dtype, pin_memory=True)
            host.copy_(grad, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(grad.device))
            link.ready = event
            return host, None, None, None
        return to_host(grad, ctx.host_dtype, pin_memory=link.pin_memory, copy=False), None, None, None


class GradLink:
    """Hands the readiness of an asynchronous gradient copy from DeviceCopy to KTMoEFunction's backward."""

    def __init__(self, pin_memory: bool) -> None:
        self.pin_memory = pin_memory
        self.ready: Any = None  # a torch.cuda.Event while a copy may be in flight

    def wait(self) -> None:
        event, self.ready = self.ready, None
        if event is not None:
            event.synchronize()


class KTMoEFunction(torch.autograd.Function):
    """out = experts(x, ids, weights) with expert LoRA (DESIGN.md §2) on a CPU experts layer.

    Host tensors in and out (HostCopy / DeviceCopy stage them): x, ids and weights are already in the
    layer's host dtype, the output is too.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        layer: ExpertsLayer,
        options: dict[str, Any],
        x_host: torch.Tensor,
        ids_host: torch.Tensor,
        weights_host: torch.Tensor,
        a_gu: torch.Tensor | None,
        b_gu: torch.Tensor | None,
        a_d: torch.Tensor | None,
        b_d: torch.Tensor | None,
    ) -> torch.Tensor:
        call: RegionCall | None = options["region_call"]
        save = options["grad_needed"]
        lora = _lora(options, a_gu, b_gu, a_d, b_d)
        lora_tensors = (a_gu, b_gu, a_d, b_d)

        ctx.layer = layer
        ctx.call = call
        ctx.handle = None
        ctx.link = options["link"]
        ctx.lora_present = tuple(t is not None for t in lora_tensors)
        # The layer reads the LoRA factors again in the backward: they must not change in between.
        ctx.lora_versions = tuple(None if t is None else t._version for t in lora_tensors)
        ctx.lora_tensors = lora_tensors
        if call is None:
            out_host, ctx.handle = layer.forward(x_host, ids_host, weights_host, lora, save)
        else:
            out_host = _region_forward(layer, call, options["policy"], x_host, ids_host, weights_host, lora)
        # A saved tensor makes a non-reentrant checkpoint recompute this region before our backward.
        ctx.save_for_backward(ids_host)
        return out_host

    @staticmethod
    def backward(ctx: Any, grad_host: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ctx.saved_tensors  # noqa: B018  (unpacking triggers the checkpoint recompute, see forward)
        layer: ExpertsLayer = ctx.layer
        handle = _take_handle(ctx)
        _check_lora_unchanged(ctx)
        ctx.link.wait()
        grads = layer.backward(handle, grad_host.contiguous())
        lora_grads = tuple(
            g if present else None for g, present in zip(grads.lora, ctx.lora_present, strict=True)
        )
        return (None, None, grads.grad_x, None, grads.grad_weights, *lora_grads)


def _lora(
    options: dict[str, Any],
    a_gu: torch.Tensor | None,
    b_gu: torch.Tensor | None,
    a_d: torch.Tensor | None,
    b_d: torch.Tensor | None,
) -> ExpertLoRA | None:
    if all(t is None for t in (a_gu, b_gu, a_d, b_d)):
        return None
    return ExpertLoRA(a_gu, b_gu, a_d, b_d, options["scale_gu"], options["scale_d"])


def _region_forward(
    layer: ExpertsLayer,
    call: RegionCall,
    policy: str,
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    lora: ExpertLoRA | None,
) -> torch.Tensor:
    entry = call.entry
    if call.phase == FIRST_PASS:
        entry.ids = ids.clone()
        if policy == "retain":
            out, entry.handle = layer.forward(x, ids, weights, lora, True)
            entry.output = out
            return out.clone()
        out, _ = layer.forward(x, ids, weights, lora, False)
        return out
    if call.phase != RECOMPUTE or entry.ids is None:
        raise RuntimeError("checkpoint recompute of a CPU experts call that has no first pass")
    if policy == "retain":
        if entry.output is None:
            raise RuntimeError("the retained CPU experts output is gone (was this region recomputed twice?)")
        return entry.output.clone()
    # Recompute with the routing of the first pass, even if the recomputed router would differ.
    out, entry.handle = layer.forward(x, entry.ids, weights, lora, True)
    return out


def _check_lora_unchanged(ctx: Any) -> None:
    for tensor, version in zip(ctx.lora_tensors, ctx.lora_versions, strict=True):
        if tensor is not None and tensor._version != version:
            raise RuntimeError(
                "an expert LoRA weight was modified in place between the forward and the backward of the CPU "
                "experts (optimizer step before backward?)"
            )


def _take_handle(ctx: Any) -> Any:
    call: RegionCall | None = ctx.call
    if call is None:
        handle, ctx.handle = ctx.handle, None
    else:
        entry = call.entry
        handle, entry.handle, entry.output = entry.handle, None, None
    if handle is None:
        raise RuntimeError(
            "no saved CPU experts activations for this backward: backward through the same graph twice "
            "(retain_graph=True) is not supported by the CPU experts, or the forward ran without grad"
        )
    return handle


def moe_experts_apply(
    layer: ExpertsLayer,
    owner: object,
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    lora: ExpertLoRA | None,
    *,
    policy: str,
    pin_memory: bool,
) -> torch.Tensor:
    """Run `layer` on (x, ids, weights) through KTMoEFunction; `owner` keys checkpoint-region entries."""
    if policy not in ACTIVATION_POLICIES:
        raise ValueError(f"activation policy must be one of {ACTIVATION_POLICIES}, got {policy!r}")
    lora = lora or ExpertLoRA()
    tensors = (x, weights, *lora.tensors())
    grad_needed = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    region_call = current_call(owner)
    # A saving layer keeps references to x (and the routing) until the backward: give it copies.
    keep = grad_needed or region_call is not None
    x_host = HostCopy.apply(x, layer.host_dtype(x.dtype), pin_memory, keep)
    ids_host = to_host(ids, ids.dtype, pin_memory=pin_memory, copy=keep)
    weights_host = HostCopy.apply(weights, layer.host_dtype(weights.dtype), pin_memory, keep)
    link = GradLink(pin_memory)
    options = {
        "policy": policy,
        "grad_needed": grad_needed,
        "region_call": region_call,
        "link": link,
        "scale_gu": lora.scale_gu,
        "scale_d": lora.scale_d,
    }
    out_host = KTMoEFunction.apply(layer, options, x_host, ids_host, weights_host, *lora.tensors())
    return DeviceCopy.apply(out_host, x.device, x.dtype, link)
