#!/usr/bin/env python3
"""The README's proxy table from final_summary JSON files (results/proxy/<kind>/<label>-seed<SEED>.json),
one row each, with the settings that differ from train_gpt.py's defaults, and a mean per label over seeds.
usage: python3 tools/proxy_table.py results/proxy/h200x2/*.json"""
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
        out.append(dict(label=label, seed=seed, diff=differences(s["config"], defaults) or "defaults",
                        budget=s["config"].get("MAX_WALLCLOCK_SECONDS"), steps=s["steps"], step_ms=s["step_ms"],
                        prequant=s["val_bpb_prequant"], roundtrip=s["val_bpb_roundtrip"],
                        sliding=s.get("val_bpb_sliding"), ttt=s.get("val_bpb_ttt"), final=s["val_bpb"],
                        bytes=s["artifact_bytes"]))
    return out


def bpb(value, missing):
    return missing if value is None else f"{value:.4f}"


def table(rs):
    """val_bpb is the run's final score: TTT's when it ran, else the sliding one (else roundtrip)."""
    lines = ["| label | seed | settings | budget s | steps | step_ms | prequant | roundtrip | sliding | ttt | val_bpb | artifact bytes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rs, key=lambda r: (r["label"], r["seed"])):
        lines.append(f"| {r['label']} | {r['seed']} | {r['diff']} | {r['budget']:g} | {r['steps']} | {r['step_ms']:.1f} | "
                     f"{r['prequant']:.4f} | {r['roundtrip']:.4f} | {bpb(r['sliding'], '-')} | {bpb(r['ttt'], 'off')} | "
                     f"{r['final']:.4f} | {r['bytes']:,} |")
    by_label = {}
    for r in rs:
        by_label.setdefault(r["label"], []).append(r["final"])
    lines += ["", "| label | seeds | mean val_bpb |", "| --- | --- | --- |"]
    lines += [f"| {k} | {len(v)} | {statistics.mean(v):.4f} |" for k, v in sorted(by_label.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("summaries", nargs="+")
    print(table(rows(ap.parse_args().summaries)))
