#!/usr/bin/env bash
# AMX machine check (issue 4): run from anywhere in the repository on the AMX machine, e.g.
#     OUT=/tmp/amx-check bash ci/device_amx_check.sh
# 1. builds and installs the kernel wheel (pip --no-build-isolation --no-deps; needs nanobind and
#    scikit-build-core installed, no network),
# 2. runs the kernel pytest suite, which sweeps every tier this CPU runs (amx included) through
#    kk.set_max_isa,
# 3. builds and runs the amx C++ correctness test with real AMX instructions,
# 4. runs the amx GEMM self-test/microbenchmark (Qwen3-30B-A3B expert shapes).
# Prints one line per result and a summary; logs and JSON go to $OUT (at most 8 files). Exit status
# is non-zero if any step failed. About 3-6 minutes on 16 vCPUs.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
pkg=$root/packages/kt-sft-kernels
OUT=${OUT:-$root/_out/amx-check}
PYTHON=${PYTHON:-python3}
BIN=${AMX_BIN_DIR:-/tmp/kt-amx-check-bin}
mkdir -p "$OUT" "$BIN"
summary=$OUT/summary.txt
: >"$summary"
failed=0

# step NAME SECONDS LOG COMMAND...: runs COMMAND under a time limit, output to the terminal and LOG.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local line
  if [ "$rc" -eq 0 ]; then line="PASS  $name ($((SECONDS - start)) s)"
  else line="FAIL  $name (exit $rc after $((SECONDS - start)) s; log: $log)"; failed=1; fi
  echo "$line" | tee -a "$summary"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git -C "$root" log --oneline -1 2>/dev/null || echo 'no git')"
  lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core|Socket|L1d|L2|L3|NUMA node\(s\)'
  echo "amx flags: $(grep -o -w 'amx_[a-z0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  echo "compiler: $(${CXX:-g++} --version | head -1); python: $($PYTHON --version 2>&1)"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt"

export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
step "build+install kt-sft-kernels wheel" 300 "$OUT/wheel.log" \
  "$PYTHON" -m pip install --no-build-isolation --no-deps --force-reinstall "$pkg"
step "python -m kt_sft_kernels (tiers, AMX permission)" 60 "$OUT/info.log" "$PYTHON" -m kt_sft_kernels
if ! "$PYTHON" -c 'import kt_sft_kernels as kk, sys; sys.exit(0 if kk.isa_supported("amx") else 1)' 2>/dev/null; then
  echo "FAIL  the amx tier is not supported here (see $OUT/info.log)" | tee -a "$summary"
  failed=1
fi
step "kernel pytest suite (every supported tier)" 240 "$OUT/pytest.log" \
  "$PYTHON" -m pytest -q -rA -p no:cacheprovider "$pkg/tests"
step "build amx C++ tests (real AMX)" 120 "$BIN/build.log" bash "$pkg/tests/cpp/build_amx_tests.sh" real "$BIN"
step "amx_kernels_test (real AMX vs float64)" 120 "$OUT/amx_kernels_test.log" "$BIN/amx_kernels_test"
step "amx_selftest (GEMM microbenchmark)" 240 "$OUT/amx_selftest.log" "$BIN/amx_selftest" --out "$OUT"

echo "== summary"
cat "$summary"
exit "$failed"
