# Sourced by proxy_side_by_side.sh and proxy_queue.sh: the run specs both take. A spec is a label, then that
# run's VAR=value settings; SEED defaults to 1337 and the run's RUN_ID is <label>-seed<SEED>.

check_specs() {  # every spec well formed, or exit 2 before anything starts
  local spec w words
  for spec in "$@"; do
    read -r -a words <<< "$spec"
    if [[ ${#words[@]} -eq 0 || ${words[0]} == *=* ]]; then
      echo "error: '$spec' must start with a label, e.g. 'attention-only MAMBA_LAYERS= NUM_LAYERS=7'" >&2; exit 2
    fi
    for w in "${words[@]:1}"; do
      if [[ $w != [A-Z]*=* ]]; then
        echo "error: '$w' in '$spec' is not a VAR=value setting" >&2; exit 2
      fi
    done
  done
}

spec_seed() {  # the SEED a spec sets, else 1337
  local w seed=1337 words
  read -r -a words <<< "$1"
  for w in "${words[@]:1}"; do [[ $w == SEED=* ]] && seed=${w#SEED=}; done
  echo "$seed"
}

spec_id() { local words; read -r -a words <<< "$1"; echo "${words[0]}-seed$(spec_seed "$1")"; }

spec_settings() {  # the settings, one a line (none for a bare label)
  local words
  read -r -a words <<< "$1"
  if [ ${#words[@]} -gt 1 ]; then printf '%s\n' "${words[@]:1}"; fi
}

summary_line() {  # one line for run $2 from its summary $1
  python3 - "$1" "$2" <<'PY'
import json, sys
path, run_id = sys.argv[1], sys.argv[2]
try:
    s = json.load(open(path))
except (OSError, ValueError):
    print(f"{run_id}: no summary (see {path[:-5]}.log and .console)")
    sys.exit(0)
if "artifact_of" in s:  # an artifact scored again (tools/eval_artifact.py)
    print(f"{run_id}: {s['artifact_of']} rescored with {' '.join(s['settings'])}: roundtrip {s['val_bpb_roundtrip']:.4f} "
          f"sliding {s['val_bpb_sliding'] or float('nan'):.4f} val_bpb {s['val_bpb']:.4f} eval {s['eval_seconds']:.0f}s")
    sys.exit(0)
print(f"{run_id}: steps {s['steps']} step_ms {s['step_ms']} prequant {s['val_bpb_prequant']:.4f} "
      f"roundtrip {s['val_bpb_roundtrip']:.4f} val_bpb {s['val_bpb']:.4f} artifact {s['artifact_bytes']:,}")
PY
}
