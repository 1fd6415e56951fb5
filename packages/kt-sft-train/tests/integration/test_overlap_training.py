"""The training loop's micro-batch overlap (--overlap N): the same loss and gradients as one batch, with
padding (unequal label-token counts per micro-batch) and gradient accumulation."""

from __future__ import annotations

import pytest
import torch
from factory import batch, randomize_lora, rel_error, tiny_model, trainable_grads
from kt_sft_train import KTConfig, get_moe_arch_config, kt_lora_config, wrap_moe_layers_with_kt_wrapper
from kt_sft_train.app.options import TrainOptions
from kt_sft_train.app.training import _forward_backward
from peft import get_peft_model


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("parts", [2, 3])
def test_overlapped_step_equals_whole_batch(parts: int, grad_accum: int) -> None:
    base = tiny_model("qwen3_moe", torch.float32)
    wrap_moe_layers_with_kt_wrapper(base, KTConfig(backend="reference"))
    model = get_peft_model(base, kt_lora_config(get_moe_arch_config(base), r=4))
    randomize_lora(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    ids = batch(batch_size=3, length=12)
    labels = ids.clone()
    labels[0, 7:] = -100  # padding: the rows hold 6, 11 and 9 label tokens
    labels[2, :3] = -100
    mask = (labels != -100).long()
    data = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(mask)}

    results = []
    for overlap in (1, parts):
        model.zero_grad(set_to_none=True)
        options = TrainOptions(overlap_microbatches=overlap, grad_accum=grad_accum)
        loss = _forward_backward(model, data, parameters, options)
        results.append((loss, trainable_grads(model)))
    (whole_loss, whole), (split_loss, split) = results
    assert abs(split_loss.item() - whole_loss.item()) <= 1e-6 * abs(whole_loss.item())
    for name, grad in whole.items():
        assert grad is not None and grad.norm() > 0, name
        assert rel_error(split[name], grad) <= 1e-5, name
