"""Runs the binding fuzz (tests/fuzz_bindings.py) in a subprocess: a crash there (segfault, abort)
is a failure of this test that names the seed, not the end of the test run. Bounded time: the
examples per fuzzer come from KT_SFT_FUZZ_EXAMPLES (default 150, ~15 s on a 2-core box)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

FUZZ = Path(__file__).with_name("fuzz_bindings.py")


def test_fuzz_bindings_in_a_subprocess(tmp_path: Path) -> None:
    seed = int(os.environ.get("KT_SFT_FUZZ_SEED") or random.randrange(2**31))
    env = dict(os.environ, KT_SFT_FUZZ_SEED=str(seed))
    env.setdefault("KT_SFT_FUZZ_EXAMPLES", "150")
    env.pop("KT_SFT_TEST_MEM_LIMIT", None)
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", str(FUZZ)],
        cwd=tmp_path,  # nothing is written into the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = (proc.stdout + proc.stderr)[-6000:]
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        pytest.fail(f"the fuzz process died of {name}; rerun with KT_SFT_FUZZ_SEED={seed}\n{output}")
    assert proc.returncode == 0, f"fuzz failed; rerun with KT_SFT_FUZZ_SEED={seed}\n{output}"
    assert "fuzz: all passed" in proc.stdout
    print(proc.stdout.strip().splitlines()[-1])
