"""A real cgroup CPU limit (issue 13): a process in a cgroup allowed fewer CPUs than its affinity mask
sees the limit in its topology, shard layout and default thread count, and computes the same bits.

Needs a writable cgroup v1 `cpu` hierarchy (root in a container or VM that mounts it read-write, as
the CI machine does); skipped elsewhere. The fake-/sys tests in test_topology.py cover the parsing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import kt_sft_kernels as kk
import numpy as np
import pytest
from kt_sft_kernels.testing import BF16

CPU_V1 = Path("/sys/fs/cgroup/cpu")

CHILD = r"""
import json, sys
import ml_dtypes, numpy as np
import kt_sft_kernels as kk
raw = np.load(sys.argv[1])  # bf16 arrays travel as their uint16 bits
inputs = {k: raw[k].view(ml_dtypes.bfloat16) if raw[k].dtype == np.uint16 else raw[k] for k in raw.files}
topology = kk.topology()
layer = kk.MoELayer(kk.MoEConfig(num_experts=4, top_k=2, hidden=64, intermediate=32))
layer.load_weights(gate_up=inputs["gate_up"], down=inputs["down"])
out = np.empty_like(inputs["x"])
layer.forward(inputs["x"], inputs["ids"], inputs["w"], out, save=False)
np.save(sys.argv[2], out.view(np.uint16))
pool = kk.ThreadPool()
print(json.dumps({"cgroup_cpus": topology["cgroup_cpus"], "default": kk.default_thread_count(),
                  "reason": kk.default_thread_reason(), "pool": pool.threads,
                  "shards": kk.shard_layout()}))
"""


@pytest.fixture
def one_cpu_cgroup() -> Iterator[Path]:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs an affinity mask of at least 2 CPUs to set a smaller limit")
    if not (CPU_V1 / "cpu.cfs_quota_us").exists() or not os.access(CPU_V1, os.W_OK):
        pytest.skip("no writable cgroup v1 cpu hierarchy here")
    group = CPU_V1 / f"kt_sft_test_{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")  # one CPU's worth of time
    except OSError as error:
        pytest.skip(f"cannot create a cgroup here: {error}")
    try:
        yield group
    finally:
        group.rmdir()  # the child has exited, so the group is empty


def test_a_one_cpu_cgroup_limits_threads_and_shards(one_cpu_cgroup: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    inputs = {
        "gate_up": (rng.standard_normal((4, 64, 64)) * 0.1).astype(BF16),
        "down": (rng.standard_normal((4, 64, 32)) * 0.1).astype(BF16),
        "x": rng.standard_normal((9, 64)).astype(BF16),
        "ids": np.argsort(rng.standard_normal((9, 4)), axis=1)[:, :2].astype(np.int32),
        "w": rng.uniform(0.1, 1.0, (9, 2)).astype(np.float32),
    }
    bits = {k: v.view(np.uint16) if v.dtype == BF16 else v for k, v in inputs.items()}
    np.savez(tmp_path / "inputs.npz", **bits)
    procs = one_cpu_cgroup / "cgroup.procs"
    # The shell moves itself into the group, then becomes the Python child (same pid).
    script = f'echo $$ > "{procs}" && exec "{sys.executable}" -c "$0" "$1" "$2"'
    done = subprocess.run(
        ["sh", "-c", script, CHILD, str(tmp_path / "inputs.npz"), str(tmp_path / "out.npy")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "KT_SFT_NUM_THREADS": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["cgroup_cpus"] == pytest.approx(1.0)
    assert report["default"] == 1 and report["pool"] == 1, report["reason"]
    assert "cgroup CPU limit" in report["reason"]
    assert sum(len(shard["cpus"]) for shard in report["shards"]) == 1
    # Same bits as this process's pool of another size (the kernels are thread-count deterministic).
    layer = kk.MoELayer(kk.MoEConfig(num_experts=4, top_k=2, hidden=64, intermediate=32))
    layer.load_weights(gate_up=inputs["gate_up"], down=inputs["down"])
    out = np.empty_like(inputs["x"])
    layer.forward(inputs["x"], inputs["ids"], inputs["w"], out, save=False)
    assert np.array_equal(np.load(tmp_path / "out.npy").view(np.uint16), out.view(np.uint16))
    assert np.isfinite(out.astype(np.float32)).all()
