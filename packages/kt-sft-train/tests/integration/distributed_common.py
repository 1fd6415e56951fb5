"""What the host-owner test ranks (distributed_worker.py) and their single-process reference share."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from factory import VOCAB, randomize_lora, tiny_model, unfreeze_routers

DTYPES = {"float64": torch.float64, "bfloat16": torch.bfloat16}
LAYER0_EXPERTS = "base_model.model.model.layers.0.mlp.experts"


def build_peft_model(kt: Any, spec: dict[str, Any]) -> nn.Module:
    from kt_sft_train import kt_lora_config, wrap_moe_layers_with_kt_wrapper
    from peft import get_peft_model

    model = tiny_model("qwen3_moe", DTYPES[spec["dtype"]], seed=0)
    wrap_moe_layers_with_kt_wrapper(model, kt)
    unfreeze_routers(model)
    if spec.get("checkpointing"):
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, kt_lora_config(model, r=4))
    randomize_lora(peft_model)
    return peft_model


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


def rank_pieces(spec: dict[str, Any]) -> list[torch.Tensor]:
    """Each rank's part of the global batch: [B_r, L_r] token ids (B and L differ per rank)."""
    pieces = []
    for rank, (batch, length) in enumerate(spec["pieces"]):
        generator = torch.Generator().manual_seed(100 + rank)
        pieces.append(torch.randint(0, VOCAB, (batch, length), generator=generator))
    return pieces


def predicted_tokens(pieces: list[torch.Tensor]) -> int:
    return sum(p.shape[0] * (p.shape[1] - 1) for p in pieces)


def token_loss_sum(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1), reduction="sum"
    )


@dataclass
class EmptyExperts:
    """Counts (experts call, expert) pairs that got no token on this rank."""

    total: int = 0
    handles: list[Any] = field(default_factory=list)


def count_empty_experts(model: nn.Module) -> EmptyExperts:
    counter = EmptyExperts()

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        ids = args[1]
        hits = torch.bincount(ids.reshape(-1), minlength=module.base_layer.base_layer.num_experts)
        counter.total += int((hits == 0).sum())

    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            counter.handles.append(module.register_forward_pre_hook(hook))
    return counter


def layer_inputs(spec: dict[str, Any], rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Direct inputs of layer 0's experts for `rank` (its T may be 0), and the output cotangent."""
    tokens = spec["layer_tokens"][rank]
    generator = torch.Generator().manual_seed(200 + rank)
    x = torch.randn(tokens, 64, generator=generator).to(dtype)
    rows = [torch.randperm(4, generator=generator)[:2] for _ in range(tokens)]
    ids = torch.stack(rows) if rows else torch.empty(0, 2, dtype=torch.long)
    weights = torch.rand(tokens, 2, generator=generator).to(dtype)
    cotangent = torch.randn(tokens, 64, generator=generator).to(dtype)
    return x, ids, weights, cotangent


def layer_call(model: nn.Module, spec: dict[str, Any], ranks: int | list[int]) -> dict[str, Any]:
    """Layer 0's experts on the inputs of `ranks` (concatenated), with a backward."""
    dtype = DTYPES[spec["dtype"]]
    parts = [layer_inputs(spec, r, dtype) for r in ([ranks] if isinstance(ranks, int) else ranks)]
    x, ids, weights, cotangent = (torch.cat(t) for t in zip(*parts, strict=True))
    x.requires_grad_(True)
    weights.requires_grad_(True)
    experts = model.get_submodule(LAYER0_EXPERTS)
    out = experts(x, ids, weights)
    (out.double() * cotangent.double()).sum().backward()
    lora = {
        name: p.grad.detach().clone()
        for name, p in model.named_parameters()
        if name.startswith(LAYER0_EXPERTS) and p.grad is not None
    }
    return {"out": out.detach(), "dx": x.grad, "dw": weights.grad, "lora_grads": lora}


class FailingLayer:
    """Stands in for the owner's experts layer and raises like a failing kernel would."""

    def __init__(self, inner: Any, message: str) -> None:
        self.inner = inner
        self.message = message

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def forward(self, *args: Any) -> Any:
        raise RuntimeError(self.message)


def make_owner_layer_fail(model: nn.Module, message: str) -> None:
    from kt_sft_train import KTExperts

    experts = [m for m in model.modules() if isinstance(m, KTExperts)]
    experts[-1].layer.inner = FailingLayer(experts[-1].layer.inner, message)


def _embedding(model: nn.Module) -> nn.Module:
    return model.get_submodule("base_model.model.model.embed_tokens")


def make_dense_forward_fail(model: nn.Module, message: str) -> None:
    def hook(module: nn.Module, args: Any) -> None:
        raise ValueError(message)

    _embedding(model).register_forward_pre_hook(hook)


def make_dense_forward_exit(model: nn.Module) -> None:
    def hook(module: nn.Module, args: Any) -> None:
        os._exit(3)

    _embedding(model).register_forward_pre_hook(hook)
