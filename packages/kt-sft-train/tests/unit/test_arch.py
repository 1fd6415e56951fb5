"""Architecture detection by structure, and one clear error per unsupported model."""

from __future__ import annotations

import pytest
import torch
from factory import EXPERT_INTERMEDIATE, FAMILIES, HIDDEN, build_model, moe_config, tiny_config, tiny_model
from kt_sft_train import (
    KTConfig,
    KTExperts,
    UnsupportedModelError,
    get_moe_arch_config,
    wrap_moe_layers_with_kt_wrapper,
)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tested_families_are_detected_from_model_and_config(family: str) -> None:
    model = tiny_model(family, torch.float32)
    arch = get_moe_arch_config(model)
    assert arch.tested and arch.model_type == family
    assert (arch.hidden_size, arch.intermediate_size, arch.top_k) == (HIDDEN, EXPERT_INTERMEDIATE, 2)
    assert arch.experts_suffix == "mlp.experts"
    dense_first = family in ("deepseek_v3", "glm4_moe")
    assert [layer.layer_index for layer in arch.layers] == ([1] if dense_first else [0, 1])
    for path in arch.experts_paths:
        assert model.get_submodule(path).gate_up_proj.shape == (
            arch.num_experts,
            2 * EXPERT_INTERMEDIATE,
            HIDDEN,
        )
    from_config = get_moe_arch_config(tiny_config(family))
    assert from_config.experts_paths == arch.experts_paths and from_config.num_experts == arch.num_experts


def test_detection_sees_through_kt_and_peft_wrappers() -> None:
    from kt_sft_train import kt_lora_config
    from peft import get_peft_model

    model = tiny_model("qwen3_moe", torch.float32)
    arch = get_moe_arch_config(model)
    wrap_moe_layers_with_kt_wrapper(model, KTConfig(backend="reference"))
    assert get_moe_arch_config(model).experts_paths == arch.experts_paths
    peft_model = get_peft_model(model, kt_lora_config(model, r=2))
    assert get_moe_arch_config(peft_model.base_model.model).experts_paths == arch.experts_paths


def test_gpt_oss_layout_is_refused_naming_every_problem() -> None:
    with pytest.raises(UnsupportedModelError) as error:
        get_moe_arch_config(moe_config("gpt_oss"))
    message = str(error.value)
    for problem in ("has_bias=True", "is_transposed=True", "is_concatenated=False"):
        assert problem in message
    assert "gpt_oss" in message


def test_non_silu_activation_is_refused() -> None:
    config = tiny_config("qwen3_moe")
    config.hidden_act = "gelu"
    with pytest.raises(UnsupportedModelError, match=r"activation 'gelu' \(the kernels implement SiLU only\)"):
        get_moe_arch_config(config)


def test_custom_gate_is_refused() -> None:
    model = tiny_model("mixtral", torch.float32)
    experts = model.get_submodule(get_moe_arch_config(model).experts_paths[0])

    def clamped_gate(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate.clamp(max=10.0)) * up.clamp(-10.0, 10.0)

    experts._apply_gate = clamped_gate
    with pytest.raises(UnsupportedModelError, match="custom gating function"):
        get_moe_arch_config(model)


def test_dense_model_has_no_routed_experts() -> None:
    model = build_model(moe_config("llama"), init="hf")
    with pytest.raises(UnsupportedModelError, match="no routed-experts module found in LlamaForCausalLM"):
        get_moe_arch_config(model)
    with pytest.raises(TypeError, match=r"expects a torch\.nn\.Module or a transformers PretrainedConfig"):
        get_moe_arch_config("Qwen/Qwen3-30B-A3B")


def test_wrap_twice_and_wrap_after_peft_are_refused() -> None:
    from kt_sft_train import kt_lora_config
    from peft import get_peft_model

    model = tiny_model("olmoe", torch.float32)
    wrap_moe_layers_with_kt_wrapper(model, KTConfig(backend="reference"))
    with pytest.raises(ValueError, match="already a KTExperts"):
        wrap_moe_layers_with_kt_wrapper(model, KTConfig(backend="reference"))
    plain = get_peft_model(tiny_model("olmoe", torch.float32), kt_lora_config(model, r=2))
    with pytest.raises(ValueError, match="before get_peft_model"):
        wrap_moe_layers_with_kt_wrapper(plain.base_model.model, KTConfig(backend="reference"))


def test_kt_experts_input_validation() -> None:
    experts = KTExperts(
        num_experts=4, top_k=2, hidden_size=8, intermediate_size=4, kt=KTConfig(backend="reference")
    )
    x, ids, weights = torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="not loaded"):
        experts(x, ids, weights)
    with pytest.raises(ValueError, match=r"gate_up must have shape \[4, 8, 8\]"):
        experts.load_expert_weights(torch.zeros(4, 8, 7), torch.zeros(4, 8, 4))
    experts.load_expert_weights(torch.randn(4, 8, 8), torch.randn(4, 8, 4))
    with pytest.raises(ValueError, match="hidden_states last dim must be 8"):
        experts(torch.randn(3, 9), ids, weights)
    with pytest.raises(ValueError, match=r"top_k_index must be \[T, 2\]"):
        experts(x, torch.zeros(3, 3, dtype=torch.long), torch.ones(3, 3))
    with pytest.raises(TypeError, match="top_k_index must be an integer"):
        experts(x, ids.float(), weights)
    with pytest.raises(ValueError, match="top_k_weights must have the shape"):
        experts(x, ids, torch.ones(3, 1))
    with pytest.raises(ValueError, match="top_k=5 is larger than num_experts=4"):
        KTExperts(num_experts=4, top_k=5, hidden_size=8, intermediate_size=4)
    assert experts(x, ids, weights).shape == x.shape
