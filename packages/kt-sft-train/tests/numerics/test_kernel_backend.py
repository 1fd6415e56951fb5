"""backend="kernels" (kt_sft_kernels) against the reference and against plain HF + PEFT (DESIGN.md §7).

Skipped only where kt_sft_kernels is not installed; under CI (env CI set) a missing kernel wheel fails.
"""

from __future__ import annotations

import pytest
import torch
from factory import (
    FAMILIES,
    batch,
    copy_lora,
    deep_copy,
    kernels_or_skip,
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
from kt_sft_train.reference import ExpertLoRA
from peft import get_peft_model

pytestmark = pytest.mark.usefixtures("_kernels")


@pytest.fixture
def _kernels() -> None:
    kernels_or_skip()


def _captured_layer_inputs(model: torch.nn.Module) -> list[tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]:
    """(experts module, (x, ids, weights)) of every MoE layer during one forward of `model`."""
    captured = []
    arch = get_moe_arch_config(model)
    hooks = []
    for path in arch.experts_paths:
        module = model.get_submodule(path)

        def hook(mod, args, _captured=captured):  # type: ignore[no-untyped-def]
            _captured.append((mod, tuple(a.detach().clone() for a in args[:3])))

        hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=batch(length=16))
    for handle in hooks:
        handle.remove()
    return captured


def _random_lora(num_experts: int, hidden: int, intermediate: int, rank: int, seed: int) -> ExpertLoRA:
    g = torch.Generator().manual_seed(seed)
    return ExpertLoRA(
        a_gu=torch.randn(num_experts, rank, hidden, generator=g) / hidden**0.5,
        b_gu=torch.randn(num_experts, 2 * intermediate, rank, generator=g) * 0.1,
        a_d=torch.randn(num_experts, rank, intermediate, generator=g) / intermediate**0.5,
        b_d=torch.randn(num_experts, hidden, rank, generator=g) * 0.1,
        scale_gu=2.0,
        scale_d=2.0,
    )


def _run(experts: KTExperts, x, ids, weights, lora: ExpertLoRA, grad_out):  # type: ignore[no-untyped-def]
    x = x.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    leaves = [t.clone().requires_grad_() for t in lora.tensors()]
    out = experts.run(x, ids, weights, lora.replace_tensors(tuple(leaves)))
    out.backward(grad_out)
    return out.detach(), [x.grad, weights.grad, *(t.grad for t in leaves)]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_kernel_layer_matches_reference_on_captured_inputs(family: str) -> None:
    model = tiny_model(family, torch.bfloat16)
    arch = get_moe_arch_config(model)
    layers = _captured_layer_inputs(model)
    assert len(layers) == len(arch.layers)
    for index, (hf_experts, (x, ids, weights)) in enumerate(layers):
        # One expert gets no token: its LoRA gradients must be exactly zero.
        ids = ids.clone()
        ids[ids == 0] = 1
        gate_up, down = hf_experts.gate_up_proj.detach(), hf_experts.down_proj.detach()
        kernel = KTExperts.from_weights(hf_experts, gate_up, down, KTConfig(backend="kernels"))
        # The float64 reference sees exactly the bf16 values the kernels see.
        reference = KTExperts.from_weights(
            hf_experts, gate_up.double(), down.double(), KTConfig(backend="reference")
        )
        lora = _random_lora(arch.num_experts, arch.hidden_size, arch.intermediate_size, 4, seed=index)
        grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(x.dtype)

        out, grads = _run(kernel, x, ids, weights, lora, grad_out)
        lora64 = ExpertLoRA(*(t.double() for t in lora.tensors()), lora.scale_gu, lora.scale_d)
        ref_out, ref_grads = _run(reference, x.double(), ids, weights.double(), lora64, grad_out.double())

        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert rel_error(out, ref_out) <= 1e-2
        row_error = ((out.double() - ref_out).norm(dim=1) / ref_out.norm(dim=1)).max()
        assert row_error <= 3e-2
        names = ["grad_x", "grad_weights", "da_gu", "db_gu", "da_d", "db_d"]
        dtypes = [x.dtype, weights.dtype] + [torch.float32] * 4
        for name, grad, expected, dtype in zip(names, grads, ref_grads, dtypes, strict=True):
            assert grad.dtype == dtype, name
            assert rel_error(grad, expected) <= 2e-2, name
        for name, grad, expected in zip(names[2:], grads[2:], ref_grads[2:], strict=True):
            assert torch.count_nonzero(grad[0]) == 0, f"{name}: expert 0 got no token"
            used = expected[1:].flatten(1).norm(dim=1) > 0
            diff = (grad[1:].double() - expected[1:]).flatten(1).norm(dim=1)
            assert (diff[used] / expected[1:].flatten(1).norm(dim=1)[used]).max() <= 3e-2, name


