"""The C++ tier-vs-portable check of every KernelTable entry (tests/cpp/simd_tiers_test.cpp).

On a CPU with AVX-512 BF16 it runs the tiers natively; elsewhere the AVX-512 tiers run through SIMDe
(libsimde-dev, CMake option KT_SFT_ISA_EMULATION), which is how a CI machine without AVX-512 still
executes their code. Skipped when neither cmake + a C++ compiler nor (for emulation) the SIMDe headers
are present.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import kt_sft_kernels as kk
import pytest
from _cmake_build import build_cpp_tests, have_cmake, have_simde


def test_simd_tiers_match_portable_in_cpp(tmp_path: Path) -> None:
    if not have_cmake():
        pytest.skip("no cmake or g++")
    if kk.isa_supported("avx512_bf16"):
        emulated = False
    elif have_simde():
        emulated = True
    else:
        pytest.skip("no AVX-512 BF16 CPU and no SIMDe headers (apt-get install libsimde-dev)")
    build = build_cpp_tests(tmp_path, ["simd_tiers_test"], emulated=emulated)
    assert build.returncode == 0, build.stdout[-8000:]
    run = subprocess.run(
        [str(tmp_path / "simd_tiers_test")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    print(run.stdout[-2000:])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "simd tiers vs portable: 0 failed checks" in run.stdout
