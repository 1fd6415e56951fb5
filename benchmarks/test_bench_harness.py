"""The harness's own arithmetic and one backend end to end on a tiny shape (in-process, fast).

Run: python -m pytest benchmarks -q
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import _bench_inputs as inputs
import _bench_reference as reference
import _bench_report as report
import _bench_worker as worker
import numpy as np
import pytest
from _bench_inputs import Problem, Shape

QWEN3_30B = Problem(inputs.SHAPES["qwen3-30b"], 512)


def test_flops_follow_design_convention() -> None:
    h, i, r, pairs = 2048, 768, 16, 512 * 8
    lora = 2 * r * (h + 2 * i) + 2 * r * (i + h)
    f = report.flops(QWEN3_30B)
    assert f["fwd"] == pairs * (6 * h * i + lora)
    assert f["bwd"] == pairs * (6 * h * i + 2 * lora)


def test_derived_metrics() -> None:
    ceilings = {"matmul_ceiling_tflops": 10.0, "triad": {"gbps": 80.0}}
    derived = report.derive(QWEN3_30B, {"fwd": 20.0, "fwd_bwd": 50.0}, 128, ceilings)
    total_flops = sum(report.flops(QWEN3_30B).values())
    assert derived["tokens_per_s"] == pytest.approx(512 / 0.05)
    assert derived["tflops"] == pytest.approx(total_flops / 0.05 / 1e12)
    assert derived["pct_ceiling"] == pytest.approx(100 * derived["tflops"] / 10.0)
    weight_bytes = 128 * 3 * 2048 * 768 * 2  # 1.21 GB: the "1.2 GB" per pass
    assert derived["weight_gbps"] == pytest.approx(2 * weight_bytes / 0.05 / 1e9)
    floor = report.streaming_floor(QWEN3_30B, 128, ceilings)
    assert floor["floor_ms"] == pytest.approx(1e3 * 2 * weight_bytes / 1e9 / 80.0)


def test_verdict_uses_design_tolerances() -> None:
    good = {"out": 9e-3, "dx": 1.9e-2, "grad_w": 0.0, "da_gu": 0.0, "db_gu": 0.0, "da_d": 0.0, "db_d": 0.0}
    assert report.verdict(good, "bf16")[0]
    assert not report.verdict({**good, "out": 1.1e-2}, "bf16")[0]
    assert not report.verdict({**good, "db_d": 2.1e-2}, "bf16")[0]
    assert not report.verdict({**good, "dx": math.inf}, "bf16")[0]
    assert report.verdict({**good, "out": 1.5e-2, "db_d": 2.5e-2}, "int8")[0]


def test_torch_backend_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    p = Problem(Shape("tiny", num_experts=8, hidden=64, intermediate=32, top_k=2), 24, rank=4, alpha=8.0)
    spec = {
        "problem": p.to_dict(),
        "backend": {"kind": "torch-sorted", "threads": 1},
        "warmup": 1,
        "repeats": 2,
        "max_seconds": 60.0,
        "check_tokens": 10,
        "check_experts": 3,
        "arrays_path": str(tmp_path / "got.npz"),
    }
    result = worker.run_backend(spec)
    assert len(result["samples_ms"]["fwd_bwd"]) == 2 and not result["warmup_counted"]
    got = dict(np.load(spec["arrays_path"]))
    ids, _ = inputs.routing(p)
    expected = reference.numpy_reference(p, inputs.check_tokens(p, 10), inputs.check_experts(p, ids, 3))
    passed, err_out, err_grad = report.verdict(reference.errors(got, expected), "bf16")
    assert passed and err_out > 0 and err_grad > 0  # bf16 rounding, not a copy of the reference


def test_a_wrong_backend_is_caught(tmp_path: Path) -> None:
    """A LoRA scale off by 10% must fail the check: the data make LoRA matter."""
    p = Problem(Shape("tiny", num_experts=8, hidden=64, intermediate=32, top_k=2), 24, rank=4, alpha=8.0)
    ids, _ = inputs.routing(p)
    rows, experts = inputs.check_tokens(p, 24), inputs.check_experts(p, ids, 8)
    expected = reference.numpy_reference(p, rows, experts)
    wrong = reference.numpy_reference(Problem(p.shape, p.tokens, p.rank, p.alpha * 1.1), rows, experts)
    assert not report.verdict(reference.errors(wrong, expected), "bf16")[0]


@pytest.mark.skipif(importlib.util.find_spec("kt_sft_kernels") is None, reason="kt_sft_kernels not installed")
def test_ours_backend_end_to_end(tmp_path: Path) -> None:
    p = Problem(Shape("tiny", num_experts=8, hidden=64, intermediate=32, top_k=2), 24, rank=4, alpha=8.0)
    spec = {
        "problem": p.to_dict(),
        "backend": {"kind": "ours", "tier": "portable", "threads": 1},
        "warmup": 0,
        "repeats": 1,
        "max_seconds": 60.0,
        "check_tokens": 24,
        "check_experts": 8,
        "arrays_path": str(tmp_path / "got.npz"),
    }
    worker.run_backend(spec)
    got = dict(np.load(spec["arrays_path"]))
    ids, _ = inputs.routing(p)
    expected = reference.reference(p, inputs.check_tokens(p, 24), inputs.check_experts(p, ids, 8))
    assert report.verdict(reference.errors(got, expected), "bf16")[0]


@pytest.mark.skipif(importlib.util.find_spec("kt_sft_kernels") is None, reason="kt_sft_kernels not installed")
@pytest.mark.parametrize(("weight_dtype", "group_size"), [("int8", 128), ("int4", 32)])
def test_ours_quantized_backend_against_the_dequantized_reference(
    tmp_path: Path, weight_dtype: str, group_size: int
) -> None:
    """A quantized run passes against the reference on the dequantized weights and would fail against
    the bf16 weights' reference at int4 (so the quantized reference is what decides)."""
    p = Problem(Shape("tiny", num_experts=8, hidden=64, intermediate=32, top_k=2), 24, rank=4, alpha=8.0)
    spec = {
        "problem": p.to_dict(),
        "backend": {
            "kind": "ours",
            "tier": "portable",
            "threads": 1,
            "weight_dtype": weight_dtype,
            "group_size": group_size,
        },
        "warmup": 0,
        "repeats": 1,
        "max_seconds": 60.0,
        "check_tokens": 24,
        "check_experts": 8,
        "arrays_path": str(tmp_path / "got.npz"),
    }
    worker.run_backend(spec)
    got = dict(np.load(spec["arrays_path"]))
    ids, _ = inputs.routing(p)
    rows, experts = inputs.check_tokens(p, 24), inputs.check_experts(p, ids, 8)
    dequantized = reference.reference(p, rows, experts, weight_dtype, group_size)
    assert report.verdict(reference.errors(got, dequantized), weight_dtype)[0]
    if weight_dtype == "int4":
        exact = reference.reference(p, rows, experts)
        assert not report.verdict(reference.errors(got, exact), weight_dtype)[0]


