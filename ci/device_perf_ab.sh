#!/usr/bin/env bash
# A/B timing of several kernel package trees on ONE machine (timings from different machines do not
# compare): OUT=/tmp/ab bash ci/device_perf_ab.sh LABEL=DIR [LABEL=DIR ...]. Each tree is built into
# its own site dir and timed by ci/device_perf.sh (tests only for the last tree; DeepSeek-V3 only for
# the last tree unless KT_PERF_SKIP_DSV3=1; every tree with KT_PERF_AB_SKIP_DSV3=0). Logs in $OUT/LABEL/.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/kt-perf-ab}
n=$#
i=0
status=0
for spec in "$@"; do
  i=$((i + 1))
  label=${spec%%=*}
  dir=${spec#*=}
  mkdir -p "$OUT/$label"
  echo "######## $label ($dir)"
  if [ "$i" -lt "$n" ]; then
    KT_PERF_SKIP_TESTS=${KT_PERF_AB_SKIP_TESTS:-1} KT_PERF_SKIP_DSV3=${KT_PERF_AB_SKIP_DSV3:-1} KT_PERF_SITE=/tmp/kt-perf-site-$label OUT=$OUT/$label \
      bash "$here/device_perf.sh" "$dir" 2>&1 | tee "$OUT/$label/perf.log" | grep -E "THP|build|T=|determinism|FAIL|Error|error|passed|failed" || status=1
  else
    KT_PERF_SITE=/tmp/kt-perf-site-$label OUT=$OUT/$label bash "$here/device_perf.sh" "$dir" 2>&1 \
      | tee "$OUT/$label/perf.log" || status=1
  fi
done
exit $status
