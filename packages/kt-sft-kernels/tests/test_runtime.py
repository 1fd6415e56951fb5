"""ISA tiers (detection, cap, env var) and the thread pool."""

from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import kt_sft_kernels as kk
import pytest
from kt_sft_kernels._core import _testing

TIERS = ["portable", "avx2", "avx512", "avx512_bf16", "amx"]


@pytest.fixture(autouse=True)
def _no_cap_after_test() -> Iterator[None]:
    yield
    kk.set_max_isa(None)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("KT_SFT_MAX_ISA", "KT_SFT_NUM_THREADS")
    } | env
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120, check=False
    )


# ---- tiers -------------------------------------------------------------------------------------


def test_tier_names_lowest_first() -> None:
    assert kk.isa_names() == TIERS


def test_portable_always_available() -> None:
    assert kk.isa_compiled("portable")
    assert kk.isa_supported("portable")


def test_supported_implies_compiled_and_best_is_highest() -> None:
    supported = [t for t in TIERS if kk.isa_supported(t)]
    assert all(kk.isa_compiled(t) for t in supported)
    assert kk.best_isa() == supported[-1]


def test_supported_tiers_follow_the_reported_features() -> None:
    """Re-derives each tier's hardware requirement from cpu_features() (DESIGN.md §3.2 flags)."""
    f = kk.cpu_features()
    avx2 = f["avx2"] and f["fma"] and f["f16c"] and f["os_avx"]
    avx512 = avx2 and all(f[n] for n in ("avx512f", "avx512bw", "avx512dq", "avx512vl")) and f["os_avx512"]
    avx512_bf16 = avx512 and f["avx512_bf16"] and f["avx512_vnni"]
    amx = (
        avx512_bf16
        and f["amx_tile"]
        and f["amx_bf16"]
        and f["amx_int8"]
        and f["os_amx"]
        and f["amx_permitted"]
    )
    hardware = {"portable": True, "avx2": avx2, "avx512": avx512, "avx512_bf16": avx512_bf16, "amx": amx}
    for tier in TIERS:
        assert kk.isa_supported(tier) == (hardware[tier] and kk.isa_compiled(tier)), tier


