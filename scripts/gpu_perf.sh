#!/usr/bin/env bash
# Decode-speed measurements in one GPU call: the small-batch linear kernel against cuBLAS per weight
# shape (with a tile sweep), and decode throughput of bench-hybrid-0.6b and bench-swa-0.7b with the
# engine's options switched one at a time, side by side in one process per model. Wheels in .whl/
# (flashinfer, transformers) and flashinfer JIT builds in .fi_cache/ are used when present; the
# builds come back in $OUT. Usage: scripts/gpu_perf.sh "BENCH_DECODE_ARGS" ["BENCH_DECODE_ARGS" ...],
# one bench_decode.py run per argument (rows appended to $OUT/decode.json), e.g.
#   scripts/gpu_perf.sh "--model bench-hybrid-0.6b --batch 1 8 64 --hf --configs cudagraph:auto:auto"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
. scripts/gpu_env.sh
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
  python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -1
} | tee "$OUT/env.txt"
quiet() { grep -v '^\[transformers\]\|_warn_once\|UserWarning\|warnings.warn'; }
timeout "${GEMV_LIMIT:-150}" python3 benchmarks/bench_gemv.py --out "$OUT" ${GEMV_ARGS:---sweep} 2>&1 | quiet | tail -40
for run in "$@"; do
  # shellcheck disable=SC2086  # each argument is one bench_decode.py command line
  timeout "${DECODE_LIMIT:-330}" python3 benchmarks/bench_decode.py --out "$OUT" --append $run 2>&1 | quiet
done
true  # scripts/gpu_env.sh brings the flashinfer builds back on exit
