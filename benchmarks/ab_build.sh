#!/usr/bin/env bash
# Builds the _core extension of a commit (or of a kernel package directory) in its own nanobind domain,
# so benchmarks/ab_inprocess.py can load it beside another build in one process:
#   bash benchmarks/ab_build.sh COMMIT|DIR LABEL  ->  prints _out/ab-build/LABEL/_core*.so
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: bash benchmarks/ab_build.sh COMMIT|KERNEL_PACKAGE_DIR LABEL" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
spec=$1 label=$2
src=$root/_out/ab-build/$label-src
rm -rf "$src" && mkdir -p "$src"
if [ -d "$spec" ]; then
  cp -r "$spec"/. "$src"/
elif git -C "$root" rev-parse -q --verify "$spec^{commit}" >/dev/null; then
  git -C "$root" archive "$spec" packages/kt-sft-kernels | tar -x -C "$src" --strip-components=2
else
  echo "ab_build: '$spec' is neither a directory nor a commit" >&2; exit 2
fi
# Own nanobind domain: two builds register the same C++ types, which one domain refuses.
sed -i "s/nanobind_add_module(_core NB_STATIC/nanobind_add_module(_core NB_STATIC NB_DOMAIN kt_ab_$label/" "$src/CMakeLists.txt"
grep -q "NB_DOMAIN kt_ab_$label" "$src/CMakeLists.txt" || { echo "ab_build: could not set NB_DOMAIN" >&2; exit 1; }
out=$root/_out/ab-build/$label
generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi
cmake -S "$src" -B "$out" "${generator[@]}" -DPython_EXECUTABLE="${PYTHON:-python3}" -DSKBUILD_PROJECT_VERSION=0.1.0 >/dev/null
cmake --build "$out" --target _core --parallel "$(nproc)" >/dev/null
ls "$out"/_core*.so
