"""One MoE layer forward + backward with LoRA from plain NumPy (no torch, no ml_dtypes).

bf16 arrays are passed as uint16 arrays holding the bf16 bits. The script checks the forward output
against a float64 NumPy evaluation of DESIGN.md §2 and exits non-zero if they disagree.

    pip install numpy ./packages/kt-sft-kernels
    python packages/kt-sft-kernels/examples/numpy_forward_backward.py
"""

from __future__ import annotations

import sys

import kt_sft_kernels as kk
import numpy as np

E, K, H, INTER, R, T = 8, 2, 256, 128, 8, 33  # experts, top-k, hidden, intermediate, LoRA rank, tokens


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def from_bf16_bits(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def reference_out(
    x: np.ndarray,
    ids: np.ndarray,
    weights: np.ndarray,
    gate_up: np.ndarray,
    down: np.ndarray,
    lora_arrays: list[np.ndarray],
    scale_gu: float,
    scale_d: float,
) -> np.ndarray:
    """float64 forward of DESIGN.md §2 (no bf16 rounding of intermediates: agreement ~1e-3)."""
    a_gu, b_gu, a_d, b_d = lora_arrays
    out = np.zeros((x.shape[0], H))
    for t in range(x.shape[0]):
        for j in range(K):
            e = ids[t, j]
            gu = gate_up[e] @ x[t] + scale_gu * b_gu[e] @ (a_gu[e] @ x[t])
            g, u = gu[:INTER], gu[INTER:]
            h = g / (1.0 + np.exp(-g)) * u
            out[t] += weights[t, j] * (down[e] @ h + scale_d * b_d[e] @ (a_d[e] @ h))
    return out


def main() -> int:
    rng = np.random.default_rng(0)
    gate_up = to_bf16_bits(rng.standard_normal((E, 2 * INTER, H)) * H**-0.5)
    down = to_bf16_bits(rng.standard_normal((E, H, INTER)) * INTER**-0.5)
    lora_arrays = (
        (rng.standard_normal((E, R, H)) * H**-0.5).astype(np.float32),
        (rng.standard_normal((E, 2 * INTER, R)) * R**-0.5).astype(np.float32),
        (rng.standard_normal((E, R, INTER)) * INTER**-0.5).astype(np.float32),
        (rng.standard_normal((E, H, R)) * R**-0.5).astype(np.float32),
    )
    scale_gu, scale_d = 0.5, 0.5
    x = to_bf16_bits(rng.standard_normal((T, H)))
    ids = np.stack([rng.choice(E, size=K, replace=False) for _ in range(T)]).astype(np.int64)
    weights = rng.random((T, K)).astype(np.float32)

    layer = kk.MoELayer(kk.MoEConfig(num_experts=E, top_k=K, hidden=H, intermediate=INTER))
    layer.load_weights(gate_up=gate_up, down=down)
    lora = kk.LoRA(*lora_arrays, scale_gu, scale_d)

    out = np.empty((T, H), np.float32)
    saved = layer.forward(x, ids, weights, out, lora=lora, save=True)

    grad_out = to_bf16_bits(rng.standard_normal((T, H)))
    grad_x = np.empty((T, H), np.float32)
    grad_weights = np.empty((T, K), np.float32)
    lora_grads = [np.empty_like(a) for a in lora_arrays]
    layer.backward(saved, grad_out, grad_x, grad_weights, lora_grads=kk.LoRAGrads(*lora_grads))

    ref = reference_out(
        from_bf16_bits(x),
        ids,
        weights,
        from_bf16_bits(gate_up),
        from_bf16_bits(down),
        [a.astype(np.float64) for a in lora_arrays],
        scale_gu,
        scale_d,
    )
    error = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    print(f"kt_sft_kernels {kk.__version__}, tier {kk.active_isa()}, {layer.pool.threads} threads")
    print(f"forward: out {out.shape}, relative error vs float64 NumPy {error:.2e}")
    norms = {"grad_x": grad_x, "grad_weights": grad_weights, "dA_gu": lora_grads[0], "dB_d": lora_grads[3]}
    print("backward: " + ", ".join(f"|{name}| {np.linalg.norm(a):.4g}" for name, a in norms.items()))
    finite = all(np.all(np.isfinite(a)) for a in (grad_x, grad_weights, *lora_grads))
    if error > 1e-2 or not finite:
        print("FAILED: the kernel disagrees with the NumPy reference or wrote non-finite gradients")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
