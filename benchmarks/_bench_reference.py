"""float64 NumPy reference of DESIGN.md §2 (forward and backward) on a checked subset of the problem.

Every backend is compared against this on the same inputs. To stay fast on big shapes it computes only:
- out, dx and grad_w for the rows in `tokens` (each needs all k experts of that token);
- every LoRA gradient for the experts in `experts` (each needs all the pairs routed to that expert).
Weights are generated one expert at a time, so the reference never holds a whole layer.

Rounding: inputs, weights and LoRA are the bf16 values every backend sees; the rest is float64 except gu,
h and dgu, which are rounded to bf16 where our kernels round them (`round_like_kernel`; docs/kernels.md
"Rounding points"). Backends that round elsewhere (PyTorch bf16 rounds after every op) differ from this
by a few 1e-3 relative, inside the §7 bounds.

Quantized bases (`weight_dtype` int8 / int4): the reference runs on the DEQUANTIZED weights of the kernel
wheel's own quantizer (kt_sft_kernels.testing.quantize / dequantize, the rule of docs/kernels.md), i.e.
exactly what our quantized layer computes with; only the library reference supports it.

`reference()` uses the library's own reference, kt_sft_kernels.testing.moe_reference, when the kernel
wheel is installed (restricted to the checked rows and experts, weights generated lazily per expert),
and the NumPy implementation here otherwise; `reference_name()` says which one ran.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import _bench_inputs as inputs
import numpy as np
from _bench_inputs import Problem

CHECKED_KEYS = ("out", "dx", "grad_w", "da_gu", "db_gu", "da_d", "db_d")
OUTPUT_KEYS = ("out",)


def _to_f64(bits: np.ndarray) -> np.ndarray:
    return inputs.bf16_bits_to_f32(bits).astype(np.float64)


def _round_bf16(values: np.ndarray) -> np.ndarray:
    return _to_f64(inputs.f32_to_bf16_bits(values.astype(np.float32)))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def numpy_reference(
    p: Problem, tokens: np.ndarray, experts: np.ndarray, round_like_kernel: bool = True
) -> dict[str, np.ndarray]:
    """Reference values of every checked quantity (keys: CHECKED_KEYS), float64."""
    sh = p.shape
    x_bits = inputs.hidden_states(p)
    g_bits = inputs.grad_output(p)
    ids, weights = inputs.routing(p)
    s = p.scale

    row_of_token = np.full(p.tokens, -1, dtype=np.int64)
    row_of_token[tokens] = np.arange(len(tokens))
    in_checked_experts = np.zeros(sh.num_experts, dtype=bool)
    in_checked_experts[experts] = True

    out = np.zeros((len(tokens), sh.hidden))
    dx = np.zeros((len(tokens), sh.hidden))
    grad_w = np.zeros((len(tokens), sh.top_k))
    lora_grads = {
        "da_gu": np.zeros((len(experts), p.rank, sh.hidden)),
        "db_gu": np.zeros((len(experts), 2 * sh.intermediate, p.rank)),
        "da_d": np.zeros((len(experts), p.rank, sh.intermediate)),
        "db_d": np.zeros((len(experts), sh.hidden, p.rank)),
    }
    slot_of_expert = {int(e): n for n, e in enumerate(experts)}

    needed = np.union1d(np.unique(ids[tokens]), experts)
    needed = needed[(needed >= 0) & (needed < sh.num_experts)]
    for e in needed.tolist():
        pair_t, pair_j = np.nonzero(ids == e)
        if not in_checked_experts[e]:
            keep = row_of_token[pair_t] >= 0
            pair_t, pair_j = pair_t[keep], pair_j[keep]
        if len(pair_t) == 0:
            continue
        x = _to_f64(x_bits[pair_t])
        grad = _to_f64(g_bits[pair_t])
        w = weights[pair_t, pair_j].astype(np.float64)[:, None]

        w_gu = np.concatenate([_to_f64(inputs.gate(p, e)), _to_f64(inputs.up(p, e))])
        w_d = _to_f64(inputs.down(p, e))
        a_gu, b_gu = _to_f64(inputs.lora_a_gu(p, e)), _to_f64(inputs.lora_b_gu(p, e))
        a_d, b_d = _to_f64(inputs.lora_a_d(p, e)), _to_f64(inputs.lora_b_d(p, e))

        # forward
        ax = x @ a_gu.T
        gu = x @ w_gu.T + s * (ax @ b_gu.T)
        if round_like_kernel:
            gu = _round_bf16(gu)
        g, u = gu[:, : sh.intermediate], gu[:, sh.intermediate :]
        sig = _sigmoid(g)
        silu = g * sig
        h = silu * u
        if round_like_kernel:
            h = _round_bf16(h)
        ah = h @ a_d.T
        y = h @ w_d.T + s * (ah @ b_d.T)

        # backward
        v = grad @ w_d + s * ((grad @ b_d) @ a_d)
        gw_pair = np.sum(h * v, axis=1)
        dh = w * v
        wg = w * grad
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        du = dh * silu
        dgu = np.concatenate([dg, du], axis=1)
        if round_like_kernel:
            dgu = _round_bf16(dgu)
        bt_dgu = dgu @ b_gu
        dx_pair = dgu @ w_gu + s * (bt_dgu @ a_gu)

        rows = row_of_token[pair_t]
        mine = rows >= 0
        np.add.at(out, rows[mine], w[mine] * y[mine])
        np.add.at(dx, rows[mine], dx_pair[mine])
        grad_w[rows[mine], pair_j[mine]] = gw_pair[mine]

        if in_checked_experts[e]:
            n = slot_of_expert[e]
            lora_grads["db_d"][n] = s * (wg.T @ ah)
            lora_grads["da_d"][n] = s * ((wg @ b_d).T @ h)
            lora_grads["db_gu"][n] = s * (dgu.T @ ax)
            lora_grads["da_gu"][n] = s * (bt_dgu.T @ x)

    return {"out": out, "dx": dx, "grad_w": grad_w, **lora_grads}


class _LazyExperts:
    """Indexable like an [E, ...] weight array, generating one expert's bf16 matrix on demand."""

    def __init__(self, make: Callable[[int], np.ndarray]) -> None:
        self.make = make

    def __getitem__(self, expert: int) -> np.ndarray:
        return self.make(int(expert))


