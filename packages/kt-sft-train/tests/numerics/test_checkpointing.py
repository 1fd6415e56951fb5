"""Gradient checkpointing with CPU experts (DESIGN.md §4.5), on the deterministic reference backend.

Both activation policies x both use_reentrant modes: gradients bitwise equal to the run without
checkpointing, the experts run once per layer ("retain") or twice ("recompute"), and a recompute uses
the routing of the first pass even when the recomputed router would choose other experts.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from factory import (
    batch,
    copy_lora,
    deep_copy,
    randomize_lora,
    tiny_model,
    trainable_grads,
    unfreeze_routers,
)
from kt_sft_train import KTConfig, KTExperts, kt_lora_config, wrap_moe_layers_with_kt_wrapper
from peft import get_peft_model


class ForwardSpy:
    """Records (save, ids) of every forward of a KTExperts layer."""

    def __init__(self, experts: KTExperts) -> None:
        self.calls: list[tuple[bool, torch.Tensor]] = []
        layer = experts.layer
        original = layer.forward

        def forward(x, ids, weights, lora, save):  # type: ignore[no-untyped-def]
            self.calls.append((save, ids.clone()))
            return original(x, ids, weights, lora, save)

        layer.forward = forward


def _kt_model(
    base: torch.nn.Module, policy: str, family_arch: Any
) -> tuple[torch.nn.Module, list[ForwardSpy]]:
    model = deep_copy(base)
    wrap_moe_layers_with_kt_wrapper(model, KTConfig(backend="reference", activation_policy=policy))
    peft_model = get_peft_model(model, kt_lora_config(family_arch, r=4))
    unfreeze_routers(peft_model)
    spies = [ForwardSpy(m) for m in peft_model.modules() if isinstance(m, KTExperts)]
    return peft_model, spies


def _loss_and_grads(
    model: torch.nn.Module, ids: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), trainable_grads(model)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("policy", ["retain", "recompute"])
def test_checkpointed_gradients_equal_plain_bitwise(policy: str, use_reentrant: bool) -> None:
    from kt_sft_train import get_moe_arch_config

    base = tiny_model("qwen3_moe", torch.float32)
    arch = get_moe_arch_config(base)
    plain, _ = _kt_model(base, policy, arch)
    randomize_lora(plain)
    checkpointed, spies = _kt_model(base, policy, arch)
    copy_lora(plain, checkpointed)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})

    ids = batch()
    plain_loss, plain_grads = _loss_and_grads(plain, ids)
    ckpt_loss, ckpt_grads = _loss_and_grads(checkpointed, ids)

    assert torch.equal(plain_loss, ckpt_loss)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, expected in plain_grads.items():
        assert expected is not None and expected.norm() > 0, name
        assert torch.equal(ckpt_grads[name], expected), name

    for spy in spies:
        saves = [save for save, _ in spy.calls]
        if policy == "retain":
            assert saves == [True], "retain must run the CPU experts once and keep the first pass"
        else:
            assert saves == [False, True], "recompute must run without saving, then save in the recompute"
            assert torch.equal(spy.calls[0][1], spy.calls[1][1])


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_recompute_reuses_first_pass_routing(use_reentrant: bool) -> None:
    from kt_sft_train import get_moe_arch_config

    base = tiny_model("mixtral", torch.float32)
    arch = get_moe_arch_config(base)
    model, spies = _kt_model(base, "recompute", arch)
    randomize_lora(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})

    # A router that picks other experts every second call: the recompute would route differently.
    routers = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    for router in routers:
        calls = {"n": 0}
        original = router.forward

        def shifting(hidden, _original=original, _calls=calls):  # type: ignore[no-untyped-def]
            logits, weights, ids = _original(hidden)
            _calls["n"] += 1
            if _calls["n"] % 2 == 0:
                ids = (ids + 1) % arch.num_experts
            return logits, weights, ids

        router.forward = shifting

    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    for spy in spies:
        assert len(spy.calls) == 2
        assert torch.equal(spy.calls[0][1], spy.calls[1][1])


def test_second_backward_through_the_experts_raises() -> None:
    from kt_sft_train import get_moe_arch_config

    base = tiny_model("olmoe", torch.float32)
    model, _ = _kt_model(base, "retain", get_moe_arch_config(base))
    ids = batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        loss.backward()
