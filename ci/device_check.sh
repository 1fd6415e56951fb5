#!/usr/bin/env bash
# The accelerator-machine run (DESIGN.md §6 layer 5), by stage: `bash ci/device_check.sh STAGE...`
#   kernels  runtime probe + kernel suite at every tier + AMX C++ tests + layer timing (device_amx_check.sh)
#   bench    benchmarks/bench_moe.py, our tiers vs PyTorch vs kt-kernel 0.7.2, Qwen3-30B-A3B T=512,4096
#   train    the training suites with the GPU for non-expert parts and the best tier for experts
#   e2e      benchmarks/e2e_train.py (full-width Qwen3-30B-A3B layers, GPU + AMX; kt-kernel's wrapper too)
# Needs: the ignored folders .whl (pytest, ml_dtypes, setuptools wheels for Python 3.12) and .kt_kernel/py312
# carried along. Everything lands in $OUT/device.tar.gz plus one summary printed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/_out/device}
work=$(mktemp -d)
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
summary=$work/summary.txt
# Both wheels, built here (no network: --no-build-isolation uses the machine's nanobind, scikit-build-core
# and the carried setuptools).
python3 -m pip install -q --no-build-isolation --no-deps ./packages/kt-sft-kernels ./packages/kt-sft-train \
  >"$work/install.log" 2>&1 || { echo "install failed"; tail -n 30 "$work/install.log"; }
run() {  # run NAME LIMIT COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$work/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$summary"
}
nproc; lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core' | tee -a "$summary"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$summary"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$summary"
for stage in "$@"; do
  case $stage in
    kernels)
      run runtime 120 bash ci/device_runtime_check.sh
      run amx 420 env OUT="$work/amx" bash ci/device_amx_check.sh
      tail -n 12 "$work/amx/summary.txt" >>"$summary" 2>/dev/null
      grep -E "^layer " "$work/amx.log" >>"$summary" ;;
    bench)
      run bench 300 python3 benchmarks/bench_moe.py --shape qwen3-30b --tokens 512,4096 --repeats 3 \
        --max-seconds 20 --out "$work/bench"
      cat "$work/bench/results.md" >>"$summary" 2>/dev/null ;;
    train)
      run train 400 python3 -m pytest -q -rs -p no:cacheprovider packages/kt-sft-train/tests
      tail -n 15 "$work/train.log" >>"$summary" ;;
    e2e)
      run e2e 560 python3 benchmarks/e2e_train.py --variants kt_sft,kt_kernel,hf_all_gpu,hf_experts_cpu \
        --steps 3 --warmup 1 --out "$work/e2e"
      cat "$work/e2e/results.md" >>"$summary" 2>/dev/null ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT" && tar -C "$work" -czf "$OUT/device.tar.gz" . && cp "$summary" "$OUT/summary.txt"
echo "===== summary"; cat "$summary"
