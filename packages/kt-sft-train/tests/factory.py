"""The one tiny-model factory of the training-wheel tests.

Every model a test builds comes from `moe_config(family, **overrides)` (the family table below) and
`build_model(config, seed=..., init=...)`; the named helpers (tiny_model, random_model, the checkpoint
configs, make_job) are presets of those two. Also: LoRA helpers, the stand-in job directories of the CLI /
examples tests, and writers of hand-made safetensors layouts.

Sizes of the default family configs: hidden 64, expert intermediate 32 (multiples of 32, as the kernels
require), 2 layers, 4-8 experts, top-2. Init styles:
- "scaled": every parameter re-drawn at a scale where each block matters, routers included (numerics);
- "bf16": fresh random values that are all bf16-representable (what the kernels will see; load tests);
- "hf": transformers' own init under torch.manual_seed (stand-in jobs).
LoRA B factors are drawn random nonzero by randomize_lora (PEFT initializes B = 0, which would hide a
dropped or mis-scaled LoRA).
"""

from __future__ import annotations

import copy
import json
import os
import random
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from kt_sft_train.config import KTConfig
from kt_sft_train.model import load_kt_model
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

VOCAB = 96
HIDDEN = 64
EXPERT_INTERMEDIATE = 32
REFERENCE = KTConfig(backend="reference")

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)

# family -> (transformers config class name, its tiny keyword arguments)
_FAMILY_KWARGS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(_COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=EXPERT_INTERMEDIATE,
             num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(_COMMON, intermediate_size=96, moe_intermediate_size=EXPERT_INTERMEDIATE,
             shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
    ),
    # Layer 0 dense, layer 1 MoE with grouped top-k (2 groups, 1 kept) and a shared expert.
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(_COMMON, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=EXPERT_INTERMEDIATE,
             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
             first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=32,
             kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(_COMMON, head_dim=16, intermediate_size=EXPERT_INTERMEDIATE, num_local_experts=4,
             num_experts_per_tok=2),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(_COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=EXPERT_INTERMEDIATE,
             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
             first_k_dense_replace=1, routed_scaling_factor=1.5, norm_topk_prob=True, use_qk_norm=True),
    ),
    "olmoe": (
        "OlmoeConfig",
        dict(_COMMON, intermediate_size=EXPERT_INTERMEDIATE, num_experts=4, num_experts_per_tok=2),
    ),
    # Edge families of issue 16 (what "attention" means; per-layer top-k): for the detection tests.
    # afmoe: an attention output gate named gate_proj, layer 0 a dense MLP with its own gate_proj.
    "afmoe": (
        "AfmoeConfig",
        dict(_COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=EXPERT_INTERMEDIATE,
             num_experts=4, num_experts_per_tok=2, num_dense_layers=1),
    ),
    # Layer 0 a Mamba mixer (in_proj, x_proj, dt_proj, out_proj), layer 1 attention.
    "jamba": (
        "JambaConfig",
        dict(_COMMON, intermediate_size=EXPERT_INTERMEDIATE, num_experts=4, num_experts_per_tok=2,
             attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
             mamba_d_state=4, mamba_dt_rank=8, mamba_expand=2, use_mamba_kernels=False),
    ),
    # Layer 0 linear attention (Gated DeltaNet), layer 1 full attention.
    "qwen3_next": (
        "Qwen3NextConfig",
        dict(_COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=EXPERT_INTERMEDIATE,
             shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2, linear_num_key_heads=2,
             linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
             layer_types=["linear_attention", "full_attention"]),
    ),
    # Layer 0 a short convolution (in_proj, out_proj), layer 1 attention (its output is `out_proj`).
    "lfm2_moe": (
        "Lfm2MoeConfig",
        dict(_COMMON, intermediate_size=96, moe_intermediate_size=EXPERT_INTERMEDIATE, num_experts=4,
             num_experts_per_tok=2, num_dense_layers=0, layer_types=["conv", "full_attention"]),
    ),
    # A shared MLP (input_linear, output_linear) beside the routed experts.
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        dict(_COMMON, intermediate_size=EXPERT_INTERMEDIATE, num_local_experts=4, num_experts_per_tok=2,
             shared_intermediate_size=32),
    ),
    # A per-layer top-k list.
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        dict(_COMMON, head_dim=16, intermediate_size=EXPERT_INTERMEDIATE, num_experts=4, moe_topk=[2, 1]),
    ),
    # Families kt-sft refuses (or that have no routed experts): for the detection tests.
    "gpt_oss": (
        "GptOssConfig",
        dict(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2),
    ),
    "llama": (
        "LlamaConfig",
        dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    ),
}  # fmt: skip


def moe_config(family: str, *, replace: bool = False, **overrides: Any) -> Any:
    """The transformers config of `family` with the tiny sizes above, `overrides` applied.

    replace=True: only `overrides` (the family's class with transformers' defaults for the rest).
    """
    import transformers

    class_name, kwargs = _FAMILY_KWARGS[family]
    values = dict(overrides) if replace else {**kwargs, **overrides}
    return getattr(transformers, class_name)(**values)


