"""Full (unsharded) checkpoint state of a model whose dense part FSDP2 shards (docs/distributed.md).

Checkpoints hold full tensors whatever the run's layout (one process, DDP or FSDP2), so a run can
resume under another. Saving gathers every sharded tensor (`full_tensor`, a collective: every rank
calls these functions in the same order); loading cuts each rank's shard out of the full tensor it
read (no communication). Tensors that are not DTensors (the owner's expert LoRA, which FSDP2 ignores,
and all tensors of an unsharded run) pass through unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` gathered to a plain CPU tensor when it is a DTensor (a collective), else itself."""
    return tensor.full_tensor().cpu() if isinstance(tensor, DTensor) else tensor


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full` laid out like `param` (a DTensor), else `full` itself.

    Every rank holds `full`, so no rank needs to send anything (src_data_rank=None)."""
    if not isinstance(param, DTensor):
        return full
    local = full.to(device=param.device, dtype=full.dtype)
    return distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None)


def _params_in_order(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with every DTensor state gathered (a collective on every rank).

    Ranks may hold different parameters (a non-owner has no expert LoRA), but the sharded ones are the
    dense parameters, which every rank holds in the same order, so the gathers match up."""
    state = optimizer.state_dict()
    return {
        "state": {
            index: {key: full_tensor(value) for key, value in entry.items()}
            for index, entry in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A full optimizer state dict (full_optimizer_state's form) cut to `optimizer`'s sharded parameters.

    Only state tensors shaped like their parameter (AdamW's moments) are sharded; the step count and
    other scalars stay as they are."""
    params = _params_in_order(optimizer)
    sharded: dict[int, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        sharded[index] = {
            key: shard_like(value, param)
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 0
            else value
            for key, value in entry.items()
        }
    return {"state": sharded, "param_groups": state["param_groups"]}
