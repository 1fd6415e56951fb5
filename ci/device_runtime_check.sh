#!/usr/bin/env bash
# Runtime/bindings check for an AVX-512 / AMX host, run by hand from the repository root (NOT CI):
#     bash ci/device_runtime_check.sh 2>&1 | tee runtime-check.log
# Each probe runs in its own process so a crash names the call that crashed. It isolates the
# reported segfault of kk.default_pool() on the 16-core Xeon device host: is it the core count
# (sysfs topology), the number of threads, or the AMX permission requested at CPU detection?
set -uo pipefail
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16} \
  python3 -m pip install --no-build-isolation --no-deps -q ./packages/kt-sft-kernels || exit 1

uname -a
python3 -c "import os, sys; print(sys.version); print('affinity', sorted(os.sched_getaffinity(0)))"
for f in physical_package_id core_id; do echo "cpu0 $f: $(cat /sys/devices/system/cpu/cpu0/topology/$f 2>&1)"; done

probe() {  # probe NAME PYTHON_CODE: runs the code in a fresh interpreter, prints its exit status
  echo "== $1"
  python3 -X faulthandler -c "import kt_sft_kernels as kk
from kt_sft_kernels._core import _testing as t
$2"
  echo "   exit status $?"
}
probe "cores (no CPU detection yet)" "print(kk.affinity_cpus(), kk.physical_cores())"
probe "pools of 1..32 threads (no CPU detection)" "
for n in range(1, 33):
    assert t.pool_run_counting(kk.ThreadPool(n), 1000) == [1] * 1000, n
print('ok')"
probe "default pool (no CPU detection)" "p = kk.default_pool(); print(p, t.pool_run_counting(p, 100) == [1] * 100)"
probe "CPU detection (AMX permission) then default pool" "
print(kk.cpu_features()['amx_permission'], kk.best_isa())
p = kk.default_pool(); print(p, t.pool_run_counting(p, 100) == [1] * 100)"
probe "CPU detection then pools of 1..32 threads" "
print(kk.cpu_features()['amx_permission'])
for n in range(1, 33):
    assert t.pool_run_counting(kk.ThreadPool(n), 1000) == [1] * 1000, n
print('ok')"
echo "== python -m kt_sft_kernels"; python3 -X faulthandler -m kt_sft_kernels; echo "   exit status $?"
echo "== kernel wheel runtime/binding/import tests"
python3 -X faulthandler -m pytest -q -rs -p no:cacheprovider packages/kt-sft-kernels/tests/test_runtime.py \
  packages/kt-sft-kernels/tests/test_bindings.py packages/kt-sft-kernels/tests/test_import.py
