"""kt_sft_train.trace: one micro-batched step's merged Chrome trace and its busy / retained-bytes summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factory import batch, kernels_or_skip, randomize_lora, tiny_model
from kt_sft_train import (
    KTConfig,
    KTExperts,
    get_moe_arch_config,
    kt_lora_config,
    wrap_moe_layers_with_kt_wrapper,
)
from kt_sft_train.overlap import run_microbatches, split_batch
from kt_sft_train.trace import PIDS, StepTrace
from peft import get_peft_model


def test_step_trace_merges_threads_phases_and_kernel_stages(tmp_path: Path) -> None:
    kernels_or_skip()
    model = tiny_model("qwen3_moe", torch.bfloat16)
    wrap_moe_layers_with_kt_wrapper(model, KTConfig(backend="kernels"))
    model = get_peft_model(model, kt_lora_config(get_moe_arch_config(model), r=4))
    randomize_lora(model)
    ids = batch(batch_size=2, length=16)
    parameters = [p for p in model.parameters() if p.requires_grad]
    with StepTrace(model) as trace:
        run_microbatches(lambda mb: model(**mb).loss, split_batch({"input_ids": ids, "labels": ids}, 2),
                         parameters=parameters)  # fmt: skip
    path = tmp_path / "step.json"
    summary = trace.write(path)
    events = json.loads(path.read_text())["traceEvents"]
    layers = sum(isinstance(m, KTExperts) for m in model.modules())
    ours = [e for e in events if e.get("pid") == PIDS["kt-sft threads"] and e["ph"] == "X"]
    assert sum(e["name"].startswith("experts fwd") for e in ours) == 2 * layers
    assert sum(e["name"].startswith("experts bwd") for e in ours) == 2 * layers
    assert {e["name"] for e in ours if e["name"].startswith("micro-batch")} == {
        f"micro-batch {i} {phase}" for i in (0, 1) for phase in ("forward", "backward")
    }
    assert len({e["tid"] for e in ours if e["name"].startswith("experts bwd")}) == 2  # one per micro-batch
    stages = [e for e in events if e.get("pid") == PIDS["CPU kernel stages"] and e["ph"] == "X"]
    assert stages and all(e["ts"] >= 0 for e in stages)
    # Each kernel call's phase lies inside one experts call on the merged clock (slack: 1 ms).
    calls = [(e["ts"] - 1e3, e["ts"] + e["dur"] + 1e3) for e in ours if e["name"].startswith("experts ")]
    phases = [e for e in stages if e["name"] in ("forward", "backward")]
    assert len(phases) == 4 * layers
    assert all(any(a <= e["ts"] and e["ts"] + e["dur"] <= b for a, b in calls) for e in phases)
    assert 0 < summary["cpu_busy_s"] <= summary["step_s"]
    # 2 layers x 16 tokens of H = 64 bf16 per micro-batch at least (x alone), plus the kernel cache.
    assert summary["retained_host_bytes_per_layer_token"] > 64 * 2
    assert summary["retained_host_bytes_peak"] > 0
    assert not any(isinstance(m.layer, type(trace)) for m in model.modules() if isinstance(m, KTExperts))
    if not torch.cuda.is_available():
        assert summary["gpu_busy_s"] is None


def test_step_trace_refuses_a_model_without_kt_experts() -> None:
    with pytest.raises(ValueError, match="the model has no KTExperts"):
        StepTrace(torch.nn.Linear(2, 2)).__enter__()


def test_torch_profiler_is_aligned_by_its_anchor(tmp_path: Path) -> None:
    """The torch.profiler plumbing (CPU activity only here): its anchor event is found, so GPU-busy and
    overlap are numbers (zero without CUDA kernels), not "unaligned"."""
    kernels_or_skip()
    model = tiny_model("qwen3_moe", torch.bfloat16)
    wrap_moe_layers_with_kt_wrapper(model, KTConfig(backend="kernels"))
    ids = batch(batch_size=1, length=8)
    with StepTrace(model, torch_profiler=True) as trace:
        model(input_ids=ids, labels=ids).loss.backward()
    summary = trace.write(tmp_path / "step.json")
    assert "gpu_note" not in summary
    assert summary["gpu_busy_s"] is not None and summary["overlap_fraction"] is not None
    if not torch.cuda.is_available():
        assert summary["gpu_busy_s"] == 0.0
