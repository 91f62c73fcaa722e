#!/usr/bin/env python3
"""The README's proxy table from final_summary JSON files (results/proxy/<kind>/<label>-seed<SEED>.json),
one row each, with the settings that differ from train_gpt.py's defaults, and a mean per label over seeds.
usage: python3 tools/proxy_table.py results/proxy/h200x2/*.json
       python3 tools/proxy_table.py --ladder results/proxy/h200x1*/*.json   # a label's mean at each budget"""
import argparse, json, re, statistics, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

# set by the proxy runner or per run, not a model difference
RUN_KEYS = {"RUN_ID", "SEED", "DATA_PATH", "TOKENIZER_PATH", "MAX_WALLCLOCK_SECONDS", "TRAIN_BATCH_TOKENS",
            "GRAD_ACCUM_STEPS", "TTT_ENABLED", "TRAIN_LOG_EVERY", "VAL_LOSS_EVERY"}


def differences(config, defaults):
    # a model without Mamba layers ignores the other MAMBA_* knobs: they are not differences
    no_mamba = str(config.get("MAMBA_LAYERS", "x")) == ""
    return " ".join(f"{k}={v}" for k, v in sorted(config.items())
                    if k not in RUN_KEYS and k in defaults and str(v) != str(defaults[k])
                    and not (no_mamba and k.startswith("MAMBA_") and k != "MAMBA_LAYERS"))


def rows(paths):
    defaults = tg.Hyperparameters({}).resolved
    out = []
    for path in paths:
        s = json.loads(Path(path).read_text())
        m = re.match(r"(.+)-seed(\d+)\.json$", Path(path).name)
        label, seed = (m.group(1), int(m.group(2))) if m else (Path(path).stem, s["config"].get("SEED"))
        config = s.get("config") or {}  # the record script's summaries have none
        diff = (differences(config, defaults) or "defaults") if config else "the record script"
        if "artifact_of" in s:  # tools/eval_artifact.py: an earlier run's weights, scored again
            diff = f"{s['artifact_of']} rescored: {' '.join(s['settings'])}"
        out.append(dict(label=label, seed=seed, diff=diff, budget=config.get("MAX_WALLCLOCK_SECONDS", s.get("budget_s")),
                        steps=s.get("steps", "-"), step_ms=s.get("step_ms"),
                        prequant=s.get("val_bpb_prequant"), roundtrip=s["val_bpb_roundtrip"],
                        sliding=s.get("val_bpb_sliding"), ttt=s.get("val_bpb_ttt"), final=s["val_bpb"],
                        bytes=s.get("artifact_bytes")))
    return out


def bpb(value, missing):
    return missing if value is None else f"{value:.4f}"


def table(rs):
    """val_bpb is the run's final score: TTT's when it ran, else the sliding one (else roundtrip)."""
    lines = ["| label | seed | settings | budget s | steps | step_ms | prequant | roundtrip | sliding | ttt | val_bpb | artifact bytes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rs, key=lambda r: (r["label"], r["seed"])):
        step_ms = "-" if r["step_ms"] is None else f"{r['step_ms']:.1f}"
        lines.append(f"| {r['label']} | {r['seed']} | {r['diff']} | {r['budget']:g} | {r['steps']} | {step_ms} | "
                     f"{bpb(r['prequant'], '-')} | {r['roundtrip']:.4f} | {bpb(r['sliding'], '-')} | {bpb(r['ttt'], 'off')} | "
                     f"{r['final']:.4f} | {'-' if r['bytes'] is None else format(r['bytes'], ',')} |")
    lines += ["", "| label | budget s | seeds | mean val_bpb |", "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {budget:g} | {len(v)} | {statistics.mean(v):.4f} |" for (label, budget), v in means(rs).items()]
    return "\n".join(lines)


def means(rs):
    """{(label, budget): the final scores over seeds}: a label's runs at other budgets are other rows."""
    out = {}
    for r in sorted(rs, key=lambda r: (r["label"], r["budget"])):
        out.setdefault((r["label"], r["budget"]), []).append(r["final"])
    return out


def ladder(rs):
    """The budget ladder: a row per label, a column per budget, each cell the mean final score (and seeds)."""
    m = means(rs)
    budgets = sorted({b for _, b in m})
    lines = ["| label | " + " | ".join(f"{b:g} s" for b in budgets) + " |", "| --- |" + " --- |" * len(budgets)]
    for label in sorted({label for label, _ in m}):
        cells = [f"{statistics.mean(m[label, b]):.4f} ({len(m[label, b])})" if (label, b) in m else "" for b in budgets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("summaries", nargs="+")
    ap.add_argument("--ladder", action="store_true", help="mean final score per label and budget, one row a label")
    a = ap.parse_args()
    print(ladder(rows(a.summaries)) if a.ladder else table(rows(a.summaries)))