def library_reference(
    p: Problem, tokens: np.ndarray, experts: np.ndarray, weight_dtype: str = "bf16", group_size: int = 128
) -> dict[str, np.ndarray]:
    """kt_sft_kernels.testing.moe_reference on two sub-problems: the checked rows (rows are independent),
    and every pair routed to a checked expert with the other slots set to -1 (skipped)."""
    import ml_dtypes
    from kt_sft_kernels import testing

    bf16 = np.dtype(ml_dtypes.bfloat16)
    sh = p.shape
    x, grad = inputs.hidden_states(p), inputs.grad_output(p)
    ids, weights = inputs.routing(p)
    lora = inputs.lora_weights(p)
    lora_arrays = testing.LoRAWeights(
        lora.a_gu.view(bf16), lora.b_gu.view(bf16), lora.a_d.view(bf16), lora.b_d.view(bf16), p.scale, p.scale
    )

    def base(matrix: np.ndarray) -> np.ndarray:
        """One expert matrix as the layer computes with it (bf16, or its dequantized fp32 values)."""
        if weight_dtype == "bf16":
            return matrix
        q, scale = testing.quantize(matrix, weight_dtype, group_size)
        return testing.dequantize(q, scale, weight_dtype, group_size)

    gate_up = _LazyExperts(lambda e: base(np.concatenate([inputs.gate(p, e), inputs.up(p, e)]).view(bf16)))
    down = _LazyExperts(lambda e: base(inputs.down(p, e).view(bf16)))

    def solve(rows: np.ndarray, row_ids: np.ndarray) -> Any:
        case = testing.MoECase(
            sh.num_experts,
            sh.top_k,
            sh.hidden,
            sh.intermediate,
            gate_up,
            down,  # type: ignore[arg-type]
            x[rows].view(bf16),
            row_ids,
            weights[rows],
            grad[rows].view(bf16),
            lora_arrays,
        )
        return testing.moe_reference(case)

    rows_result = solve(tokens, ids[tokens])
    lora_rows = np.nonzero(np.isin(ids, experts).any(axis=1))[0]
    masked_ids = np.where(np.isin(ids[lora_rows], experts), ids[lora_rows], -1)
    lora_result = solve(lora_rows, masked_ids)
    return {
        "out": rows_result.out,
        "dx": rows_result.grad_x,
        "grad_w": rows_result.grad_weights,
        **{key: lora_result.lora_grads[key][experts] for key in ("da_gu", "db_gu", "da_d", "db_d")},
    }


def library_available() -> bool:
    try:
        from kt_sft_kernels import testing  # noqa: F401
    except ImportError:
        return False
    return True


def reference_name(weight_dtype: str = "bf16", group_size: int = 128) -> str:
    base = {"bf16": "", "int8": " on int8-dequantized weights"}.get(
        weight_dtype, f" on {weight_dtype} g{group_size}-dequantized weights"
    )
    if library_available():
        return "kt_sft_kernels.testing.moe_reference" + base
    return "benchmarks/_bench_reference.py numpy_reference" + base


def reference(
    p: Problem, tokens: np.ndarray, experts: np.ndarray, weight_dtype: str = "bf16", group_size: int = 128
) -> dict[str, np.ndarray]:
    if library_available():
        return library_reference(p, tokens, experts, weight_dtype, group_size)
    if weight_dtype != "bf16":
        raise RuntimeError(f"a {weight_dtype} reference needs kt_sft_kernels.testing (the wheel's quantizer)")
    return numpy_reference(p, tokens, experts)


def relative_error(result: np.ndarray, expected: np.ndarray) -> float:
    """Relative Frobenius error; NaN anywhere in the result (an unwritten output) gives inf."""
    result = np.asarray(result, dtype=np.float64)
    if result.shape != expected.shape:
        raise ValueError(f"result shape {result.shape} != reference shape {expected.shape}")
    if not np.all(np.isfinite(result)):
        return float("inf")
    norm = np.linalg.norm(expected)
    return float(np.linalg.norm(result - expected) / norm) if norm > 0 else float(np.linalg.norm(result))


def errors(result: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> dict[str, float]:
    return {key: relative_error(result[key], expected[key]) for key in CHECKED_KEYS}
