"""Checkpoint state of a host-owner run that any rank can resume from (docs/distributed.md).

The owners hold the expert LoRA and its optimizer state; the other ranks hold placeholders and an
optimizer without them. After each step the dense part is equal on every rank (DDP) and the expert part
is equal on every owner (their grads are all-reduced), so the first host's owner's adapter and optimizer
state are the whole run's. Its optimizer state is saved with the parameter names in optimizer order;
each rank takes the entries of the parameters it trains (a non-owner: all but the expert LoRA).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from . import distributed

OWNER_OPTIMIZER = "kt_owner_optimizer.pt"


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The qualified name of each parameter of each optimizer group, in optimizer order."""
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    try:
        return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    except KeyError as missing:
        raise ValueError("the optimizer holds a parameter that is not the model's") from missing


def save_owner_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """The adapter writer (first host's owner) writes its optimizer state with names; every rank calls."""
    runtime = distributed.current_runtime()
    if runtime is None:
        raise RuntimeError("save_owner_optimizer: no host-owner run is set up in this process")
    error: BaseException | None = None
    if runtime.layout.is_adapter_writer:
        try:
            state = {"names": _optimizer_names(model, optimizer), "optimizer": optimizer.state_dict()}
            temporary = os.path.join(directory, OWNER_OPTIMIZER + ".tmp")
            torch.save(state, temporary)
            os.replace(temporary, os.path.join(directory, OWNER_OPTIMIZER))
        except BaseException as caught:
            runtime.report(caught)
            error = caught
    if error is not None:
        raise error
    barrier = torch.distributed.barrier(async_op=True, group=runtime.control_group)
    runtime.wait([barrier], f"saving the owner's optimizer state to {directory}")


def owner_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, directory: str
) -> dict[str, Any]:
    """The saved owner state restricted to `optimizer`'s parameters (by name), in its order."""
    path = os.path.join(directory, OWNER_OPTIMIZER)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: resuming host-owner experts needs a checkpoint written by "
            "HostOwnerTrainerMixin (it holds the owner's expert-LoRA optimizer state)"
        )
    saved = torch.load(path, map_location="cpu", weights_only=True)
    saved_names: list[list[str]] = saved["names"]
    state: dict[str, Any] = saved["optimizer"]
    mine = _optimizer_names(model, optimizer)
    if len(mine) != len(saved_names):
        raise ValueError(
            f"{path}: {len(saved_names)} optimizer parameter groups saved, this optimizer has {len(mine)}"
        )
    index_of = {name: i for i, name in enumerate(n for group in saved_names for n in group)}
    groups, entries, position = [], {}, 0
    for saved_group, names in zip(state["param_groups"], mine, strict=True):
        unknown = [name for name in names if name not in index_of]
        if unknown:
            raise ValueError(f"{path} has no optimizer state for {unknown[:3]}")
        params = []
        for name in names:
            old = index_of[name]
            if old in state["state"]:
                entries[position] = state["state"][old]
            params.append(position)
            position += 1
        groups.append(dict(saved_group, params=params))
    return {"state": entries, "param_groups": groups}


def load_owner_adapter(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load a saved adapter's tensors (PEFT keys, without the adapter name) into a host-owner PEFT model;
    a non-owner skips the expert LoRA (it holds placeholders)."""
    from peft import set_peft_model_state_dict

    runtime = distributed.current_runtime()
    if runtime is not None and not runtime.layout.is_owner:
        adapter = getattr(model, "active_adapter", "default")
        expert = {name.replace(f".{adapter}.", ".") for name in distributed.expert_lora_parameters(model)}
        weights = {key: value for key, value in weights.items() if key not in expert}
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"the adapter has tensors the model lacks: {unexpected[:3]}")