def test_kernel_results_do_not_depend_on_thread_count() -> None:
    model = tiny_model("mixtral", torch.bfloat16)
    arch = get_moe_arch_config(model)
    hf_experts, (x, ids, weights) = _captured_layer_inputs(model)[0]
    lora = _random_lora(arch.num_experts, arch.hidden_size, arch.intermediate_size, 4, seed=3)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    results = []
    for threads in (1, 2):
        experts = KTExperts.from_weights(
            hf_experts,
            hf_experts.gate_up_proj.detach(),
            hf_experts.down_proj.detach(),
            KTConfig(threads=threads),
        )
        results.append(_run(experts, x, ids, weights, lora, grad_out))
    (out1, grads1), (out2, grads2) = results
    assert torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2, strict=True))


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_whole_model_kernels_vs_hf_peft_bf16(family: str, device: str) -> None:
    """On a GPU host the dense part of both models runs on the GPU; KT's experts stay on the CPU kernels."""
    base = tiny_model(family, torch.bfloat16)
    arch = get_moe_arch_config(base)
    hf = get_peft_model(deep_copy(base), kt_lora_config(arch, r=4))
    randomize_lora(hf)
    wrap_moe_layers_with_kt_wrapper(base, KTConfig(backend="kernels"))
    kt = get_peft_model(base, kt_lora_config(arch, r=4))
    copy_lora(hf, kt)
    for model in (hf, kt):
        unfreeze_routers(model)
    assert all(m.backend == "kernels" for m in kt.modules() if isinstance(m, KTExperts))
    for model in (hf, kt):
        model.to(device)  # KTExperts keep their experts and expert LoRA on the CPU

    ids = batch(length=16).to(device)
    losses = []
    for model in (hf, kt):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) <= 1e-2 * abs(losses[0])
    hf_grads, kt_grads = trainable_grads(hf), trainable_grads(kt)
    assert hf_grads.keys() == kt_grads.keys()
    assert any(".experts." in n for n in kt_grads)
    for name, expected in hf_grads.items():
        assert expected is not None and expected.float().norm() > 0, name
        assert rel_error(kt_grads[name], expected) <= 5e-2, name

    next_losses = []
    for model in (hf, kt):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        optimizer.step()
        with torch.no_grad():
            next_losses.append(model(input_ids=ids, labels=ids).loss.item())
    assert next_losses[0] != losses[0]
    assert abs(next_losses[1] - next_losses[0]) <= 1e-2 * abs(next_losses[0])


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("policy", ["retain", "recompute"])
def test_kernel_checkpointing_bitwise(policy: str, use_reentrant: bool) -> None:
    base = tiny_model("qwen3_moe", torch.float32)
    arch = get_moe_arch_config(base)
    models = []
    for _ in range(2):
        model = deep_copy(base)
        wrap_moe_layers_with_kt_wrapper(model, KTConfig(backend="kernels", activation_policy=policy))
        models.append(get_peft_model(model, kt_lora_config(arch, r=4)))
    plain, checkpointed = models
    randomize_lora(plain)
    copy_lora(plain, checkpointed)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ids = batch()
    for model in models:
        model(input_ids=ids, labels=ids).loss.backward()
    expected, actual = trainable_grads(plain), trainable_grads(checkpointed)
    for name, grad in expected.items():
        assert grad is not None and torch.equal(actual[name], grad), name
