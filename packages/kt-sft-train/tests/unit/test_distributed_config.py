"""KTConfig's host-owner fields and the host layout, without processes (see integration/test_distributed)."""

from __future__ import annotations

import pytest
from kt_sft_train import KTConfig, KTConfigError
from kt_sft_train.distributed import HostLayout, gloo_serves_cpu


def test_host_owner_fields_from_kwargs_mapping_and_env() -> None:
    config = KTConfig(
        distributed="host_owner",
        owner_local_rank=1,
        hosts=[[1, 0], [3, 2]],
        distributed_timeout_s=30,
        exchange_transport="gloo",
    )
    assert config.hosts == ((0, 1), (2, 3)) and config.owner_local_rank == 1
    assert KTConfig.from_mapping(config.to_dict()) == config
    env = {
        "KT_SFT_DISTRIBUTED": "host_owner",
        "KT_SFT_OWNER_LOCAL_RANK": "1",
        "KT_SFT_HOSTS": "0,1;2,3",
        "KT_SFT_DISTRIBUTED_TIMEOUT_S": "30",
        "KT_SFT_EXCHANGE_TRANSPORT": "gloo",
    }
    assert KTConfig.from_env(env) == config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"distributed": "host_owner", "hosts": [[0, 1], [1, 2]]}, "names a rank twice"),
        ({"distributed": "host_owner", "hosts": [[0], [2]]}, "every rank 0..N-1"),
        ({"distributed": "host_owner", "hosts": "0,1"}, "list of lists"),
        ({"distributed": "host_owner", "hosts": [[0, True]]}, "list of lists"),
        ({"distributed": "host_owner", "owner_local_rank": -1}, "owner_local_rank"),
        ({"distributed": "host_owner", "distributed_timeout_s": 0}, "distributed_timeout_s"),
        ({"hosts": [[0, 1]]}, "only apply with distributed='host_owner'"),
        ({"distributed": "host_owner", "exchange_transport": "nccl"}, "exchange_transport='nccl' is not"),
        ({"owner_local_rank": 1}, "only apply with distributed='host_owner'"),
    ],
)
def test_bad_host_owner_fields_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(KTConfigError, match=message):
        KTConfig(**kwargs)


def test_bad_env_hosts() -> None:
    with pytest.raises(KTConfigError, match="KT_SFT_HOSTS"):
        KTConfig.from_env({"KT_SFT_DISTRIBUTED": "host_owner", "KT_SFT_HOSTS": "0,1;x"})


def test_layout_owners_and_writer() -> None:
    layout = HostLayout(((0, 1, 2), (3, 4)), owner_local_rank=1, rank=4)
    assert layout.members == (3, 4) and layout.owner == 4 and layout.is_owner
    assert layout.owners == (1, 4) and not layout.is_adapter_writer and layout.world_size == 5
    with pytest.raises(ValueError, match="owner_local_rank=2 but host"):
        HostLayout(((0, 1, 2), (3, 4)), owner_local_rank=2, rank=0)


@pytest.mark.parametrize(
    "key", ["kt_distributed", "kt_owner_local_rank", "kt_hosts", "kt_distributed_timeout_s"]
)
def test_no_upstream_kt_name_for_the_host_owner_fields(key: str) -> None:
    """Upstream kt-kernel / LLaMA-Factory has no kt_* key for its (implicit) rank-0 ownership: a kt_-prefixed
    spelling of ours is rejected, pointing at the real field, instead of being silently ignored."""
    field = key.removeprefix("kt_")
    with pytest.raises(KTConfigError, match=rf"unknown KTConfig key '{key}' \(did you mean '{field}'\?\)"):
        KTConfig.from_mapping({key: 1})


@pytest.mark.parametrize(
    ("backend", "serves"),
    [
        ("gloo", True),
        ("cpu:gloo,cuda:nccl", True),
        ("cuda:nccl, cpu:gloo", True),
        ("nccl", False),
        ("cuda:nccl", False),
        ("cpu:nccl", False),
        ("mpi", False),
    ],
)
def test_which_default_backends_run_host_tensors_on_gloo(backend: str, serves: bool) -> None:
    # Otherwise (NCCL on GPUs) the host-owner runtime makes a gloo group of its own (control_group_for).
    assert gloo_serves_cpu(backend) is serves
