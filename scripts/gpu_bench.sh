#!/usr/bin/env bash
# GPU benchmarks in one call; results (JSON) go to $OUT. See benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/tests"
python3 benchmarks/bench_decode.py --out "$OUT" "$@" 2>&1 | grep -v '^\[transformers\]'
