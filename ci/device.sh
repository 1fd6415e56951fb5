#!/usr/bin/env bash
# The accelerator-machine run (DESIGN.md §6 layer 5), by named stage, from anywhere in the repository:
#     OUT=/tmp/device bash ci/device.sh STAGE... [perf-ab LABEL=DIR...]
# Stages (each does what one of the former ci/device_*.sh scripts did; the wheels are built once, by
# pip through scikit-build-core, and the C++ programs once, through CMake):
#   build       install both wheels (pip --no-build-isolation --no-deps: no network), python -m kt_sft_kernels;
#               run first automatically by every stage that needs it
#   runtime     runtime/binding probes + suites under three process setups (the device-run-1 segfault hunt)
#   kernels     the kernel pytest suite, which sweeps every tier this CPU runs
#   amx-cpp     CMake's C++ tests with the real instructions: amx_kernels_test, amx_layer_test
#   amx-rates   amx_selftest (the tier's GEMM rates)
#   simd-cpp    simd_tiers_test (every SIMD tier's table entry vs portable, real instructions)
#   layer       one Qwen3-30B-A3B MoE layer fwd+bwd at avx512_bf16 and amx (ci/device/layer_timing.py)
#   microbench  benchmarks/cpp/gemm_microbench (per-call GEMM rates, avx512 tier)
#   amx-probe   benchmarks/cpp/amx_tile_probe (ns per AMX tile product by tile shape, one core)
#   bench       benchmarks/bench_moe.py: our tiers vs PyTorch vs kt-kernel 0.7.2, Qwen3-30B-A3B T=512,4096
#   numa-cost   issue 13: 2 vs 1 NUMA shards on this one node, Qwen3-30B-A3B T=512,4096 amx: bench_moe.py
#               --numa-shards 1,2, then benchmarks/shard_cost.py (one process, interleaved, + stage profile)
#   bench-quant       bench_moe.py, quantized bases (issue 11): ours amx bf16/int8/int4 vs kt-kernel bf16/int8/int4,
#               Qwen3-30B-A3B T=512,4096
#   bench-quant-dsv3  DeepSeek-V3 T=4096: ours amx bf16/int8 vs kt-kernel int8; bench-quant-dsv3-int4: ours int4
#               vs kt-kernel int4. Each takes most of a device call (22.5 GB of weights made by every process;
#               the whole set did not finish in 575 s): run them in separate calls. Results go straight to
#               $OUT/STAGE/ after every backend.
#   tune        benchmarks/tune_sweep.py: the amx tier's prefetch knobs, Qwen3-30B-A3B T=512,4096 bf16 and int8,
#               one process, $KT_TUNE_ROUNDS rounds (default 5); its tables go to the summary
#   train-gpu   the training suites, GPU for the non-expert parts, the best tier for the experts
#   e2e         benchmarks/e2e_train.py (full-width Qwen3-30B-A3B layers, GPU + AMX; kt-kernel's wrapper too)
#   e2e-overlap issue 17, 48-layer Qwen3-30B-A3B, batch 2 x seq 2048, variants from $KT_E2E_VARIANTS (default
#               kt_sft; one variant per device command: kt_sft, kt_sft_no_overlap, kt_kernel), one traced step;
#               $KT_E2E_WEIGHT_DTYPE (bf16, int8, int4) is the kt-sft variants' expert base
#   e2e-dtypes  issues 11/17: 48-layer Qwen3-30B-A3B, batch 2 x 2048, no overlap, one run per expert base in
#               $KT_E2E_WEIGHT_DTYPES (default "bf16 int8 int4"), the first traced (plot_trace --summary);
#               $KT_E2E_STEPS timed steps (default 2)
#   e2e-dsv3    DeepSeek-V3 MoE widths (E256 H7168 I2048), $KT_E2E_LAYERS (default 3) layers, batch 2 x 2048,
#               --grad-ckpt, kt_sft then kt_sft_no_overlap
#   e2e-long    seq $KT_E2E_SEQ (default 8192) x batch 2, $KT_E2E_LAYERS (default 8) Qwen3-30B-A3B layers,
#               --grad-ckpt, $KT_E2E_VARIANTS (default kt_sft,kt_sft_no_overlap)
#   ab BASE[,BASE...]  this tree against each BASE (a commit, exported by git here or by ci/ab_tree.sh and
#               carried, or a kernel package directory) on the tier $KT_AB_TIER (default amx):
#               benchmarks/ab_inprocess.py (all builds in one process, interleaved; int8 and bf16 layers,
#               numa_shards 1 and 2, T=512,4096), then benchmarks/shard_cost.py of this tree and the first
#               BASE, one process each, alternated twice (2 / 1 NUMA shards on this node); the A/B's json
#               and plot land in $OUT/ab
#   perf        amx numerics/profiler/C++ tests + ci/device/perf_layer.py on this tree (KT_PERF_* env knobs)
#   perf-ab LABEL=DIR|COMMIT...  perf of several kernel package trees on this one machine, each in its own
#               site, at every tier of KT_PERF_AB_TIERS (default "amx avx512_bf16"); a COMMIT (e.g. base=HEAD~1)
#               is exported from git here, or from _out/ab/COMMIT (ci/ab_tree.sh COMMIT, carried) where the
#               copy has no .git; must be the last stage (it takes the rest of the arguments)
# Former scripts: device_check.sh kernels = `runtime kernels amx-cpp layer`; device_amx_check.sh =
# `kernels amx-cpp layer`; device_kernels_check.sh = `kernels layer`; device_runtime_check.sh = `runtime`;
# device_perf.sh [DIR] = `perf` (KT_PERF_PKG=DIR); device_perf_ab.sh ARGS = `perf-ab ARGS`.
# Optional carried folders: .whl (pytest, ml_dtypes, setuptools wheels) and .kt_kernel/py312.
# Everything lands in $OUT/device.tar.gz plus $OUT/summary.txt; exit status non-zero if a stage failed.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
kernels_pkg=$root/packages/kt-sft-kernels
OUT=${OUT:-$root/_out/device}
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
summary=$work/summary.txt
failed=0
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
[ $# -ge 1 ] || { sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 2; }
if [ -d .whl ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME LIMIT COMMAND...: COMMAND under a time limit, output in $work/NAME.log, one summary line
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS rc
  # The running step's output also goes to $OUT/running.log: what a call cut off mid-step returns.
  mkdir -p "$OUT"
  if [ "$(type -t "$1")" = function ]; then  # a stage function: its commands carry their own limits
    ("$@") 2>&1 | tee "$OUT/running.log" >"$work/$name.log"
  else
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/running.log" >"$work/$name.log"
  fi
  rc=${PIPESTATUS[0]}
  tail -n 30 "$work/$name.log"
  if [ "$rc" -ne 0 ]; then failed=1; fi
  echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$summary"
  save
  return "$rc"
}

save() {  # everything so far to $OUT, after every step: a call cut off at its limit still returns it
  mkdir -p "$OUT" && tar -C "$work" -czf "$OUT/device.tar.gz" . && cp "$summary" "$OUT/summary.txt"
}

built=0
ensure_built() {
  [ "$built" = 1 ] && return 0
  built=1
  step build 600 bash -c "'$PYTHON' -m pip install --no-build-isolation --no-deps --force-reinstall \
    ./packages/kt-sft-kernels ./packages/kt-sft-train && '$PYTHON' -m kt_sft_kernels"
}

cpp_built=0
ensure_cpp_built() {  # the C++ tests, real instructions, one CMake build directory
  [ "$cpp_built" = 1 ] && return 0
  cpp_built=1
  step cpp-build 300 bash -c "cmake -S '$kernels_pkg' -B '$work/cpp' -DKT_SFT_BUILD_EXTENSION=OFF \
    -DKT_SFT_BUILD_CPP_TESTS=ON && cmake --build '$work/cpp'"
}

runtime_probes() {  # device run 1 segfaulted inside pytest; these separate the candidate causes
  local tests=$kernels_pkg/tests
  uname -a; ldd --version | head -n 1; ulimit -s
  "$PYTHON" -c "import os, sys; print(sys.version); print('affinity', sorted(os.sched_getaffinity(0)))"
  "$PYTHON" -c "import importlib.metadata as m; print('pytest plugins:', sorted(e.value for e in m.entry_points(group='pytest11')))"
  probe() {
    echo "== $1"
    timeout 300 "$PYTHON" -X faulthandler -c "import kt_sft_kernels as kk
from kt_sft_kernels._core import _testing as t
$2"
    echo "   exit status $?"
  }
  local pool_check="
print(kk.cpu_features()['amx_permission'])
assert len({kk.physical_cores() for _ in range(2000)}) == 1
print(kk.default_pool(), t.pool_run_counting(kk.default_pool(), 100) == [1] * 100)"
  probe "detection, then physical_cores() x2000 and the default pool" "$pool_check"
  probe "NumPy + numpy.linalg (OpenBLAS threads) + ml_dtypes loaded first" "
import numpy, numpy.linalg, ml_dtypes
numpy.linalg.inv(numpy.eye(64) * 2.0)$pool_check"
  run_pytest() {
    local name=$1; shift
    echo "== pytest: $name"
    env "$@" timeout 600 "$PYTHON" -X faulthandler -m pytest -q -rs -p no:cacheprovider \
      "$tests/test_runtime.py" "$tests/test_bindings.py" "$tests/test_import.py" 2>&1 | tail -n 40
    echo "   exit status ${PIPESTATUS[0]}"
  }
  run_pytest "plain" PYTHONFAULTHANDLER=1
  run_pytest "no auto-loaded plugins" PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
  local malloc_debug
  malloc_debug=$(ls /usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0 /lib/x86_64-linux-gnu/libc_malloc_debug.so.0 \
    2>/dev/null | head -n 1)
  if [ -n "$malloc_debug" ]; then
    run_pytest "glibc malloc checking" LD_PRELOAD="$malloc_debug" GLIBC_TUNABLES=glibc.malloc.check=3
  fi
  if command -v cuda-gdb >/dev/null; then  # the image has no gdb; cuda-gdb debugs CPU-only programs too
    echo "== cuda-gdb backtrace of the runtime suite (only meaningful if it crashes)"
    timeout 600 cuda-gdb -q -batch -ex "set pagination off" -ex "handle SIGSEGV stop print" -ex run \
      -ex "bt 30" -ex "info registers rip rsp" -ex "x/8i \$pc" -ex "info symbol \$pc" \
      --args "$PYTHON" -m pytest -q -p no:cacheprovider -p no:faulthandler "$tests/test_runtime.py" 2>&1 | tail -n 120
  fi
}

perf_tree() {  # perf_tree PKG_DIR SITE OUT_DIR: build PKG_DIR into SITE, amx tests (unless skipped), timing
  local pkg site dir rc=0
  pkg=$(cd "$1" && pwd) site=$2 dir=$3
  mkdir -p "$dir"
  echo "THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)" \
    "defrag: $(cat /sys/kernel/mm/transparent_hugepage/defrag 2>/dev/null)"
  "$PYTHON" -m pip install --no-build-isolation --no-deps -q --upgrade --target "$site" \
    -C build-dir="$site-build" "$pkg" >"$dir/build.log" 2>&1 || { tail -n 40 "$dir/build.log"; return 1; }
  echo "build ok ($pkg)"
  if [ "${KT_PERF_SKIP_TESTS:-0}" != 1 ]; then
    (cd "$pkg/tests" && PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} timeout 300 "$PYTHON" -m pytest -q \
      -p no:cacheprovider test_moe_numerics.py test_profiler.py test_amx_cpp.py -k "amx or profiler or report" \
      2>&1 | tail -n 15) || rc=1
  fi
  local tier
  for tier in ${KT_PERF_TIERS:-amx}; do  # perf_layer.py prints the tier on every line
    mkdir -p "$dir/$tier"
    KT_PERF_TIER=$tier PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} timeout 420 "$PYTHON" \
      "$root/ci/device/perf_layer.py" "$dir/$tier" || rc=1
  done
  return $rc
}

