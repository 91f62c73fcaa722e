"""tools/: the proxy table maker (the GPU tools need a GPU and run on the device only)."""
import json
import sys
from pathlib import Path

import train_gpt as tg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import proxy_table  # noqa: E402


def summary(val_bpb, **config_overrides):
    config = dict(tg.Hyperparameters({}).resolved, RUN_ID="x", SEED=1, MAX_WALLCLOCK_SECONDS=150.0)
    config.update(config_overrides)
    return dict(val_bpb=val_bpb, val_bpb_prequant=val_bpb + 0.01, val_bpb_roundtrip=val_bpb + 0.011, steps=700,
                step_ms=170.0, artifact_bytes=15_500_000, config=config)


def test_rows_show_only_model_differences_and_the_table_averages_seeds(tmp_path):
    files = []
    for name, s in (("hybrid-default-seed1.json", summary(1.44, SEED=1)),
                    ("hybrid-default-seed2.json", summary(1.46, SEED=2, TRAIN_LOG_EVERY=50)),
                    ("attention-only-seed1.json", summary(1.40, MAMBA_LAYERS="", NUM_LAYERS=7))):
        (tmp_path / name).write_text(json.dumps(s))
        files.append(tmp_path / name)
    rows = {(r["label"], r["seed"]): r for r in proxy_table.rows(files)}
    assert rows[("hybrid-default", 1)]["diff"] == "defaults"
    assert rows[("hybrid-default", 2)]["diff"] == "defaults"  # logging cadence is not a model difference
    assert rows[("attention-only", 1)]["diff"] == "MAMBA_LAYERS= NUM_LAYERS=7"
    text = proxy_table.table(list(rows.values()))
    assert "| hybrid-default | 2 | 1.4500 |" in text and "| attention-only | 1 | 1.4000 |" in text
    assert "| attention-only | 1 | MAMBA_LAYERS= NUM_LAYERS=7 | 150 | 700 | 170.0 |" in text
