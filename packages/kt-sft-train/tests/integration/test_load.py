"""load_kt_model: routed experts streamed from safetensors into KTExperts, checked against plain HF loads.

Checkpoints are tiny random-init models written here (save_pretrained, hand-written per-expert and fused
keys, sharded with an index, float8 block-scaled). Logits of the KT model (reference backend, float64)
must equal the plain `from_pretrained` model's (DESIGN.md §7: float64 ≤ 1e-6). The streaming test loads
8 layers × ~75 MB of experts in a subprocess and bounds the rise of its peak RSS.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from factory import (
    REFERENCE,
    VOCAB,
    assert_same_logits,
    deepseek_v3_config,
    expert_modules,
    kernels_or_skip,
    kt_model,
    logits_of,
    mixtral_config,
    moe_config,
    per_expert_state_dict,
    plain_hf,
    quantize_fp8_blocks,
    qwen3_moe_config,
    random_model,
    relative_error,
    tokens,
    write_sharded,
)
from kt_sft_train.model import build_kt_device_map, load_kt_model
from kt_sft_train.weights import CheckpointError, MissingShardError, dequantize_fp8_blocks
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    FineGrainedFP8Config,
)

# -- equivalence with plain from_pretrained ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_save_pretrained_checkpoint_gives_plain_hf_logits(tmp_path: Path, family: str) -> None:
    config = {"qwen3_moe": qwen3_moe_config, "mixtral": mixtral_config, "deepseek_v3": deepseek_v3_config}[
        family
    ]()
    random_model(config).to(torch.bfloat16).save_pretrained(tmp_path)
    kt = kt_model(tmp_path)
    assert expert_modules(kt), "no routed experts were replaced"
    assert not any(p.is_meta for p in kt.parameters())
    assert_same_logits(kt, plain_hf(tmp_path))


def test_default_kernel_backend_loads_the_same_model(tmp_path: Path) -> None:
    kernels_or_skip()
    config = qwen3_moe_config()
    config.moe_intermediate_size = 32  # the kernels need multiples of 32
    random_model(config, seed=2).to(torch.bfloat16).save_pretrained(tmp_path)
    kt = load_kt_model(tmp_path, dtype=torch.float32).eval()
    assert {module.backend for module in kt.modules() if type(module).__name__ == "KTExperts"} == {"kernels"}
    expected = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    input_ids = tokens()
    # bf16 kernel arithmetic: DESIGN.md §7's whole-model bound.
    assert relative_error(logits_of(kt, input_ids), logits_of(expected, input_ids)) <= 1e-2


def test_hand_written_per_expert_sharded_checkpoint(tmp_path: Path) -> None:
    config = deepseek_v3_config()
    model = random_model(config, seed=3)
    write_sharded(tmp_path, config, per_expert_state_dict(model.to(torch.bfloat16)), num_shards=3)
    assert_same_logits(kt_model(tmp_path), plain_hf(tmp_path))


def test_hand_written_mixtral_w1_w3_w2_keys(tmp_path: Path) -> None:
    config = mixtral_config()
    model = random_model(config, seed=4).to(torch.bfloat16)
    tensors = {
        key.replace(".mlp.experts.", ".block_sparse_moe.experts.").replace(
            ".mlp.gate.", ".block_sparse_moe.gate."
        ): v
        for key, v in per_expert_state_dict(model, names=("w1", "w3", "w2")).items()
    }
    assert any(".block_sparse_moe.experts.3.w3.weight" in key for key in tensors)
    write_sharded(tmp_path, config, tensors, num_shards=2)
    assert_same_logits(kt_model(tmp_path), plain_hf(tmp_path))


def test_hand_written_fused_keys(tmp_path: Path) -> None:
    config = qwen3_moe_config()
    model = random_model(config, seed=5).to(torch.bfloat16)
    tensors = model.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in tensors
    write_sharded(tmp_path, config, dict(tensors), num_shards=1)
    assert_same_logits(kt_model(tmp_path), plain_hf(tmp_path))


def test_fp8_block_scaled_checkpoint_matches_dequantized_hf_load(tmp_path: Path) -> None:
    config = deepseek_v3_config(hidden=256, moe_intermediate=128)
    model = random_model(config, seed=6).to(torch.bfloat16)
    tensors = {}
    for key, value in per_expert_state_dict(model).items():
        if (
            key.endswith("proj.weight")
            and value.dim() == 2
            and value.shape[0] % 128 == value.shape[1] % 128 == 0
        ):
            tensors[key], tensors[key + "_scale_inv"] = quantize_fp8_blocks(value)
        else:
            tensors[key] = value
    assert sum(key.endswith("experts.3.up_proj.weight_scale_inv") for key in tensors) == 2
    config.quantization_config = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    write_sharded(tmp_path, config, tensors, num_shards=2)

    reference = plain_hf(tmp_path, quantization_config=FineGrainedFP8Config(dequantize=True))
    # transformers dequantizes into the model dtype (float64 here); the kernels see the bf16 rounding of
    # the same fp32 product, which is what the reference must use (DESIGN.md §7).
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if ".experts." in name:
                param.copy_(param.bfloat16())
    kt = kt_model(tmp_path)
    assert_same_logits(kt, reference)


def test_dequantize_fp8_blocks_matches_float64_loop() -> None:
    torch.manual_seed(7)
    rows, cols, block = 300, 200, (128, 64)  # partial last blocks in both directions
    weight = (torch.randn(rows, cols) * 40).to(torch.float8_e4m3fn)
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    scale_inv = torch.rand(grid) * 1e-3 + 1e-4
    expected = torch.empty(rows, cols, dtype=torch.float64)
    w64, s64 = weight.double(), scale_inv.double()
    for i in range(grid[0]):
        for j in range(grid[1]):
            rs, cs = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            expected[rs, cs] = w64[rs, cs] * s64[i, j]
    actual = dequantize_fp8_blocks(weight, scale_inv, block)
    assert actual.dtype == torch.bfloat16 and actual.shape == (rows, cols)
    # One bf16 rounding of the exact product (fp32 multiply first): within half a bf16 ulp, 2^-9 relative.
    assert ((actual.double() - expected).abs() <= expected.abs() * 2.0**-8).all()
    with pytest.raises(CheckpointError, match=r"expected \[3, 4\]"):
        dequantize_fp8_blocks(weight, scale_inv[:, :3], block)


# -- a second load, leftovers, device map ----------------------------------------------------------------


def test_second_load_in_the_same_process_leaves_nothing_behind(tmp_path: Path) -> None:
    config = qwen3_moe_config()
    random_model(config, seed=8).to(torch.bfloat16).save_pretrained(tmp_path)
    first = kt_model(tmp_path)
    second = kt_model(tmp_path)
    input_ids = tokens(2)
    assert torch.equal(logits_of(first, input_ids), logits_of(second, input_ids))
    # No registration hook or patched class attribute survives a load.
    plain = AutoModelForCausalLM.from_config(config)
    assert type(plain.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    assert "_keys_to_ignore_on_load_unexpected" not in type(plain).__dict__


def test_build_kt_device_map_puts_only_routed_experts_on_cpu() -> None:
    config = deepseek_v3_config()
    device_map = build_kt_device_map(config, REFERENCE, device="cuda:1")
    assert device_map == {
        "": "cuda:1",
        "model.layers.1.mlp.experts": "cpu",
        "model.layers.2.mlp.experts": "cpu",
    }


# -- errors ------------------------------------------------------------------------------------------------


def test_missing_shard_is_named(tmp_path: Path) -> None:
    config = qwen3_moe_config()
    write_sharded(
        tmp_path, config, per_expert_state_dict(random_model(config).to(torch.bfloat16)), num_shards=3
    )
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(MissingShardError, match=r"model-00002-of-00003\.safetensors"):
        kt_model(tmp_path)


def test_shape_mismatch_names_layer_and_file(tmp_path: Path) -> None:
    config = qwen3_moe_config()
    random_model(config).to(torch.bfloat16).save_pretrained(tmp_path)
    edited = json.loads((tmp_path / "config.json").read_text())
    edited["moe_intermediate_size"] = 24
    (tmp_path / "config.json").write_text(json.dumps(edited))
    expected = r"shape mismatch for model\.layers\.0\.mlp\.experts\.gate_up_proj: model\.safetensors:"
    with pytest.raises(CheckpointError, match=expected):
        kt_model(tmp_path)


def test_missing_expert_is_named(tmp_path: Path) -> None:
    config = qwen3_moe_config()
    tensors = per_expert_state_dict(random_model(config).to(torch.bfloat16))
    del tensors["model.layers.1.mlp.experts.4.up_proj.weight"]
    write_sharded(tmp_path, config, tensors, num_shards=1)
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj.*part 1 of experts \[4\]"
    ):
        kt_model(tmp_path)


def test_unsupported_family_fails_before_reading_weights(tmp_path: Path) -> None:
    from kt_sft_train.arch import UnsupportedModelError

    # No weights at all: the family check must come first.
    moe_config(
        "gpt_oss", vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_attention_heads=2,
        num_key_value_heads=1,
    ).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(UnsupportedModelError, match=r"gpt_oss.*(bias|transposed)"):
        kt_model(tmp_path)


def test_not_a_local_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a local checkpoint directory"):
        load_kt_model(tmp_path / "absent", kt=REFERENCE)
    with pytest.raises(TypeError, match="KTConfig"):
        load_kt_model(tmp_path, kt={"backend": "reference"})


# -- streaming: peak host memory ---------------------------------------------------------------------------

STREAM_LAYERS, STREAM_EXPERTS, STREAM_HIDDEN, STREAM_INTERMEDIATE = 8, 128, 256, 384
STREAM_LAYER_BYTES = STREAM_EXPERTS * 3 * STREAM_HIDDEN * STREAM_INTERMEDIATE * 2  # bf16


def write_streaming_checkpoint(directory: Path) -> None:
    """8 MoE layers of ~75 MB of bf16 experts, one shard per layer; everything else is tiny."""
    config = moe_config(
        "qwen3_moe",
        replace=True,
        vocab_size=VOCAB,
        hidden_size=STREAM_HIDDEN,
        intermediate_size=64,
        moe_intermediate_size=STREAM_INTERMEDIATE,
        num_hidden_layers=STREAM_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_experts=STREAM_EXPERTS,
        num_experts_per_tok=2,
    )
    directory.mkdir()
    config.save_pretrained(directory)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(9)
    weight_map: dict[str, str] = {}

    def save_shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    others = {
        name: torch.randn(tuple(p.shape), generator=generator).mul_(0.05).bfloat16()
        for name, p in skeleton.named_parameters()
        if ".experts." not in name
    }
    save_shard("rest.safetensors", others)
    shapes = {
        "gate_proj": (STREAM_INTERMEDIATE, STREAM_HIDDEN),
        "up_proj": (STREAM_INTERMEDIATE, STREAM_HIDDEN),
        "down_proj": (STREAM_HIDDEN, STREAM_INTERMEDIATE),
    }
    for layer in range(STREAM_LAYERS):
        layer_tensors = {
            f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight": torch.empty(
                shape, dtype=torch.bfloat16
            ).normal_(generator=generator)
            for e in range(STREAM_EXPERTS)
            for proj, shape in shapes.items()
        }
        save_shard(f"experts-{layer}.safetensors", layer_tensors)
        del layer_tensors
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


STREAM_CHILD = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    from kt_sft_train.config import KTConfig
    from kt_sft_train.model import load_kt_model

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    import transformers  # imported before the baseline: its import is not part of the load
    gc.collect()
    baseline = status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    kt = KTConfig(backend=sys.argv[2], weight_dtype=sys.argv[3])
    model = load_kt_model(sys.argv[1], kt=kt, dtype=torch.bfloat16)
    gc.collect()
    experts = sum(type(m).__name__ == "KTExperts" for m in model.modules())
    print(json.dumps({"baseline": baseline, "final": status("VmRSS"), "peak": status("VmHWM"),
                      "hwm_reset": hwm_reset, "experts": experts}))
    """
)


