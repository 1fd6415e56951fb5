"""Model-family edges (issue 16 item 7): what "attention" targets on families whose decoder layers hold
more than softmax attention, a per-layer top-k, an expert size the kernels cannot run, and an unsupported
layout named with every reason at once. Tiny random configs of each family, built by the factory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factory import REFERENCE, build_model, moe_config
from kt_sft_train import KTConfig, UnsupportedModelError, get_moe_arch_config, kt_lora_config
from kt_sft_train.model import load_kt_model
from peft import get_peft_model
from torch import nn


def attention_paths(layers: tuple[int, ...], names: str = "q k v o") -> set[str]:
    return {f"model.layers.{n}.self_attn.{p}_proj" for n in layers for p in names.split()}


# family -> the full module paths "attention" must target (and nothing else)
EXPECTED = {
    # The attention output gate `self_attn.gate_proj` is left out: PEFT re-reads a `gate_proj` target as the
    # experts' gate_up_proj (it made get_peft_model fail); layer 0's dense mlp.gate_proj is not attention.
    "afmoe": attention_paths((0, 1)),
    # Layer 0's Mamba mixer (in_proj, x_proj, dt_proj, out_proj) is not attention.
    "jamba": attention_paths((1,)),
    # Layer 0's linear attention (Gated DeltaNet) is not softmax attention.
    "qwen3_next": attention_paths((1,)),
    # Layer 0's short convolution is not; layer 1's attention calls its output projection out_proj.
    "lfm2_moe": attention_paths((1,), "q k v") | {"model.layers.1.self_attn.out_proj"},
    # The shared MLP (input_linear, output_linear) is not attention.
    "granitemoeshared": attention_paths((0, 1)),
    "qwen3_moe": attention_paths((0, 1)),
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_attention_targets_are_full_paths_of_attention_blocks(family: str) -> None:
    model = build_model(moe_config(family), seed=1, init="hf")
    arch = get_moe_arch_config(model)
    assert set(arch.dense_target_modules) == EXPECTED[family]

    # PEFT puts LoRA on exactly those modules (plain HF model and the KT model), experts included.
    peft_model = get_peft_model(model, kt_lora_config(model, r=2))
    wrapped = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), nn.Linear)
    }
    assert wrapped == EXPECTED[family]
    assert any(".experts" in name and "lora_A" in name for name, _ in peft_model.named_parameters())


def test_afmoe_trains_on_the_kt_model_with_the_default_targets() -> None:
    from kt_sft_train import wrap_moe_layers_with_kt_wrapper

    model = build_model(moe_config("afmoe"), seed=2, init="hf").double()
    wrap_moe_layers_with_kt_wrapper(model, REFERENCE)
    peft_model = get_peft_model(model, kt_lora_config(model, r=2))
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    peft_model(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)


def test_per_layer_top_k_is_rejected_up_front_and_a_uniform_list_works() -> None:
    with pytest.raises(
        UnsupportedModelError, match=r"per-layer router top-k .*\[2, 1\].* not implemented yet"
    ):
        get_moe_arch_config(moe_config("hunyuan_v1_moe"))
    assert get_moe_arch_config(moe_config("hunyuan_v1_moe", moe_topk=[2, 2])).top_k == 2


def test_unsupported_layout_names_every_reason() -> None:
    with pytest.raises(UnsupportedModelError) as error:
        get_moe_arch_config(moe_config("gpt_oss"))
    message = str(error.value)
    for reason in ("has_bias=True", "is_transposed=True", "is_concatenated=False", "custom gating function"):
        assert reason in message, message


def test_expert_size_off_the_kernel_tile_is_rejected_before_loading(tmp_path: Path) -> None:
    config = moe_config("qwen3_moe", moe_intermediate_size=48)
    config.save_pretrained(tmp_path)  # no weights at all: the check must come before any is read
    assert json.loads((tmp_path / "config.json").read_text())["moe_intermediate_size"] == 48
    with pytest.raises(
        UnsupportedModelError, match=r"model\.layers\.0\.mlp\.experts: expert intermediate size 48"
    ):
        load_kt_model(tmp_path, KTConfig(threads=1))
