"""PEFT integration: no W + ΔW, host-resident expert LoRA and placeholders, adapters in PEFT's format."""

from __future__ import annotations

import json

import pytest
import torch
from factory import batch, copy_lora, deep_copy, randomize_lora, tiny_model, trainable_grads
from kt_sft_train import (
    KTConfig,
    KTExperts,
    get_moe_arch_config,
    kt_lora_config,
    take_over_peft_wrappers,
    wrap_moe_layers_with_kt_wrapper,
)
from peft import get_peft_model
from peft.tuners.lora import layer as lora_layer
from safetensors.torch import load_file


def _kt_peft(family: str = "qwen3_moe", dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    base = tiny_model(family, dtype)
    arch = get_moe_arch_config(base)
    wrap_moe_layers_with_kt_wrapper(base, KTConfig(backend="reference"))
    model = get_peft_model(base, kt_lora_config(arch, r=4))
    randomize_lora(model)
    return model, arch


def _expert_lora_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".experts." in n and "lora_" in n}


def _placeholders(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t for m in model.modules() if isinstance(m, KTExperts) for t in (m.gate_up_proj, m.down_proj)]


def test_peft_never_materializes_the_expert_delta(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = _kt_peft()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("PEFT materialized W + ΔW for the CPU experts")

    for name in ("get_delta_weight", "get_delta_factors", "_activate_lora"):
        monkeypatch.setattr(lora_layer.ParamWrapper, name, refuse)
    ids = batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = _expert_lora_params(model)
    assert len(grads) == 8 and all(p.grad is not None and p.grad.norm() > 0 for p in grads.values())


def test_the_patch_above_would_catch_plain_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    # Guards the test above: on a plain HF model the same patch fires.
    base = tiny_model("qwen3_moe", torch.float32)
    model = get_peft_model(base, kt_lora_config(base, r=4))
    calls = []
    original = lora_layer.ParamWrapper._activate_lora

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(self.parameter_name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(lora_layer.ParamWrapper, "_activate_lora", spy)
    ids = batch()
    model(input_ids=ids, labels=ids)
    assert calls


def test_device_and_dtype_moves_leave_expert_lora_and_placeholders() -> None:
    model, _ = _kt_peft()
    lora = _expert_lora_params(model)
    before = {n: (p.data_ptr(), p.dtype, p.device, p.detach().clone()) for n, p in lora.items()}
    placeholders = _placeholders(model)
    assert placeholders and all(t.untyped_storage().nbytes() <= t.element_size() for t in placeholders)
    attention = next(p for n, p in model.named_parameters() if "q_proj.lora_A" in n)

    model.to(torch.float64)
    assert attention.dtype == torch.float64  # the rest of the model did move
    model.half()
    model.to("meta")
    assert next(p for n, p in model.named_parameters() if "q_proj.lora_A" in n).device.type == "meta"

    for name, param in _expert_lora_params(model).items():
        ptr, dtype, device, value = before[name]
        assert (param.data_ptr(), param.dtype, param.device) == (ptr, dtype, device), name
        assert torch.equal(param.detach(), value), name
    for tensor in _placeholders(model):
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32
        assert tensor.untyped_storage().nbytes() <= tensor.element_size()


def test_accelerate_prepare_leaves_expert_lora_on_the_host() -> None:
    from accelerate import Accelerator

    model, _ = _kt_peft()
    lora = {n: (p.data_ptr(), p.dtype) for n, p in _expert_lora_params(model).items()}
    prepared = Accelerator(cpu=True).prepare(model)
    for name, param in _expert_lora_params(prepared).items():
        assert (param.data_ptr(), param.dtype) == lora[name] and param.device.type == "cpu", name
    assert all(t.untyped_storage().nbytes() <= t.element_size() for t in _placeholders(prepared))
    ids = batch()
    prepared(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in _expert_lora_params(prepared).values())


def test_save_pretrained_writes_the_same_adapter_as_plain_peft(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = tiny_model("deepseek_v3", torch.float32)
    arch = get_moe_arch_config(base)
    plain = get_peft_model(deep_copy(base), kt_lora_config(arch, r=4))
    randomize_lora(plain)
    wrap_moe_layers_with_kt_wrapper(base, KTConfig(backend="reference"))
    kt = get_peft_model(base, kt_lora_config(arch, r=4))
    copy_lora(plain, kt)
    plain.save_pretrained(tmp_path / "plain")
    kt.save_pretrained(tmp_path / "kt")
    plain_tensors = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    kt_tensors = load_file(tmp_path / "kt" / "adapter_model.safetensors")
    assert plain_tensors.keys() == kt_tensors.keys()
    assert any(".experts." in k for k in kt_tensors)
    for key, value in plain_tensors.items():
        assert torch.equal(kt_tensors[key], value), key
    config = json.loads((tmp_path / "kt" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(arch.lora_target_parameters)
    assert config == json.loads((tmp_path / "plain" / "adapter_config.json").read_text())


def test_merge_refuses_clearly_and_unload_drops_the_lora() -> None:
    model, _ = _kt_peft()
    with pytest.raises(NotImplementedError, match="not implemented yet"):
        model.merge_and_unload()


def test_several_active_adapters_on_experts_are_refused() -> None:
    model, arch = _kt_peft()
    model.add_adapter("second", kt_lora_config(arch, r=2))
    model.base_model.set_adapter(["default", "second"])
    ids = batch()
    with pytest.raises(NotImplementedError, match="not implemented yet"):
        model(input_ids=ids)


def test_take_over_is_idempotent_and_counts_experts() -> None:
    model, arch = _kt_peft()
    assert take_over_peft_wrappers(model) == len(arch.layers)
    assert take_over_peft_wrappers(model) == len(arch.layers)


def test_parametrized_experts_raise_instead_of_ignoring_lora() -> None:
    experts = next(m for m in _kt_peft()[0].modules() if isinstance(m, KTExperts))

    class Shift(torch.nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight + 1

    torch.nn.utils.parametrize.register_parametrization(experts, "down_proj", Shift(), unsafe=True)
    x = torch.randn(3, experts.hidden_dim)
    ids = torch.zeros(3, experts.top_k, dtype=torch.long)
    with pytest.raises(RuntimeError, match="parametrized"):
        experts(x, ids, torch.ones(3, experts.top_k))


def test_lora_config_helper() -> None:
    base = tiny_model("deepseek_v3", torch.float32)
    config = kt_lora_config(base, r=8)
    assert config.r == 8 and config.lora_alpha == 16
    assert kt_lora_config(base, r=8, alpha=4).lora_alpha == 4
    assert sorted(config.target_parameters) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    leaves = {name.rpartition(".")[2] for name in config.target_modules}
    assert leaves == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    assert all(name.startswith("model.layers.") and ".self_attn." in name for name in config.target_modules)
    assert not any("expert" in name or "gate" in name for name in config.target_modules)
    with pytest.raises(ValueError, match="lora_dropout"):
        kt_lora_config(base, lora_dropout=0.05)
    assert kt_lora_config(base, lora_dropout=0.05, experts=False).target_parameters is None
    with pytest.raises(ValueError, match="nothing to train"):
        kt_lora_config(base, experts=False, target_modules=None)
    rs = kt_lora_config(base, r=4, lora_alpha=8, use_rslora=True)
    wrapped = get_peft_model(base, rs)
    wrapper = next(m for n, m in wrapped.named_modules() if n.endswith("mlp.experts"))
    assert wrapper.scaling["default"] == pytest.approx(8 / 2)


def test_rslora_scaling_reaches_the_experts() -> None:
    base = tiny_model("olmoe", torch.float64)
    arch = get_moe_arch_config(base)
    plain = get_peft_model(deep_copy(base), kt_lora_config(arch, r=4, lora_alpha=3, use_rslora=True))
    randomize_lora(plain)
    wrap_moe_layers_with_kt_wrapper(base, KTConfig(backend="reference"))
    kt = get_peft_model(base, kt_lora_config(arch, r=4, lora_alpha=3, use_rslora=True))
    copy_lora(plain, kt)
    ids = batch()
    plain(input_ids=ids, labels=ids).loss.backward()
    kt(input_ids=ids, labels=ids).loss.backward()
    expected, actual = trainable_grads(plain), trainable_grads(kt)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-9)


def test_adapter_reloads_onto_a_kt_model_with_peft_from_pretrained(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kt_sft_train.peft import is_taken_over
    from peft import PeftModel

    base = tiny_model("glm4_moe", torch.float32)
    fresh = deep_copy(base)
    arch = get_moe_arch_config(base)
    wrap_moe_layers_with_kt_wrapper(base, KTConfig(backend="reference"))
    trained = get_peft_model(base, kt_lora_config(arch, r=4))
    randomize_lora(trained)
    trained.save_pretrained(tmp_path)

    wrap_moe_layers_with_kt_wrapper(fresh, KTConfig(backend="reference"))
    reloaded = PeftModel.from_pretrained(fresh, tmp_path, is_trainable=True)
    wrappers = [m for m in reloaded.modules() if type(m).__name__ == "ParamWrapper"]
    assert wrappers and all(is_taken_over(w) for w in wrappers)
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)
    reloaded(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in _expert_lora_params(reloaded).values())
