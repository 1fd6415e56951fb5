#!/usr/bin/env bash
# Builds and runs gemm_microbench.cpp on an AVX-512 BF16 machine:
#   benchmarks/cpp/gemm_microbench.sh [BASELINE_KERNELS_DIR]
# BASELINE_KERNELS_DIR: another tree's packages/kt-sft-kernels; its avx512_bf16 tier is timed beside
# this tree's avx512 tier in the same process (renamed namespace). Flags as the wheel's Release build (-O3).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pkg=$(cd "$here/../../packages/kt-sft-kernels" && pwd)
out=$(mktemp -d)
cxx=${CXX:-g++}
common=(-std=c++20 -O3 -DNDEBUG -Wall -Wextra -Wno-psabi -I"$pkg/include")
avx512=(-mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512dq -mavx512vl)
bf16=("${avx512[@]}" -mavx512bf16 -mavx512vnni)
objs=("$out/avx512.o")
"$cxx" "${common[@]}" "${avx512[@]}" -c -o "$out/avx512.o" "$pkg/src/isa/avx512/kernels.cpp" &
defs=()
if [ $# -ge 1 ]; then
  base=$(cd "$1" && pwd)
  "$cxx" "${common[@]}" "${bf16[@]}" -I"$base/include" -Disa_avx512_bf16=isa_avx512_bf16_baseline \
    -c -o "$out/baseline.o" "$base/src/isa/avx512_bf16/kernels.cpp" &
  objs+=("$out/baseline.o")
  defs=(-DKT_MICROBENCH_BASELINE)
fi
wait
"$cxx" "${common[@]}" "${bf16[@]}" "${defs[@]}" -o "$out/gemm_microbench" "$here/gemm_microbench.cpp" \
  "${objs[@]}" -lpthread
"$out/gemm_microbench"
