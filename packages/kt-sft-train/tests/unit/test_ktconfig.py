"""KTConfig: construction paths, validation, upstream aliases, not-yet-built features, no side effects."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from kt_sft_train import KTConfig, KTConfigError


def test_defaults_and_kwargs() -> None:
    config = KTConfig()
    assert (config.backend, config.threads, config.numa_shards, config.weight_dtype) == (
        "kernels",
        None,
        1,
        "bf16",
    )
    assert config.activation_policy == "retain" and config.max_isa is None
    custom = KTConfig(backend="reference", threads=3, activation_policy="recompute", max_isa="avx2")
    assert (custom.backend, custom.threads, custom.activation_policy, custom.max_isa) == (
        "reference",
        3,
        "recompute",
        "avx2",
    )
    assert custom.replace(threads=5).threads == 5 and custom.threads == 3


def test_mapping_yaml_and_env_agree(tmp_path) -> None:  # type: ignore[no-untyped-def]
    expected = KTConfig(backend="reference", threads=4, activation_policy="recompute", max_isa="avx512")
    mapping = {"backend": "reference", "threads": 4, "activation_policy": "recompute", "max_isa": "avx512"}
    assert KTConfig.from_mapping(mapping) == expected
    path = tmp_path / "kt.yaml"
    path.write_text(
        "kt_config:\n  backend: reference\n  threads: 4\n  activation_policy: recompute\n  max_isa: avx512\n"
    )
    assert KTConfig.from_yaml(path) == expected
    env = {
        "KT_SFT_BACKEND": "reference",
        "KT_SFT_NUM_THREADS": "4",  # one variable for the thread count, read by both wheels
        "KT_SFT_ACTIVATION_POLICY": "recompute",
        "KT_SFT_MAX_ISA": "avx512",
        "KT_SFT_PROFILE": "/tmp/trace.json",  # the kernel wheel's variable: not ours, not an error
        "PATH": "/usr/bin",
    }
    assert KTConfig.from_env(env) == expected
    assert KTConfig.from_env({}) == KTConfig()
    assert KTConfig.from_env({"KT_SFT_NUM_THREADS": "0"}).threads is None  # 0: the kernel default
    with pytest.raises(KTConfigError, match=r"KT_SFT_THREADS is no longer read.*KT_SFT_NUM_THREADS"):
        KTConfig.from_env({"KT_SFT_THREADS": "4"})


def test_upstream_aliases() -> None:
    config = KTConfig.from_mapping(
        {
            "kt_backend": "AMXBF16",
            "kt_num_threads": 8,
            "kt_cpu_activation": "recompute",
            "kt_tp_enabled": False,
        }
    )
    assert (config.weight_dtype, config.threads, config.activation_policy) == ("bf16", 8, "recompute")
    assert KTConfig.from_mapping({"kt_backend": "reference"}).backend == "reference"


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"thread": 4}, r"unknown KTConfig key 'thread' \(did you mean 'threads'\?\)"),
        ({"activation_polcy": "retain"}, r"did you mean 'activation_policy'"),
        ({"kt_num_thread": 4}, r"did you mean 'kt_num_threads'"),
        ({"backend": "kernal"}, r"did you mean 'kernels'"),
        ({"activation_policy": "keep"}, r"activation_policy='keep' is not one of"),
        ({"threads": 0}, r"threads must be a positive integer"),
        ({"threads": True}, r"threads must be a positive integer"),
        ({"max_isa": "avx9000"}, r"max_isa='avx9000'"),
        ({"kt_max_cache_depth": 2}, r"kt_max_cache_depth.*not used by kt-sft"),
        ({"kt_lora_rank": 8}, r"peft.LoraConfig"),
        ({"kt_weight_path": "/converted"}, r"kt_weight_path.*not used by kt-sft.*quantized_cache"),
        ({"quantized_cache": ""}, r"quantized_cache must be a directory path or None"),
        ({"threads": 2, "kt_num_threads": 3}, r"given twice"),
    ],
)
def test_bad_configuration_fails_with_one_clear_message(mapping: dict, message: str) -> None:
    with pytest.raises(KTConfigError, match=message):
        KTConfig.from_mapping(mapping)


def test_bad_environment_names_the_variable() -> None:
    with pytest.raises(KTConfigError, match=r"KT_SFT_THREAD .*did you mean 'KT_SFT_NUM_THREADS'"):
        KTConfig.from_env({"KT_SFT_THREAD": "4"})
    with pytest.raises(KTConfigError, match=r"KT_SFT_NUM_THREADS='many' is not an integer"):
        KTConfig.from_env({"KT_SFT_NUM_THREADS": "many"})
    with pytest.raises(KTConfigError, match=r"environment"):
        KTConfig.from_env({"KT_SFT_BACKEND": "gpu"})


@pytest.mark.parametrize(
    ("mapping", "weight_dtype", "group_size"),
    [
        ({"kt_backend": "AMXINT8"}, "int8", None),
        ({"kt_method": "AMXINT4", "kt_group_size": 64}, "int4", 64),
        ({"kt_weight_dtype": "amxint4"}, "int4", None),
        ({"kt_weight_dtype": "RAWINT4"}, "int4", None),
        ({"kt_weight_dtype": "int8"}, "int8", None),
        ({"weight_dtype": "int4", "group_size": 32}, "int4", 32),
    ],
)
def test_quantized_bases_and_their_upstream_names(
    mapping: dict, weight_dtype: str, group_size: int | None
) -> None:
    config = KTConfig.from_mapping(mapping)
    assert (config.weight_dtype, config.group_size) == (weight_dtype, group_size)


def test_quantized_base_settings_are_checked() -> None:
    with pytest.raises(KTConfigError, match=r"group_size=48 is not one of \[32, 64, 128\]"):
        KTConfig(weight_dtype="int4", group_size=48)
    with pytest.raises(KTConfigError, match=r"weight_dtype='int3' is not one of"):
        KTConfig.from_mapping({"kt_weight_dtype": "int3"})
    assert KTConfig.from_env({"KT_SFT_WEIGHT_DTYPE": "int8", "KT_SFT_GROUP_SIZE": "64"}).group_size == 64
    with pytest.raises(KTConfigError, match=r"KT_SFT_GROUP_SIZE='big' is not an integer"):
        KTConfig.from_env({"KT_SFT_GROUP_SIZE": "big"})


def test_yaml_that_is_not_a_mapping(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "kt.yaml"
    path.write_text("- threads\n")
    with pytest.raises(KTConfigError, match="expected a YAML mapping"):
        KTConfig.from_yaml(path)


def test_construction_has_no_side_effects() -> None:
    # A fresh interpreter: building configs (max_isa included) neither imports the kernels nor
    # changes os.environ.
    code = textwrap.dedent(
        """
        import os, sys
        before = dict(os.environ)
        from kt_sft_train import KTConfig
        KTConfig(max_isa="avx2", threads=2)
        KTConfig.from_env({"KT_SFT_MAX_ISA": "portable"})
        assert "kt_sft_kernels" not in sys.modules, "KTConfig imported the kernels"
        assert dict(os.environ) == before
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_numa_shards_counts_auto_and_upstream_names() -> None:
    assert KTConfig(numa_shards=3).numa_shards == 3
    assert KTConfig(numa_shards="auto").numa_shards == "auto"
    assert KTConfig.from_mapping({"kt_tp_enabled": True}).numa_shards == "auto"
    assert KTConfig.from_mapping({"kt_tp_enabled": True, "kt_threadpool_count": 2}).numa_shards == 2
    assert KTConfig.from_mapping({"kt_threadpool_count": 4}).numa_shards == 4
    assert KTConfig.from_mapping({"kt_tp_enabled": False}).numa_shards == 1
    assert KTConfig.from_env({"KT_SFT_NUMA_SHARDS": "auto"}).numa_shards == "auto"
    assert KTConfig.from_env({"KT_SFT_NUMA_SHARDS": "2", "KT_SFT_NUMA": "0;1"}).numa_shards == 2


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"numa_shards": 0}, r"numa_shards must be a positive integer or 'auto', got 0"),
        ({"numa_shards": "all"}, r"numa_shards must be a positive integer or 'auto'"),
        (
            {"kt_tp_enabled": False, "kt_threadpool_count": 2},
            r"kt_tp_enabled=False contradicts numa_shards=2",
        ),
        ({"kt_tp_enabled": "yes"}, r"kt_tp_enabled must be true or false"),
    ],
)
def test_bad_numa_shards(mapping: dict, message: str) -> None:
    with pytest.raises(KTConfigError, match=message):
        KTConfig.from_mapping(mapping)
