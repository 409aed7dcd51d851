#!/usr/bin/env bash
# Every GPU benchmark in one run (under 10 minutes on an H100 with the flashinfer builds carried
# in .fi_cache/): decode throughput, the step profile, prefill, op
# overhead, memory and speculation. JSON results go to $OUT as they are measured (a section cut
# short keeps what it finished), then benchmarks/report.py writes $OUT/RESULTS_run.md and
# benchmarks/plot.py the PNGs (where matplotlib is installed; otherwise run it later from the JSON).
# Extra arguments go to bench_decode.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
. scripts/gpu_env.sh
quiet() { grep -v '^\[transformers\]\|_warn_once\|UserWarning\|warnings.warn'; }
save_builds() {  # bring the flashinfer JIT builds back after every section (pieces under 16 MB), so a
  [ -d ~/.cache/flashinfer ] || return 0  # call cut short still returns what it built
  rm -f "$OUT"/fi_cache.tgz.*; tar czf - -C ~/.cache flashinfer | split -b 15M - "$OUT/fi_cache.tgz."
}
section() {
  local limit=$1; shift; local t0=$SECONDS
  timeout "$limit" python3 "$@" 2>&1 | quiet
  local rc=${PIPESTATUS[0]}
  echo "== $1: $((SECONDS - t0)) s$([ "$rc" = 124 ] && echo ", cut at its ${limit} s limit")"
  save_builds
}
# The limits add up to 500 s, leaving room in a 600 s call for the wheel install and the report.
# Separate calls: the transforms table (bench_transforms.py --out OUT) and inductor decode rows
# (bench_decode.py --batch 64 --append --configs torch-opt:triton:flashinfer, ~40 s per build).
# CUDA-graph configurations at every batch size: both Triton backends, the auto choice (Triton
# attention, flashinfer SSM), all flashinfer
section 170 benchmarks/bench_decode.py --out "$OUT" --batch 1 8 64 --hf \
  --configs cudagraph:triton:triton cudagraph:triton:flashinfer cudagraph:flashinfer:flashinfer "$@"
section 330 benchmarks/bench_suite.py --out "$OUT"
python3 benchmarks/report.py --results "$OUT" > "$OUT/RESULTS_run.md"
python3 -c "import matplotlib" 2>/dev/null && python3 benchmarks/plot.py --results "$OUT" --out "$OUT"
true
