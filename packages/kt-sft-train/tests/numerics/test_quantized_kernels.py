"""Quantized expert bases (int8, int4) in training, and frozen experts (no expert LoRA), against references
that use the kernels' DEQUANTIZED weights (DESIGN.md §7, issue 11).

- per layer, on captured inputs: kernel layer vs the float64 reference layer on the dequantized weights,
  at §7's quantized bounds (int8: output 2e-2, gradients 3e-2; int4: 3e-2 / 4e-2);
- whole tiny model of every family: kernels vs plain HF+PEFT whose experts hold the dequantized weights;
- frozen experts: attention-only LoRA runs the experts without any LoRA buffer (forward + dx + routing
  gradients only).
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
from peft import LoraConfig, get_peft_model

pytestmark = pytest.mark.usefixtures("_kernels")

# DESIGN.md §7: a quantized base vs the reference on its dequantized weights (output, every gradient).
LAYER_BOUNDS = {"int8": (2e-2, 3e-2), "int4": (3e-2, 4e-2)}


# The dtype of the weights the kernels compute with (rounding point RQ, ADR 0603): int8 fp32(q * scale),
# int4 bf16(fp32(q * scale)).
KERNEL_WEIGHT_DTYPES = {"int8": torch.float32, "int4": torch.bfloat16}


@pytest.fixture
def _kernels() -> None:
    kernels_or_skip()


def _with_kernel_weights(
    hf_base: torch.nn.Module, wrapped: list[KTExperts], weight_dtype: str
) -> torch.nn.Module:
    """The plain HF model with its routed experts holding exactly the kernels' weights. int8's are fp32:
    those expert modules become fp32 and compute on their (bf16) inputs in fp32, returning bf16 as the
    kernels do; the rest of the model stays bf16 (the bf16 whole-model comparison's rounding points)."""
    weight_dtype_torch = KERNEL_WEIGHT_DTYPES[weight_dtype]
    with torch.no_grad():
        for layer, experts in zip(get_moe_arch_config(hf_base).layers, wrapped, strict=True):
            module = hf_base.get_submodule(layer.experts_path)
            gate_up, down = experts.layer.dequantized_weights()
            assert gate_up.dtype == weight_dtype_torch
            if weight_dtype_torch != module.gate_up_proj.dtype:
                module.to(weight_dtype_torch)
                module.register_forward_pre_hook(_inputs_to(weight_dtype_torch))
                module.register_forward_hook(_output_to(hf_base.dtype))
            module.gate_up_proj.copy_(gate_up)
            module.down_proj.copy_(down)
    return hf_base


def _inputs_to(dtype: torch.dtype):  # type: ignore[no-untyped-def]
    def hook(_module, args):  # type: ignore[no-untyped-def]
        return (args[0].to(dtype), *args[1:])

    return hook


def _output_to(dtype: torch.dtype):  # type: ignore[no-untyped-def]
    def hook(_module, _args, output):  # type: ignore[no-untyped-def]
        return output.to(dtype)

    return hook


def _captured(model: torch.nn.Module) -> list[tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]:
    captured = []
    hooks = []
    for path in get_moe_arch_config(model).experts_paths:

        def hook(mod, args, _captured=captured):  # type: ignore[no-untyped-def]
            _captured.append((mod, tuple(a.detach().clone() for a in args[:3])))

        hooks.append(model.get_submodule(path).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=batch(length=16))
    for handle in hooks:
        handle.remove()
    return captured


def _run(experts: KTExperts, x, ids, weights, lora: ExpertLoRA, grad_out):  # type: ignore[no-untyped-def]
    x = x.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    leaves = [t.clone().requires_grad_() for t in lora.tensors()]
    out = experts.run(x, ids, weights, lora.replace_tensors(tuple(leaves)))
    out.backward(grad_out)
    return out.detach(), [x.grad, weights.grad, *(t.grad for t in leaves)]


@pytest.mark.parametrize("weight_dtype", ["int8", "int4"])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_quantized_layer_matches_reference_on_dequantized_weights(family: str, weight_dtype: str) -> None:
    model = tiny_model(family, torch.bfloat16)
    arch = get_moe_arch_config(model)
    out_bound, grad_bound = LAYER_BOUNDS[weight_dtype]
    for index, (hf_experts, (x, ids, weights)) in enumerate(_captured(model)):
        gate_up, down = hf_experts.gate_up_proj.detach(), hf_experts.down_proj.detach()
        kernel = KTExperts.from_weights(hf_experts, gate_up, down, KTConfig(weight_dtype=weight_dtype))
        dq_gate_up, dq_down = kernel.layer.dequantized_weights()
        assert dq_gate_up.dtype == KERNEL_WEIGHT_DTYPES[weight_dtype]
        assert not torch.equal(dq_gate_up, gate_up.to(dq_gate_up.dtype)), "not quantized"
        reference = KTExperts.from_weights(
            hf_experts, dq_gate_up.double(), dq_down.double(), KTConfig(backend="reference")
        )
        g = torch.Generator().manual_seed(index)
        E, H, inter, r = arch.num_experts, arch.hidden_size, arch.intermediate_size, 4
        lora = ExpertLoRA(
            a_gu=torch.randn(E, r, H, generator=g) / H**0.5,
            b_gu=torch.randn(E, 2 * inter, r, generator=g) * 0.1,
            a_d=torch.randn(E, r, inter, generator=g) / inter**0.5,
            b_d=torch.randn(E, H, r, generator=g) * 0.1,
            scale_gu=2.0,
            scale_d=2.0,
        )
        grad_out = torch.randn(x.shape, generator=g).to(x.dtype)
        out, grads = _run(kernel, x, ids, weights, lora, grad_out)
        lora64 = ExpertLoRA(*(t.double() for t in lora.tensors()), lora.scale_gu, lora.scale_d)
        ref_out, ref_grads = _run(reference, x.double(), ids, weights.double(), lora64, grad_out.double())
        assert torch.isfinite(out).all()
        assert rel_error(out, ref_out) <= out_bound
        for name, grad, expected in zip(
            ["grad_x", "grad_weights", "da_gu", "db_gu", "da_d", "db_d"], grads, ref_grads, strict=True
        ):
            assert rel_error(grad, expected) <= grad_bound, name


@pytest.mark.parametrize("weight_dtype", ["int8", "int4"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_whole_model_quantized_vs_hf_peft_on_dequantized_weights(family: str, weight_dtype: str) -> None:
    base = tiny_model(family, torch.bfloat16)
    arch = get_moe_arch_config(base)
    hf_base = deep_copy(base)
    wrapped = wrap_moe_layers_with_kt_wrapper(base, KTConfig(weight_dtype=weight_dtype))
    hf_base = _with_kernel_weights(hf_base, wrapped, weight_dtype)
    hf = get_peft_model(hf_base, kt_lora_config(arch, r=4))
    randomize_lora(hf)
    kt = get_peft_model(base, kt_lora_config(arch, r=4))
    copy_lora(hf, kt)
    for model in (hf, kt):
        unfreeze_routers(model)

    ids = batch(length=16)
    losses = []
    for model in (hf, kt):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    # Whole-model bounds: the bf16 ones of DESIGN.md §7 (loss 1e-2, gradients 5e-2). Against HF on the
    # dequantized weights (int8: fp32 HF experts) the quantization error cancels and the comparison is the
    # bf16 test's: same weights, only the kernels' documented activation rounding points differ.
    assert abs(losses[1] - losses[0]) <= 1e-2 * abs(losses[0])
    hf_grads, kt_grads = trainable_grads(hf), trainable_grads(kt)
    assert hf_grads.keys() == kt_grads.keys()
    assert any(".experts." in n for n in kt_grads)
    for name, expected in hf_grads.items():
        assert expected is not None and expected.float().norm() > 0, name
        assert rel_error(kt_grads[name], expected) <= 5e-2, name


@pytest.mark.parametrize("weight_dtype", ["bf16", "int4"])
def test_frozen_experts_run_without_lora_buffers(weight_dtype: str) -> None:
    """Attention-only LoRA: PEFT wraps no expert parameter, so the kernels run forward + dx + routing
    gradients with no LoRA (the reference's SkipLoRA); results equal HF+PEFT, no LoRA cache is kept."""
    import kt_sft_kernels as kk

    base = tiny_model("qwen3_moe", torch.bfloat16)
    hf_base = deep_copy(base)
    wrapped = wrap_moe_layers_with_kt_wrapper(base, KTConfig(weight_dtype=weight_dtype))
    if weight_dtype != "bf16":
        hf_base = _with_kernel_weights(hf_base, wrapped, weight_dtype)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    hf = get_peft_model(hf_base, config)
    randomize_lora(hf)
    kt = get_peft_model(base, LoraConfig(**config.to_dict()))
    copy_lora(hf, kt)
    for model in (hf, kt):
        unfreeze_routers(model)
    assert not [n for n, p in kt.named_parameters() if ".experts." in n and p.requires_grad]

    ids = batch(length=16)
    for model in (hf, kt):
        model(input_ids=ids, labels=ids).loss.backward()
    hf_grads, kt_grads = trainable_grads(hf), trainable_grads(kt)
    assert hf_grads.keys() == kt_grads.keys()
    # Gradients below the last MoE layer reach the attention LoRA of layer 0 only through the experts' dx
    # and the routing weights' gradients.
    assert any("layers.0.self_attn" in n for n in kt_grads) and any("mlp.gate" in n for n in kt_grads)
    for name, expected in hf_grads.items():
        assert expected is not None and expected.float().norm() > 0, name
        assert rel_error(kt_grads[name], expected) <= 5e-2, name

    tokens = ids.numel()
    for experts in wrapped:
        report = experts.layer.memory_report()
        cfg = experts.layer.config
        no_lora = kk.estimate_layer_bytes(cfg, tokens=tokens, lora_rank=0)["cache"]
        with_lora = kk.estimate_layer_bytes(cfg, tokens=tokens, lora_rank=4)["cache"]
        assert no_lora < with_lora
        # The activation cache of the step (kept for the next forward) is the one without LoRA factors.
        assert report["cache_spare"] == no_lora
