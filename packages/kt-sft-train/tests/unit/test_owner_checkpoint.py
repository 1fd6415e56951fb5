"""owner_checkpoint: a rank takes its own parameters' entries of the owner's saved optimizer state by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kt_sft_train.owner_checkpoint import OWNER_OPTIMIZER, owner_optimizer_state
from torch import nn


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(3, 4)
        self.expert = nn.Linear(4, 2, bias=False)


def _stepped(model: Toy, groups: list[list[nn.Parameter]]) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW([{"params": g, "weight_decay": 0.1 * i} for i, g in enumerate(groups)])
    loss = model.expert(model.dense(torch.randn(5, 3))).pow(2).sum()
    loss.backward()
    optimizer.step()
    return optimizer


def test_a_non_owner_takes_the_dense_entries_of_the_owner_state_by_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    owner = Toy()
    # Owner: groups (dense weight, expert weight), (dense bias): the expert sits inside a group.
    saved = _stepped(owner, [[owner.dense.weight, owner.expert.weight], [owner.dense.bias]])
    names = [["dense.weight", "expert.weight"], ["dense.bias"]]
    torch.save({"names": names, "optimizer": saved.state_dict()}, tmp_path / OWNER_OPTIMIZER)

    other = Toy()  # a non-owner: the same groups without the expert LoRA
    optimizer = torch.optim.AdamW([{"params": [other.dense.weight]}, {"params": [other.dense.bias]}])
    optimizer.load_state_dict(owner_optimizer_state(other, optimizer, str(tmp_path)))
    for param, source in ((other.dense.weight, owner.dense.weight), (other.dense.bias, owner.dense.bias)):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[param][key], saved.state[source][key]), key
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.1]  # the saved hyper-parameters


def test_an_unknown_parameter_or_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    model = Toy()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(FileNotFoundError, match="HostOwnerTrainerMixin"):
        owner_optimizer_state(model, optimizer, str(tmp_path))
    saved = torch.optim.AdamW([model.dense.weight])
    torch.save({"names": [["dense.weight"]], "optimizer": saved.state_dict()}, tmp_path / OWNER_OPTIMIZER)
    with pytest.raises(ValueError, match="no optimizer state for"):
        owner_optimizer_state(model, optimizer, str(tmp_path))
