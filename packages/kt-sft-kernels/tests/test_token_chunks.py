"""Token chunks of the per-pair fp32 rows (ADR 0405): when a call's [P, H] fp32 rows (the forward's
down output, the backward's dx rows) exceed the row budget, the down product + combine and the dx
product + combine run per token chunk. The results must be bitwise those of one chunk, at every
tier, for every LoRA form, quantized bases and NUMA shards; the workspace must stop growing by
P·H·4 bytes. The testing hook lowers the budget so small shapes run in several chunks."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import kt_sft_kernels as kk
import numpy as np
import pytest
from kt_sft_kernels import testing as kt
from kt_sft_kernels._core import _testing
from kt_sft_kernels.testing import tier

TIERS = kt.tier_names()  # every tier this host runs, avx512_bf16 once per kernel variant
F32 = np.dtype(np.float32)
H, K = 96, 3
TOKEN_ROWS = H * 4 * K  # fp32 row bytes of one token's k pairs

LORA_KINDS = {
    "f32": dict(rank_gu=8, rank_d=16, lora_dtype=F32),
    "bf16": dict(rank_gu=16, rank_d=8, lora_dtype=kt.BF16, x_dtype=F32, weight_dtype=kt.BF16),
    "frozen": dict(rank_gu=0, rank_d=0),
    "down_only": dict(rank_gu=0, rank_d=8, lora_dtype=kt.BF16, id_dtype=np.int64),
}
# 1 byte: one token a chunk (its k rows exceed the budget); else chunks of 5 and of 13 tokens.
BUDGETS = [1, 5 * TOKEN_ROWS + 7, 13 * TOKEN_ROWS]


@contextmanager
def row_budget(nbytes: int) -> Iterator[None]:
    before = _testing.set_row_budget(nbytes)
    try:
        yield
    finally:
        _testing.set_row_budget(0)
        assert before == _testing.set_row_budget(0)


def make(kind: str, tokens: int = 37, seed: int = 11) -> kt.MoECase:
    return kt.make_case(
        tokens=tokens,
        num_experts=7,
        top_k=K,
        hidden=H,
        intermediate=160,
        idle_experts=2,
        invalid_ids=3,
        seed=seed,
        **LORA_KINDS[kind],
    )


def bits(res: kt.KernelResult) -> dict[str, bytes]:
    named = {"out": res.out, "grad_x": res.grad_x, "grad_weights": res.grad_weights} | res.lora_grads
    return {k: v.tobytes() for k, v in named.items() if v is not None}


QUANT: dict[str, tuple[str, int]] = {"int8": ("int8", 128), "int4": ("int4", 32)}
BOUNDS = {"bf16": (1e-2, 2e-2), "int8": (2e-2, 3e-2), "int4": (3e-2, 4e-2)}  # DESIGN.md §7: out, grad_x


def assert_chunks_change_no_bit(
    layer: object, case: kt.MoECase, label: str, base: str = "bf16", budgets: list[int] = BUDGETS
) -> None:
    whole = bits(kt.run_kernels(layer, case))
    whole_infer = kt.run_kernels(layer, case, backward=False).out.tobytes()
    for budget in budgets:
        with row_budget(budget):
            got = kt.run_kernels(layer, case)
            infer = kt.run_kernels(layer, case, backward=False).out.tobytes()
        for name, value in bits(got).items():
            assert value == whole[name], f"{label} budget={budget}: {name} differs from one chunk"
        assert infer == whole_infer, f"{label} budget={budget}: forward(save=False) differs"
    # and the chunked results are the right ones (not merely equal to the unchunked ones)
    ref = kt.moe_reference(kt.dequantized_case(case, *QUANT[base]) if base in QUANT else case)
    out_bound, grad_bound = BOUNDS[base]
    assert kt.rel_fro(got.out, ref.out) <= out_bound, label
    assert kt.rel_fro(got.grad_x, ref.grad_x) <= grad_bound, label


@pytest.mark.parametrize("kind", list(LORA_KINDS))
@pytest.mark.parametrize("isa", TIERS)
def test_chunked_bits_equal_one_chunk(isa: str, kind: str) -> None:
    case = make(kind)
    with tier(isa):
        assert_chunks_change_no_bit(kt.build_layer(case), case, f"bf16 {isa} {kind}")


@pytest.mark.parametrize("weight_dtype", list(QUANT))
@pytest.mark.parametrize("isa", TIERS)
def test_chunked_bits_equal_one_chunk_quantized(isa: str, weight_dtype: str) -> None:
    case = make("f32", tokens=29, seed=12)
    wd, group = QUANT[weight_dtype]
    with tier(isa):
        layer = kt.build_layer(case, weight_dtype=wd, group_size=group)
        assert_chunks_change_no_bit(layer, case, f"{weight_dtype} {isa}", base=weight_dtype)


@pytest.mark.parametrize("shared_down", ["1", "0"])
@pytest.mark.parametrize("isa", [TIERS[0], TIERS[-1]])
def test_chunked_bits_equal_one_chunk_numa_shards(
    isa: str, shared_down: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KT_SFT_NUMA_SHARED_DOWN", shared_down)
    case = make("bf16", tokens=41, seed=13)
    with tier(isa):
        assert_chunks_change_no_bit(
            kt.build_layer(case, numa_shards=2), case, f"bf16 {isa} N=2 {shared_down}"
        )


@pytest.mark.parametrize("isa", TIERS)
def test_chunks_inside_experts_of_several_calls(isa: str) -> None:
    """~350 rows an expert (two GEMM calls of <= 256 rows), chunks of ~50 and ~10 rows an expert."""
    case = kt.make_case(
        tokens=700, num_experts=4, top_k=2, hidden=H, intermediate=64, idle_experts=0, invalid_ids=5, seed=16
    )
    with tier(isa):
        budgets = [100 * H * 4 * 2 + 3, 20 * H * 4 * 2]
        assert_chunks_change_no_bit(kt.build_layer(case), case, f"bf16 {isa} long", budgets=budgets)


def test_empty_and_all_skipped_calls_under_a_tiny_budget() -> None:
    case = make("f32", tokens=9, seed=14)
    layer = kt.build_layer(case)
    case.ids[:] = -1
    with row_budget(1):
        res = kt.run_kernels(layer, case)
        out = np.empty((0, H), dtype=kt.BF16)
        layer.forward(out.copy(), np.zeros((0, K), np.int32), np.zeros((0, K), F32), out, save=False)
    assert np.all(kt.as_f64(res.out) == 0.0) and np.all(kt.as_f64(res.grad_x) == 0.0)
    assert np.all(kt.as_f64(res.grad_weights) == 0.0)


def workspace_after_a_step(case: kt.MoECase) -> int:
    layer = kt.build_layer(case, kk.ThreadPool(threads=1))  # a pool of its own: its own workspace
    kt.run_kernels(layer, case)
    return int(layer.memory_report()["workspace_shared"])


def test_workspace_rows_stay_within_the_budget_as_tokens_grow() -> None:
    budget = 8 * TOKEN_ROWS
    for tokens in (64, 256):
        case = make("f32", tokens=tokens, seed=15)
        pairs = int(((case.ids >= 0) & (case.ids < case.num_experts)).sum())
        whole = workspace_after_a_step(case)
        with row_budget(budget):
            chunked = workspace_after_a_step(case)
        # Chunking drops the [P, H] fp32 rows to one chunk's (<= budget), at the price of a chunk-row
        # map (4 bytes a pair) and one chunk's row pointers.
        assert whole - chunked >= pairs * H * 4 - budget - pairs * 4 - budget // (H * 4) * 8, (
            tokens,
            whole,
            chunked,
        )


def estimated_forward_workspace(case: kt.MoECase, monkeypatch: pytest.MonkeyPatch) -> int:
    """The bytes the up-front memory check says forward(save=False) needs, from its MemoryError."""
    layer = kt.build_layer(case, kk.ThreadPool(threads=1))  # a fresh (empty) workspace
    monkeypatch.setenv("KT_SFT_TEST_MEM_LIMIT", "1")
    out = kt.nan_array(case.x.shape, case.x.dtype)
    with pytest.raises(MemoryError) as raised:
        layer.forward(case.x, case.ids, case.weights, out, save=False)
    monkeypatch.delenv("KT_SFT_TEST_MEM_LIMIT")
    return int(str(raised.value).split(" bytes) more")[0].rsplit("(", 1)[1])


def test_memory_estimate_counts_one_chunk_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    hidden, top_k, tokens = 512, 2, 512
    case = kt.make_case(
        tokens=tokens,
        num_experts=4,
        top_k=top_k,
        hidden=hidden,
        intermediate=64,
        rank_gu=0,
        rank_d=0,
        seed=17,
    )
    budget = 32 * hidden * 4 * top_k  # chunks of 32 tokens
    whole = estimated_forward_workspace(case, monkeypatch)
    with row_budget(budget):
        chunked = estimated_forward_workspace(case, monkeypatch)
        layer = kt.build_layer(case, kk.ThreadPool(threads=1))
        layer.forward(case.x, case.ids, case.weights, kt.nan_array(case.x.shape, case.x.dtype), save=False)
        used = int(layer.memory_report()["workspace_shared"])
    pairs = tokens * top_k
    assert whole - chunked >= pairs * hidden * 4 - budget - pairs * 4 - budget // (hidden * 4) * 8, (
        whole,
        chunked,
    )
    assert chunked >= used, f"the estimate ({chunked}) is below what the chunked call allocated ({used})"


SHARDED_FOOTPRINT = """
import sys
import kt_sft_kernels as kk
from kt_sft_kernels import testing as kt
from kt_sft_kernels._core import _testing
sys.path.insert(0, sys.argv[1])
from test_token_chunks import make
budget = int(sys.argv[2])
case = make("f32", tokens=256, seed=15)
if budget:
    _testing.set_row_budget(budget)
