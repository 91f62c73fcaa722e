#!/usr/bin/env bash
# On a GPU machine, from the project root: the GPU tests (fast kernels against the PyTorch fallbacks,
# whole-model compile without graph breaks, a 2-GPU run when there are 2 GPUs) and the kernel
# benchmarks, each log kept in $OUT (or /tmp/gpu_check) so nothing is lost to a truncated console.
# The 2-GPU run goes first, in its own pytest process: after the compile tests in the same process it
# once ran past 390 s instead of its usual 108. Every part has a time limit; the rest of the GPU tests took
# 380 s on a fresh nvidia-h200 (mamba_ssm autotunes its SSD kernels per shape on first use).
#   BENCH_ARGS="--what ssd,attn" bash tools/gpu_check.sh
set -uo pipefail
[ -f .bench/gpu_env.sh ] && source .bench/gpu_env.sh
# wheels carried in .whl (e.g. causal-conv1d built elsewhere: docs/kernels.md); python3's own pip, since a
# plain `pip` on the device image belongs to another Python
for wheel in .whl/*.whl; do [ -f "$wheel" ] && python3 -m pip install -q --no-deps --no-index "$wheel"; done
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name: exit $? (limit ${limit}s) -> $out/$name.log"
}
run gpu_tests_2gpu 200 python3 -m pytest -m gpu tests/test_gpu.py -k two_gpu -q -rA -p no:cacheprovider
run gpu_tests 420 python3 -m pytest -m gpu tests/test_gpu.py -k "not two_gpu" -q -rA -p no:cacheprovider
grep -hE "^(PASSED|FAILED|SKIPPED|ERROR)|passed|failed" "$out"/gpu_tests*.log | tail -40
run bench_step 240 python3 tools/bench_step.py ${BENCH_ARGS:---what ssd,attn}
grep -E "^(ssd|attention|layer|step)" "$out/bench_step.log" | tail -30
