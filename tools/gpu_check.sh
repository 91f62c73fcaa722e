#!/usr/bin/env bash
# On a GPU machine, from the project root: the GPU parity tests (fast kernels against the PyTorch
# fallbacks) and the step benchmark, each log kept in $OUT (or /tmp/gpu_check) so nothing is lost to a
# truncated console. Uses .bench/gpu_env.sh for the kernel packages where that folder exists.
set -uo pipefail
[ -f .bench/gpu_env.sh ] && source .bench/gpu_env.sh
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pytest -m gpu tests/test_gpu.py -q -rA > "$out/gpu_tests.log" 2>&1
echo "gpu tests: exit $? -> $out/gpu_tests.log"; tail -3 "$out/gpu_tests.log"
python3 tools/bench_step.py --iters 10 ${BENCH_ARGS:-} > "$out/bench_step.log" 2>&1
echo "bench: exit $? -> $out/bench_step.log"; grep "ms/step\|skip" "$out/bench_step.log"