layer = kt.build_layer(case, numa_shards=2)
kt.run_kernels(layer, case)
workspaces = sum(s["workspace_shared"] for s in layer.memory_report()["shards"])
print(workspaces + sum(s["buffer_bytes"] for s in layer.shard_report()))
"""


@pytest.mark.parametrize("isa", [TIERS[0], TIERS[-1]])
def test_one_node_shards_keep_one_chunk_of_rows(isa: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """numa_shards on one node: the down / dx rows of all shards are one token chunk's, not the whole
    call's (ADR 0701). Each footprint in a fresh process: the shards' runtimes and workspaces are
    process-wide and grow-only."""
    budget = 8 * TOKEN_ROWS
    case = make("f32", tokens=256, seed=15)
    pairs = int(((case.ids >= 0) & (case.ids < case.num_experts)).sum())
    env = os.environ | kt.tier_environment(isa) | {"KT_SFT_NUMA_SHARED_DOWN": "1"}

    def footprint(nbytes: int) -> int:
        args = [sys.executable, "-c", SHARDED_FOOTPRINT, os.path.dirname(__file__), str(nbytes)]
        cwd = tmp_path_factory.mktemp("footprint")
        done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=cwd)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    whole, chunked = footprint(0), footprint(budget)
    # As for one layer (above), with one chunk's row pointers per shard.
    pointers = 2 * (budget // (H * 4) * 8)
    assert whole - chunked >= pairs * H * 4 - budget - pairs * 4 - pointers, (whole, chunked)
