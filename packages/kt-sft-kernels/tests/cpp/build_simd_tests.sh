#!/usr/bin/env bash
# Builds and runs tests/cpp/simd_tiers_test.cpp (not part of the wheel's CMake build):
#   tests/cpp/build_simd_tests.sh emulate [OUTDIR]  any x86-64 CPU: AVX-512 intrinsics from SIMDe
#                                                   (Debian/Ubuntu: apt-get install libsimde-dev)
#   tests/cpp/build_simd_tests.sh real [OUTDIR]     an AVX-512 BF16 CPU: the wheel's per-tier flags
set -euo pipefail
mode=${1:?usage: build_simd_tests.sh emulate|real [OUTDIR]}
pkg=$(cd "$(dirname "$0")/../.." && pwd)
out=${2:-$pkg/build/simd-tests}
mkdir -p "$out"
cxx=${CXX:-g++}
common=(-std=c++20 -O2 -Wall -Wextra -Wpedantic -Wno-psabi -I"$pkg/include")
avx2=(-mavx2 -mfma -mf16c)
avx512=("${avx2[@]}" -mavx512f -mavx512bw -mavx512dq -mavx512vl)
avx512_bf16=("${avx512[@]}" -mavx512bf16 -mavx512vnni)
if [[ $mode == emulate ]]; then
  avx2=(-DKT_SFT_EMULATE_X86_WITH_SIMDE)
  avx512=(-DKT_SFT_EMULATE_X86_WITH_SIMDE)
  avx512_bf16=(-DKT_SFT_EMULATE_X86_WITH_SIMDE)
elif [[ $mode != real ]]; then
  echo "unknown mode $mode" >&2
  exit 2
fi
"$cxx" "${common[@]}" -c -o "$out/portable.o" "$pkg/src/isa/portable/kernels.cpp" &
"$cxx" "${common[@]}" "${avx2[@]}" -c -o "$out/avx2.o" "$pkg/src/isa/avx2/kernels.cpp" &
"$cxx" "${common[@]}" "${avx512[@]}" -c -o "$out/avx512.o" "$pkg/src/isa/avx512/kernels.cpp" &
"$cxx" "${common[@]}" "${avx512_bf16[@]}" -c -o "$out/avx512_bf16.o" "$pkg/src/isa/avx512_bf16/kernels.cpp" &
wait
"$cxx" "${common[@]}" -o "$out/simd_tiers_test" "$pkg/tests/cpp/simd_tiers_test.cpp" \
  "$out/portable.o" "$out/avx2.o" "$out/avx512.o" "$out/avx512_bf16.o"
"$out/simd_tiers_test"
