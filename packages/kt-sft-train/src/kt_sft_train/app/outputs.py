"""Where a `kt-sft train` run writes: the default run folder, the up-front writability check, and the
clean-up of folders a failed run created but never filled.

Without --output every run gets a new folder ``./kt-sft-output/run-YYYYMMDD-HHMMSS`` (running the main job
twice never meets the previous run); --output names the exact folder, which --overwrite replaces and
--resume continues.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from pathlib import Path

from .options import OptionsError

DEFAULT_ROOT = Path("kt-sft-output")
RUN_PREFIX = "run-"


def new_run_directory(root: Path = DEFAULT_ROOT, *, now: float | None = None) -> Path:
    """A fresh ``root/run-YYYYMMDD-HHMMSS`` (``-2``, ``-3``... when two runs start in the same second)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    candidate = root / f"{RUN_PREFIX}{stamp}"
    counter = 2
    while candidate.exists():
        candidate = root / f"{RUN_PREFIX}{stamp}-{counter}"
        counter += 1
    return candidate


def check_writable(output: Path) -> None:
    """Raise OptionsError naming --output unless a run can create files there; checked before any loading.

    Permission bits alone do not answer it (root ignores them, read-only mounts and ACLs do not show in
    them): a probe file is created and removed in the nearest existing folder.
    """
    existing = output
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "exists and is not a directory" if existing == output else f"is under the file {existing}"
        raise OptionsError(f"--output {str(output)!r} {where}")
    try:
        handle, probe = tempfile.mkstemp(prefix=".kt-sft-write-probe-", dir=existing)
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason += " (choose a folder you can write, e.g. --output ~/kt-sft-runs/NAME)"
        raise OptionsError(f"--output {str(output)!r} is not writable: {existing}: {reason}") from None
    os.close(handle)
    os.unlink(probe)


def create_run_directory(output: Path) -> list[Path]:
    """mkdir -p `output`; returns the folders this call created (innermost first), for remove_if_empty."""
    created = []
    path = output
    while not path.exists():
        created.append(path)
        path = path.parent
    output.mkdir(parents=True, exist_ok=True)
    return created


def remove_if_empty(created: list[Path]) -> None:
    """Remove the folders a failed run created, as long as nothing was written into them."""
    for path in created:
        try:
            path.rmdir()
        except OSError:
            return
