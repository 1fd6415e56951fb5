"""The one developer entry point: build, test, lint, bench.

`nox -s tests` is what CI runs (.ci/run). Everything installs against ci/constraints.txt so an
unpinned dependency can never pull a CUDA build of torch onto a CPU-only machine.
"""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "ci" / "constraints.txt"))
KERNELS = str(ROOT / "packages" / "kt-sft-kernels")
TRAIN = str(ROOT / "packages" / "kt-sft-train")

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


def _install(session: nox.Session, *, train: bool) -> None:
    session.install(*CONSTRAINTS, "pip")
    packages = [f"{KERNELS}[test]"] + ([f"{TRAIN}[test]"] if train else [])
    session.install(*CONSTRAINTS, *packages)


@nox.session
def tests(session: nox.Session) -> None:
    """Build both wheels from source and run every test suite (what CI runs)."""
    _install(session, train=True)
    session.run("python", "-m", "kt_sft_kernels")
    session.run("python", "-m", "pytest", "-q", "-rs", *session.posargs,
                f"{KERNELS}/tests", f"{TRAIN}/tests")


@nox.session
def kernels(session: nox.Session) -> None:
    """Only the kernel wheel and its NumPy-only tests (no torch in the environment)."""
    _install(session, train=False)
    session.run("python", "-m", "kt_sft_kernels")
    session.run("python", "-m", "pytest", "-q", "-rs", *session.posargs, f"{KERNELS}/tests")


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
