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
