"""MoE forward/backward vs the float64 reference (DESIGN.md §2, §7), on every tier this host runs.

Shapes are chosen pairwise (not as a full product) to keep the suite fast: token counts around
the kernels' tile edges, k in {1, 8}, H and I multiples of 32 but not of 64, ranks 1..64, f32 and
bf16 LoRA, no LoRA, LoRA on one projection, experts with no tokens, ids outside [0, E).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import kt_sft_kernels as kk
import numpy as np
import pytest
from kt_sft_kernels import testing as kt
from kt_sft_kernels.testing import tier

TIERS = kt.tier_names()  # the avx512_bf16 tier once per kernel variant ("avx512_bf16/bf16dot")
SIMD_TIERS = [t for t in TIERS if t != "portable"]
BF16 = kt.BF16
F32 = np.dtype(np.float32)
POOL = kk.ThreadPool(threads=2)  # explicit: results must not depend on the machine's core count


def test_report_tiers() -> None:
    """Says which tiers this run covers (shown with -rA / in the CI log)."""
    print(f"MoE numerics tiers on this host: {', '.join(TIERS)}")
    assert "portable" in TIERS


@dataclass(frozen=True)
class Shape:
    tokens: int
    experts: int
    k: int
    hidden: int
    intermediate: int
    rank_gu: int
    rank_d: int
    lora_dtype: Any = F32
    x_dtype: Any = BF16
    id_dtype: Any = np.int32
    weight_dtype: Any = F32
    idle: int = 1
    invalid: int = 0
    out_dtype: Any = None

    def case(self, seed: int) -> kt.MoECase:
        return kt.make_case(
            tokens=self.tokens,
            num_experts=self.experts,
            top_k=self.k,
            hidden=self.hidden,
            intermediate=self.intermediate,
            rank_gu=self.rank_gu,
            rank_d=self.rank_d,
            lora_dtype=self.lora_dtype,
            x_dtype=self.x_dtype,
            id_dtype=self.id_dtype,
            weight_dtype=self.weight_dtype,
            idle_experts=self.idle,
            invalid_ids=self.invalid,
            seed=seed,
        )

    def __str__(self) -> str:
        lora = (
            "nolora"
            if not (self.rank_gu or self.rank_d)
            else (f"r{self.rank_gu}-{self.rank_d}-{np.dtype(self.lora_dtype).name}")
        )
        return (
            f"T{self.tokens}-E{self.experts}-k{self.k}-H{self.hidden}-I{self.intermediate}-{lora}"
            f"-x{np.dtype(self.x_dtype).name}-inv{self.invalid}"
        )


SHAPES = [
    Shape(1, 4, 1, 96, 160, 8, 8),
    Shape(2, 12, 8, 96, 160, 16, 16, BF16, F32, np.int64, BF16, idle=2, invalid=3),
    Shape(15, 12, 8, 160, 96, 1, 64, F32, BF16, np.int64, F32, idle=3, invalid=5),
    Shape(16, 6, 1, 96, 160, 64, 1, BF16, BF16, np.int32, BF16, idle=2),
    Shape(17, 10, 8, 96, 160, 8, 16, F32, F32, np.int32, F32, idle=2, invalid=2),
    Shape(33, 12, 8, 96, 96, 0, 0, F32, BF16, np.int32, F32, idle=3, invalid=4),
    Shape(33, 8, 1, 224, 160, 16, 8, BF16, BF16, np.int64, F32, idle=1, out_dtype=F32),
    Shape(200, 16, 8, 96, 160, 16, 0, F32, BF16, np.int64, F32, idle=2, invalid=7),
    Shape(200, 8, 2, 96, 160, 0, 16, BF16, F32, np.int32, BF16, idle=1),
    # ~400 pairs per expert: several GEMM calls per expert (more than one 256-row chunk)
    Shape(400, 3, 2, 96, 160, 16, 8, F32, BF16, np.int32, F32, idle=1),
]


def check_against_reference(res: kt.KernelResult, ref: kt.ReferenceResult, case: kt.MoECase) -> None:
    """The DESIGN.md §7 bf16 checks."""
    errors = {
        "out": (kt.rel_fro(res.out, ref.out), kt.max_rel_rows(res.out, ref.out), 1e-2),
        "grad_x": (kt.rel_fro(res.grad_x, ref.grad_x), kt.max_rel_rows(res.grad_x, ref.grad_x), 2e-2),
    }
    for name, (fro, rows, bound) in errors.items():
        assert fro <= bound, f"{name}: relative Frobenius error {fro:.3g} > {bound}"
        assert rows <= 3e-2, f"{name}: worst token row relative error {rows:.3g} > 3e-2"
    gw = kt.rel_fro(res.grad_weights, ref.grad_weights)
    assert gw <= 2e-2, f"grad_weights: relative Frobenius error {gw:.3g} > 2e-2"
    skipped = (case.ids < 0) | (case.ids >= case.num_experts)
    assert np.all(kt.as_f64(res.grad_weights)[skipped] == 0.0), (
        "grad_weights must be 0 where the id is skipped"
    )
    assert set(res.lora_grads) == set(ref.lora_grads)
    for name, got in res.lora_grads.items():
        want = ref.lora_grads[name]
        fro = kt.rel_fro(got, want)
        assert fro <= 2e-2, f"{name}: relative Frobenius error {fro:.3g} > 2e-2"
        per_expert = kt.max_rel_rows(got, want)
        assert per_expert <= 3e-2, f"{name}: worst expert slice relative error {per_expert:.3g} > 3e-2"
        for e in case.idle_experts:
            assert np.all(kt.as_f64(got[e]) == 0.0), f"{name}[{e}]: expert without tokens must be exactly 0"


def lora_is_visible(case: kt.MoECase) -> None:
    """Guards the test data itself: the LoRA term must be of the order of the base term."""
    lo = case.lora
    if lo is None or lo.a_gu is None:
        return
    x = kt.as_f64(case.x[:8])
    e = int(case.ids[0, 0])
    base = np.linalg.norm(x @ kt.as_f64(case.gate_up[e]).T)
    delta = lo.scale_gu * np.linalg.norm(x @ kt.as_f64(lo.a_gu[e]).T @ kt.as_f64(lo.b_gu[e]).T)
    assert 0.2 < delta / base < 5.0


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("isa", TIERS)
def test_forward_backward_match_reference(isa: str, shape: Shape) -> None:
    case = shape.case(seed=zlib.crc32(str(shape).encode()))
    lora_is_visible(case)
    with tier(isa):
        layer = kt.build_layer(case, POOL)
        res = kt.run_kernels(layer, case, out_dtype=shape.out_dtype, grad_dtype=shape.out_dtype)
    ref = kt.moe_reference(case, out_dtype=shape.out_dtype, grad_dtype=shape.out_dtype)
    check_against_reference(res, ref, case)


@pytest.mark.parametrize("isa", TIERS)
def test_inference_forward_equals_training_forward(isa: str) -> None:
    """save=False (no cache) gives bitwise the same output as save=True, with and without LoRA."""
    case = kt.make_case(tokens=40, num_experts=8, top_k=2, rank_gu=8, rank_d=8, seed=3)
    with tier(isa):
        layer = kt.build_layer(case, POOL)
        trained = kt.run_kernels(layer, case)
        inferred = kt.run_kernels(layer, case, backward=False)
        np.testing.assert_array_equal(inferred.out.view(np.uint16), trained.out.view(np.uint16))
        case.lora = None
        frozen = kt.run_kernels(layer, case, backward=False)
    ref = kt.moe_reference(case)
    assert kt.rel_fro(frozen.out, ref.out) <= 1e-2
    assert kt.max_rel_rows(frozen.out, ref.out) <= 3e-2


@pytest.mark.parametrize("isa", SIMD_TIERS)
def test_tier_matches_portable(isa: str) -> None:
    """Same rounding points on every tier: each output within 2e-3 of the portable tier."""
    case = kt.make_case(
        tokens=70,
        num_experts=6,
        top_k=2,
        hidden=160,
        intermediate=96,
        rank_gu=16,
        rank_d=8,
        idle_experts=1,
        invalid_ids=3,
        seed=11,
    )
    results = {}
    for name in ("portable", isa):
        with tier(name):
            results[name] = kt.run_kernels(kt.build_layer(case, POOL), case)
    kt.assert_results_close(results[isa], results["portable"], 2e-3, f"{isa} vs portable")


@pytest.mark.parametrize("isa", TIERS)
def test_layers_sharing_a_pool_interleave_like_separate_layers(isa: str) -> None:
    """Layers on one pool share its scratch: forwards of several layers, then their backwards in reverse
    (a model's order), give bitwise what each layer gives alone on its own pool."""
    shapes = [
        dict(hidden=96, intermediate=160),
        dict(hidden=160, intermediate=96),
        dict(hidden=96, intermediate=96),
    ]
    cases = [
        kt.make_case(tokens=t, num_experts=6, top_k=2, rank_gu=8, rank_d=8, seed=40 + i, **shape)
        for i, (t, shape) in enumerate(zip((50, 17, 33), shapes, strict=True))
    ]
    with tier(isa):
        alone = [
            kt.result_bytes(kt.run_kernels(kt.build_layer(c, pool=kk.ThreadPool(threads=2)), c))
            for c in cases
        ]
        pool = kk.ThreadPool(threads=2)
        layers = [kt.build_layer(c, pool=pool) for c in cases]
        outs, handles = [], []
        for layer, c in zip(layers, cases, strict=True):
            out = kt.nan_array(c.x.shape, c.x.dtype)
            handles.append(layer.forward(c.x, c.ids, c.weights, out, lora=kt.kernel_lora(c), save=True))
            outs.append(out)
        for i in reversed(range(len(cases))):
            res = kt.KernelResult(out=outs[i])
            kt.run_backward(layers[i], handles[i], cases[i], res)
            assert kt.result_bytes(res) == alone[i], f"layer {i}: differs from the same layer on its own pool"


@pytest.mark.parametrize("isa", TIERS)
def test_bitwise_deterministic_across_threads_and_runs(isa: str) -> None:
    """Results are bitwise identical for 1, 2 and 3 threads and from run to run."""
    case = kt.make_case(
        tokens=90,
        num_experts=6,
        top_k=4,
        hidden=96,
        intermediate=160,
        rank_gu=8,
        rank_d=16,
        lora_dtype=BF16,
        idle_experts=1,
        invalid_ids=2,
        seed=5,
    )
    small = kt.make_case(
        tokens=3,
        num_experts=6,
        top_k=4,
        hidden=96,
        intermediate=160,
        rank_gu=8,
        rank_d=16,
        lora_dtype=BF16,
        seed=6,
    )
    with tier(isa):
        first = None
        for threads in (1, 2, 3, 2):
            layer = kt.build_layer(case, pool=kk.ThreadPool(threads=threads))
            raw = kt.result_bytes(kt.run_kernels(layer, case))
            kt.run_kernels(layer, small)  # a different size in between reuses the workspace
            again = kt.result_bytes(kt.run_kernels(layer, case))
            assert raw == again, f"threads={threads}: second run differs from the first"
            if first is None:
                first = raw
            assert raw == first, f"threads={threads}: differs from threads=1"


@pytest.mark.parametrize("isa", TIERS)
def test_separate_gate_up_weights_load_like_fused(isa: str) -> None:
    case = kt.make_case(tokens=20, num_experts=4, top_k=2, rank_gu=4, rank_d=4, seed=8)
    with tier(isa):
        fused = kt.result_bytes(kt.run_kernels(kt.build_layer(case, POOL), case))
        separate = kt.result_bytes(kt.run_kernels(kt.build_layer(case, POOL, separate_gate_up=True), case))
    assert fused == separate


@pytest.mark.parametrize("isa", TIERS)
def test_separate_gate_up_lora(isa: str) -> None:
    """Separate gate/up LoRA pairs through the exact fused mapping (rank 2r, block-diagonal B)."""
    rng = np.random.default_rng(21)
    case = kt.make_case(tokens=30, num_experts=6, top_k=2, rank_gu=0, rank_d=4, seed=21)
    E, H, inter, r = case.num_experts, case.hidden, case.intermediate, 8
    a_g, a_u = ((rng.standard_normal((E, r, H)) * H**-0.5).astype(np.float32) for _ in range(2))
    b_g, b_u = ((rng.standard_normal((E, inter, r)) * r**-0.5).astype(np.float32) for _ in range(2))
    a_gu, b_gu = kk.separate_gate_up_lora(a_g, b_g, a_u, b_u)
    # The fused pair computes exactly the separate pairs' delta (independent float64 check).
    x = kt.as_f64(case.x[:5])
    f64 = np.float64
    fused = x @ a_gu[1].astype(f64).T @ b_gu[1].astype(f64).T
    gate_delta = x @ a_g[1].astype(f64).T @ b_g[1].astype(f64).T
    up_delta = x @ a_u[1].astype(f64).T @ b_u[1].astype(f64).T
    np.testing.assert_allclose(fused[:, :inter], gate_delta, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fused[:, inter:], up_delta, rtol=1e-12, atol=1e-12)
    case.lora.a_gu, case.lora.b_gu, case.lora.scale_gu = a_gu, b_gu, 0.9
    with tier(isa):
        res = kt.run_kernels(kt.build_layer(case, POOL), case)
    ref = kt.moe_reference(case)
    check_against_reference(res, ref, case)
    got = kk.split_gate_up_lora_grads(res.lora_grads["da_gu"], res.lora_grads["db_gu"])
    want = kk.split_gate_up_lora_grads(ref.lora_grads["da_gu"], ref.lora_grads["db_gu"])
    for g, w in zip(got, want, strict=True):
        assert kt.rel_fro(g, w) <= 2e-2


@pytest.mark.parametrize("isa", TIERS)
def test_no_valid_ids_and_empty_batch(isa: str) -> None:
    """All ids skipped: out and grads are written zeros. T = 0: empty results, LoRA grads zero."""
    case = kt.make_case(tokens=5, num_experts=4, top_k=2, rank_gu=4, rank_d=4, idle_experts=0, seed=2)
    case.ids[:] = -1
    case.ids[0, 1] = 4
    case.idle_experts = list(range(case.num_experts))
    with tier(isa):
        layer = kt.build_layer(case, POOL)
        res = kt.run_kernels(layer, case)
        assert np.all(kt.as_f64(res.out) == 0.0)
        assert np.all(kt.as_f64(res.grad_x) == 0.0)
        assert np.all(kt.as_f64(res.grad_weights) == 0.0)
        for g in res.lora_grads.values():
            assert np.all(kt.as_f64(g) == 0.0)
        empty = kt.make_case(tokens=0, num_experts=4, top_k=2, rank_gu=4, rank_d=4, seed=2)
        res = kt.run_kernels(layer, empty)
        assert res.out.shape == (0, case.hidden) and res.grad_x.shape == (0, case.hidden)
        for g in res.lora_grads.values():
            assert np.all(kt.as_f64(g) == 0.0)


@pytest.mark.skipif(len(TIERS) < 2, reason="needs two tiers")
def test_tier_change_between_forward_and_backward() -> None:
    """The cache is tier-neutral: a backward on another tier than its forward is still right."""
    case = kt.make_case(tokens=24, num_experts=4, top_k=2, rank_gu=8, rank_d=8, seed=4)
    ref = kt.moe_reference(case)
    with tier(TIERS[-1]):
        layer = kt.build_layer(case, POOL)
        out = kt.nan_array(case.x.shape, case.x.dtype)
        handle = layer.forward(case.x, case.ids, case.weights, out, lora=kt.kernel_lora(case), save=True)
    with tier("portable"):
        res = kt.KernelResult(
            out=out,
            grad_x=kt.nan_array(case.x.shape, case.x.dtype),
            grad_weights=kt.nan_array(case.weights.shape, case.weights.dtype),
        )
        lo = case.lora
        res.lora_grads = {
            n: kt.nan_array(a.shape, a.dtype)
            for n, a in (("da_gu", lo.a_gu), ("db_gu", lo.b_gu), ("da_d", lo.a_d), ("db_d", lo.b_d))
        }
        layer.backward(
            handle, case.grad_out, res.grad_x, res.grad_weights, lora_grads=kk.LoRAGrads(**res.lora_grads)
        )
    check_against_reference(res, ref, case)
