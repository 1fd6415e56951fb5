"""_kernels.py is the one door to kt_sft_kernels: version check, clear errors, nobody else imports it."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
from kt_sft_train import KTConfig, KTExperts, _kernels

SOURCE = Path(_kernels.__file__).parent


def test_only_the_kernels_module_imports_the_kernel_wheel() -> None:
    pattern = re.compile(r"^\s*(import|from)\s+kt_sft_kernels\b|import_module\(\s*['\"]kt_sft_kernels", re.M)
    offenders = [
        p.name for p in SOURCE.rglob("*.py") if p.name != "_kernels.py" and pattern.search(p.read_text())
    ]
    assert offenders == []
    assert pattern.search((SOURCE / "_kernels.py").read_text().replace("KERNELS_MODULE", '"kt_sft_kernels"'))


def test_incompatible_kernel_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("kt_sft_kernels")
    fake.__version__ = "9.0.0"
    monkeypatch.setattr(_kernels, "_module", None)
    monkeypatch.setattr(_kernels.importlib, "import_module", lambda name: fake)
    with pytest.raises(ImportError, match=r"kt_sft_kernels 9\.0\.0 is not compatible"):
        _kernels.load_kernels()
    assert not _kernels.kernels_available()


def test_missing_kernels_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(_kernels, "_module", None)
    monkeypatch.setattr(_kernels.importlib, "import_module", missing)
    with pytest.raises(ImportError, match=r"backend='reference'"):
        KTExperts(
            num_experts=4, top_k=2, hidden_size=32, intermediate_size=32, kt=KTConfig(backend="kernels")
        )


def test_bad_lora_dtypes_get_the_kernel_layers_one_clear_error() -> None:
    # The kernel layer is the one validator of the LoRA factors; its errors name the factor.
    import torch
    from factory import kernels_or_skip
    from kt_sft_train.reference import ExpertLoRA

    kernels_or_skip()
    experts, rank = KTExperts(num_experts=4, top_k=2, hidden_size=64, intermediate_size=32), 4
    generator = torch.Generator().manual_seed(0)
    experts.load_expert_weights(
        torch.randn(4, 64, 64, generator=generator), torch.randn(4, 64, 32, generator=generator)
    )
    x = torch.randn(5, 64, generator=generator)
    ids = torch.randint(0, 4, (5, 2), generator=generator)
    weights = torch.rand(5, 2, generator=generator)

    def lora(a_gu_dtype: torch.dtype) -> ExpertLoRA:
        return ExpertLoRA(
            torch.randn(4, rank, 64, generator=generator, dtype=a_gu_dtype),
            torch.randn(4, 64, rank, generator=generator),
            torch.randn(4, rank, 32, generator=generator),
            torch.randn(4, 64, rank, generator=generator),
            2.0,
            2.0,
        )

    with pytest.raises(TypeError, match=r"a_gu: expected dtype .*float32, got float64"):
        experts.run(x, ids, weights, lora(torch.float64))
    with pytest.raises(TypeError, match=r"b_gu: dtype float32 differs from a_gu's bfloat16"):
        experts.run(x, ids, weights, lora(torch.bfloat16))
    assert torch.isfinite(experts.run(x, ids, weights, lora(torch.float32))).all()
