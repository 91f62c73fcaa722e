#!/usr/bin/env bash
# Proxy runs one after another on the GPU machine, detached: each starts the moment the one before ends,
# whenever the calls that collect them come (the device machine is given back 30 s after a command ends,
# so a chain of single runs loses a run to one late call). Run from the project root with .bench carried:
#   bash tools/proxy_queue.sh 'hybrid-0-1-10 MAMBA_LAYERS=0,1,10' 'hybrid-lr04 MAMBA_MATRIX_LR=0.04'
#   bash tools/proxy_queue.sh wait 560     # then again, within 30 s, until it prints "queue: done"
# Each argument is a label, then that run's settings (SEED defaults to 1337; RUN_ID <label>-seed<SEED>);
# settings for all come from the environment. Every run uses all the machine's GPUs and stops after
# PROXY_TIMEOUT seconds (default 1500). `wait SECONDS` returns when the queue is done or after SECONDS,
# with the .log and .json (.console too when it left no summary) of each run finished since the last wait
# in $OUT (at most 8 files and 60 MiB, what the device tool returns a call: the rest come with the next wait;
# PROXY_COLLECT_ALL=1: every finished run's again), a line per run, and the last lines of the one running.
# One queue at a time per machine.
# A spec with ARTIFACT_OF=<RUN_ID> trains nothing: it scores that earlier run's artifact again with the spec's
# evaluation settings (tools/eval_artifact.py), e.g. 'hybrid-e4096 ARTIFACT_OF=hybrid-0-1-10-seed1337 EVAL_SEQ_LEN=4096'.
# A training run's artifact comes back with its log (<RUN_ID>.artifact, about 16 MB): kept in .artifacts/ with the
# .log and carried, it is rescored on a later machine that has only the validation split staged (docs/experiments.md).
set -uo pipefail
source "$(dirname "$0")/proxy_specs.sh"
runner=${PROXY_RUNNER:-.bench/run_proxy.sh}
queue=${PROXY_QUEUE_DIR:-/tmp/proxy_queue}
out=${OUT:-/tmp/proxy_out}
logs=${PROXY_LOGS:-logs}              # where train_gpt.py leaves <RUN_ID>.txt and .artifact
kept=${PROXY_ARTIFACTS:-.artifacts}   # artifacts and logs brought back from earlier machines, carried
data=${PROXY_DATA:-data/datasets/proxy_sp${VOCAB_SIZE:-8192}}

