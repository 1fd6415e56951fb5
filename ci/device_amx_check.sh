#!/usr/bin/env bash
# AMX machine check (issue 4): run from anywhere in the repository on the AMX machine, e.g.
#     OUT=/tmp/amx-check bash ci/device_amx_check.sh
# 1. builds and installs the kernel wheel (pip --no-build-isolation --no-deps; needs nanobind and
#    scikit-build-core installed, no network),
# 2. runs the kernel pytest suite, which sweeps every tier this CPU runs (amx included) through
#    kk.set_max_isa,
# 3. builds and runs the amx C++ correctness test with real AMX instructions,
# 4. runs the amx GEMM self-test/microbenchmark (Qwen3-30B-A3B expert shapes),
# 5. times one Qwen3-30B-A3B MoE layer fwd+bwd at the amx and avx512_bf16 tiers (T = 512, 4096).
# Prints one line per result and a summary; logs and JSON go to $OUT (8 files). Exit status is non-zero if any
# step failed. About 3-6 minutes on 16 vCPUs.
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
# (one log for build and report: a device run brings back at most 8 files)
step "build+install kt-sft-kernels wheel, python -m kt_sft_kernels" 300 "$OUT/wheel.log" bash -c \
  "'$PYTHON' -m pip install --no-build-isolation --no-deps --force-reinstall '$pkg' && '$PYTHON' -m kt_sft_kernels"
if ! "$PYTHON" -c 'import kt_sft_kernels as kk, sys; sys.exit(0 if kk.isa_supported("amx") else 1)' 2>/dev/null; then
  echo "FAIL  the amx tier is not supported here (see the end of $OUT/wheel.log)" | tee -a "$summary"
  failed=1
fi
step "kernel pytest suite (every supported tier)" 240 "$OUT/pytest.log" \
  "$PYTHON" -m pytest -q -rA -p no:cacheprovider "$pkg/tests"
step "build amx C++ tests (real AMX)" 120 "$BIN/build.log" bash "$pkg/tests/cpp/build_amx_tests.sh" real "$BIN"
step "amx_kernels_test (real AMX vs float64)" 120 "$OUT/amx_kernels_test.log" "$BIN/amx_kernels_test"
step "amx_selftest (GEMM microbenchmark)" 240 "$OUT/amx_selftest.log" "$BIN/amx_selftest" --out "$OUT"
step "layer timing, Qwen3-30B-A3B fwd+bwd LoRA r16, amx vs avx512_bf16" 240 "$OUT/layer_timing.log" \
  "$PYTHON" - <<'PY'
# One MoE layer as issue #4 times it (E128 H2048 I768 k8, LoRA r16 on gate_up and down, uniform
# top-k routing), all logical CPUs, best of 3 after a warm-up. Not a benchmark suite (that is
# benchmarks/bench_moe.py): a quick look at where the layer stands at the amx tier.
import os, time
import ml_dtypes
import numpy as np
import kt_sft_kernels as kk

E, H, I, K, R = 128, 2048, 768, 8, 16
rng = np.random.default_rng(0)
bf16 = ml_dtypes.bfloat16
gate_up = (rng.standard_normal((E, 2 * I, H), dtype=np.float32) * H**-0.5).astype(bf16)
down = (rng.standard_normal((E, H, I), dtype=np.float32) * I**-0.5).astype(bf16)
shapes = (((E, R, H), H**-0.5), ((E, 2 * I, R), R**-0.5), ((E, R, I), I**-0.5), ((E, H, R), R**-0.5))
lora_arrays = [rng.standard_normal(s, dtype=np.float32) * f for s, f in shapes]
lora = kk.LoRA(*lora_arrays, 2.0, 2.0)
grads = kk.LoRAGrads(*(np.empty_like(a) for a in lora_arrays))
threads = os.cpu_count() or 1
pool = kk.ThreadPool(threads=threads)
targets = {512: "<= 1.25 x weight-streaming floor (~30-38 ms)", 4096: "<= 135 ms"}
for tier in [t for t in ("avx512_bf16", "amx") if kk.isa_supported(t)]:
    kk.set_max_isa(tier)
    layer = kk.MoELayer(kk.MoEConfig(num_experts=E, top_k=K, hidden=H, intermediate=I), pool=pool)
    layer.load_weights(gate_up=gate_up, down=down)
    for T in (512, 4096):
        x = rng.standard_normal((T, H), dtype=np.float32).astype(bf16)
        g = rng.standard_normal((T, H), dtype=np.float32).astype(bf16)
        ids = np.argsort(rng.standard_normal((T, E)), axis=1)[:, :K].astype(np.int32)
        w = rng.uniform(0.1, 1, (T, K)).astype(np.float32)
        out, dx, gw = np.empty((T, H), bf16), np.empty((T, H), bf16), np.empty((T, K), np.float32)
        best_f = best_fb = float("inf")
        for run in range(4):
            t0 = time.perf_counter()
            saved = layer.forward(x, ids, w, out, lora=lora, save=True)
            t1 = time.perf_counter()
            layer.backward(saved, g, dx, grad_weights=gw, lora_grads=grads)
            t2 = time.perf_counter()
            if run:
                best_f, best_fb = min(best_f, t1 - t0), min(best_fb, t2 - t0)
        print(f"layer Qwen3-30B-A3B T={T} tier={tier} threads={threads}: fwd {1e3 * best_f:.1f} ms, "
              f"fwd+bwd {1e3 * best_fb:.1f} ms (issue #4 target {targets[T]})", flush=True)
kk.set_max_isa(None)
PY

echo "== summary"
cat "$summary"
exit "$failed"
