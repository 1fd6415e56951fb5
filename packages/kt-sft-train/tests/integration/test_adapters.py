"""adapters.py: atomic saves, validated loads, merged-checkpoint and per-expert exports (DESIGN.md §4.4, §5).

Adapters are made with plain transformers + PEFT on tiny models (their format is what the KT model writes,
see test_adapter_roundtrip.py), with random nonzero LoRA factors on attention and on the experts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from factory import (
    REFERENCE,
    deepseek_v3_config,
    logits_of,
    mixtral_config,
    per_expert_state_dict,
    quantize_fp8_blocks,
    qwen3_moe_config,
    random_model,
    randomize_lora,
    relative_error,
    tokens,
    write_sharded,
)
from kt_sft_train import adapters
from kt_sft_train.adapters import (
    AdapterError,
    export_merged_checkpoint,
    export_per_expert_adapter,
    load_adapter,
    previous_copy_path,
    save_adapter,
    validate_adapter,
)
from kt_sft_train.model import load_kt_model
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, FineGrainedFP8Config

ATTENTION = ["q_proj", "v_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def lora_model(
    base: nn.Module, seed: int = 21, r: int = 4, target_modules: list[str] = ATTENTION
) -> nn.Module:
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules, target_parameters=EXPERTS)
    model = get_peft_model(base, config)
    randomize_lora(model, seed=seed)
    return model.eval()


def plain(path: Path, dtype: torch.dtype = torch.float64, **kwargs) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, experts_implementation="eager", **kwargs
    ).eval()


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bf16 Qwen3-MoE checkpoint as save_pretrained writes it (per-expert keys)."""
    path = tmp_path_factory.mktemp("qwen") / "base"
    random_model(qwen3_moe_config(), seed=20).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen_adapter(qwen_base: Path) -> Path:
    path = qwen_base.parent / "adapter"
    lora_model(plain(qwen_base)).save_pretrained(path)
    return path


# -- atomic saves ----------------------------------------------------------------------------------------


def test_save_adapter_replaces_the_previous_adapter_completely(qwen_base: Path, tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    save_adapter(lora_model(plain(qwen_base), seed=1), target)
    first = files_of(target)
    save_adapter(lora_model(plain(qwen_base), seed=2), target)
    second = files_of(target)
    assert (
        set(first) == set(second)
        and first["adapter_model.safetensors"] != second["adapter_model.safetensors"]
    )
    assert leftovers(tmp_path, "adapter") == []


def test_failed_save_leaves_the_previous_adapter_intact(qwen_base: Path, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "adapter"
    model = lora_model(plain(qwen_base), seed=1)
    save_adapter(model, target)
    before = files_of(target)
    original = type(model).save_pretrained

    def half_written(self, directory, **kwargs):  # type: ignore[no-untyped-def]
        original(self, directory, **kwargs)
        (Path(directory) / "adapter_model.safetensors").write_bytes(b"truncated")
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(lora_model(plain(qwen_base), seed=2), target)
    assert files_of(target) == before
    assert leftovers(tmp_path, "adapter") == []


CRASH_CHILD = textwrap.dedent(
    """
    import os, sys
    import peft.peft_model
    import torch
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model
    from kt_sft_train.adapters import save_adapter

    base, target = sys.argv[1:3]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, experts_implementation="eager"),
        LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
    )
    real_save_file = peft.peft_model.safe_save_file

    def crash_halfway(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        os._exit(17)  # the process dies with the new adapter half written

    peft.peft_model.safe_save_file = crash_halfway
    save_adapter(model, target)
    """
)


def test_a_crash_mid_save_leaves_the_previous_adapter_loadable(qwen_base: Path, tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    model = lora_model(plain(qwen_base), seed=3)
    save_adapter(model, target)
    before = files_of(target)
    result = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, str(qwen_base), str(target)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 17, result.stderr[-3000:]
    assert files_of(target) == before
    reloaded = load_adapter(plain(qwen_base), target)
    input_ids = tokens(5)
    assert torch.equal(logits_of(reloaded, input_ids), logits_of(model, input_ids))


def test_interrupted_non_atomic_replace_points_to_the_previous_copy(
    qwen_base: Path, tmp_path: Path, monkeypatch
) -> None:
    target = tmp_path / "adapter"
    save_adapter(lora_model(plain(qwen_base), seed=1), target)
    before = files_of(target)
    monkeypatch.setattr(adapters, "_exchange", lambda first, second: False)  # an OS without renameat2
    real_rename = os.rename

    def die_after_first_rename(source, destination):  # type: ignore[no-untyped-def]
        real_rename(source, destination)
        if Path(destination) == previous_copy_path(target):
            raise KeyboardInterrupt  # killed between the two renames

    monkeypatch.setattr(adapters.os, "rename", die_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(lora_model(plain(qwen_base), seed=2), target)
    assert files_of(previous_copy_path(target)) == before
    with pytest.raises(AdapterError, match=r"previous adapter at .*\.adapter\.previous"):
        load_adapter(plain(qwen_base), target)


# -- validated loads ---------------------------------------------------------------------------------------


def test_load_adapter_onto_a_kt_model_gives_the_saving_models_logits(
    qwen_base: Path, qwen_adapter: Path
) -> None:
    expected = PeftModel.from_pretrained(plain(qwen_base), qwen_adapter).eval()
    kt = load_adapter(load_kt_model(qwen_base, kt=REFERENCE, dtype=torch.float64), qwen_adapter).eval()
    input_ids = tokens(6)
    assert relative_error(logits_of(kt, input_ids), logits_of(expected, input_ids)) <= 1e-6


def broken_copy(source: Path, destination: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    destination.mkdir()
    config = json.loads((source / "adapter_config.json").read_text())
    tensors = load_file(source / "adapter_model.safetensors")
    edit(config, tensors)
    (destination / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, destination / "adapter_model.safetensors")
    return destination


def _rank_8(config: dict, tensors: dict) -> None:
    config["r"] = 8


def _drop_one(config: dict, tensors: dict) -> None:
    del tensors[sorted(k for k in tensors if ".experts." in k)[0]]


def _extra(config: dict, tensors: dict) -> None:
    tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"] = torch.randn(4, 32)


def _integer(config: dict, tensors: dict) -> None:
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].to(torch.int32)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_rank_8, r"experts\.base_layer\.lora_A\.weight has shape \[24, 32\], the model needs \[48, 32\]"),
        (_drop_one, r"1 missing tensors, e\.g\. \['base_model\.model\.model\.layers\.0\.mlp\.experts"),
        (_extra, r"1 tensors the model has no place for, e\.g\. \[.*o_proj\.lora_A"),
        (_integer, r"dtype I32; LoRA factors must be floating point"),
    ],
)
def test_a_bad_adapter_is_refused_before_the_model_is_touched(
    qwen_base: Path, qwen_adapter: Path, tmp_path: Path, edit, message: str
) -> None:
    bad = broken_copy(qwen_adapter, tmp_path / "bad", edit)
    model = load_kt_model(qwen_base, kt=REFERENCE, dtype=torch.float64)
    before = {
        name: (type(module), len(list(module.parameters(recurse=False))))
        for name, module in model.named_modules()
    }
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, bad)
    after = {
        name: (type(module), len(list(module.parameters(recurse=False))))
        for name, module in model.named_modules()
    }
    assert after == before
    assert not any("lora_" in name for name in model.state_dict())