def test_cpu_features_agree_with_proc_cpuinfo() -> None:
    """A flag Linux lists comes from CPUID, so detection must report it too (independent source)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    flags_line = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), None)
    if flags_line is None:
        pytest.skip("/proc/cpuinfo has no flags line")
    linux = set(flags_line.split(":", 1)[1].split())
    f = kk.cpu_features()
    names = [
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512dq",
        "avx512vl",
        "avx512_bf16",
        "avx512_vnni",
        "amx_tile",
        "amx_bf16",
        "amx_int8",
    ]
    for name in names:
        if name in linux:
            assert f[name], f"/proc/cpuinfo lists {name} but detection says no"
    assert isinstance(f["vendor"], str) and f["vendor"]
    if f["amx_tile"] and f["os_amx"]:
        assert f["amx_permission"] in ("granted",) or f["amx_permission"].startswith("denied")
    else:
        assert f["amx_permission"].startswith("not requested")


def test_set_max_isa_every_supported_tier_and_back() -> None:
    best = kk.best_isa()
    for tier in TIERS:
        if not kk.isa_supported(tier):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kk.set_max_isa(tier) == tier
        assert kk.active_isa() == tier
        assert kk.isa_cap() == tier
        assert kk.isa_cap_source() == "set_max_isa"
    assert kk.set_max_isa(None) == best
    assert kk.active_isa() == best
    assert kk.isa_cap() is None
    assert kk.isa_cap_source() == "none"


def test_set_max_isa_above_hardware_uses_best_and_warns() -> None:
    above = [t for t in TIERS if not kk.isa_supported(t)]
    if not above:
        pytest.skip("every tier runs on this host")
    best = kk.best_isa()
    with pytest.warns(RuntimeWarning, match=rf"requested {above[0]}.*using {best}"):
        assert kk.set_max_isa(above[0]) == best
    assert kk.active_isa() == best
    assert kk.isa_cap() == above[0]


@pytest.mark.parametrize("call", [kk.set_max_isa, kk.isa_supported, kk.isa_compiled])
def test_unknown_tier_name_is_a_value_error_listing_names(call: object) -> None:
    with pytest.raises(
        ValueError, match=r"unknown ISA tier 'avx1024'.*portable, avx2, avx512, avx512_bf16, amx"
    ):
        call("avx1024")  # type: ignore[operator]


def test_env_var_caps_the_tier() -> None:
    proc = run_python(
        "import kt_sft_kernels as kk; print(kk.active_isa(), kk.isa_cap(), kk.isa_cap_source())",
        KT_SFT_MAX_ISA="portable",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["portable", "portable", "KT_SFT_MAX_ISA"]


def test_env_var_above_hardware_warns_and_uses_best() -> None:
    above = [t for t in TIERS if not kk.isa_supported(t)]
    if not above:
        pytest.skip("every tier runs on this host")
    code = (
        "import warnings, kt_sft_kernels as kk\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    print(kk.active_isa())\n"
        "print(len(w), w[0].message if w else '')\n"
    )
    proc = run_python(code, KT_SFT_MAX_ISA=above[-1])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == kk.best_isa()
    assert lines[1].startswith("1 ") and "KT_SFT_MAX_ISA requested" in lines[1]


def test_env_var_unknown_name_raises_until_overridden() -> None:
    code = (
        "import kt_sft_kernels as kk\n"
        "try:\n"
        "    kk.active_isa()\n"
        "except ValueError as e:\n"
        "    print('raised:', e)\n"
        "print(kk.set_max_isa('portable'), kk.active_isa())\n"
    )
    proc = run_python(code, KT_SFT_MAX_ISA="bogus")
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert first.startswith("raised: KT_SFT_MAX_ISA='bogus' is not a tier name; valid names: portable")
    assert second == "portable portable"


def test_env_var_is_case_insensitive() -> None:
    proc = run_python("import kt_sft_kernels as kk; print(kk.active_isa())", KT_SFT_MAX_ISA="PORTABLE")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "portable"


# ---- cores and the default pool -----------------------------------------------------------------


def physical_cores_from_sysfs(cpus: set[int]) -> int:
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(
                ((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip())
            )
        except OSError:
            return len(cpus)
    return len(cores)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_getaffinity")
def test_physical_cores_match_sysfs_topology() -> None:
    cpus = os.sched_getaffinity(0)
    assert sorted(kk.affinity_cpus()) == sorted(cpus)
    assert kk.physical_cores() == physical_cores_from_sysfs(cpus)
    assert 1 <= kk.physical_cores() <= len(cpus)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_default_pool_follows_the_affinity_mask() -> None:
    cpu = min(os.sched_getaffinity(0))
    code = (
        f"import os; os.sched_setaffinity(0, {{{cpu}}})\n"
        "import kt_sft_kernels as kk\n"
        "print(kk.physical_cores(), kk.default_pool().threads, kk.affinity_cpus())\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1", f"[{cpu}]"]


def test_env_var_sizes_the_default_pool() -> None:
    code = "import kt_sft_kernels as kk; print(kk.default_pool().threads)"
    proc = run_python(code, KT_SFT_NUM_THREADS="3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3"
    code = "import kt_sft_kernels as kk\ntry:\n    kk.default_pool()\nexcept ValueError as e:\n    print(e)"
    bad = run_python(code, KT_SFT_NUM_THREADS="lots")
    assert bad.returncode == 0, bad.stderr
    assert bad.stdout.startswith("KT_SFT_NUM_THREADS='lots' is not a thread count")


def test_default_pool_is_one_per_process() -> None:
    assert kk.default_pool() == kk.default_pool()
    assert kk.default_pool().is_default
    assert kk.default_pool().threads == kk.default_thread_count()
    assert kk.ThreadPool(0).threads == kk.default_thread_count()


@pytest.mark.parametrize(
    ("logical", "physical", "threads"),
    [
        (2, 1, 2),  # a 2-vCPU VM that sysfs shows as 1 core x 2 threads: both vCPUs
        (2, 2, 2),
        (4, 2, 4),  # small SMT box: every logical CPU
        (6, 3, 6),
        (8, 4, 4),  # real SMT machine with >= 4 cores: one thread per core
        (64, 32, 32),
        (16, 16, 16),
        (1, 1, 1),
    ],
)
def test_default_thread_rule(logical: int, physical: int, threads: int) -> None:
    """ADR 0901: all logical CPUs unless SMT siblings on >= 4 physical cores."""
    assert kk.default_thread_count(logical, physical) == threads


def test_default_thread_count_on_this_host() -> None:
    logical, physical = len(kk.affinity_cpus()), kk.physical_cores()
    assert kk.default_thread_count() == kk.default_thread_count(logical, physical)
    assert kk.default_thread_reason().startswith(f"{kk.default_thread_count()} (")
    with pytest.raises(ValueError, match="give both"):
        kk.default_thread_count(2)


# ---- thread pool --------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_every_task_runs_exactly_once(threads: int) -> None:
    pool = kk.ThreadPool(threads)
    assert pool.threads == threads
    for num_tasks in [0, 1, 2, 3, 5, 7, 64, 1000, 10007]:
        counts = _testing.pool_run_counting(pool, num_tasks)
        assert len(counts) == num_tasks
        assert all(c == 1 for c in counts), (threads, num_tasks)


def test_calls_return_only_after_every_task_and_late_workers_stay_out() -> None:
    # A call closes its job once every task is handed out and waits only for the workers inside it;
    # workers still waking up (the pauses below let them fall asleep) must neither be waited for nor
    # run a task of a job whose call returned (its tasks' counts would read 0 here, or 2 in a later call).
    pool = kk.ThreadPool(4)
    rng = random.Random(7)
    for i in range(600):
        num_tasks = rng.choice([2, 3, 5, 17, 64])
        assert _testing.pool_run_counting(pool, num_tasks) == [1] * num_tasks, (i, num_tasks)
        if i % 3 == 0:
            time.sleep(rng.uniform(0.0, 0.0006))


@pytest.mark.parametrize("threads", [1, 3])
def test_task_exception_reaches_the_caller_and_pool_survives(threads: int) -> None:
    pool = kk.ThreadPool(threads)
    with pytest.raises(RuntimeError, match=r"task 37 failed"):
        _testing.pool_run_raising(pool, 100, 37)
    with pytest.raises(ValueError, match=r"task 0 failed"):
        _testing.pool_run_raising(pool, 5, 0, "value")
    assert _testing.pool_run_counting(pool, 500) == [1] * 500


def test_nested_call_into_the_same_pool_is_rejected() -> None:
    pool = kk.ThreadPool(2)
    with pytest.raises(RuntimeError, match=r"from inside one of its own tasks"):
        _testing.pool_run_nested(pool)
    assert _testing.pool_run_counting(pool, 10) == [1] * 10


def test_negative_thread_count_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"threads must be >= 0"):
        kk.ThreadPool(-1)


def test_pinned_pool_runs() -> None:
    pool = kk.ThreadPool(2, pin=True)
    assert pool.pinned
    assert _testing.pool_run_counting(pool, 100) == [1] * 100


def os_thread_count() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("Threads:")))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_creating_and_destroying_many_pools_leaks_no_threads() -> None:
    gc.collect()
    before = os_thread_count()
    for i in range(200):
        pool = kk.ThreadPool(i % 4 + 1)
        if i % 10 == 0:
            assert _testing.pool_run_counting(pool, 33) == [1] * 33
        del pool
    gc.collect()
    assert os_thread_count() == before


def test_concurrent_calls_on_one_pool_from_python_threads() -> None:
    pool = kk.ThreadPool(2)
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for n in (1, 17, 300):
                assert _testing.pool_run_counting(pool, n) == [1] * n
        except BaseException as e:  # re-raised in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
