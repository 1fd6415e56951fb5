"""The one developer entry point: build, test, lint, bench.

`nox -s tests` is what CI runs (.ci/run). Everything installs against ci/constraints.txt so an
unpinned dependency can never pull a CUDA build of torch onto a CPU-only machine.
"""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "ci" / "constraints.txt"))
KERNELS = str(ROOT / "packages" / "kt-sft-kernels")
TRAIN = str(ROOT / "packages" / "kt-sft-train")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


def _reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5).close()
    except OSError:
        return False
    return True


def _install_torch(session: nox.Session) -> None:
    """PyPI's Linux torch wheels are CUDA builds of several GB. Without an NVIDIA GPU take the CPU build
    of the pinned version from PyTorch's CPU index when it is reachable (elsewhere, as on CI, the pin
    resolves to a CPU wheel the machine already offers)."""
    if shutil.which("nvidia-smi") is None and _reachable(TORCH_CPU_INDEX + "/torch/"):
        session.install(*CONSTRAINTS, "torch", "--index-url", TORCH_CPU_INDEX)


def _install(session: nox.Session, *, train: bool) -> None:
    session.install(*CONSTRAINTS, "pip")
    if train:
        _install_torch(session)
    packages = [f"{KERNELS}[test]"] + ([f"{TRAIN}[test]"] if train else [])
    session.install(*CONSTRAINTS, *packages)


@nox.session
def tests(session: nox.Session) -> None:
    """Build both wheels from source and run every test suite (what CI runs)."""
    _install(session, train=True)
    session.run("python", "-m", "kt_sft_kernels")
    session.run("python", "-m", "pytest", "-q", "-rs", *session.posargs, f"{KERNELS}/tests", f"{TRAIN}/tests")


@nox.session
def train(session: nox.Session) -> None:
    """The main job: install both wheels and run `kt-sft train` (no arguments = the embedded default)."""
    _install(session, train=True)
    session.run("kt-sft", "train", *session.posargs)


@nox.session
def kernels(session: nox.Session) -> None:
    """Only the kernel wheel and its NumPy-only tests (no torch in the environment)."""
    _install(session, train=False)
    session.run("python", "-m", "kt_sft_kernels")
    session.run("python", "-m", "pytest", "-q", "-rs", *session.posargs, f"{KERNELS}/tests")


@nox.session
def sanitize(session: nox.Session) -> None:
    """The kernel suite and the binding fuzz with the extension built with -fsanitize=address,undefined
    (CMake option KT_SFT_SANITIZE). The interpreter is not instrumented, so libasan/libubsan are preloaded
    and leak checking is off (Python's own allocations would drown it). The C++-only tier tests build
    their own binaries and are left out. Record the result in docs/reliability.md."""
    session.install(*CONSTRAINTS, "pip")
    session.install(
        *CONSTRAINTS,
        "--config-settings=cmake.define.KT_SFT_SANITIZE=ON",
        "--config-settings=cmake.build-type=RelWithDebInfo",
        f"{KERNELS}[test]",
    )
    compiler = shutil.which("c++") or "g++"
    runtimes = [
        session.run(compiler, f"-print-file-name={name}", silent=True, external=True).strip()
        for name in ("libasan.so", "libubsan.so")
    ]
    env = {
        "LD_PRELOAD": ":".join(runtimes),
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        "KT_SFT_FUZZ_EXAMPLES": "100",
    }
    tests = f"{KERNELS}/tests"
    session.run(
        "python",
        "-m",
        "pytest",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        *session.posargs,
        tests,
        f"--ignore={tests}/test_amx_cpp.py",
        f"--ignore={tests}/test_moe_simd_tiers_cpp.py",
        env=env,
    )


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def build(session: nox.Session) -> None:
    """Build both wheels into dist/."""
    session.install("build")
    for package in (KERNELS, TRAIN):
        session.run("python", "-m", "build", "--wheel", "--outdir", str(ROOT / "dist"), package)


@nox.session
def bench(session: nox.Session) -> None:
    """Kernel benchmarks (not run in CI; timings are never asserted)."""
    _install(session, train=True)
    session.install(*CONSTRAINTS, "matplotlib")
    session.run("python", str(ROOT / "benchmarks" / "bench_moe.py"), *session.posargs)
