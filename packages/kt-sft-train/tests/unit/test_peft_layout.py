"""kt_sft_train.peft.layout: the one decoder of PEFT's 3-D expert-LoRA layout (DESIGN.md §4.4).

The end-to-end judges are the vanilla-PEFT round trips (integration/); here the decoder is checked against
PEFT's own description of the layout: lora_A rows expert-major (e*r + i), lora_B columns rank-major (i*E + e).
"""

from __future__ import annotations

import pytest
import torch
from kt_sft_train.peft.layout import per_expert_factors


def test_decoder_follows_pefts_index_order() -> None:
    experts, rank, in_features, out_features = 3, 2, 5, 4
    generator = torch.Generator().manual_seed(0)
    lora_a = torch.randn(rank * experts, in_features, generator=generator)
    lora_b = torch.randn(out_features, rank * experts, generator=generator)
    a, b = per_expert_factors(lora_a, lora_b, experts)
    assert a.shape == (experts, rank, in_features) and b.shape == (experts, out_features, rank)
    for e in range(experts):
        for i in range(rank):
            assert torch.equal(a[e, i], lora_a[e * rank + i])
            assert torch.equal(b[e, :, i], lora_b[:, i * experts + e])


def test_decoder_is_differentiable_and_refuses_bad_shapes() -> None:
    lora_a = torch.randn(6, 5, requires_grad=True)
    lora_b = torch.randn(4, 6, requires_grad=True)
    a, b = per_expert_factors(lora_a, lora_b, 3)
    (a.sum() + 2 * b.sum()).backward()
    assert torch.equal(lora_a.grad, torch.ones(6, 5)) and torch.equal(lora_b.grad, torch.full((4, 6), 2.0))
    with pytest.raises(ValueError, match=r"4 experts: lora_A \(6, 5\) and lora_B \(4, 6\)"):
        per_expert_factors(lora_a, lora_b, 4)
    with pytest.raises(ValueError, match=r"lora_B \(4, 8\)"):
        per_expert_factors(lora_a, torch.randn(4, 8), 3)