def build_model(
    config: Any, *, seed: int = 0, init: str = "scaled", dtype: torch.dtype | None = None
) -> nn.Module:
    """The one model builder: a causal LM of `config`, initialised by `init` ("scaled", "bf16", "hf")."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        if init == "scaled":
            generator = torch.Generator().manual_seed(seed + 1)
            for name, param in model.named_parameters():
                if param.dim() == 1:
                    # Norm scales around 1, biases small.
                    fill = 1.0 if "norm" in name else 0.0
                    param.copy_(fill + 0.1 * torch.randn(param.shape, generator=generator))
                else:
                    param.copy_(
                        torch.randn(param.shape, generator=generator) * (0.6 / param.shape[-1] ** 0.5)
                    )
            for name, buffer in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buffer.copy_(0.05 * torch.randn(buffer.shape, generator=generator))
        elif init == "bf16":
            for name, param in model.named_parameters():
                # Fresh random values everywhere (HF init leaves some tensors at 0 or 1).
                scale = 0.3 if "norm" in name else 0.2
                param.copy_((torch.randn_like(param) * scale + (1.0 if "norm" in name else 0.0)).bfloat16())
            for name, buffer in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buffer.copy_(torch.randn_like(buffer) * 0.1)
        elif init != "hf":
            raise ValueError(f"build_model: unknown init {init!r}")
    return model if dtype is None else model.to(dtype)


# -- presets: the numerics tests (six families, "scaled" init, eager HF reference) ----------------------

FAMILIES: dict[str, Callable[[], object]] = {
    family: (lambda family=family: moe_config(family))
    for family in ("qwen3_moe", "qwen2_moe", "deepseek_v3", "mixtral", "glm4_moe", "olmoe")
}


def tiny_config(family: str):  # type: ignore[no-untyped-def]
    config = FAMILIES[family]()
    # The plain HF reference runs transformers' own per-expert loop and eager attention.
    config._experts_implementation = "eager"
    config._attn_implementation = "eager"
    return config


def tiny_model(family: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """A randomly initialised tiny model of `family` in `dtype`, in train mode."""
    return build_model(tiny_config(family), seed=seed, init="scaled", dtype=dtype).train()


# -- presets: the load / adapter tests (smaller, "bf16" init) ------------------------------------------


def qwen3_moe_config() -> Any:
    return moe_config(
        "qwen3_moe", replace=True, vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
        moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
    )  # fmt: skip


def mixtral_config() -> Any:
    return moe_config(
        "mixtral", replace=True, vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip


def deepseek_v3_config(hidden: int = 32, moe_intermediate: int = 16, q_lora_rank: int = 16) -> Any:
    return moe_config(
        "deepseek_v3", replace=True, vocab_size=VOCAB, hidden_size=hidden,
        intermediate_size=2 * moe_intermediate,
        moe_intermediate_size=moe_intermediate, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=q_lora_rank, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    )  # fmt: skip


def random_model(config, seed: int = 0) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    """A random-init model whose weights are all bf16-representable (what the kernels will see)."""
    return build_model(config, seed=seed, init="bf16").eval()


# -- LoRA and numerics helpers -------------------------------------------------------------------


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


# -- stand-in job directories (CLI / examples tests) ---------------------------------------------------
# A tiny Qwen3-MoE, a character-level tokenizer built locally (no download) and a small string task, in the
# layout of the embedded default job (model/, train.jsonl, heldout.jsonl, job.json).

ALPHABET = string.ascii_lowercase + string.digits + " :=+-,."
SPECIALS = ("<pad>", "<eos>", "<unk>")
# A minimal chat template: "<|user|>...\n<|assistant|>...<eos>" (rendered as plain characters).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}U:{{ m['content'] }}\n"
    "{% else %}A:{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


def char_tokenizer(chat_template: str | None = None) -> Any:
    """A character-level PreTrainedTokenizerFast: one id per character, specials first."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS)}
    for char in ALPHABET + "\nUA":
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def tiny_qwen3_moe(vocab_size: int, seed: int, *, layers: int = 2, experts: int = 8) -> Any:
    config = moe_config(
        "qwen3_moe", vocab_size=vocab_size, intermediate_size=128, num_hidden_layers=layers,
        num_experts=experts, max_position_embeddings=256,
    )  # fmt: skip
    return build_model(config, seed=seed, init="hf").eval()


def reverse_records(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        records.append({"prompt": f"rev:{word}=", "completion": word[::-1]})
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_job(
    directory: Path,
    *,
    seed: int = 0,
    chat_template: str | None = None,
    job: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a stand-in job directory; returns it.

    bf16 weights on disk, like the embedded job: kt-sft streams experts in bf16, so vanilla transformers
    and kt-sft then compute with identical weight values."""
    tokenizer = char_tokenizer(chat_template)
    model = tiny_qwen3_moe(len(tokenizer), seed)
    model_dir = directory / "model"
    model.to(dtype).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_jsonl(directory / "train.jsonl", reverse_records(64, seed + 1))
    write_jsonl(directory / "heldout.jsonl", reverse_records(8, seed + 2))
    settings = {
        "description": "stand-in job: reverse a word",
        "seed": seed,
        "steps": 12,
        "batch_size": 8,
        "max_seq_len": 32,
        "lr": 0.01,
        "lora_r": 4,
        "eval_max_new_tokens": 8,
        "eval_limit": 8,
    }
    settings.update(job or {})
    (directory / "job.json").write_text(json.dumps(settings, indent=1), encoding="utf-8")
    return directory


# -- checkpoints: logits helpers and hand-written safetensors layouts --------------------------------


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
