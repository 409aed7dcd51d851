#!/usr/bin/env bash
# The long prefix-caching fuzz run: PROCESSES pytest processes on the CPU (one thread each), each
# running EXAMPLES random schedules of tests/test_fuzz.py's prefix test with its own hypothesis
# seed (1..PROCESSES); prints the schedules that passed and failed in all, and exits 1 on a failure.
#
#   scripts/fuzz_prefix.sh 2 5100      # 10,200 schedules: ~25 minutes on 2 cores
#   scripts/fuzz_prefix.sh 2 5         # a quick check
set -u
procs=${1:?usage: scripts/fuzz_prefix.sh PROCESSES EXAMPLES_EACH}
each=${2:?usage: scripts/fuzz_prefix.sh PROCESSES EXAMPLES_EACH}
cd "$(dirname "$0")/.."
logs=$(mktemp -d)
for seed in $(seq 1 "$procs"); do
  CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 AUTODEPLOY_FUZZ_EXAMPLES="$each" \
    python -m pytest -q -p no:cacheprovider tests/test_fuzz.py -k prefix --hypothesis-seed="$seed" \
    --hypothesis-show-statistics > "$logs/$seed.log" 2>&1 &
done
wait
passed=$(grep -ho '[0-9]* passing,' "$logs"/*.log | awk '{s += $1} END {print s + 0}')
failed_runs=$(grep -L ' passed' "$logs"/*.log | wc -l)
echo "prefix fuzz: $passed schedules passed over $procs processes; $failed_runs processes failed (logs: $logs)"
if [ "$failed_runs" -ne 0 ]; then
  grep -l -L ' passed' "$logs"/*.log | head -3 | xargs -r tail -n 40
  exit 1
fi
