#!/usr/bin/env bash
# On a GPU machine, from the project root: the GPU tests (fast kernels against the PyTorch fallbacks,
# whole-model compile without graph breaks, a 2-GPU run when there are 2 GPUs) and the kernel
# benchmarks, each log kept in $OUT (or /tmp/gpu_check) so nothing is lost to a truncated console.
# Uses .bench/gpu_env.sh for the kernel packages where that folder exists.
#   BENCH_ARGS="--what ssd,attn" bash tools/gpu_check.sh
set -uo pipefail
[ -f .bench/gpu_env.sh ] && source .bench/gpu_env.sh
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pytest -m gpu tests/test_gpu.py -q -rA --durations=5 > "$out/gpu_tests.log" 2>&1
echo "gpu tests: exit $? -> $out/gpu_tests.log"; grep -E "^(PASSED|FAILED|SKIPPED|ERROR)|passed|failed" "$out/gpu_tests.log" | tail -40
python3 tools/bench_step.py ${BENCH_ARGS:---what ssd,attn} > "$out/bench_step.log" 2>&1
echo "bench: exit $? -> $out/bench_step.log"; grep -v "^kernels:" "$out/bench_step.log" | tail -30
