"""Micro-batch overlap (kt_sft_train.overlap): results vs plain HF + PEFT, on vs off, and the threads the
CPU experts backward runs on. Kernel backend (skipped only where kt_sft_kernels is not installed)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from factory import (
    batch,
    copy_lora,
    deep_copy,
    kernels_or_skip,
    randomize_lora,
    rel_error,
    tiny_model,
    trainable_grads,
    unfreeze_routers,
)
from kt_sft_train import (
    KTConfig,
    KTExperts,
    get_moe_arch_config,
    kt_lora_config,
    wrap_moe_layers_with_kt_wrapper,
)
from kt_sft_train.overlap import label_tokens, run_microbatches, split_batch
from peft import get_peft_model

pytestmark = pytest.mark.usefixtures("_kernels")

CHECKPOINTING = {"none": None, "reentrant": True, "non_reentrant": False}
# On a GPU host the dense part runs on the GPU (the experts stay on the CPU kernels): that is where the
# engine's device thread and the per-thread CUDA streams come into play.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
]


@pytest.fixture
def _kernels() -> None:
    kernels_or_skip()


def _kt_model(base: torch.nn.Module, policy: str = "retain") -> torch.nn.Module:
    model = deep_copy(base)
    wrap_moe_layers_with_kt_wrapper(model, KTConfig(backend="kernels", activation_policy=policy))
    peft_model = get_peft_model(model, kt_lora_config(get_moe_arch_config(base), r=4))
    unfreeze_routers(peft_model)
    return peft_model


def _checkpointing(model: torch.nn.Module, mode: str) -> None:
    use_reentrant = CHECKPOINTING[mode]
    if use_reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def _microbatch_step(model: torch.nn.Module, ids: torch.Tensor, parts: int, concurrent: bool) -> torch.Tensor:
    """One step's loss through run_microbatches; the gradients land in .grad."""
    microbatches = split_batch({"input_ids": ids, "labels": ids}, parts)
    total = sum(label_tokens(mb) for mb in microbatches)
    return run_microbatches(
        lambda mb: model(**mb).loss,
        microbatches,
        parameters=[p for p in model.parameters() if p.requires_grad],
        weights=[label_tokens(mb) / total for mb in microbatches],
        concurrent=concurrent,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("checkpointing", sorted(CHECKPOINTING))
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no_overlap"])
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_whole_model_microbatches_vs_hf_peft_bf16(
    family: str, overlap: bool, checkpointing: str, device: str
) -> None:
    """Loss, every gradient and one optimizer step vs plain HF + PEFT on the whole batch (DESIGN §7)."""
    base = tiny_model(family, torch.bfloat16)
    hf = get_peft_model(deep_copy(base), kt_lora_config(get_moe_arch_config(base), r=4))
    randomize_lora(hf)
    unfreeze_routers(hf)
    kt = _kt_model(base)
    copy_lora(hf, kt)
    _checkpointing(kt, checkpointing)
    for model in (hf, kt):
        model.to(device)  # KTExperts keep their experts and expert LoRA on the CPU
    ids = batch(batch_size=2, length=16).to(device)

    hf_loss = hf(input_ids=ids, labels=ids).loss
    hf_loss.backward()
    kt_loss = _microbatch_step(kt, ids, 2, overlap)
    assert abs(kt_loss.item() - hf_loss.item()) <= 1e-2 * abs(hf_loss.item())
    hf_grads, kt_grads = trainable_grads(hf), trainable_grads(kt)
    assert hf_grads.keys() == kt_grads.keys()
    assert any(".experts." in name for name in kt_grads)
    for name, expected in hf_grads.items():
        assert expected is not None and expected.float().norm() > 0, name
        assert rel_error(kt_grads[name], expected) <= 5e-2, name

    next_losses = []
    for model in (hf, kt):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        optimizer.step()
        with torch.no_grad():
            next_losses.append(model(input_ids=ids, labels=ids).loss.item())
    assert next_losses[0] != hf_loss.item()
    assert abs(next_losses[1] - next_losses[0]) <= 1e-2 * abs(next_losses[0])


@pytest.mark.parametrize("checkpointing", sorted(CHECKPOINTING))
@pytest.mark.parametrize("parts", [2, 3, 4])
def test_overlap_on_equals_off_bitwise(parts: int, checkpointing: str) -> None:
    base = tiny_model("qwen3_moe", torch.bfloat16)
    models = [_kt_model(base) for _ in range(2)]
    randomize_lora(models[0])
    copy_lora(models[0], models[1])
    for model in models:
        _checkpointing(model, checkpointing)
    ids = batch(batch_size=parts, length=16)
    losses = [
        _microbatch_step(model, ids, parts, concurrent)
        for model, concurrent in zip(models, (True, False), strict=True)
    ]
    assert torch.equal(losses[0], losses[1])
    on, off = trainable_grads(models[0]), trainable_grads(models[1])
    for name, grad in off.items():
        assert grad is not None and grad.float().norm() > 0, name
        assert torch.equal(on[name], grad), name


def test_gradients_add_to_existing_grad() -> None:
    """Like loss.backward(): run_microbatches accumulates into .grad that is already set."""
    base = tiny_model("qwen3_moe", torch.bfloat16)
    model = _kt_model(base)
    randomize_lora(model)
    ids = batch(batch_size=2, length=16)
    _microbatch_step(model, ids, 2, True)
    once = trainable_grads(model)
    _microbatch_step(model, ids, 2, True)
    twice = trainable_grads(model)
    for name, grad in once.items():
        assert torch.equal(twice[name], grad + grad), name


class _ThreadRecorder:
    """Wraps every KTExperts layer: the thread of each forward(save) and of the backward of its handle."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.lock = threading.Lock()
        self.forward_thread: dict[int, int] = {}
        self.backward_threads: list[tuple[int, int]] = []  # (forward thread, backward thread)
        for module in model.modules():
            if isinstance(module, KTExperts):
                self._wrap(module.layer)

    def _wrap(self, layer: Any) -> None:
        forward, backward = layer.forward, layer.backward

        def recorded_forward(x, ids, weights, lora, save):  # type: ignore[no-untyped-def]
            out, handle = forward(x, ids, weights, lora, save)
            if handle is not None:
                with self.lock:
                    self.forward_thread[id(handle)] = threading.get_ident()
            return out, handle

        def recorded_backward(handle, grad_out):  # type: ignore[no-untyped-def]
            with self.lock:
                self.backward_threads.append((self.forward_thread.pop(id(handle)), threading.get_ident()))
            return backward(handle, grad_out)

        layer.forward, layer.backward = recorded_forward, recorded_backward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("checkpointing", ["none", "non_reentrant"])
def test_experts_backward_runs_on_each_microbatch_thread(checkpointing: str, device: str) -> None:
    """On CUDA this is the engine claim of kt_sft_train.overlap: the experts node has host gradients, so
    its backward runs on the thread that called backward, not on the shared CUDA device thread."""
    base = tiny_model("qwen3_moe", torch.bfloat16)
    model = _kt_model(base)
    randomize_lora(model)
    _checkpointing(model, checkpointing)
    model.to(device)
    recorder = _ThreadRecorder(model)
    step_threads: set[int] = set()

    def step(mb: dict[str, torch.Tensor]) -> torch.Tensor:
        step_threads.add(threading.get_ident())
        return model(**mb).loss

    ids = batch(batch_size=2, length=16).to(device)
    microbatches = split_batch({"input_ids": ids, "labels": ids}, 2)
    run_microbatches(step, microbatches, parameters=[p for p in model.parameters() if p.requires_grad])
    layers = sum(isinstance(m, KTExperts) for m in model.modules())
    assert len(step_threads) == 2 and threading.get_ident() not in step_threads
    assert len(recorder.backward_threads) == 2 * layers
    for forward_thread, backward_thread in recorder.backward_threads:
        assert forward_thread in step_threads
        assert backward_thread == forward_thread
    assert not recorder.forward_thread  # every saved forward was consumed by a backward


def test_microbatch_arguments_are_checked() -> None:
    ids = batch(batch_size=2, length=8)
    with pytest.raises(ValueError, match="cannot split a batch of 2 rows into 3"):
        split_batch({"input_ids": ids}, 3)
    with pytest.raises(ValueError, match="parts must be a positive integer"):
        split_batch({"input_ids": ids}, 0)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        split_batch({"input_ids": ids, "labels": ids[:1]}, 2)
    param = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="weights has 1 entries for 2 micro-batches"):
        run_microbatches(lambda mb: param.sum(), [1, 2], parameters=[param], weights=[1.0])
    with pytest.raises(ValueError, match="microbatches must not be empty"):
        run_microbatches(lambda mb: param.sum(), [], parameters=[param])


def test_an_error_in_a_microbatch_thread_is_raised() -> None:
    param = torch.ones(2, requires_grad=True)

    def step(mb: int) -> torch.Tensor:
        if mb == 1:
            raise KeyError("micro-batch 1 failed")
        return (param * mb).sum()

    with pytest.raises(KeyError, match="micro-batch 1 failed"):
        run_microbatches(step, [0, 1], parameters=[param])
    assert param.grad is None
