"""Tiny MoE checkpoints for the load / adapter tests: configs, bf16-exact random models, and writers for
hand-made safetensors layouts (sharded with an index, per-expert keys, float8 block scales)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from kt_sft_train.config import KTConfig
from kt_sft_train.model import load_kt_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, DeepseekV3Config, MixtralConfig, Qwen3MoeConfig

REFERENCE = KTConfig(backend="reference")
VOCAB = 96


# -- tiny models ----------------------------------------------------------------------------------------


def qwen3_moe_config() -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=6,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    )


def mixtral_config() -> MixtralConfig:
    return MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
    )


def deepseek_v3_config(
    hidden: int = 32, moe_intermediate: int = 16, q_lora_rank: int = 16
) -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * moe_intermediate,
        moe_intermediate_size=moe_intermediate,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )


def random_model(config, seed: int = 0) -> torch.nn.Module:
    """A random-init model whose weights are all bf16-representable (what the kernels will see)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Fresh random values everywhere (HF init leaves some tensors at 0 or 1).
            scale = 0.3 if "norm" in name else 0.2
            param.copy_((torch.randn_like(param) * scale + (1.0 if "norm" in name else 0.0)).bfloat16())
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.1)
    return model


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """float64 CPU logits; the inputs go where the embeddings are (a GPU for a KT model on a GPU host)."""
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        return model(input_ids=input_ids.to(device)).logits.double().cpu()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def plain_hf(path: Path, **kwargs) -> torch.nn.Module:
    # The eager experts loop: grouped_mm (the CPU default) has no float64 kernel.
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float64, experts_implementation="eager", **kwargs
    ).eval()


def kt_model(path: Path, **kwargs) -> torch.nn.Module:
    return load_kt_model(path, kt=REFERENCE, dtype=torch.float64, **kwargs).eval()


def assert_same_logits(kt: torch.nn.Module, reference: torch.nn.Module) -> None:
    input_ids = tokens()
    actual, expected = logits_of(kt, input_ids), logits_of(reference, input_ids)
    assert torch.isfinite(actual).all()
    assert relative_error(actual, expected) <= 1e-6


def expert_modules(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if type(module).__name__ == "KTExperts"]


# -- hand-written checkpoints ----------------------------------------------------------------------------


def write_sharded(directory: Path, config, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    """safetensors shards + model.safetensors.index.json, keys dealt round-robin over the shards."""
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    names = [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    shards: list[dict[str, torch.Tensor]] = [{} for _ in names]
    weight_map = {}
    for i, key in enumerate(sorted(tensors)):
        shards[i % num_shards][key] = tensors[key].contiguous()
        weight_map[key] = names[i % num_shards]
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, directory / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}}
    index["weight_map"] = weight_map
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def per_expert_state_dict(model: torch.nn.Module, names=("gate_proj", "up_proj", "down_proj")) -> dict:
    """The model's state dict with every fused experts parameter split into per-expert Linear weights."""
    gate, up, down = names
    out = {}
    for key, value in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "gate_up_proj" and prefix.endswith("experts"):
            half = value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.{gate}.weight"] = value[e, :half].clone()
                out[f"{prefix}.{e}.{up}.weight"] = value[e, half:].clone()
        elif leaf == "down_proj" and prefix.endswith("experts"):
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.{down}.weight"] = value[e].clone()
        else:
            out[key] = value.clone()
    return out


def quantize_fp8_blocks(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 style: per 128x128 block, scale_inv = amax / 448 (times a random factor)."""
    rows, cols = weight.shape
    blocks = weight.float().reshape(rows // block, block, cols // block, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-4)
    scale_inv = amax / 448.0 * torch.empty_like(amax).uniform_(1.0, 1.5)
    full = scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return (weight.float() / full).to(torch.float8_e4m3fn), scale_inv