if [ "${1:-}" = wait ]; then
  seconds=${2:-540}
  [[ $seconds =~ ^[0-9]+$ ]] || { echo "error: wait takes seconds, got '$seconds'" >&2; exit 2; }
  [ -f "$queue/ids" ] || { echo "error: no queue on this machine ($queue): started on another, or the machine was replaced" >&2; exit 1; }
  end=$(( $(date +%s) + seconds ))
  while [ "$(date +%s)" -lt "$end" ] && [ ! -f "$queue/done" ]; do sleep 1; done
  mkdir -p "$out"
  held=0  # runs whose files did not fit this call (the device tool returns 8 files, 64 MiB; 60 MiB leaves room)
  while read -r id; do
    if [ -f "$queue/$id.finished" ]; then
      if [ ! -f "$queue/$id.collected" ] || [ -n "${PROXY_COLLECT_ALL:-}" ]; then
        files=("$queue/out/$id".*)
        [ -s "$queue/out/$id.json" ] || files+=("$queue/$id.console")
        mapfile -t files < <(ls -d "${files[@]}" 2>/dev/null)
        n=$(( $(find "$out" -type f | wc -l) + ${#files[@]} ))
        bytes=$(( $(du -cb "$out" "${files[@]}" 2>/dev/null | tail -n 1 | cut -f1) ))
        if [ "$n" -gt "${PROXY_MAX_FILES:-8}" ] || [ "$bytes" -gt "${PROXY_MAX_BYTES:-62914560}" ]; then
          echo "$id: finished; its files come with the next wait (this call's are full)"; held=$((held + 1)); continue
        fi
        cp "${files[@]}" "$out/"
        touch "$queue/$id.collected"
      fi
      summary_line "$queue/out/$id.json" "$id"
    elif [ -f "$queue/$id.console" ]; then
      echo "$id: running"; tail -n 3 "$queue/$id.console" | cut -c1-300
    else
      echo "$id: waiting"
    fi
  done < "$queue/ids"
  if [ "$held" -gt 0 ]; then echo "queue: $held runs' files still to bring back; wait again"
  elif [ -f "$queue/done" ]; then echo "queue: done"; else echo "queue: still running; wait again"; fi
  exit 0
fi

if [ "${1:-}" = __worker ]; then  # the detached part: the runs in order, then the mark that all ended
  shift
  for spec in "$@"; do
    id=$(spec_id "$spec")
    mapfile -t settings < <(spec_settings "$spec")
    of=$(printf '%s\n' "${settings[@]}" | sed -n 's/^ARTIFACT_OF=//p')
    if [ -n "$of" ]; then
      mapfile -t rest < <(printf '%s\n' "${settings[@]}" | grep -v '^ARTIFACT_OF=')
      if [ ! -f "$logs/$of.artifact" ] && [ -f "$kept/$of.artifact" ] && [ -f "$kept/$of.log" ]; then
        # trained on an earlier machine: its artifact and log from $kept, scored on this machine's validation split
        mkdir -p "$logs" && cp "$kept/$of.artifact" "$logs/" && cp "$kept/$of.log" "$logs/$of.txt"
        printf '%s\n' "${rest[@]}" | grep -q '^DATA_PATH=' || rest+=("DATA_PATH=$data")
      fi
      ( [ -f .bench/gpu_env.sh ] && source .bench/gpu_env.sh
        timeout "${PROXY_TIMEOUT:-1500}" ${PROXY_EVAL:-torchrun --standalone --nproc_per_node=$(nvidia-smi -L | wc -l) tools/eval_artifact.py} \
          "$of" "${rest[@]}" ) > "$queue/$id.console" 2>&1
      cp "$queue/$id.console" "$queue/out/$id.log"
      sed -n 's/^eval_summary //p' "$queue/$id.console" | tail -n 1 > "$queue/out/$id.json"
    else
      env "${settings[@]}" SEED="$(spec_seed "$spec")" RUN_ID="$id" OUT="$queue/out" \
        timeout "${PROXY_TIMEOUT:-1500}" bash "$runner" > "$queue/$id.console" 2>&1
      [ "$logs/$id.artifact" -nt "$queue/ids" ] && cp "$logs/$id.artifact" "$queue/out/"  # this run's, not a stale one
    fi
    touch "$queue/$id.finished"
  done
  touch "$queue/done"
  exit 0
fi

if [ $# -eq 0 ]; then
  echo "usage: $0 'LABEL [VAR=value ...]' ... (run one after another), or: $0 wait SECONDS" >&2; exit 2
fi
check_specs "$@"
if [ -f "$queue/ids" ] && [ ! -f "$queue/done" ]; then
  echo "error: a queue is still running on this machine ($queue): wait for it (bash $0 wait SECONDS)" >&2; exit 2
fi
ids=$(for spec in "$@"; do spec_id "$spec"; done)
if [ "$(sort <<< "$ids" | uniq -d)" ]; then
  echo "error: two runs would share a RUN_ID: $(sort <<< "$ids" | uniq -d | tr '\n' ' ')" >&2; exit 2
fi
rm -rf "$queue"; mkdir -p "$queue/out"
echo "$ids" > "$queue/ids"
setsid nohup bash "$0" __worker "$@" > "$queue/worker.console" 2>&1 < /dev/null &
echo "queue: started $(wc -l < "$queue/ids") runs: $(tr '\n' ' ' < "$queue/ids")"
