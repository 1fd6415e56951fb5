"""KTConfig.numa_shards through the training layer: N shards give the numa_shards=1 results within
DESIGN.md §7's same-rounding bound (ADR 0701); "auto" resolves to the kernel's shard layout."""

from __future__ import annotations

import pytest
import torch
from factory import kernels_or_skip, rel_error
from kt_sft_train import KTConfig, KTExperts
from kt_sft_train.reference import ExpertLoRA

E, K, H, INTER, R = 6, 2, 64, 160, 4


def _experts(kt: KTConfig) -> KTExperts:
    g = torch.Generator().manual_seed(0)
    experts = KTExperts(num_experts=E, top_k=K, hidden_size=H, intermediate_size=INTER, kt=kt)
    experts.load_expert_weights(
        (torch.randn(E, 2 * INTER, H, generator=g) / H**0.5).bfloat16(),
        (torch.randn(E, H, INTER, generator=g) / INTER**0.5).bfloat16(),
    )
    return experts


def _step(experts: KTExperts) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(19, H, generator=g).bfloat16().requires_grad_()
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(19)])
    weights = torch.rand(19, K, generator=g).requires_grad_()
    lora = ExpertLoRA(
        a_gu=(torch.randn(E, R, H, generator=g) / H**0.5).requires_grad_(),
        b_gu=(torch.randn(E, 2 * INTER, R, generator=g) * 0.3).requires_grad_(),
        a_d=(torch.randn(E, R, INTER, generator=g) / INTER**0.5).requires_grad_(),
        b_d=(torch.randn(E, H, R, generator=g) * 0.3).requires_grad_(),
        scale_gu=2.0,
        scale_d=2.0,
    )
    out = experts.run(x, ids, weights, lora)
    out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
    return [out.detach(), x.grad, weights.grad, *(t.grad for t in lora.tensors())]


@pytest.mark.parametrize("weight_dtype", ["bf16", "int8", "int4"])  # int4: group 32 (H = 64)
@pytest.mark.parametrize("shards", [2, 3, "auto"])
def test_sharded_training_layer_equals_one_shard(shards: int | str, weight_dtype: str) -> None:
    kernels_or_skip()
    single = _step(_experts(KTConfig(threads=2, weight_dtype=weight_dtype)))
    sharded = _step(_experts(KTConfig(numa_shards=shards, weight_dtype=weight_dtype)))
    for name, got, want in zip(
        ["out", "dx", "dw", "da_gu", "db_gu", "da_d", "db_d"], sharded, single, strict=True
    ):
        assert got.dtype == want.dtype, name
        assert rel_error(got, want) <= 2e-3, name


def test_auto_follows_the_kernel_layout_and_fits_intermediate(monkeypatch: pytest.MonkeyPatch) -> None:
    kernels_or_skip()
    from kt_sft_train import _kernels

    kk = _kernels.load_kernels()
    assert _kernels.numa_shard_count(kk, "auto", 4096) == len(kk.shard_layout())
    monkeypatch.setenv("KT_SFT_NUMA", "3")
    assert _kernels.numa_shard_count(kk, "auto", 4096) == 3
    assert _kernels.numa_shard_count(kk, "auto", 64) == 2  # at most intermediate / 32 shards
    assert _kernels.numa_shard_count(kk, 5, 4096) == 5
    assert _kernels.numa_shard_count(kk, "auto", 256, 128) == 2  # int4 group 128: whole groups a shard