def test_missing_and_pickled_adapters(qwen_base: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="does not exist"):
        validate_adapter(plain(qwen_base), tmp_path / "absent")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text("{}")
    (legacy / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(NotImplementedError, match="not implemented yet: pickled adapters"):
        validate_adapter(plain(qwen_base), legacy)


# -- merged checkpoint export --------------------------------------------------------------------------------


def fused_checkpoint(directory: Path) -> Path:
    config = qwen3_moe_config()
    write_sharded(directory, config, dict(random_model(config, seed=22).to(torch.bfloat16).state_dict()), 2)
    return directory


def mixtral_w_keys_checkpoint(directory: Path) -> Path:
    config = mixtral_config()
    tensors = per_expert_state_dict(
        random_model(config, seed=23).to(torch.bfloat16), names=("w1", "w3", "w2")
    )
    tensors = {k.replace(".mlp.experts.", ".block_sparse_moe.experts."): v for k, v in tensors.items()}
    write_sharded(directory, config, tensors, 2)
    return directory


def fp8_checkpoint(directory: Path) -> Path:
    config = deepseek_v3_config(hidden=256, moe_intermediate=128, q_lora_rank=128)
    tensors = {}
    for key, value in per_expert_state_dict(random_model(config, seed=24).to(torch.bfloat16)).items():
        if (
            key.endswith("proj.weight")
            and value.dim() == 2
            and value.shape[0] % 128 == value.shape[1] % 128 == 0
        ):
            tensors[key], tensors[key + "_scale_inv"] = quantize_fp8_blocks(value)
        else:
            tensors[key] = value
    assert "model.layers.1.self_attn.q_a_proj.weight_scale_inv" in tensors  # a float8 LoRA target
    config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    write_sharded(directory, config, tensors, 2)
    return directory


LAYOUTS = {"fused": fused_checkpoint, "mixtral_w1_w3_w2": mixtral_w_keys_checkpoint, "fp8": fp8_checkpoint}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_merged_export_equals_peft_merge(tmp_path: Path, layout: str) -> None:
    base = LAYOUTS[layout](tmp_path / "base")
    hf_kwargs = {"quantization_config": FineGrainedFP8Config(dequantize=True)} if layout == "fp8" else {}
    # DeepSeek-V3 has MLA attention; q_a_proj [128, 256] is one of its float8 weights.
    targets = ["q_a_proj", "o_proj"] if layout == "fp8" else ATTENTION
    lora = lora_model(plain(base, **hf_kwargs), seed=25, target_modules=targets)
    lora.save_pretrained(tmp_path / "adapter")
    input_ids = tokens(7)
    expected = logits_of(lora, input_ids)

    merged_dir = export_merged_checkpoint(
        base, tmp_path / "adapter", tmp_path / "merged", dtype=torch.float64
    )
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    merged = plain(merged_dir)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert relative_error(logits_of(merged, input_ids), expected) <= 1e-6
    # The merge really changed the base: without it the logits are far off.
    assert relative_error(logits_of(plain(base, **hf_kwargs), input_ids), expected) > 1e-2


def test_merged_export_in_the_base_dtype(qwen_base: Path, qwen_adapter: Path, tmp_path: Path) -> None:
    merged_dir = export_merged_checkpoint(qwen_base, qwen_adapter, tmp_path / "merged")
    with safe_open(merged_dir / "model.safetensors", "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}  # noqa: SIM118
    expected = PeftModel.from_pretrained(plain(qwen_base), qwen_adapter).eval()
    input_ids = tokens(8)
    # W + ΔW rounded once to bf16 (the base dtype).
    assert relative_error(logits_of(plain(merged_dir), input_ids), logits_of(expected, input_ids)) <= 1e-2


# -- per-expert adapter export ----------------------------------------------------------------------------


def module_tree(shapes: dict[str, tuple[int, int]]) -> nn.Module:
    """A bare module tree with an nn.Linear [out, in] at each dotted path (a per-expert, 4.x-style model)."""
    root = nn.Module()
    for path, (out_features, in_features) in shapes.items():
        parent = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(in_features, out_features, bias=False))
    return root


@pytest.mark.parametrize("layout", ["save_pretrained", "fused", "mixtral_w1_w3_w2"])
def test_per_expert_export_loads_in_vanilla_peft_with_the_same_deltas(
    qwen_base: Path, qwen_adapter: Path, tmp_path: Path, layout: str
) -> None:
    if layout == "save_pretrained":
        base, adapter = qwen_base, qwen_adapter
    else:
        base = LAYOUTS[layout](tmp_path / "base")
        adapter = tmp_path / "adapter"
        lora_model(plain(base), seed=26).save_pretrained(adapter)
    out = export_per_expert_adapter(adapter, tmp_path / "per_expert", base_dir=base)

    # Fused deltas, as vanilla PEFT computes them on the transformers 5 model.
    fused = PeftModel.from_pretrained(plain(base), adapter)
    expected: dict[str, torch.Tensor] = {}
    for name, module in fused.named_modules():
        if type(module).__name__ == "ParamWrapper":
            owner = name.removeprefix("base_model.model.").split(".base_layer")[0]
            expected[f"{owner}.{module.parameter_name}"] = module.get_delta_weight("default")
        elif type(module).__name__ == "Linear" and hasattr(module, "lora_A"):
            expected[name.removeprefix("base_model.model.")] = module.get_delta_weight("default")

    # The per-expert adapter, injected by vanilla PEFT into a per-expert module tree named as the checkpoint.
    tensors = load_file(out / "adapter_model.safetensors")
    shapes = {}  # module -> (out, in) from B [out, r] and A [r, in]
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b_key = key.replace(".lora_A.", ".lora_B.")
            shapes[module] = (tensors[b_key].shape[0], tensors[key].shape[1])
    tree = module_tree(shapes)
    config = LoraConfig.from_pretrained(str(out))
    assert config.target_parameters is None
    inject_adapter_in_model(config, tree)
    result = set_peft_model_state_dict(
        tree, {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    )
    assert not result.unexpected_keys
    injected = {name for name, m in tree.named_modules() if hasattr(m, "lora_A")}
    assert injected == set(shapes)

    experts_of = {  # checkpoint names of expert e's projections, per fused parameter
        "fused": lambda layer, e: (
            f"model.layers.{layer}.mlp.experts.{e}",
            "gate_proj",
            "up_proj",
            "down_proj",
        ),
        "save_pretrained": lambda layer, e: (
            f"model.layers.{layer}.mlp.experts.{e}",
            "gate_proj",
            "up_proj",
            "down_proj",
        ),
        "mixtral_w1_w3_w2": lambda layer, e: (
            f"model.layers.{layer}.block_sparse_moe.experts.{e}",
            "w1",
            "w3",
            "w2",
        ),
    }[layout]
    checked = 0
    for parameter, delta in expected.items():
        if parameter.endswith(("gate_up_proj", "down_proj")):
            layer = int(parameter.split(".")[2])
            half = delta.shape[1] // 2
            for e in range(delta.shape[0]):
                prefix, gate, up, down = experts_of(layer, e)
                parts = (
                    {gate: delta[e, :half], up: delta[e, half:]}
                    if parameter.endswith("gate_up_proj")
                    else {down: delta[e]}
                )
                for projection, want in parts.items():
                    got = tree.get_submodule(f"{prefix}.{projection}").get_delta_weight("default")
                    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-7)
                    checked += 1
        else:
            got = tree.get_submodule(parameter).get_delta_weight("default")
            torch.testing.assert_close(got, delta.to(got.dtype), rtol=1e-5, atol=1e-7)
            checked += 1
    assert checked > 0
