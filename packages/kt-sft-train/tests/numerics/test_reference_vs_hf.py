"""backend="reference" vs plain transformers + PEFT in float64, for every tested family (DESIGN.md §7).

Same tiny model, same LoRA (random, B nonzero), routers trainable: logits, loss, every trainable gradient
and the loss after one AdamW step agree to 1e-6 relative. The PEFT model on the KT side is built with
the ordinary get_peft_model; kt-sft takes the expert wrappers over by itself.
"""

from __future__ import annotations

import pytest
import torch
from factory import (
    FAMILIES,
    batch,
    copy_lora,
    deep_copy,
    randomize_lora,
    rel_error,
    tiny_model,
    trainable_grads,
    unfreeze_routers,
)
from kt_sft_train import (
    KTConfig,
    KTExperts,
    get_moe_arch_config,
    kt_lora_config,
    wrap_moe_layers_with_kt_wrapper,
)
from kt_sft_train.peft import is_taken_over
from peft import get_peft_model

TOLERANCE = 1e-6


def _pair(family: str, dtype: torch.dtype = torch.float64):  # type: ignore[no-untyped-def]
    base = tiny_model(family, dtype)
    arch = get_moe_arch_config(base)
    kt_base = deep_copy(base)
    wrap_moe_layers_with_kt_wrapper(kt_base, KTConfig(backend="reference"))
    hf = get_peft_model(base, kt_lora_config(arch, r=4, lora_alpha=8))
    kt = get_peft_model(kt_base, kt_lora_config(arch, r=4, lora_alpha=8))
    randomize_lora(hf)
    copy_lora(hf, kt)
    unfreeze_routers(hf)
    unfreeze_routers(kt)
    return hf, kt, arch


def _step(model, ids):  # type: ignore[no-untyped-def]
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reference_backend_equals_hf_peft_float64(family: str) -> None:
    hf, kt, arch = _pair(family)
    assert arch.model_type == family
    experts = [m for m in kt.modules() if isinstance(m, KTExperts)]
    assert len(experts) == len(arch.layers) > 0
    wrappers = [m for m in kt.modules() if type(m).__name__ == "ParamWrapper"]
    assert wrappers and all(is_taken_over(w) for w in wrappers)

    ids = batch()
    hf_out, kt_out = _step(hf, ids), _step(kt, ids)
    assert rel_error(kt_out.logits, hf_out.logits) <= TOLERANCE
    assert abs(kt_out.loss.item() - hf_out.loss.item()) <= TOLERANCE * abs(hf_out.loss.item())

    hf_grads, kt_grads = trainable_grads(hf), trainable_grads(kt)
    assert hf_grads.keys() == kt_grads.keys()
    expert_lora = [n for n in hf_grads if ".experts." in n and "lora_" in n]
    routers = [n for n in hf_grads if n.endswith("mlp.gate.weight")]
    assert len(expert_lora) == 4 * len(arch.layers) and routers
    for name, expected in hf_grads.items():
        assert expected is not None and expected.norm() > 0, name
        assert rel_error(kt_grads[name], expected) <= TOLERANCE, name

    # One AdamW step on both, then the next loss.
    for model in (hf, kt):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        hf_next = hf(input_ids=ids, labels=ids).loss.item()
        kt_next = kt(input_ids=ids, labels=ids).loss.item()
    assert hf_next != hf_out.loss.item()
    assert abs(kt_next - hf_next) <= TOLERANCE * abs(hf_next)


def test_lora_changes_the_output_and_is_seen_by_kt() -> None:
    # Guards the test above: disabling the adapters must move the loss on both sides, equally.
    hf, kt, _ = _pair("qwen3_moe")
    ids = batch()
    with torch.no_grad():
        on = (hf(input_ids=ids, labels=ids).loss.item(), kt(input_ids=ids, labels=ids).loss.item())
        with hf.disable_adapter(), kt.disable_adapter():
            off = (hf(input_ids=ids, labels=ids).loss.item(), kt(input_ids=ids, labels=ids).loss.item())
    assert abs(on[0] - off[0]) > 1e-3
    assert abs(on[1] - on[0]) <= TOLERANCE * on[0]
    assert abs(off[1] - off[0]) <= TOLERANCE * off[0]


def test_gradient_accumulation_and_zero_grad_set_to_none() -> None:
    _, kt, _ = _pair("mixtral")
    first, second = batch(seed=5), batch(seed=6)
    params = {n: p for n, p in kt.named_parameters() if p.requires_grad}

    _step(kt, first)
    grads_first = trainable_grads(kt)
    kt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params.values())
    _step(kt, second)
    grads_second = trainable_grads(kt)
    kt.zero_grad(set_to_none=True)

    _step(kt, first)
    _step(kt, second)
    for name, param in params.items():
        expected = grads_first[name] + grads_second[name]
        assert rel_error(param.grad, expected) <= 1e-12, name