# Issue 11/17: the whole 48-layer Qwen3-30B-A3B at batch 2 x 2048, kt-sft without overlap, one process per
# expert base in $KT_E2E_WEIGHT_DTYPES (default "bf16 int8 int4"); the first one traced and summarised.
e2e_dtypes() {
  local dtype first=1 rc=0
  for dtype in ${KT_E2E_WEIGHT_DTYPES:-bf16 int8 int4}; do
    local trace=""
    [ $first = 1 ] && trace="$work/e2e-dtypes/step_$dtype.json" && first=0
    "$PYTHON" benchmarks/e2e_train.py --variants kt_sft_no_overlap --layers "${KT_E2E_LAYERS:-48}" --batch 2 \
      --seq-len 2048 --steps "${KT_E2E_STEPS:-2}" --warmup 1 --split-steps 1 --weight-dtype "$dtype" ${trace:+--trace "$trace"} \
      --out "$work/e2e-dtypes/$dtype" || rc=1
    cat "$work/e2e-dtypes/$dtype/results.md" >>"$summary" 2>/dev/null
  done
  for f in "$work"/e2e-dtypes/step_*.json; do
    [ -f "$f" ] && "$PYTHON" benchmarks/plot_trace.py "$f" --summary >>"$summary" 2>&1 && gzip -f "$f"
  done
  return $rc
}

