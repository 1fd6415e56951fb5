"""The amx tier's C++ correctness tests (tests/cpp/amx_kernels_test.cpp, amx_layer_test.cpp) under pytest.

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


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CMake build for both programs (they share the amx tier's objects)."""
    return tmp_path_factory.mktemp("cpp")


def build_and_run(build_dir: Path, program: str) -> tuple[int, int]:
    """Builds tests/cpp/PROGRAM (emulated without an AMX CPU), runs it; its (checks, failures)."""
    if not have_cmake():
        pytest.skip("no cmake or g++")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the amx tier is x86-64 only")
    real = kk.isa_supported("amx")
    if not real and not have_simde():
        pytest.skip("no AMX CPU and no SIMDe headers (apt-get install libsimde-dev)")
    build = build_cpp_tests(build_dir, [program], emulated=not real)
    assert build.returncode == 0, build.stdout[-8000:]
    run = subprocess.run([str(build_dir / program)], capture_output=True, text=True, timeout=600, check=False)
    print(run.stdout[-2000:])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    summary = re.search(rf"{program} \((.*)\): (\d+) checks, (\d+) failures", run.stdout)
    assert summary is not None, run.stdout[-2000:]
    assert summary.group(1) == ("real AMX" if real else "EMULATED AMX/AVX-512")
    return int(summary.group(2)), int(summary.group(3))


def test_amx_kernels_against_float64(build_dir: Path) -> None:
    checks, failures = build_and_run(build_dir, "amx_kernels_test")
    assert checks > 1000
    assert failures == 0


def test_amx_layer_against_portable(build_dir: Path) -> None:
    """The whole layer on amx vs portable, tier changes back and forth, NUMA shards on amx."""
    checks, failures = build_and_run(build_dir, "amx_layer_test")
    assert checks > 100
    assert failures == 0
