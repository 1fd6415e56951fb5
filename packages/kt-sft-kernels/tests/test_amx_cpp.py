"""The amx tier's C++ correctness test (tests/cpp/amx_kernels_test.cpp) under pytest.

Built through CMake (KT_SFT_BUILD_CPP_TESTS). On a CPU whose amx tier runs, it is built with the wheel's
amx flags and runs the real AMX and AVX-512 instructions; elsewhere the same test is built with
KT_SFT_ISA_EMULATION (any x86-64): the tile operations (TDPBF16PS, TDPBSSD) and VDPBF16PS come from
portable C++, every other AVX-512 intrinsic from SIMDe (layouts, tiling, tails, the int8 digits and
determinism are checked; real rounding and speed are not). Skipped without cmake/g++, off x86-64, or,
for the emulated build, without the SIMDe headers.
"""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path

import kt_sft_kernels as kk
import pytest
from _cmake_build import build_cpp_tests, have_cmake, have_simde


def test_amx_kernels_against_float64(tmp_path: Path) -> None:
    if not have_cmake():
        pytest.skip("no cmake or g++")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the amx tier is x86-64 only")
    real = kk.isa_supported("amx")
    if not real and not have_simde():
        pytest.skip("no AMX CPU and no SIMDe headers (apt-get install libsimde-dev)")
    build = build_cpp_tests(tmp_path, ["amx_kernels_test"], emulated=not real)
    assert build.returncode == 0, build.stdout[-8000:]
    binary = tmp_path / "amx_kernels_test"
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600, check=False)
    print(run.stdout[-2000:])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    summary = re.search(r"amx_kernels_test \((.*)\): (\d+) checks, (\d+) failures", run.stdout)
    assert summary is not None, run.stdout[-2000:]
    assert summary.group(1) == ("real AMX" if real else "EMULATED AMX/AVX-512")
    assert int(summary.group(2)) > 1000
    assert int(summary.group(3)) == 0