# A perf-ab tree: a directory, or a commit whose packages/kt-sft-kernels is exported to _out/ab/COMMIT
# (by git here, or beforehand by ci/ab_tree.sh where the device copy has no .git).
ab_tree() {
  local spec=$1 dest=$root/_out/ab/$1
  if [ -d "$spec" ]; then echo "$spec"; return 0; fi
  if [ ! -d "$dest/packages/kt-sft-kernels" ]; then
    if ! git -C "$root" rev-parse -q --verify "$spec^{commit}" >/dev/null 2>&1; then
      echo "perf-ab: '$spec' is neither a directory nor a commit of this copy; run 'bash ci/ab_tree.sh $spec'" \
        "and carry _out/ab/$spec" >&2
      return 1
    fi
    mkdir -p "$dest" && git -C "$root" archive "$spec" packages/kt-sft-kernels | tar -x -C "$dest" || return 1
  fi
  echo "$dest/packages/kt-sft-kernels"
}

ab_against() {  # BASE[,BASE...]: the A/Bs of the `ab` stage, this tree ("new", installed by build) against each
  local threads spec dir label first="" i=0 cores=()
  threads=$(nproc)
  PYTHON=$PYTHON bash benchmarks/ab_build.sh "$kernels_pkg" new || return 1
  cores+=(--core "new=$(ls "$root"/_out/ab-build/new/_core*.so)")
  for spec in ${1//,/ }; do
    i=$((i + 1)) label=base$i
    [ "$i" = 1 ] && label=base
    dir=$(ab_tree "$spec") || return 1
    [ -n "$first" ] || first=$dir
    PYTHON=$PYTHON bash benchmarks/ab_build.sh "$dir" "$label" || return 1
    cores+=(--core "$label=$(ls "$root"/_out/ab-build/$label/_core*.so)")
  done
  mkdir -p "$OUT/ab"
  timeout 300 "$PYTHON" benchmarks/ab_inprocess.py "${cores[@]}" --tier "${KT_AB_TIER:-amx}" --threads "$threads" \
    --weight-dtype int8,bf16 --numa-shards 1,2 --tokens 512,4096 --rounds 5 --tiny-calls 0 --json "$OUT/ab/ab.json" \
    --plot "$OUT/ab/ab.png" || return 1
  "$PYTHON" -m pip install -q --no-build-isolation --no-deps --upgrade --target /tmp/kt-ab-site-base "$first" || return 1
  local tree site
  for tree in new base new base; do
    site=""
    [ "$tree" = base ] && site=/tmp/kt-ab-site-base
    echo "######## shard_cost, $tree"
    PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} KT_SFT_MAX_ISA=${KT_AB_TIER:-amx} timeout 90 "$PYTHON" benchmarks/shard_cost.py \
      --experts 128 --tokens 512,4096 --repeats 7 --no-profile || return 1
  done
}

