"""KTConfig.quantized_cache (ADR 0604): the int8 / int4 experts quantized from a bf16 or fp8 checkpoint
are written once and read back bit-exactly by later loads; stale, damaged and unwritable files cost a
quantization, never the run or a wrong weight."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from factory import (
    deepseek_v3_config,
    kernels_or_skip,
    per_expert_state_dict,
    quantize_fp8_blocks,
    random_model,
    tiny_model,
    write_sharded,
)
from kt_sft_train import KTConfig, KTConfigError, KTExperts
from kt_sft_train.model import load_kt_model
from kt_sft_train.quantized_cache import QuantizedCacheError, quantized_cache_report
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.usefixtures("_kernels")


@pytest.fixture
def _kernels() -> None:
    kernels_or_skip()


def _storage(model: torch.nn.Module) -> list[tuple[torch.Tensor, ...]]:
    return [m.layer.quantized_storage() for m in model.modules() if isinstance(m, KTExperts)]


def _assert_same_storage(
    actual: list[tuple[torch.Tensor, ...]], expected: list[tuple[torch.Tensor, ...]]
) -> None:
    assert len(actual) == len(expected) == 2
    for got, want in zip(actual, expected, strict=True):
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


def _files(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.safetensors"))


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    tiny_model("qwen3_moe", torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize(("weight_dtype", "group_size"), [("int8", None), ("int4", 32)])
def test_a_second_load_reads_the_cache_bit_exactly(
    tmp_path: Path, checkpoint: Path, weight_dtype: str, group_size
) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cache"
    plain = _storage(load_kt_model(checkpoint, KTConfig(weight_dtype=weight_dtype, group_size=group_size)))
    kt = KTConfig(weight_dtype=weight_dtype, group_size=group_size, quantized_cache=str(cache))

    first = load_kt_model(checkpoint, kt)
    report = quantized_cache_report(first)
    assert report is not None and (report.read, report.written) == (0, 2)
    files = _files(cache)
    base = "int8" if weight_dtype == "int8" else "int4-g32"
    assert [f.name.split(".")[-2] for f in files] == [base] * 2
    assert not list(cache.rglob("*.tmp"))
    _assert_same_storage(_storage(first), plain)

    second = load_kt_model(checkpoint, kt)
    report = quantized_cache_report(second)
    assert report is not None and (report.read, report.written, report.replaced) == (2, 0, [])
    _assert_same_storage(_storage(second), plain)

    # The values come from the file: change one in the cache (keeping its key) and the next load has it.
    with safe_open(files[0], framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(files[0])
    tensors["down_scale"] = tensors["down_scale"] * 2
    save_file(tensors, files[0], metadata=metadata)
    third = _storage(load_kt_model(checkpoint, kt))
    layer = int(files[0].name.split(".")[2])  # model.layers.<i>.mlp.experts.<base>.safetensors
    assert torch.equal(third[layer][3], plain[layer][3] * 2)


def test_a_changed_checkpoint_or_setting_is_quantized_again(tmp_path: Path, checkpoint: Path) -> None:
    cache = tmp_path / "cache"
    kt = KTConfig(weight_dtype="int8", quantized_cache=str(cache))
    plain = _storage(load_kt_model(checkpoint, kt))

    weights = checkpoint / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten in place
    again = load_kt_model(checkpoint, kt)
    report = quantized_cache_report(again)
    assert report is not None and report.read == 0 and report.written == 2 and len(report.replaced) == 2
    _assert_same_storage(_storage(again), plain)

    # Another base of the same checkpoint gets files of its own; the int8 ones stay valid.
    load_kt_model(checkpoint, kt.replace(weight_dtype="int4", group_size=32))
    assert len(_files(cache)) == 4
    report = quantized_cache_report(load_kt_model(checkpoint, kt))
    assert report is not None and report.read == 2


def _truncate(path: Path) -> str:
    path.write_bytes(path.read_bytes()[:100])  # a truncated copy, say
    return f"cannot read {path}"


def _nan_scale(path: Path) -> str:
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    tensors["gate_up_scale"][0, 0] = float("nan")  # the key still matches: only the check can tell
    save_file(tensors, path, metadata=metadata)
    return "gate_up_scale holds a non-finite scale"


@pytest.mark.parametrize("damage", [_truncate, _nan_scale], ids=["truncated", "nan-scale"])
def test_a_damaged_file_warns_and_is_replaced(
    tmp_path: Path, checkpoint: Path, caplog: pytest.LogCaptureFixture, damage
) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cache"
    kt = KTConfig(weight_dtype="int4", group_size=32, quantized_cache=str(cache))
    plain = _storage(load_kt_model(checkpoint, kt))
    damaged = _files(cache)[1]
    message = damage(damaged)

    with caplog.at_level(logging.WARNING, logger="kt_sft_train.quantized_cache"):
        model = load_kt_model(checkpoint, kt)
    assert message in caplog.text
    report = quantized_cache_report(model)
    assert report is not None and (report.read, report.written, report.replaced) == (1, 1, [damaged.name])
    _assert_same_storage(_storage(model), plain)
    report = quantized_cache_report(load_kt_model(checkpoint, kt))
    assert report is not None and report.read == 2


def test_a_file_that_cannot_be_written_only_warns(
    tmp_path: Path, checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    kt = KTConfig(weight_dtype="int8", quantized_cache=str(cache))
    plain = _storage(load_kt_model(checkpoint, kt))
    target = _files(cache)[0]
    target.unlink()
    (target / "in-the-way").mkdir(parents=True)  # the rename onto this name fails (root ignores permissions)

    with caplog.at_level(logging.WARNING, logger="kt_sft_train.quantized_cache"):
        model = load_kt_model(checkpoint, kt)
    assert f"cannot write {target}" in caplog.text and "training goes on" in caplog.text
    report = quantized_cache_report(model)
    assert report is not None and (report.read, report.written, report.not_written) == (1, 0, [target.name])
    assert not list(cache.rglob("*.tmp"))
    _assert_same_storage(_storage(model), plain)


def test_a_cache_path_that_is_not_a_directory_is_a_clear_error(tmp_path: Path, checkpoint: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    expected = r"^KTConfig.quantized_cache: cannot create '.*a-file/model-[0-9a-f]{16}'"
    with pytest.raises(QuantizedCacheError, match=expected):
        load_kt_model(checkpoint, KTConfig(weight_dtype="int8", quantized_cache=str(blocker)))


def test_fp8_checkpoint_cache_round_trip(tmp_path: Path) -> None:
    config = deepseek_v3_config(hidden=256, moe_intermediate=128)
    model = random_model(config, seed=7).to(torch.bfloat16)
    tensors = {}
    for key, value in per_expert_state_dict(model).items():
        if ".experts." in key and key.endswith("proj.weight"):
            tensors[key], tensors[key + "_scale_inv"] = quantize_fp8_blocks(value)
        else:
            tensors[key] = value
    config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    path = tmp_path / "model"
    write_sharded(path, config, tensors, num_shards=2)
    kt = KTConfig(weight_dtype="int8", quantized_cache=str(tmp_path / "cache"))
    plain = _storage(load_kt_model(path, kt.replace(quantized_cache=None), dtype=torch.float32))
    first = load_kt_model(path, kt, dtype=torch.float32)
    second = load_kt_model(path, kt, dtype=torch.float32)
    reports = [quantized_cache_report(first), quantized_cache_report(second)]
    assert [(r.read, r.written) for r in reports if r is not None] == [(0, 2), (2, 0)]
    _assert_same_storage(_storage(second), plain)


def test_bf16_bases_use_no_cache(tmp_path: Path, checkpoint: Path) -> None:
    model = load_kt_model(checkpoint, KTConfig(quantized_cache=str(tmp_path / "cache")))
    assert quantized_cache_report(model) is None
    assert not (tmp_path / "cache").exists()


def test_config_spellings() -> None:
    assert KTConfig(quantized_cache=Path("/x/y")).quantized_cache == "/x/y"
    assert KTConfig.from_env({"KT_SFT_QUANTIZED_CACHE": "/c"}).quantized_cache == "/c"
    assert KTConfig.from_env({"KT_SFT_QUANTIZED_CACHE": ""}).quantized_cache is None
    for bad in ("", 3):
        with pytest.raises(KTConfigError, match="quantized_cache must be a directory path or None"):
            KTConfig(quantized_cache=bad)  # type: ignore[arg-type]
