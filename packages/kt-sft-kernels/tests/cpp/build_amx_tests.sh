#!/usr/bin/env bash
# Builds the amx tier's C++ tests by hand (they are not part of the wheel's CMake build).
#   tests/cpp/build_amx_tests.sh emulate [OUTDIR] [--test-only]  any x86-64 with AVX2: AMX and AVX-512 emulated in C++
#   tests/cpp/build_amx_tests.sh real [OUTDIR] [--test-only]     an AMX machine: the wheel's amx flags, real instructions
# --test-only skips the self-test/microbenchmark (tests/test_amx_cpp.py needs just the test).
set -euo pipefail
mode=${1:?usage: build_amx_tests.sh emulate|real [OUTDIR]}
pkg=$(cd "$(dirname "$0")/../.." && pwd)
out=${2:-$pkg/build/amx-tests}
programs=(amx_kernels_test amx_selftest)
[ "${3:-}" = "--test-only" ] && programs=(amx_kernels_test)
mkdir -p "$out"
cxx=${CXX:-g++}
common=(-std=c++20 -O2 -g -Wall -Wextra -Wpedantic -Wshadow -Wno-psabi -I"$pkg/include" -pthread)
case "$mode" in
  emulate)
    flags=(-mavx2 -mfma -mf16c -DKT_AMX_EMULATE)
    "$cxx" "${common[@]}" "${flags[@]}" -c -o "$out/amx_kernels_emulated.o" "$pkg/src/isa/amx/kernels.cpp"
    "$cxx" "${common[@]}" -c -o "$out/cpu_features.o" "$pkg/src/runtime/cpu_features.cpp"
    for name in "${programs[@]}"; do
      "$cxx" "${common[@]}" "${flags[@]}" -o "$out/${name}_emulated" \
        "$pkg/tests/cpp/$name.cpp" "$out/amx_kernels_emulated.o" "$out/cpu_features.o"
      echo "$out/${name}_emulated"
    done
    ;;
  real)
    flags=(-mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512bf16 -mavx512vnni
           -mamx-tile -mamx-bf16 -mamx-int8)
    # cpu_features.cpp requests the AMX permission; like in the wheel, it gets no -m flags.
    "$cxx" "${common[@]}" -c -o "$out/cpu_features.o" "$pkg/src/runtime/cpu_features.cpp"
    "$cxx" "${common[@]}" "${flags[@]}" -c -o "$out/amx_kernels.o" "$pkg/src/isa/amx/kernels.cpp"
    for name in "${programs[@]}"; do
      "$cxx" "${common[@]}" "${flags[@]}" -o "$out/$name" "$pkg/tests/cpp/$name.cpp" "$out/amx_kernels.o" "$out/cpu_features.o"
      echo "$out/$name"
    done
    ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
