#!/usr/bin/env bash
# The GPU tests of the newest code paths, in a few minutes (scripts/gpu_check.sh runs them all):
# programmatic dependent launch (same bits and tokens as plain launches), prefix caching under CUDA
# graphs with poisoned replays, the flashinfer backend's host half, CUDA graphs == eager tokens on
# the zoo's hybrid, Mamba and Gemma models, the build-time self-check in bf16, LLM(model) with no
# options, the fused Mamba2 mixer at bench sizes, and the Triton op tests in bf16.
# Expects the environment of scripts/gpu_env.sh (wheels installed, PYTHONPATH set). Reports to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
P="python3 -m pytest -p no:cacheprovider -o log_level=WARNING"
status=0
timeout "${TESTS_LIMIT:-420}" $P -v -m gpu tests/test_gpu.py tests/test_defaults.py tests/test_self_check.py \
  tests/runtime/test_prefix_cache.py tests/custom_ops/test_linear.py tests/custom_ops/test_triton_mamba_mixer.py \
  -k "programmatic or prefix or flashinfer or long_prompt or false_alarm or bench_hybrid_sizes or immune_to_poison \
  or (cuda_graphs_give_eager_tokens and (hybrid or gemma3 or mamba2))" 2>&1 | tee "$OUT/pytest_gpu.txt" | grep -E "PASSED|FAILED|ERROR|passed|failed" | tail -30 || status=1
timeout "${OPS_LIMIT:-120}" $P -q tests/custom_ops/test_linear.py tests/custom_ops/test_norm_linear.py \
  tests/custom_ops/test_triton_prepare_metadata.py tests/custom_ops/test_triton_kv_write.py \
  tests/custom_ops/test_triton_mamba_mixer.py 2>&1 | tee "$OUT/pytest_ops.txt" | tail -4 || status=1
exit $status