perf_ab() {  # LABEL=DIR|COMMIT...: every tree but the last without tests and DeepSeek-V3 (env overrides)
  local n=$# i=0 rc=0 spec label dir
  export KT_PERF_TIERS=${KT_PERF_AB_TIERS:-amx avx512_bf16}
  for spec in "$@"; do
    i=$((i + 1)) label=${spec%%=*}
    dir=$(ab_tree "${spec#*=}") || { rc=1; continue; }
    echo "######## $label ($dir)"
    if [ "$i" -lt "$n" ]; then
      KT_PERF_SKIP_TESTS=${KT_PERF_AB_SKIP_TESTS:-1} KT_PERF_SKIP_DSV3=${KT_PERF_AB_SKIP_DSV3:-1} \
        perf_tree "$dir" "/tmp/kt-perf-site-$label" "$work/perf-ab/$label" || rc=1
    else
      perf_tree "$dir" "/tmp/kt-perf-site-$label" "$work/perf-ab/$label" || rc=1
    fi
  done
  return $rc
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  git: $(git -C "$root" log --oneline -1 2>/dev/null || echo 'no git')"
  nproc
  lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core|Socket|L1d|L2|L3|NUMA node\(s\)'
  echo "amx flags: $(grep -o -w 'amx_[a-z0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  echo "compiler: $(${CXX:-g++} --version | head -1); python: $($PYTHON --version 2>&1)"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
  "$PYTHON" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__)" 2>/dev/null
} | tee -a "$summary"

