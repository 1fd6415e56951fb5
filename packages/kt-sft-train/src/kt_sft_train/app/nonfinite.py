"""A loss or gradient that became NaN/Inf: the error and the finders that name where it appeared first."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .checkpoints import trainable_parameters


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became NaN/Inf; the message names the layer and tensor."""


def first_nonfinite_gradient(model: nn.Module) -> str | None:
    """The name of the first trainable parameter whose gradient holds NaN/Inf (None: all finite)."""
    for name, parameter in trainable_parameters(model):
        if parameter.grad is not None and not bool(torch.isfinite(parameter.grad).all()):
            return name
    return None


def first_nonfinite_output(model: nn.Module, batch: dict[str, torch.Tensor]) -> str | None:
    """Re-run a forward without gradients and name the first module whose output holds NaN/Inf."""
    found: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        def check(module: nn.Module, inputs: Any, output: Any) -> None:
            tensors = output if isinstance(output, (tuple, list)) else (output,)
            for tensor in tensors:
                floating = isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
                if floating and not found and not bool(torch.isfinite(tensor).all()):
                    found.append(name)

        return check

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if found:
        return found[0]
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            return f"{name} (weights)"
    return None


def nonfinite_message(what: str, step: int, where: str | None) -> str:
    place = f"first non-finite tensor: {where}" if where else "no module output is non-finite on a re-run"
    return (
        f"{what} became non-finite at step {step} ({place}); lower --lr or --max-grad-norm, check the data "
        "and the checkpoint, or pass --skip-nonfinite-steps to skip such steps"
    )
