"""NUMA topology discovery, shard layout, KT_SFT_NUMA, and pinned pools (ADR 0701).

Fake /sys and /proc trees (2 and 4 nodes, SMT, cgroup v1/v2 limits) are built under tmp_path and
read through kk.topology(root=...); the real machine is used for pinning and affinity masks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import kt_sft_kernels as kk
import pytest
from kt_sft_kernels._core import _testing

needs_affinity = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def fake_machine(root: Path, nodes: dict[int, list[int]], smt: int = 2, nodes_dir: bool = True) -> Path:
    """A /sys tree: node N lists its CPUs; CPUs c and c+1 (smt=2) of a node share a core."""
    for node, cpus in nodes.items():
        if nodes_dir:
            write(root / f"sys/devices/system/node/node{node}/cpulist", kk.format_cpu_list(cpus))
        for i, cpu in enumerate(cpus):
            topo = root / f"sys/devices/system/cpu/cpu{cpu}/topology"
            write(topo / "physical_package_id", str(node // 2))
            write(topo / "core_id", str(100 * node + i // smt))
    return root


TWO_NODES = {0: list(range(0, 8)), 1: list(range(8, 16))}
FOUR_NODES = {n: list(range(4 * n, 4 * n + 4)) for n in range(4)}
ALL16 = list(range(16))


def test_two_nodes_with_smt_siblings(tmp_path: Path) -> None:
    root = fake_machine(tmp_path, TWO_NODES)
    topo = kk.topology(root=str(root), affinity=ALL16)
    assert topo["from_sysfs"] and topo["machine_nodes"] == 2 and topo["cgroup_cpus"] is None
    assert [n["id"] for n in topo["nodes"]] == [0, 1]
    assert topo["nodes"][0]["cpus"] == list(range(8))
    assert topo["nodes"][0]["cores"] == [0, 2, 4, 6]  # one logical CPU per SMT pair
    assert topo["nodes"][1]["cores"] == [8, 10, 12, 14]
    assert topo["physical_cores"] == 8


def test_affinity_mask_cuts_nodes_and_cores(tmp_path: Path) -> None:
    root = fake_machine(tmp_path, FOUR_NODES)
    # node 3 not allowed at all; node 2 only its second core's siblings (10, 11); 1 only CPU 5.
    topo = kk.topology(root=str(root), affinity=[0, 1, 2, 3, 5, 10, 11])
    assert topo["machine_nodes"] == 4
    assert [(n["id"], n["cpus"], n["cores"]) for n in topo["nodes"]] == [
        (0, [0, 1, 2, 3], [0, 2]),
        (1, [5], [5]),
        (2, [10, 11], [10]),
    ]
    layout = kk.shard_layout(numa="auto", root=str(root), affinity=[0, 1, 2, 3, 5, 10, 11])
    assert [s["nodes"] for s in layout] == [[0], [1], [2]]


def test_machine_without_node_directories_is_one_node(tmp_path: Path) -> None:
    root = fake_machine(tmp_path, TWO_NODES, nodes_dir=False)
    topo = kk.topology(root=str(root), affinity=ALL16)
    assert not topo["from_sysfs"] and topo["machine_nodes"] == 1
    assert len(topo["nodes"]) == 1 and topo["nodes"][0]["cpus"] == ALL16
    assert topo["physical_cores"] == 8
    # No topology files at all either: every CPU counts as a core.
    empty = tmp_path / "empty"
    empty.mkdir()
    nodes = kk.topology(root=str(empty), affinity=[0, 1, 2])["nodes"]
    assert nodes == [{"id": 0, "cpus": [0, 1, 2], "cores": [0, 1, 2]}]


@pytest.mark.parametrize("shards", [2, 3, 4, 5, 9])
def test_shards_split_each_node_without_overlap(tmp_path: Path, shards: int) -> None:
    root = fake_machine(tmp_path, TWO_NODES)
    layout = kk.shard_layout(shards, numa="auto", root=str(root), affinity=ALL16)
    assert len(layout) == shards
    node_cores = {0: [0, 2, 4, 6], 1: [8, 10, 12, 14]}
    for node, cores in node_cores.items():
        mine = [s for s in layout if s["nodes"] == [node]]
        assert len(mine) in (shards // 2, (shards + 1) // 2)
        used = [cpu for s in mine for cpu in s["cpus"]]
        assert all(s["cpus"] for s in mine)
        if len(mine) <= len(cores):  # enough cores: a partition of the node's cores, sizes within 1
            assert sorted(used) == cores
            sizes = [len(s["cpus"]) for s in mine]
            assert max(sizes) - min(sizes) <= 1
        else:  # more shards than cores: they share, each on one core of its own node
            assert set(used) == set(cores)
    # Shards are ordered by node (shard s on node s * nodes // shards).
    assert [s["nodes"][0] for s in layout] == [s * 2 // shards for s in range(shards)]


def test_fewer_shards_than_nodes_take_whole_nodes(tmp_path: Path) -> None:
    two = str(fake_machine(tmp_path / "two", TWO_NODES))
    assert kk.shard_layout(1, numa="auto", root=two, affinity=ALL16) == [
        {"nodes": [0, 1], "cpus": [0, 2, 4, 6, 8, 10, 12, 14]}
    ]
    root = fake_machine(tmp_path, FOUR_NODES)
    layout = kk.shard_layout(2, numa="auto", root=str(root), affinity=ALL16)
    assert layout == [{"nodes": [0, 1], "cpus": [0, 2, 4, 6]}, {"nodes": [2, 3], "cpus": [8, 10, 12, 14]}]
    assert len(kk.shard_layout(numa="auto", root=str(root), affinity=ALL16)) == 4


def test_numa_setting_forms(tmp_path: Path) -> None:
    root = str(fake_machine(tmp_path, TWO_NODES))
    off = kk.shard_layout(numa="off", root=root, affinity=ALL16)
    assert off == [{"nodes": [0, 1], "cpus": [0, 2, 4, 6, 8, 10, 12, 14]}]
    assert len(kk.shard_layout(numa="3", root=root, affinity=ALL16)) == 3
    assert kk.shard_layout(numa="0-1;9,12", root=root, affinity=ALL16) == [
        {"nodes": [0], "cpus": [0, 1]},
        {"nodes": [1], "cpus": [9, 12]},
    ]
    # Explicit lists apply when the shard count matches; another count is laid out from the topology.
    assert len(kk.shard_layout(3, numa="0-1;9,12", root=root, affinity=ALL16)) == 3
    auto = kk.shard_layout(numa="AUTO", root=root, affinity=ALL16)
    assert auto == kk.shard_layout(2, numa="", root=root, affinity=ALL16)


@pytest.mark.parametrize("text", ["0", "-2", "2000", "0-x", "3-1", "0-1;", "many"])
def test_bad_numa_setting_names_the_variable(text: str) -> None:
    with pytest.raises(ValueError, match="KT_SFT_NUMA"):
        kk.shard_layout(numa=text)


def test_explicit_cpus_outside_the_mask_are_rejected(tmp_path: Path) -> None:
    root = str(fake_machine(tmp_path, TWO_NODES))
    with pytest.raises(ValueError, match="KT_SFT_NUMA: CPU 9 is not one this process may use"):
        kk.shard_layout(numa="0;9", root=root, affinity=list(range(8)))
    with pytest.raises(ValueError, match="shards must be >= 1"):
        kk.shard_layout(0)


# ---- cgroup CPU limits ------------------------------------------------------------------------


def test_cgroup_v2_limit_trims_cores_evenly_over_nodes(tmp_path: Path) -> None:
    root = fake_machine(tmp_path, TWO_NODES)
    write(root / "proc/self/cgroup", "0::/jobs/train")
    write(root / "sys/fs/cgroup/cpu.max", "max 100000")
    write(root / "sys/fs/cgroup/jobs/cpu.max", "500000 100000")
    write(root / "sys/fs/cgroup/jobs/train/cpu.max", "250000 100000")  # 2.5 CPUs -> 3 cores
    topo = kk.topology(root=str(root), affinity=ALL16)
    assert topo["cgroup_cpus"] == pytest.approx(2.5)
    assert topo["cgroup_source"].endswith("jobs/train/cpu.max")
    assert [n["cores"] for n in topo["nodes"]] == [[0, 2], [8]]
    assert topo["physical_cores"] == 3
    # The parent is stricter: it wins.
    write(root / "sys/fs/cgroup/jobs/cpu.max", "100000 100000")
    topo = kk.topology(root=str(root), affinity=ALL16)
    assert topo["physical_cores"] == 1 and [n["cores"] for n in topo["nodes"]] == [[0]]


def test_cgroup_v2_container_sees_its_cgroup_at_the_mount_root(tmp_path: Path) -> None:
    root = fake_machine(tmp_path, TWO_NODES)
    write(root / "proc/self/cgroup", "0::/")
    write(root / "sys/fs/cgroup/cpu.max", "400000 100000")
    assert kk.topology(root=str(root), affinity=ALL16)["physical_cores"] == 4
    assert [len(s["cpus"]) for s in kk.shard_layout(numa="auto", root=str(root), affinity=ALL16)] == [2, 2]


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    root = fake_machine(tmp_path, TWO_NODES)
    write(root / "proc/self/cgroup", "4:memory:/x\n3:cpu,cpuacct:/x\n0::/")
    write(root / "sys/fs/cgroup/cpu,cpuacct/x/cpu.cfs_quota_us", "200000")
    write(root / "sys/fs/cgroup/cpu,cpuacct/x/cpu.cfs_period_us", "100000")
    topo = kk.topology(root=str(root), affinity=ALL16)
    assert topo["cgroup_cpus"] == pytest.approx(2.0) and topo["physical_cores"] == 2
    write(root / "sys/fs/cgroup/cpu,cpuacct/x/cpu.cfs_quota_us", "-1")  # unlimited
    assert kk.topology(root=str(root), affinity=ALL16)["cgroup_cpus"] is None


# ---- pinned pools on this machine -------------------------------------------------------------


def test_pool_on_cpus_pins_every_thread() -> None:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else kk.affinity_cpus()
    chosen = list(reversed(cpus))[:3]
    pool = kk.ThreadPool(cpus=chosen)
    assert pool.threads == len(chosen) and pool.pinned and pool.cpus == chosen
    assert pool.cpu_affinity() == [[c] for c in chosen]  # read back from the OS
    assert _testing.pool_run_counting(pool, 50) == [1] * 50


def test_pool_on_a_node_uses_its_physical_cores() -> None:
    node = kk.topology()["nodes"][0]
    pool = kk.ThreadPool(node=node["id"])
    assert pool.cpus == node["cores"]
    assert pool.cpu_affinity() == [[c] for c in node["cores"]]


def test_bad_pool_arguments() -> None:
    with pytest.raises(ValueError, match="cpus: a pool needs at least one CPU"):
        kk.ThreadPool(cpus=[])
    with pytest.raises(ValueError, match="not in this process's affinity mask"):
        kk.ThreadPool(cpus=[max(kk.affinity_cpus()) + 1])
    with pytest.raises(ValueError, match="cpus or node, not both"):
        kk.ThreadPool(cpus=[0], node=0)
    with pytest.raises(ValueError, match="threads: 3 does not match"):
        kk.ThreadPool(threads=3, cpus=kk.affinity_cpus()[:1])
    with pytest.raises(ValueError, match="node: 999 is not a NUMA node"):
        kk.ThreadPool(node=999)


RUN_INFO = "import runpy; runpy.run_module('kt_sft_kernels', run_name='__main__')"


def run_python(code: str, prefix: list[str] | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KT_SFT_")} | env
    return subprocess.run(
        [*(prefix or []), sys.executable, "-c", code],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@needs_affinity
def test_restricted_affinity_mask_in_a_child() -> None:
    cpu = max(os.sched_getaffinity(0))
    code = (
        f"import os; os.sched_setaffinity(0, {{{cpu}}})\n"
        "import kt_sft_kernels as kk\n"
        "t = kk.topology()\n"
        "print(t['affinity'], [n['cores'] for n in t['nodes']], kk.physical_cores())\n"
        "print([s['cpus'] for s in kk.shard_layout(2)])\n"
        "p = kk.ThreadPool(node=t['nodes'][0]['id']); print(p.cpus, p.cpu_affinity())\n"
        "print(kk.default_pool().threads)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"[{cpu}] [[{cpu}]] 1",
        f"[[{cpu}], [{cpu}]]",  # two logical shards sharing the one core
        f"[{cpu}] [[{cpu}]]",
        "1",
    ]


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset")
def test_info_report_under_taskset() -> None:
    cpu = min(kk.affinity_cpus())
    result = run_python(RUN_INFO, prefix=["taskset", "-c", str(cpu)], KT_SFT_NUMA="2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "shards (KT_SFT_NUMA=2): 2" in lines
    assert sum(f"1 threads on cpus {cpu}" in line for line in lines) == 2
    assert "  one node: a layer's shards run as one call, on all these cpus (ADR 0701)" in lines


def test_info_report_with_a_bad_setting_is_one_line() -> None:
    result = run_python(RUN_INFO, KT_SFT_NUMA="x-y")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert any(line.startswith("shards: KT_SFT_NUMA") for line in result.stdout.splitlines())
