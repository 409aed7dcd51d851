#!/usr/bin/env bash
# Every GPU benchmark in one call (about 9 minutes on an H100 with the flashinfer builds carried in
# .fi_cache/): decode throughput, the performance transforms, prefill / op overhead / memory /
# speculation. JSON results go to $OUT; `python benchmarks/plot.py` turns them into PNGs and
# benchmarks/RESULTS.md holds the tables. Extra arguments go to bench_decode.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site
fi
if compgen -G ".fi_cache/fi_cache.tgz.*" > /dev/null; then
  mkdir -p ~/.cache && cat .fi_cache/fi_cache.tgz.* | tar xzf - -C ~/.cache
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/tests"
quiet() { grep -v '^\[transformers\]\|_warn_once\|UserWarning'; }
python3 benchmarks/bench_decode.py --out "$OUT" --batch 1 8 64 \
  --configs cudagraph:triton cudagraph:flashinfer torch-opt:triton --hf "$@" 2>&1 | quiet
python3 benchmarks/bench_transforms.py --out "$OUT" 2>&1 | quiet
python3 benchmarks/bench_suite.py --out "$OUT" 2>&1 | quiet
