"""Shared pytest setup of the kernel wheel's suites (NumPy + ml_dtypes only)."""

from __future__ import annotations

import os

import kt_sft_kernels as kk
from kt_sft_kernels.__main__ import tier_summary


def pytest_report_header() -> str:
    """Every run names the tiers it could exercise (the AMX machine runs plain pytest, not nox).

    Creates no thread pool: the header must not be what fails on an unusual host."""
    threads = os.environ.get("KT_SFT_NUM_THREADS") or f"{kk.physical_cores()} (physical cores)"
    return f"{tier_summary()}; default pool threads: {threads}"
