#!/usr/bin/env bash
# The GPU tests that cover the newest kernels, in a few minutes (scripts/gpu_check.sh runs them all):
# the fused Mamba2 mixer at bench sizes (eager against the torch chain, CUDA-graph replay against
# eager), CUDA graphs == eager tokens and poisoned replays on the zoo's hybrid, Mamba and Gemma
# models, the build-time self-check in bf16 and under CUDA graphs, LLM(model) with no options, and the
# Triton op tests (one-row GEMV, fused norms, prepare kernels, K/V write) on the GPU in bf16.
# Expects the environment of scripts/gpu_perf.sh (wheels installed, PYTHONPATH set). Reports to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
P="python3 -m pytest -q -p no:cacheprovider -o log_level=WARNING"
status=0
timeout "${TESTS_LIMIT:-420}" $P -m gpu tests/test_gpu.py tests/test_defaults.py tests/test_self_check.py \
  tests/custom_ops/test_triton_mamba_mixer.py -k "long_prompt or false_alarm or bench_hybrid_sizes or immune_to_poison \
  or (cuda_graphs_give_eager_tokens and (hybrid or gemma3 or mamba2))" 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -8 || status=1
timeout "${OPS_LIMIT:-120}" $P tests/custom_ops/test_linear.py tests/custom_ops/test_norm_linear.py \
  tests/custom_ops/test_triton_prepare_metadata.py tests/custom_ops/test_triton_kv_write.py \
  tests/custom_ops/test_triton_mamba_mixer.py 2>&1 | tee "$OUT/pytest_ops.txt" | tail -4 || status=1
exit $status
