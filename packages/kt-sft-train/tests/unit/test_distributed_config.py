"""KTConfig's host-owner fields and the host layout, without processes (see integration/test_distributed)."""

from __future__ import annotations

import pytest
from kt_sft_train import KTConfig, KTConfigError
from kt_sft_train.distributed import HostLayout


def test_host_owner_fields_from_kwargs_mapping_and_env() -> None:
    config = KTConfig(
        distributed="host_owner", owner_local_rank=1, hosts=[[1, 0], [3, 2]], distributed_timeout_s=30
    )
    assert config.hosts == ((0, 1), (2, 3)) and config.owner_local_rank == 1
    assert KTConfig.from_mapping(config.to_dict()) == config
    env = {
        "KT_SFT_DISTRIBUTED": "host_owner",
        "KT_SFT_OWNER_LOCAL_RANK": "1",
        "KT_SFT_HOSTS": "0,1;2,3",
        "KT_SFT_DISTRIBUTED_TIMEOUT_S": "30",
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
