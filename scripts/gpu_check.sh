#!/usr/bin/env bash
# Everything that needs a GPU, in one call: `pytest -m gpu` (backends vs the torch backend at
# model level), the Triton op tests compiled for the GPU, and the environment they ran in.
# Installs the wheels in .whl/ (flashinfer, transformers) when present.
# Usage: scripts/gpu_check.sh [extra pytest args]; the report goes to $OUT (default gpu_out/).
# Takes under 10 minutes on two GPUs (550 s on 2 H100s, the halves side by side); on one GPU the
# model tests alone take ~11 minutes: split them over two runs with -k "flashinfer" and
# -k "not flashinfer".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/tests"
# flashinfer JIT builds (minutes each) carried between machines: .fi_cache/ holds the pieces
if compgen -G ".fi_cache/fi_cache.tgz.*" > /dev/null; then
  mkdir -p ~/.cache && cat .fi_cache/fi_cache.tgz.* | tar xzf - -C ~/.cache
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
  python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -1
} | tee "$OUT/env.txt"
status=0
PYTEST="python3 -m pytest -q -o log_level=WARNING -p no:cacheprovider"
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  # two GPUs: the model-level tests in two halves side by side (under 10 minutes), and
  # tensor parallelism with NCCL over both
  (CUDA_VISIBLE_DEVICES=0 $PYTEST -m gpu tests/test_gpu.py -k "not cuda_graphs_give and not dynamo" "$@" \
    > "$OUT/pytest_gpu.txt" 2>&1) & first=$!
  (CUDA_VISIBLE_DEVICES=1 $PYTEST -m gpu tests/test_gpu.py -k "cuda_graphs_give or dynamo" "$@" \
    > "$OUT/pytest_gpu2.txt" 2>&1) & second=$!
  $PYTEST -m gpu tests/test_tensor_parallel.py > "$OUT/pytest_tp.txt" 2>&1 || status=1
  wait $first || status=1
  wait $second || status=1
  tail -n 5 "$OUT/pytest_gpu.txt" "$OUT/pytest_gpu2.txt" "$OUT/pytest_tp.txt"
else
  $PYTEST -m gpu tests/test_gpu.py "$@" 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25 || status=1
fi
python3 -m pytest -q -o log_level=WARNING -p no:cacheprovider tests/custom_ops/test_triton_attention.py \
  tests/custom_ops/test_triton_ssd_scan.py tests/custom_ops/test_triton_causal_conv1d.py tests/custom_ops/test_perf_ops.py 2>&1 \
  | tee "$OUT/pytest_triton_ops.txt" | tail -5 || status=1
if [ -d ~/.cache/flashinfer ]; then  # bring the builds back: pieces under 16 MB
  tar czf - -C ~/.cache flashinfer | split -b 15M - "$OUT/fi_cache.tgz."
fi
exit $status
