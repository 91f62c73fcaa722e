#!/usr/bin/env bash
# Several proxy runs at once on the GPU machine, one GPU each, so that they share machine, budget and
# time (the issue protocol's "side by side"). Run from the project root with .bench carried. Each
# argument is a label, then that run's settings; SEED defaults to 1337:
#   bash tools/proxy_side_by_side.sh 'hybrid-default' 'attention-only MAMBA_LAYERS= NUM_LAYERS=7' \
#                                    'hybrid-default SEED=42' 'attention-only SEED=42 MAMBA_LAYERS= NUM_LAYERS=7'
# Settings shared by all runs come from the environment (e.g. MAX_WALLCLOCK_SECONDS=150 TTT_ENABLED=0).
# Run i gets GPU i and RUN_ID <label>-seed<SEED>; the runner writes $OUT/<RUN_ID>.{log,json}, ready to copy to
# results/proxy/<kind>/. Each run stops after PROXY_TIMEOUT seconds (default 540). Prints a line per run.
# A run's console output (installs, tokenizing, the log again) lands in $OUT/<RUN_ID>.console only when it left
# no summary: the device tool returns 8 files a command, and four runs' consoles once crowded out a summary.
set -uo pipefail
source "$(dirname "$0")/proxy_specs.sh"
runner=${PROXY_RUNNER:-.bench/run_proxy.sh}
timeout_s=${PROXY_TIMEOUT:-540}
out=${OUT:-/tmp/proxy_out}
gpus=${PROXY_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ $# -eq 0 ]; then
  echo "usage: $0 'LABEL [VAR=value ...]' ... (one run per GPU)" >&2; exit 2
fi
if [ $# -gt "$gpus" ]; then
  echo "error: $# runs but $gpus GPUs: one run per GPU" >&2; exit 2
fi
check_specs "$@"
mkdir -p "$out"
consoles=$(mktemp -d)
trap 'rm -rf "$consoles"' EXIT  # the consoles that matter are copied to $out
gpu=0
ids=()
for spec in "$@"; do
  id=$(spec_id "$spec")
  ids+=("$id")
  mapfile -t settings < <(spec_settings "$spec")
  env "${settings[@]}" SEED="$(spec_seed "$spec")" NGPU=1 CUDA_VISIBLE_DEVICES=$gpu RUN_ID="$id" OUT="$out" \
    timeout "$timeout_s" bash "$runner" > "$consoles/$id.console" 2>&1 &
  gpu=$((gpu + 1))
done
wait
for id in "${ids[@]}"; do
  [ -s "$out/$id.json" ] || cp "$consoles/$id.console" "$out/"
  summary_line "$out/$id.json" "$id"
done
