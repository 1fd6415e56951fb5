#!/usr/bin/env bash
# Builds (CMake option KT_SFT_BUILD_MICROBENCH, the wheel's Release flags) and runs gemm_microbench.cpp
# on an AVX-512 BF16 machine:
#   benchmarks/cpp/gemm_microbench.sh [BASELINE_KERNELS_DIR]
# BASELINE_KERNELS_DIR: another tree's packages/kt-sft-kernels; its avx512_bf16 tier is timed beside
# this tree's avx512 tier in the same process (renamed namespace). The avx512_bf16 tier's two variants
# are always both timed: "fma" is the avx512 tier's kernels, "bf16dot" the VDPBF16PS pair panels (ADR 0902).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pkg=$(cd "$here/../../packages/kt-sft-kernels" && pwd)
out=$(mktemp -d)
baseline=""
[ $# -ge 1 ] && baseline=$(cd "$1" && pwd)
cmake -S "$pkg" -B "$out" -DKT_SFT_BUILD_EXTENSION=OFF -DKT_SFT_BUILD_MICROBENCH=ON \
  -DKT_SFT_MICROBENCH_BASELINE="$baseline" >/dev/null
cmake --build "$out" -j "$(nproc)" --target gemm_microbench >/dev/null
"$out/gemm_microbench"
