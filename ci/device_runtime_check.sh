#!/usr/bin/env bash
# Runtime/bindings check for an AVX-512 / AMX host, run by hand from the repository root (NOT CI):
#     bash ci/device_runtime_check.sh 2>&1 | tee runtime-check.log        (about 2-4 minutes)
#
# Device run 1 (Xeon with AMX, Python 3.12, GCC 13) segfaulted inside pytest, three times, each time
# in a call that reaches physical_cores_available() (kk.physical_cores(), kk.default_pool(), a layer
# on the default pool), while the same calls in fresh `python -c` processes and in
# `python -m kt_sft_kernels` passed, and ASan/UBSan/TSan runs on an AVX2 host are clean. The probes
# below separate the candidates: pytest's auto-loaded plugins, NumPy/OpenBLAS in the process, the AMX
# permission, heap corruption from elsewhere (glibc malloc checking), and the crash site (cuda-gdb
# backtrace; the image has no gdb, and cuda-gdb debugs CPU-only programs too).
set -uo pipefail
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16} \
  python3 -m pip install --no-build-isolation --no-deps -q ./packages/kt-sft-kernels || exit 1
TESTS=packages/kt-sft-kernels/tests

uname -a
ldd --version | head -n 1
python3 -c "import os, sys; print(sys.version); print('affinity', sorted(os.sched_getaffinity(0)))"
python3 -c "import importlib.metadata as m; print('pytest plugins:', sorted(e.value for e in m.entry_points(group='pytest11')))"
ulimit -s

probe() {  # probe NAME PYTHON_CODE: runs the code in a fresh interpreter, prints its exit status
  echo "== $1"
  timeout 300 python3 -X faulthandler -c "import kt_sft_kernels as kk
from kt_sft_kernels._core import _testing as t
$2"
  echo "   exit status $?"
}
probe "detection, then physical_cores() x2000 and the default pool" "
print(kk.cpu_features()['amx_permission'])
assert len({kk.physical_cores() for _ in range(2000)}) == 1
print(kk.default_pool(), t.pool_run_counting(kk.default_pool(), 100) == [1] * 100)"
probe "NumPy + numpy.linalg (OpenBLAS threads) + ml_dtypes loaded, detection, physical_cores() x2000, default pool" "
import numpy, numpy.linalg, ml_dtypes
numpy.linalg.inv(numpy.eye(64) * 2.0)
print(kk.cpu_features()['amx_permission'])
assert len({kk.physical_cores() for _ in range(2000)}) == 1
print(kk.default_pool(), t.pool_run_counting(kk.default_pool(), 100) == [1] * 100)"

run_pytest() {  # run_pytest NAME ENV...: the runtime + binding + import suites
  local name=$1; shift
  echo "== pytest: $name"
  env "$@" timeout 600 python3 -X faulthandler -m pytest -q -rs -p no:cacheprovider \
    "$TESTS/test_runtime.py" "$TESTS/test_bindings.py" "$TESTS/test_import.py" 2>&1 | tail -n 40
  echo "   exit status ${PIPESTATUS[0]}"
}
run_pytest "as in device run 1" PYTHONFAULTHANDLER=1
run_pytest "no auto-loaded plugins" PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
MALLOC_DEBUG=$(ls /usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0 /lib/x86_64-linux-gnu/libc_malloc_debug.so.0 \
  2>/dev/null | head -n 1)
if [ -n "$MALLOC_DEBUG" ]; then
  run_pytest "glibc malloc checking" LD_PRELOAD="$MALLOC_DEBUG" GLIBC_TUNABLES=glibc.malloc.check=3
fi

if command -v cuda-gdb >/dev/null; then
  echo "== cuda-gdb backtrace of the runtime suite (only meaningful if it crashes)"
  timeout 600 cuda-gdb -q -batch -ex "set pagination off" -ex "handle SIGSEGV stop print" -ex run \
    -ex "bt 30" -ex "info registers rip rsp" -ex "x/8i \$pc" -ex "info symbol \$pc" \
    --args python3 -m pytest -q -p no:cacheprovider -p no:faulthandler "$TESTS/test_runtime.py" 2>&1 | tail -n 120
fi
echo "== python -m kt_sft_kernels"; python3 -X faulthandler -m kt_sft_kernels; echo "   exit status $?"
