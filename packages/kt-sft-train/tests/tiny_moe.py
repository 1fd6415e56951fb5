"""Tiny random-init MoE models of several transformers families, and the helpers the training tests share.

Sizes: hidden 64, expert intermediate 32 (multiples of 32, as the kernels require), 2 layers, 4-8
experts, top-2. Every parameter is re-drawn at a scale where each block matters, routers included, and
the LoRA B factors are random nonzero (PEFT initializes B = 0, which would hide a dropped or mis-scaled
LoRA).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import pytest
import torch
from torch import nn

VOCAB = 96
HIDDEN = 64
EXPERT_INTERMEDIATE = 32

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def _qwen3_moe():  # type: ignore[no-untyped-def]
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_COMMON,
        head_dim=16,
        intermediate_size=96,
        moe_intermediate_size=EXPERT_INTERMEDIATE,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    )


def _qwen2_moe():  # type: ignore[no-untyped-def]
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **_COMMON,
        intermediate_size=96,
        moe_intermediate_size=EXPERT_INTERMEDIATE,
        shared_expert_intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    )


def _deepseek_v3():  # type: ignore[no-untyped-def]
    from transformers import DeepseekV3Config

    common = dict(_COMMON, num_key_value_heads=4)
    # Layer 0 dense, layer 1 MoE with grouped top-k (2 groups, 1 kept) and a shared expert.
    return DeepseekV3Config(
        **common,
        intermediate_size=96,
        moe_intermediate_size=EXPERT_INTERMEDIATE,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
    )


def _mixtral():  # type: ignore[no-untyped-def]
    from transformers import MixtralConfig

    return MixtralConfig(
        **_COMMON,
        head_dim=16,
        intermediate_size=EXPERT_INTERMEDIATE,
        num_local_experts=4,
        num_experts_per_tok=2,
    )


def _glm4_moe():  # type: ignore[no-untyped-def]
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(
        **_COMMON,
        head_dim=16,
        intermediate_size=96,
        moe_intermediate_size=EXPERT_INTERMEDIATE,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=1.5,
        norm_topk_prob=True,
        use_qk_norm=True,
    )


def _olmoe():  # type: ignore[no-untyped-def]
    from transformers import OlmoeConfig

    return OlmoeConfig(**_COMMON, intermediate_size=EXPERT_INTERMEDIATE, num_experts=4, num_experts_per_tok=2)


FAMILIES: dict[str, Callable[[], object]] = {
    "qwen3_moe": _qwen3_moe,
    "qwen2_moe": _qwen2_moe,
    "deepseek_v3": _deepseek_v3,
    "mixtral": _mixtral,
    "glm4_moe": _glm4_moe,
    "olmoe": _olmoe,
}


def tiny_config(family: str):  # type: ignore[no-untyped-def]
    config = FAMILIES[family]()
    # The plain HF reference runs transformers' own per-expert loop and eager attention.
    config._experts_implementation = "eager"
    config._attn_implementation = "eager"
    return config


def tiny_model(family: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """A randomly initialised tiny model of `family` in `dtype`, in train mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                # Norm scales around 1, biases small.
                fill = 1.0 if "norm" in name else 0.0
                param.copy_(fill + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * (0.6 / param.shape[-1] ** 0.5))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.05 * torch.randn(buffer.shape, generator=generator))
    return model.to(dtype).train()


def randomize_lora(peft_model: nn.Module, seed: int = 2) -> None:
    """Draw every LoRA factor at random, B included, so s·B·A·x is of the order of W·x."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if ".lora_A." in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
            elif ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3 / param.shape[-1] ** 0.5)


def copy_lora(source: nn.Module, target: nn.Module) -> None:
    state = {k: v for k, v in source.state_dict().items() if "lora_" in k}
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "lora_" in k], missing


def unfreeze_routers(model: nn.Module) -> None:
    """Train the router weights too, so their gradients (through top_k_weights) are compared."""
    for name, param in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            param.requires_grad_(True)


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: (param.grad.detach().clone() if param.grad is not None else None)
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error, in float64."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def batch(seed: int = 3, batch_size: int = 2, length: int = 9) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch_size, length), generator=generator)


def kernels_or_skip() -> None:
    """Skip when kt_sft_kernels is not installed, except in CI where it must be (fail loudly)."""
    from kt_sft_train._kernels import kernels_available, load_kernels

    if kernels_available():
        return
    if os.environ.get("CI"):
        load_kernels()  # raises the ImportError that says why
    pytest.skip("kt_sft_kernels is not installed (kernel-backend tests run where it is, and always in CI)")


def deep_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
