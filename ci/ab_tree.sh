#!/usr/bin/env bash
# Exports the kernel package of a commit for `ci/device.sh perf-ab LABEL=COMMIT` on a machine whose copy
# of the repository has no .git:  bash ci/ab_tree.sh COMMIT  ->  _out/ab/COMMIT/packages/kt-sft-kernels
# (carry _out/ab/COMMIT to the device machine with the run).
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: bash ci/ab_tree.sh COMMIT" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
git -C "$root" rev-parse -q --verify "$1^{commit}" >/dev/null || { echo "ab_tree: '$1' is not a commit" >&2; exit 2; }
dest=$root/_out/ab/$1
rm -rf "$dest" && mkdir -p "$dest"
git -C "$root" archive "$1" packages/kt-sft-kernels | tar -x -C "$dest"
echo "$dest/packages/kt-sft-kernels"
