"""Importing the wheel: no ML framework pulled in, versions agree, the info report, the layout helpers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kt_sft_kernels as kk
import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "numpy_forward_backward.py"


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, check=False)


def test_import_pulls_in_neither_torch_nor_numpy() -> None:
    code = "import sys, kt_sft_kernels; print('torch' in sys.modules, 'numpy' in sys.modules)"
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


def test_numpy_forward_backward_never_imports_torch() -> None:
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(EXAMPLE)!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, f'example failed: {e.code}'\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "relative error vs float64 NumPy" in proc.stdout
    assert proc.stdout.strip().endswith("torch imported: False")


def test_versions_agree() -> None:
    assert kk.build_info()["version"] == kk.__version__
    assert all(hasattr(kk, name) for name in kk.__all__)


def test_info_report() -> None:
    proc = run_python("-m", "kt_sft_kernels")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in (
        "kt-sft-kernels " + kk.__version__,
        "compiler:",
        "amx permission:",
        "cpu flags:",
        "threads:",
    ):
        assert needle in out, needle
    for tier in kk.isa_names():
        assert f"  {tier} " in out, tier
    assert f"tier chosen: {kk.active_isa()}" in out
    assert (
        out.strip().splitlines()[-1].startswith(f"kt_sft_kernels {kk.__version__} tiers: compiled=portable")
    )


# ---- separate gate/up LoRA <-> fused form (DESIGN.md §2), checked in float64 --------------------


def test_fused_gate_up_lora_is_exactly_the_separate_pairs() -> None:
    rng = np.random.default_rng(0)
    num_experts, rank, hidden, inter, tokens = 3, 4, 16, 8, 5
    a_g, a_u = rng.standard_normal((2, num_experts, rank, hidden))
    b_g, b_u = rng.standard_normal((2, num_experts, inter, rank))
    a_gu, b_gu = kk.separate_gate_up_lora(a_g, b_g, a_u, b_u)
    assert a_gu.shape == (num_experts, 2 * rank, hidden) and b_gu.shape == (num_experts, 2 * inter, 2 * rank)
    x = rng.standard_normal((tokens, hidden))
    dgu = rng.standard_normal((tokens, 2 * inter))
    for e in range(num_experts):
        fused = (b_gu[e] @ (a_gu[e] @ x.T)).T
        np.testing.assert_allclose(fused[:, :inter], (b_g[e] @ (a_g[e] @ x.T)).T, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(fused[:, inter:], (b_u[e] @ (a_u[e] @ x.T)).T, rtol=1e-12, atol=1e-12)

        # Gradients of the fused pair (DESIGN.md §2), mapped back, equal those of the separate pairs.
        da_gu = (b_gu[e].T @ dgu.T) @ x
        db_gu = dgu.T @ (a_gu[e] @ x.T).T
        da_g, db_g, da_u, db_u = kk.split_gate_up_lora_grads(da_gu[None], db_gu[None])
        dg, du = dgu[:, :inter], dgu[:, inter:]
        np.testing.assert_allclose(da_g[0], (b_g[e].T @ dg.T) @ x, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(da_u[0], (b_u[e].T @ du.T) @ x, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(db_g[0], dg.T @ (a_g[e] @ x.T).T, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(db_u[0], du.T @ (a_u[e] @ x.T).T, rtol=1e-12, atol=1e-12)
        assert da_g.flags.c_contiguous and db_u.flags.c_contiguous


def test_layout_helpers_validate_shapes() -> None:
    a = np.zeros((2, 4, 16))
    b = np.zeros((2, 8, 4))
    with pytest.raises(ValueError, match=r"b_u: expected shape"):
        kk.separate_gate_up_lora(a, b, a, np.zeros((2, 8, 3)))
    with pytest.raises(TypeError, match=r"one dtype"):
        kk.separate_gate_up_lora(a, b, a, b.astype(np.float32))
    with pytest.raises(ValueError, match=r"da_gu: expected shape"):
        kk.split_gate_up_lora_grads(np.zeros((2, 3, 16)), np.zeros((2, 16, 3)))
    with pytest.raises(ValueError, match=r"db_gu: expected shape"):
        kk.split_gate_up_lora_grads(np.zeros((2, 4, 16)), np.zeros((2, 16, 6)))


def test_stub_names_match_the_native_module() -> None:
    """_core.pyi is hand-kept: every public name and method of the module must appear in it, and back."""
    import ast

    from kt_sft_kernels import _core

    stub = ast.parse((Path(kk.__file__).parent / "_core.pyi").read_text())
    stub_names: dict[str, set[str]] = {}
    for node in stub.body:
        if isinstance(node, ast.FunctionDef):
            stub_names[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            stub_names[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
    public = {n for n in dir(_core) if not n.startswith("_")}
    assert public == set(stub_names)
    for name, members in stub_names.items():
        if members:
            native = {m for m in vars(getattr(_core, name)) if not m.startswith("_")}
            assert native == {m for m in members if not m.startswith("_")}, name
