"""Quantized expert bases from checkpoints (issue 11, ADR 0602): bf16 and DeepSeek-style fp8 checkpoints
quantized by the kernels while streaming, compressed-tensors int4 "pack-quantized" checkpoints taken
bit-exactly. The dequantized kernel weights are checked bit for bit against an independent NumPy
quantizer (kt_sft_kernels.testing) or the checkpoint's own dequantization, and the model's logits
against plain HF run on exactly those dequantized weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from factory import (
    deepseek_v3_config,
    kernels_or_skip,
    logits_of,
    per_expert_state_dict,
    quantize_fp8_blocks,
    random_model,
    relative_error,
    tiny_model,
    tokens,
    write_sharded,
)
from kt_sft_train import KTConfig, KTExperts, get_moe_arch_config
from kt_sft_train.model import load_kt_model
from kt_sft_train.weights import CheckpointError, dequantize_fp8_blocks
from transformers import AutoModelForCausalLM, FineGrainedFP8Config

pytestmark = pytest.mark.usefixtures("_kernels")


@pytest.fixture
def _kernels() -> None:
    kernels_or_skip()


def _numpy_quantized(weight: torch.Tensor, weight_dtype: str, group_size: int) -> torch.Tensor:
    """The kernels' documented quantization rule and rounding point RQ, by the independent NumPy
    quantizer (int8 fp32, int4 bf16: the dtype of the kernels' weights)."""
    from kt_sft_kernels import testing

    w = weight.float().numpy()
    q, scale = testing.quantize(w, weight_dtype, group_size)
    dequantized = np.asarray(testing.dequantize(q, scale, weight_dtype, group_size)).astype(np.float32)
    return torch.from_numpy(dequantized).to(torch.float32 if weight_dtype == "int8" else torch.bfloat16)


def _kt_experts(model: torch.nn.Module) -> list[KTExperts]:
    return [m for m in model.modules() if isinstance(m, KTExperts)]


def _hf_with_experts(path: Path, experts: list[KTExperts], **kwargs) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    """Plain HF (fp32) with every routed expert replaced by the kernels' dequantized weights (fp32 holds
    them exactly)."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    arch = get_moe_arch_config(hf)
    with torch.no_grad():
        for layer, kt in zip(arch.layers, experts, strict=True):
            module = hf.get_submodule(layer.experts_path)
            gate_up, down = kt.layer.dequantized_weights()
            module.gate_up_proj.copy_(gate_up)
            module.down_proj.copy_(down)
    return hf


def _assert_close_logits(kt: torch.nn.Module, hf: torch.nn.Module, bound: float) -> None:
    ids = tokens()
    actual, expected = logits_of(kt, ids), logits_of(hf, ids)
    assert torch.isfinite(actual).all()
    assert relative_error(actual, expected) <= bound


# The whole-model bound: the kernels see bf16 activations where HF computes in fp32 on the same
# (dequantized) weights; one bf16 rounding per activation through 2 layers gives ~1e-3 relative, the
# 1e-2 of the bf16 whole-model loss bound (DESIGN.md §7) leaves room and still catches a wrong weight.
LOGITS_BOUND = 1e-2


@pytest.mark.parametrize(("weight_dtype", "group_size"), [("int8", None), ("int4", 32), ("int4", None)])
def test_bf16_checkpoint_is_quantized_while_streaming(tmp_path: Path, weight_dtype: str, group_size) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("qwen3_moe", torch.bfloat16)
    model.save_pretrained(tmp_path)
    kt = load_kt_model(
        tmp_path, KTConfig(weight_dtype=weight_dtype, group_size=group_size), dtype=torch.float32
    )
    experts = _kt_experts(kt)
    arch = get_moe_arch_config(model)
    assert len(experts) == len(arch.layers) == 2
    for layer, loaded in zip(arch.layers, experts, strict=True):
        source = model.get_submodule(layer.experts_path)
        gate_up, down = loaded.layer.dequantized_weights()
        # hidden 64, expert intermediate 32: the automatic int4 group is the largest that divides both.
        group = 32
        assert torch.equal(gate_up, _numpy_quantized(source.gate_up_proj.detach(), weight_dtype, group))
        assert torch.equal(down, _numpy_quantized(source.down_proj.detach(), weight_dtype, group))
        report = loaded.layer.memory_report()
        assert report["weights"] == {"int8": 1, "int4": 0.5}[weight_dtype] * 3 * gate_up.numel() // 2
    _assert_close_logits(kt, _hf_with_experts(tmp_path, experts), LOGITS_BOUND)


def test_fp8_checkpoint_goes_to_int8_without_a_bf16_round_trip(tmp_path: Path) -> None:
    config = deepseek_v3_config(hidden=256, moe_intermediate=128)
    model = random_model(config, seed=6).to(torch.bfloat16)
    tensors, fp8 = {}, {}
    for key, value in per_expert_state_dict(model).items():
        if ".experts." in key and key.endswith("proj.weight"):
            tensors[key], tensors[key + "_scale_inv"] = quantize_fp8_blocks(value)
            fp8[key] = dequantize_fp8_blocks(tensors[key], tensors[key + "_scale_inv"], dtype=torch.float32)
        else:
            tensors[key] = value
    config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    write_sharded(tmp_path, config, tensors, num_shards=2)

    kt = load_kt_model(tmp_path, KTConfig(weight_dtype="int8"), dtype=torch.float32)
    experts = _kt_experts(kt)
    arch = get_moe_arch_config(kt)
    differs_from_bf16_round_trip = False
    for layer, loaded in zip(arch.layers, experts, strict=True):
        prefix = layer.experts_path
        gate_up = torch.stack(
            [
                torch.cat([fp8[f"{prefix}.{e}.gate_proj.weight"], fp8[f"{prefix}.{e}.up_proj.weight"]])
                for e in range(arch.num_experts)
            ]
        )
        down = torch.stack([fp8[f"{prefix}.{e}.down_proj.weight"] for e in range(arch.num_experts)])
        actual_gate_up, actual_down = loaded.layer.dequantized_weights()
        # The kernels quantized the exact fp32 products of the fp8 checkpoint, not their bf16 rounding.
        assert torch.equal(actual_gate_up, _numpy_quantized(gate_up, "int8", 128))
        assert torch.equal(actual_down, _numpy_quantized(down, "int8", 128))
        if not torch.equal(actual_gate_up, _numpy_quantized(gate_up.bfloat16(), "int8", 128)):
            differs_from_bf16_round_trip = True
    assert differs_from_bf16_round_trip, "the test data cannot tell fp32 staging from a bf16 round trip"
    hf = _hf_with_experts(tmp_path, experts, quantization_config=FineGrainedFP8Config(dequantize=True))
    _assert_close_logits(kt, hf, LOGITS_BOUND)


# -- compressed-tensors int4 "pack-quantized" -------------------------------------------------------------


def pack_int4_words(values: torch.Tensor) -> torch.Tensor:
    """The test's own packer: int values in [-8, 7] [N, K] -> int32 [N, K/8], stored as value + 8, element k
    at bits 4*(k % 8) of word k // 8 (the compressed-tensors pack-quantized layout)."""
    unsigned = (values.to(torch.int64) + 8).reshape(values.shape[0], -1, 8)
    shifts = torch.arange(8, dtype=torch.int64) * 4
    words = (unsigned << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits as a signed int32
    return words.to(torch.int32)


def _int4_checkpoint(directory: Path, group: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny Qwen3-MoE whose experts ship as packed int4 (random values and bf16 group scales), and the
    checkpoint's own dequantization of every expert weight: q * scale with bf16 scales, i.e. the exact
    product rounded once to bf16 (what compressed-tensors' decompression in the scale dtype gives, and
    the kernels' rounding point RQ)."""
    model = tiny_model("qwen3_moe", torch.bfloat16)
    generator = torch.Generator().manual_seed(11)
    tensors, dequantized = {}, {}
    for key, value in per_expert_state_dict(model).items():
        if ".experts." not in key:
            tensors[key] = value
            continue
        rows, cols = value.shape
        q = torch.randint(-8, 8, (rows, cols), generator=generator)
        scale = (torch.rand(rows, cols // group, generator=generator) * 0.02 + 0.005).to(torch.bfloat16)
        base = key.removesuffix(".weight")
        tensors[f"{base}.weight_packed"] = pack_int4_words(q)
        tensors[f"{base}.weight_scale"] = scale
        tensors[f"{base}.weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
        dequantized[key] = (q.to(torch.bfloat16) * scale.repeat_interleave(group, dim=1)).bfloat16()
    config = model.config
    config.quantization_config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                            "group_size": group, "dynamic": False, "observer": "minmax"},
                "input_activations": None,
            }
        },
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*mlp.gate$"],
    }  # fmt: skip
    # Three shards: a weight's packed values, scales and shape land in different files.
    write_sharded(directory, config, tensors, num_shards=3)
    return model, dequantized


def test_packer_matches_the_documented_nibble_order() -> None:
    values = torch.tensor([[-8, -1, 0, 1, 7, 3, -5, 2]])
    word = pack_int4_words(values).view(torch.uint8)
    # little-endian bytes: element k in byte k // 2, low nibble = even k, value + 8.
    expected = [(0 + 8 * 0) | (7 << 4), 8 | (9 << 4), 15 | (11 << 4), 3 | (10 << 4)]
    assert word.flatten().tolist() == expected


@pytest.mark.parametrize("group", [32])
def test_compressed_tensors_int4_checkpoint_is_loaded_bit_exactly(tmp_path: Path, group: int) -> None:
    _, dequantized = _int4_checkpoint(tmp_path, group)
    kt = load_kt_model(tmp_path, KTConfig(weight_dtype="int4"), dtype=torch.float32)
    experts = _kt_experts(kt)
    arch = get_moe_arch_config(kt)
    for layer, loaded in zip(arch.layers, experts, strict=True):
        assert loaded.layer.config.group_size == group
        prefix = layer.experts_path
        gate_up = torch.stack(
            [
                torch.cat(
                    [
                        dequantized[f"{prefix}.{e}.gate_proj.weight"],
                        dequantized[f"{prefix}.{e}.up_proj.weight"],
                    ]
                )
                for e in range(arch.num_experts)
            ]
        )
        down = torch.stack([dequantized[f"{prefix}.{e}.down_proj.weight"] for e in range(arch.num_experts)])
        actual_gate_up, actual_down = loaded.layer.dequantized_weights()
        assert torch.equal(actual_gate_up, gate_up)
        assert torch.equal(actual_down, down)
    # The rest of the model came from the checkpoint as plain weights (quantization_config dropped).
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    reference = tiny_model("qwen3_moe", torch.bfloat16)
    hf = reference.float().eval()
    hf_arch = get_moe_arch_config(hf)
    with torch.no_grad():
        for layer, loaded in zip(hf_arch.layers, experts, strict=True):
            module = hf.get_submodule(layer.experts_path)
            gate_up, down = loaded.layer.dequantized_weights()
            module.gate_up_proj.copy_(gate_up)
            module.down_proj.copy_(down)
    _assert_close_logits(kt, hf, LOGITS_BOUND)


def test_int4_checkpoint_refuses_other_bases_and_group_sizes(tmp_path: Path) -> None:
    _int4_checkpoint(tmp_path, 32)
    for kt in (KTConfig(), KTConfig(weight_dtype="int8")):
        with pytest.raises(CheckpointError, match=r"ships int4 experts .*KTConfig\(weight_dtype='int4'\)"):
            load_kt_model(tmp_path, kt)
    with pytest.raises(CheckpointError, match=r"groups of 32; KTConfig.group_size=64"):
        load_kt_model(tmp_path, KTConfig(weight_dtype="int4", group_size=64))


def test_int4_checkpoint_with_an_unsupported_scheme_says_so(tmp_path: Path) -> None:
    _int4_checkpoint(tmp_path, 32)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotImplementedError, match=r"not implemented yet.*symmetric"):
        load_kt_model(tmp_path, KTConfig(weight_dtype="int4"))


def test_reference_backend_refuses_quantized_bases() -> None:
    with pytest.raises(NotImplementedError, match="not implemented yet"):
        KTExperts(num_experts=2, top_k=1, hidden_size=64, intermediate_size=32,
                  kt=KTConfig(backend="reference", weight_dtype="int8"))  # fmt: skip


def test_numpy_rule_is_not_trivial() -> None:
    # Guards the bit-exact checks above: quantization changes the weights (no self-comparison).
    w = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert not torch.equal(_numpy_quantized(w, "int8", 128), w.float())


def test_merged_export_of_an_int4_base_is_its_dequantized_weights_plus_lora(tmp_path: Path) -> None:
    """export --merge on a compressed-tensors int4 base: q * scale + ΔW, written as plain bf16 weights."""
    from kt_sft_train.adapters import export_merged_checkpoint
    from peft import LoraConfig, get_peft_model

    _int4_checkpoint(tmp_path / "base", 32)
    kt = load_kt_model(tmp_path / "base", KTConfig(weight_dtype="int4"), dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    lora = get_peft_model(kt, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in sorted(lora.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3 / param.shape[-1] ** 0.5)
    lora.save_pretrained(tmp_path / "adapter")
    expected = logits_of(lora.eval(), tokens(7))

    merged_dir = export_merged_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    # W + ΔW rounded once to bf16; the kernels ran the fp32 dequantized W with bf16 activations.
    assert relative_error(logits_of(merged, tokens(7)), expected) <= LOGITS_BOUND
    unmerged = _hf_with_experts(tmp_path / "merged", _kt_experts(kt))
    # Without the experts' ΔW the logits are far off: the expert merge mattered.
    assert relative_error(logits_of(unmerged, tokens(7)), expected) > LOGITS_BOUND


def test_memory_estimate_of_an_int4_checkpoint_uses_its_groups(tmp_path: Path) -> None:
    """kt-sft info --model: an int4 checkpoint is estimated in its own groups; bf16/int8 not loadable."""
    from kt_sft_train.memory import estimate_checkpoint, measure_experts

    _int4_checkpoint(tmp_path, 32)
    rows = {row.weight_dtype: row for row in estimate_checkpoint(tmp_path)}
    assert (rows["int4"].group_size, rows["int4"].loadable) == (32, True)
    assert not rows["bf16"].loadable and not rows["int8"].loadable
    kt = load_kt_model(tmp_path, KTConfig(weight_dtype="int4"), dtype=torch.float32)
    measured = measure_experts(kt)
    assert measured is not None and measured.base_bytes == rows["int4"].bytes