@pytest.fixture(scope="module")
def streaming_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    checkpoint = tmp_path_factory.mktemp("stream") / "ckpt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: worker threads only add contention on a shared CI machine
    try:
        write_streaming_checkpoint(checkpoint)
    finally:
        torch.set_num_threads(threads)
    return checkpoint


# Bytes of a loaded base per bf16 byte of the checkpoint (int8: 1 of 2 bytes, int4: 0.5 of 2, scales aside).
BASE_FRACTION = {"bf16": 1.0, "int8": 0.5, "int4": 0.25}


@pytest.mark.parametrize(
    ("backend", "weight_dtype"),
    [("reference", "bf16"), ("kernels", "bf16"), ("kernels", "int8"), ("kernels", "int4")],
)
def test_streaming_load_peak_rss_is_final_footprint_plus_one_layer(
    streaming_checkpoint: Path, backend: str, weight_dtype: str
) -> None:
    """Quantized bases too: each bf16 layer is quantized by the kernels as it streams in."""
    if backend == "kernels":
        kernels_or_skip()
    result = subprocess.run(
        [sys.executable, "-c", STREAM_CHILD, str(streaming_checkpoint), backend, weight_dtype],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["experts"] == STREAM_LAYERS
    final_rise = numbers["final"] - numbers["baseline"]
    peak_rise = numbers["peak"] - numbers["baseline"]
    # The experts really are resident (bf16: both backends keep a copy of every layer; int8/int4 their
    # quantized copy).
    assert final_rise >= 0.9 * BASE_FRACTION[weight_dtype] * STREAM_LAYERS * STREAM_LAYER_BYTES, numbers
    if weight_dtype != "bf16":
        # No bf16 copy of the experts stays behind (it would add 1.0 x all layers). The slack of 0.5 x all
        # layers covers what the process keeps besides the base (allocator caches, runtime; ~0.3 here).
        limit = (BASE_FRACTION[weight_dtype] + 0.5) * STREAM_LAYERS * STREAM_LAYER_BYTES
        assert final_rise <= limit, numbers
    assert peak_rise <= final_rise + 1.5 * STREAM_LAYER_BYTES, numbers