while [ $# -gt 0 ]; do
  stage=$1
  shift
  case $stage in
    build) ensure_built ;;
    runtime) ensure_built && step runtime 1500 runtime_probes ;;
    kernels) ensure_built && step kernels 600 "$PYTHON" -m pytest -q -rA -p no:cacheprovider "$kernels_pkg/tests"
      tail -n 3 "$work/kernels.log" >>"$summary" ;;
    amx-cpp) ensure_cpp_built && step amx_kernels_test 120 "$work/cpp/amx_kernels_test"
      step amx_layer_test 120 "$work/cpp/amx_layer_test"
      grep -h "checks," "$work/amx_kernels_test.log" "$work/amx_layer_test.log" >>"$summary" 2>/dev/null ;;
    amx-rates) ensure_cpp_built && step amx_selftest 240 "$work/cpp/amx_selftest" --out "$work/amx_selftest" ;;
    simd-cpp) ensure_cpp_built && step simd_tiers_test 120 "$work/cpp/simd_tiers_test"
      tail -n 1 "$work/simd_tiers_test.log" >>"$summary" ;;
    layer) ensure_built && step layer 240 "$PYTHON" ci/device/layer_timing.py
      grep -E "^layer " "$work/layer.log" >>"$summary" ;;
    microbench) step microbench 300 bash benchmarks/cpp/gemm_microbench.sh ;;
    amx-probe) step amx-probe 120 bash -c "g++ -O2 -mamx-tile -mamx-int8 -mamx-bf16 -o '$work/amx_tile_probe' \
        benchmarks/cpp/amx_tile_probe.cpp && taskset -c 1 '$work/amx_tile_probe'"
      tail -n 9 "$work/amx-probe.log" >>"$summary" ;;
    bench) ensure_built && step bench 300 "$PYTHON" benchmarks/bench_moe.py --shape qwen3-30b --tokens 512,4096 \
        --repeats 3 --max-seconds 20 --out "$work/bench"
      cat "$work/bench/results.md" >>"$summary" 2>/dev/null ;;
    numa-cost) ensure_built && step numa-bench 300 "$PYTHON" benchmarks/bench_moe.py --shape qwen3-30b \
        --tokens 512,4096 --backends ours --tiers amx --numa-shards 1,2 --repeats 3 --max-seconds 12 \
        --out "$work/numa-bench"
      cat "$work/numa-bench/results.md" >>"$summary" 2>/dev/null
      KT_SFT_MAX_ISA=amx step numa-cost 400 "$PYTHON" benchmarks/shard_cost.py --experts 128 --tokens 512,4096 \
        --repeats 7
      grep -E "T=|shard" "$work/numa-cost.log" >>"$summary" ;;
    bench-quant) ensure_built && step bench-quant 560 "$PYTHON" benchmarks/bench_moe.py --shape qwen3-30b \
        --tokens 512,4096 --backends ours,kt,kt-int8,kt-int4 --tiers amx --weight-dtype bf16,int8,int4 \
        --group-size 128 --kt-threads 15 --repeats 3 --max-seconds 15 --out "$work/bench-quant"
      cat "$work/bench-quant/results.md" >>"$summary" 2>/dev/null ;;
    bench-quant-dsv3 | bench-quant-dsv3-int4)  # one device call each; results in $OUT/$stage as each row ends
      backends=ours,kt-int8 dtypes=bf16,int8
      [ "$stage" = bench-quant-dsv3-int4 ] && backends=ours,kt-int4 dtypes=int4
      ensure_built && step "$stage" 580 "$PYTHON" benchmarks/bench_moe.py --shape deepseek-v3 --tokens 4096 \
        --backends "$backends" --tiers amx --weight-dtype "$dtypes" --group-size 128 --kt-threads 15 --repeats 2 \
        --max-seconds 15 --out "$OUT/$stage"
      cat "$OUT/$stage/results.md" >>"$summary" 2>/dev/null ;;
    tune) ensure_built && step tune 300 "$PYTHON" benchmarks/tune_sweep.py --rounds "${KT_TUNE_ROUNDS:-5}"
      sed -n '/^T=/,$p' "$work/tune.log" >>"$summary" ;;
    train-gpu) ensure_built && step train 400 "$PYTHON" -m pytest -q -rs -p no:cacheprovider packages/kt-sft-train/tests
      tail -n 15 "$work/train.log" >>"$summary" ;;
    e2e) ensure_built && step e2e 560 "$PYTHON" benchmarks/e2e_train.py \
        --variants kt_sft,kt_kernel,hf_all_gpu,hf_experts_cpu --steps 3 --warmup 1 --out "$work/e2e"
      cat "$work/e2e/results.md" >>"$summary" 2>/dev/null ;;
    e2e-overlap) ensure_built && step e2e-overlap 580 "$PYTHON" benchmarks/e2e_train.py \
        --variants "${KT_E2E_VARIANTS:-kt_sft}" --layers "${KT_E2E_LAYERS:-48}" --batch 2 --seq-len 2048 \
        --weight-dtype "${KT_E2E_WEIGHT_DTYPE:-bf16}" \
        --steps 2 --warmup 1 --split-steps 1 --trace "$work/e2e-overlap/step.json" --out "$work/e2e-overlap"
      cat "$work/e2e-overlap/results.md" >>"$summary" 2>/dev/null
      "$PYTHON" benchmarks/plot_trace.py "$work"/e2e-overlap/step*.json --summary >>"$summary" 2>&1
      gzip -f "$work"/e2e-overlap/step*.json ;;
    e2e-dtypes) ensure_built && step e2e-dtypes 590 e2e_dtypes ;;
    e2e-dsv3) ensure_built && step e2e-dsv3 580 "$PYTHON" benchmarks/e2e_train.py --shape dsv3-width \
        --variants kt_sft,kt_sft_no_overlap --layers "${KT_E2E_LAYERS:-3}" --batch 2 --seq-len 2048 --grad-ckpt \
        --steps 2 --warmup 1 --split-steps 1 --trace "$work/e2e-dsv3/step.json" --out "$work/e2e-dsv3"
      cat "$work/e2e-dsv3/results.md" >>"$summary" 2>/dev/null ;;
    e2e-long) ensure_built && step e2e-long 580 "$PYTHON" benchmarks/e2e_train.py \
        --variants "${KT_E2E_VARIANTS:-kt_sft,kt_sft_no_overlap}" --layers "${KT_E2E_LAYERS:-8}" --batch 2 \
        --seq-len "${KT_E2E_SEQ:-8192}" --grad-ckpt \
        --steps 2 --warmup 1 --split-steps 1 --trace "$work/e2e-long/step.json" --out "$work/e2e-long"
      cat "$work/e2e-long/results.md" >>"$summary" 2>/dev/null ;;
    ab) [ $# -ge 1 ] || { echo "ab needs BASE[,BASE...] (commits or kernel package directories)" >&2; exit 2; }
      ensure_built && step ab 900 ab_against "$1"
      grep -E "median|bitwise|########|shard" "$work/ab.log" >>"$summary"
      shift ;;
    perf) step perf 900 perf_tree "${KT_PERF_PKG:-$kernels_pkg}" "${KT_PERF_SITE:-/tmp/kt-perf-site}" "$work/perf"
      grep -E "T=|determinism" "$work/perf.log" >>"$summary" ;;
    perf-ab) step perf-ab 1800 perf_ab "$@"
      grep -E "########|T=|determinism" "$work/perf-ab.log" >>"$summary"
      shift $# ;;
    *) echo "unknown stage $stage (run without arguments for the list)" >&2; exit 2 ;;
  esac
done
save
echo "===== summary"; cat "$summary"
exit "$failed"
