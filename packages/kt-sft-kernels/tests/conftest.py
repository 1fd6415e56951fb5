"""Shared pytest setup of the kernel wheel's suites (NumPy + ml_dtypes only)."""

from __future__ import annotations

import kt_sft_kernels as kk
from kt_sft_kernels.__main__ import tier_summary


def pytest_report_header() -> str:
    """Every run names the tiers it could exercise (the AMX machine runs plain pytest, not nox)."""
    return f"{tier_summary()}; default pool {kk.default_pool().threads} threads"
