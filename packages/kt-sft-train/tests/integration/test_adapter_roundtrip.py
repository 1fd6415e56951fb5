"""The adapter a KT model saves is a standard PEFT adapter (DESIGN.md §4.4, §6 layer 3).

A KT model (loaded with load_kt_model, experts on the CPU) gets expert + attention LoRA, random nonzero
factors and one AdamW step, and saves its adapter. A separate Python process in which kt_sft_train and
kt_sft_kernels cannot be imported (checked there) loads the base checkpoint with plain transformers,
applies the adapter with `PeftModel.from_pretrained`, and must reproduce the KT model's logits; so must
`merge_and_unload()`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from factory import batch, kernels_or_skip, randomize_lora, tiny_model
from kt_sft_train import KTConfig, kt_lora_config
from kt_sft_train.model import load_kt_model
from peft import get_peft_model

# The child runs with `python -I` (no PYTHONPATH, no user site) and a meta-path finder that refuses
# kt_sft_train / kt_sft_kernels, so an editable install cannot leak in either.
VANILLA_CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = ("kt_sft_train", "kt_sft_kernels")

    class RefuseKtSft(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"{name} is blocked in the vanilla process", name=name)
            return None

    sys.meta_path.insert(0, RefuseKtSft())
    importable = []
    for name in BLOCKED:
        try:
            __import__(name)
            importable.append(name)
        except ImportError:
            pass

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir, expected_path, dtype_name, experts_impl = sys.argv[1:6]
    dtype = getattr(torch, dtype_name)
    expected = torch.load(expected_path, weights_only=True)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, experts_implementation=experts_impl)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    lora_modules = sum(".lora_A." in n for n, _ in model.named_parameters())

    def rel(actual):
        actual = actual.double()
        return float((actual - expected["logits"]).norm() / expected["logits"].norm())

    with torch.no_grad():
        peft_error = rel(model(input_ids=expected["input_ids"]).logits)
        merged = model.merge_and_unload().eval()
        merged_error = rel(merged(input_ids=expected["input_ids"]).logits)
    print(json.dumps({
        "importable": importable,
        "leaked": sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED),
        "peft_error": peft_error,
        "merged_error": merged_error,
        "lora_modules": lora_modules,
        "merged_is_plain": type(merged).__name__,
    }))
    """
)


def run_vanilla(base: Path, adapter: Path, expected: Path, dtype: torch.dtype, experts_impl: str) -> dict:
    dtype_name = str(dtype).removeprefix("torch.")
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            VANILLA_CHILD,
            str(base),
            str(adapter),
            str(expected),
            dtype_name,
            experts_impl,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# (backend, model dtype, HF experts implementation in the vanilla process, tolerance on logits)
# reference: float64 end to end, DESIGN.md §7's 1e-6 for reference vs HF+PEFT.
# kernels: bf16 kernel arithmetic under a float32 model; §7's whole-model bound (1e-2 relative).
CASES = {
    "reference": (torch.float64, "eager", 1e-6),
    "kernels": (torch.float32, "grouped_mm", 1e-2),
}


@pytest.mark.parametrize("backend", sorted(CASES))
def test_saved_adapter_loads_in_vanilla_peft_with_the_same_logits(tmp_path: Path, backend: str) -> None:
    if backend == "kernels":
        kernels_or_skip()
    dtype, experts_impl, tolerance = CASES[backend]
    base_dir, adapter_dir, expected_path = tmp_path / "base", tmp_path / "adapter", tmp_path / "expected.pt"
    # bf16 base weights: the values the kernels see are exactly the ones vanilla transformers loads.
    tiny_model("qwen3_moe", dtype=torch.float32, seed=11).to(torch.bfloat16).save_pretrained(base_dir)

    model = load_kt_model(base_dir, kt=KTConfig(backend=backend), dtype=dtype)
    peft_model = get_peft_model(model, kt_lora_config(model, r=4, target_modules="attention"))
    randomize_lora(peft_model, seed=12)
    lora_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".experts." in n for n in lora_before) and any("self_attn" in n for n in lora_before)

    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    device = peft_model.get_input_embeddings().weight.device  # a GPU where there is one
    input_ids = batch(seed=13).to(device)
    peft_model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    changed = [
        n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])
    ]
    assert len(changed) == len(lora_before), "every LoRA factor must have been trained"

    peft_model.eval()
    eval_ids = batch(seed=14)
    with torch.no_grad():
        logits = peft_model(input_ids=eval_ids.to(device)).logits.double().cpu()
    assert torch.isfinite(logits).all()
    torch.save({"input_ids": eval_ids, "logits": logits}, expected_path)
    peft_model.save_pretrained(adapter_dir)

    report = run_vanilla(base_dir, adapter_dir, expected_path, dtype, experts_impl)
    assert report["importable"] == [], "kt-sft must not be importable in the vanilla process"
    assert report["leaked"] == []
    assert report["lora_modules"] > 0
    assert report["merged_is_plain"] == "Qwen3MoeForCausalLM"
    assert report["peft_error"] <= tolerance, report
    assert report["merged_error"] <= tolerance, report
