"""Separate gate/up LoRA <-> the fused gate_up form the kernels run (DESIGN.md §2).

Separate adapters (A_g, B_g) and (A_u, B_u) of rank r each are exactly the fused adapter
A_gu = [A_g; A_u] (rank 2r) and B_gu = blockdiag(B_g, B_u), with the same scale. The kernel then
computes the off-diagonal blocks of dB_gu too; they belong to no parameter and are discarded.
NumPy is imported only when these helpers are called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


def _check_separate_shapes(a_g: Any, b_g: Any, a_u: Any, b_u: Any) -> tuple[int, int, int, int]:
    if a_g.ndim != 3 or b_g.ndim != 3 or a_u.ndim != 3 or b_u.ndim != 3:
        raise ValueError("a_g, b_g, a_u, b_u: expected 3-d arrays ([E,r,H], [E,I,r], [E,r,H], [E,I,r])")
    num_experts, rank, hidden = a_g.shape
    intermediate = b_g.shape[1]
    expected = {
        "a_g": (a_g, (num_experts, rank, hidden)),
        "b_g": (b_g, (num_experts, intermediate, rank)),
        "a_u": (a_u, (num_experts, rank, hidden)),
        "b_u": (b_u, (num_experts, intermediate, rank)),
    }
    for name, (array, shape) in expected.items():
        if tuple(array.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(array.shape)}")
    dtypes = {str(a.dtype) for a in (a_g, b_g, a_u, b_u)}
    if len(dtypes) != 1:
        raise TypeError(f"a_g, b_g, a_u, b_u: expected one dtype, got {sorted(dtypes)}")
    return num_experts, rank, hidden, intermediate


def separate_gate_up_lora(a_g: Any, b_g: Any, a_u: Any, b_u: Any) -> tuple[np.ndarray, np.ndarray]:
    """Fuse separate gate/up LoRA pairs: returns (a_gu [E,2r,H], b_gu [E,2I,2r]) as new NumPy arrays.

    a_g, a_u: [E, r, H]; b_g, b_u: [E, I, r]; one dtype (float32, or bf16 as ml_dtypes/uint16 bits).
    Use the same scale (alpha / r of the separate adapters) for the fused pair.
    """
    import numpy as np

    a_g, b_g, a_u, b_u = (np.asarray(a) for a in (a_g, b_g, a_u, b_u))
    num_experts, rank, _, intermediate = _check_separate_shapes(a_g, b_g, a_u, b_u)
    a_gu = np.concatenate([a_g, a_u], axis=1)
    b_gu = np.zeros((num_experts, 2 * intermediate, 2 * rank), dtype=b_g.dtype)
    b_gu[:, :intermediate, :rank] = b_g
    b_gu[:, intermediate:, rank:] = b_u
    return np.ascontiguousarray(a_gu), b_gu


def split_gate_up_lora_grads(da_gu: Any, db_gu: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Map fused gradients back to the separate pairs: returns (da_g, db_g, da_u, db_u).

    da_gu: [E, 2r, H] -> da_g = rows :r, da_u = rows r:. db_gu: [E, 2I, 2r] -> its diagonal blocks
    db_g = [:, :I, :r] and db_u = [:, I:, r:]; the off-diagonal blocks are discarded. The returned
    arrays are contiguous copies.
    """
    import numpy as np

    da_gu, db_gu = np.asarray(da_gu), np.asarray(db_gu)
    if da_gu.ndim != 3 or da_gu.shape[1] % 2:
        raise ValueError(f"da_gu: expected shape (E, 2r, H) with an even 2r, got {tuple(da_gu.shape)}")
    num_experts, fused_rank = da_gu.shape[:2]
    if db_gu.ndim != 3 or db_gu.shape[0] != num_experts or db_gu.shape[2] != fused_rank or db_gu.shape[1] % 2:
        raise ValueError(
            f"db_gu: expected shape ({num_experts}, 2I, {fused_rank}) with an even 2I, "
            f"got {tuple(db_gu.shape)}"
        )
    rank, intermediate = fused_rank // 2, db_gu.shape[1] // 2
    parts = (
        da_gu[:, :rank],
        db_gu[:, :intermediate, :rank],
        da_gu[:, rank:],
        db_gu[:, intermediate:, rank:],
    )
    da_g, db_g, da_u, db_u = (np.ascontiguousarray(p) for p in parts)
    return da_g, db_g, da_u, db_u
