"""Tests of the training wheel: unit/, numerics/ (vs the float64 reference and plain HF + PEFT),
integration/ (PEFT, loading, adapter files), e2e/ (the CLI, examples, the e2e benchmark).

This file puts tests/ on sys.path (pytest's rootdir-less import mode), so every test imports the one
tiny-model factory as `from factory import ...`.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never read or write the working directory: whatever a user (or the main job, which writes
    # ./kt-sft-output) left there cannot change an outcome, and a test writing a relative path cannot
    # litter the checkout.
    monkeypatch.chdir(tmp_path)
