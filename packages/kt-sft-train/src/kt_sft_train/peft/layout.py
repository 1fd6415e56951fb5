"""The one decoder of PEFT's expert-LoRA layout for a 3-D parameter (DESIGN.md §4.4).

PEFT layout of a 3-D parameter with E experts and rank r (peft 0.21, ParamWrapper.get_delta_weight):
lora_A.weight [r*E, in] is expert-major (row e*r + i), lora_B.weight [out, r*E] is rank-major
(column i*E + e), and ΔW[e] = scaling * B_e @ A_e with B_e [out, r], A_e [r, in]. For gate_up_proj
[E, 2I, H]: in = H, out = 2I; for down_proj [E, H, I]: in = I, out = H. The vanilla-PEFT round-trip
tests are the judge of this order.
"""

from __future__ import annotations

import torch


def per_expert_factors(
    lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (lora_A [r*E, in], lora_B [out, r*E]) as views A [E, r, in] and B [E, out, r].

    Views, so differentiable and free; call .contiguous() where a kernel needs dense storage.
    """
    rows, in_features = lora_a.shape
    out_features, columns = lora_b.shape
    if rows % num_experts or rows != columns:
        raise ValueError(
            f"expert LoRA with {num_experts} experts: lora_A {tuple(lora_a.shape)} and lora_B "
            f"{tuple(lora_b.shape)} are not [r*E, in] and [out, r*E]"
        )
    rank = rows // num_experts
    a = lora_a.reshape(num_experts, rank, in_features)
    b = lora_b.reshape(out_features, rank, num_experts).permute(2, 0, 1)
    return a, b