def test_variants_give_one_row_each_for_avx512_bf16(tmp_path: Path) -> None:
    """--variants splits our avx512_bf16 row into one per kernel variant (ADR 0902); other tiers keep one."""
    import bench_moe

    args = bench_moe.parse_args(["--tiers", "avx512,avx512_bf16", "--variants", "fma,bf16dot"])
    harness = bench_moe.Harness(args, tmp_path)
    harness.probe = {"ours": {"tiers": ["portable", "avx512", "avx512_bf16"]}}
    specs = harness.backend_specs(["ours"])
    assert [record["label"] for _, record in specs] == [
        "ours avx512",
        "ours avx512_bf16 (fma)",
        "ours avx512_bf16 (bf16dot)",
    ]
    assert [spec["variant"] for spec, _ in specs] == [None, "fma", "bf16dot"]
    with pytest.raises(SystemExit):
        bench_moe.parse_args(["--variants", "fma,vnni"])


def _has_avx512_bf16() -> bool:
    if importlib.util.find_spec("kt_sft_kernels") is None:
        return False
    import kt_sft_kernels as kk

    return bool(kk.isa_supported("avx512_bf16"))


@pytest.mark.skipif(not _has_avx512_bf16(), reason="this CPU cannot run the avx512_bf16 tier")
def test_ours_backend_runs_the_requested_variant(tmp_path: Path) -> None:
    p = Problem(Shape("tiny", num_experts=8, hidden=64, intermediate=32, top_k=2), 24, rank=4, alpha=8.0)
    for variant in ("fma", "bf16dot"):
        spec = {
            "problem": p.to_dict(),
            "backend": {"kind": "ours", "tier": "avx512_bf16", "variant": variant, "threads": 1},
            "warmup": 0,
            "repeats": 1,
            "max_seconds": 60.0,
            "check_tokens": 24,
            "check_experts": 8,
            "arrays_path": str(tmp_path / f"{variant}.npz"),
        }
        result = worker.run_backend(spec)
        assert result["info"]["variant"] == variant
        got = dict(np.load(spec["arrays_path"]))
        ids, _ = inputs.routing(p)
        expected = reference.reference(p, inputs.check_tokens(p, 24), inputs.check_experts(p, ids, 8))
        assert report.verdict(reference.errors(got, expected), "bf16")[0]
