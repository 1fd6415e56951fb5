"""Configures this package's CMakeLists.txt with the C++ tests on and builds some of its targets."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]


def have_cmake() -> bool:
    return shutil.which("cmake") is not None and shutil.which("g++") is not None


def have_simde() -> bool:
    """The SIMDe headers (libsimde-dev) that emulated builds take their AVX-512 intrinsics from."""
    return Path("/usr/include/simde/x86/avx512.h").exists()


def build_cpp_tests(
    build_dir: Path, targets: list[str], *, emulated: bool
) -> subprocess.CompletedProcess[str]:
    """cmake configure + build of `targets` in `build_dir`; the executables land in `build_dir`."""
    configure = ["cmake", "-S", str(PACKAGE), "-B", str(build_dir), "-DKT_SFT_BUILD_EXTENSION=OFF"]
    configure += ["-DKT_SFT_BUILD_CPP_TESTS=ON", f"-DKT_SFT_ISA_EMULATION={'ON' if emulated else 'OFF'}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    build = ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1), "--target", *targets]
    output = ""
    for command in (configure, build):
        step = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        output += step.stdout + step.stderr
        if step.returncode != 0:
            return subprocess.CompletedProcess(command, step.returncode, output, "")
    return subprocess.CompletedProcess(build, 0, output, "")
