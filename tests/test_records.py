"""records/: log parsing, the significance test, the submission packager, the plot.

Fixtures: tests/fixtures/smoke_seed{1,2,3}.txt are the logs of three real SMOKE runs (see
tests/fixtures/README.md). Their code_sha256/code_bytes are those of train_gpt.py packed as it was then; the
script moves on, so `logs()` below writes tmp_path copies whose final_summary is made to match whichever script
the test passes as --train-script (the real train_gpt.py by default) once packed by train_gpt.packed_source,
plus any edits a test wants (a too-large artifact, a duplicate seed, ...). Everything else in the logs is as
the runs wrote it.
"""
import ast
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "records"))
import package as pk  # noqa: E402
import plot_runs  # noqa: E402
from runlog import Run  # noqa: E402

FIXTURES = sorted((ROOT / "tests" / "fixtures").glob("smoke_seed*.txt"))
SCRIPT = ROOT / "train_gpt.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The key set the challenge's recent records/track_10min_16mb/*/submission.json share.
RECORD_KEYS = {"author", "github_id", "name", "blurb", "date", "track", "val_loss", "val_bpb", "val_bpb_std",
               "val_loss_std", "seeds", "seed_results", "bytes_total", "bytes_code", "compliance"}


def logs(tmp_path, script=SCRIPT, edits=None, drop_summary=()):
    """Copies of the fixture logs in tmp_path/logs, final_summary's code fields matching `script`;
    edits: {index: {summary key or "SEED": value}}; drop_summary: indices whose final_summary is removed."""
    code = tg.packed_source(Path(script).read_bytes())
    out = []
    (tmp_path / "logs").mkdir(exist_ok=True)
    for i, src in enumerate(FIXTURES):
        lines = src.read_text().splitlines()
        assert lines[-1].startswith("final_summary ")
        summary = json.loads(lines[-1][len("final_summary "):])
        summary.update(code_sha256=hashlib.sha256(code).hexdigest(), code_bytes=len(code))
        for k, v in (edits or {}).get(i, {}).items():
            if k == "SEED":
                summary["config"]["SEED"] = v
            else:
                summary[k] = v
        lines[-1] = "final_summary " + json.dumps(summary)
        if i in drop_summary:
            lines = lines[:-1]
        dst = tmp_path / "logs" / src.name
        dst.write_text("\n".join(lines) + "\n")
        out.append(dst)
    return out


def package(tmp_path, log_paths, *extra, script=SCRIPT):
    argv = [str(p) for p in log_paths] + [
        "--name", "Smoke hybrid", "--author", "Tester", "--github-id", "tester", "--track", "track_10min_16mb",
        "--baseline-bpb", "0.65", "--date", "2026-05-01", "--out", str(tmp_path / "out"),
        "--requirements", str(ROOT / "requirements.txt"), "--train-script", str(script), *extra]
    return pk.main(argv)


# ---- the significance test ---------------------------------------------------------------------

def scores_with_t(n, t):
    """n scores and a baseline placed so that the one-sample statistic against baseline - margin is t."""
    scores = [1.0 + 0.01 * i for i in range(n)]
    se = statistics.stdev(scores) / math.sqrt(n)
    return scores, statistics.fmean(scores) - t * se + pk.MARGIN


@pytest.mark.parametrize("df, t, p", [(1, -31.821, 0.01), (2, -6.965, 0.01), (4, -3.747, 0.01), (10, -2.764, 0.01),
                                      (30, -2.457, 0.01), (5, 2.015, 0.95), (20, -1.725, 0.05)])
def test_one_sample_p_at_printed_t_table_values(df, t, p):
    # one-sided critical values from a printed t table (3 decimals: +-0.0005 in t moves p by < 5e-5)
    scores, baseline = scores_with_t(df + 1, t)
    sig = pk.significance(scores, baseline)
    assert sig["df"] == df and sig["t"] == pytest.approx(t, abs=1e-9) and sig["p"] == pytest.approx(p, abs=5e-5)
    assert sig["significant"] == (sig["p"] < pk.ALPHA)


def test_one_sample_p_closed_forms():
    # df = 1 (two scores): the Cauchy CDF, 0.5 + atan(t) / pi; df = 2: 0.5 + t / (2 sqrt(2 + t^2))
    for t in (-40.0, -2.0, -0.3, 0.5, 3.0):
        assert pk.significance(*scores_with_t(2, t))["p"] == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert pk.significance(*scores_with_t(3, t))["p"] == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)),
                                                                           abs=1e-12)


def test_no_hand_written_distribution_code():
    """scipy.stats does the maths: no incomplete beta or log-gamma of our own under records/."""
    for path in (ROOT / "records").glob("*.py"):
        text = path.read_text()
        assert "betainc" not in text and "lgamma" not in text, path


def test_one_sample_test_at_the_table_value():
    # scores with mean 1.0, s = 0.01 (n = 3, df = 2); baseline placed so that t = -6.965, the 1% point.
    scores, se = [0.99, 1.00, 1.01], 0.01 / math.sqrt(3)
    baseline = 1.0 + 6.965 * se + pk.MARGIN
    sig = pk.significance(scores, baseline)
    assert sig["kind"] == "one-sample" and sig["df"] == 2
    assert sig["threshold"] == pytest.approx(baseline - 0.005)
    assert sig["t"] == pytest.approx(-6.965, abs=1e-9) and sig["p"] == pytest.approx(0.01, abs=2e-5)
    assert pk.significance(scores, baseline + 0.001)["significant"]
    assert not pk.significance(scores, baseline - 0.001)["significant"]
    assert pk.significance([1.0], 2.0)["p"] is None          # one seed: not testable
    assert pk.significance([1.0, 1.0], 2.0)["p"] == 0.0        # no spread: decided by the sign
    assert pk.significance([1.0, 1.0], None, baseline_scores=[1.0, 1.0])["p"] == 1.0


def test_welch_test_by_hand():
    # equal n and variance: s^2 = 1e-4 each, t = (1.01 - 1.04 + 0.005) / sqrt(2e-4 / 3), Welch df = 2(n-1) = 4
    sig = pk.significance([1.00, 1.01, 1.02], None, baseline_scores=[1.03, 1.04, 1.05])
    t = -0.025 / math.sqrt(2e-4 / 3)
    u = 1 + t * t / 4   # closed-form t CDF for df = 4
    p4 = 0.5 + 0.375 * t / math.sqrt(u) * (1 - t * t / (12 * u))
    assert sig["kind"].startswith("Welch") and sig["t"] == pytest.approx(t) and sig["df"] == pytest.approx(4)
    assert sig["p"] == pytest.approx(p4, abs=1e-12) and not sig["significant"]
    # unequal: v1/n1 = (5/3)/4, v2/n2 = 4/3; df = 1.75^2 / ((5/12)^2/3 + (4/3)^2/2) = 3.2347...
    sig = pk.significance([1, 2, 3, 4], None, baseline_scores=[2, 4, 6], margin=0.0)
    assert sig["t"] == pytest.approx(-1.5 / math.sqrt(1.75)) and sig["df"] == pytest.approx(3.0625 / 0.9467593, rel=1e-6)

# ---- packaging --------------------------------------------------------------------------------

def test_fixtures_are_three_finished_smoke_runs():
    runs = [Run(p) for p in FIXTURES]
    assert [r.seed for r in runs] == [1, 2, 3] and all(r.summary and r.config["SMOKE"] == 1 for r in runs)
    assert len({r.summary["code_sha256"] for r in runs}) == 1  # one script version for all three


def test_valid_package(tmp_path, capsys):
    paths = logs(tmp_path)
    assert package(tmp_path, paths) == 0
    folder = tmp_path / "out" / "track_10min_16mb" / "2026-05-01_Smoke_hybrid"
    files = {"README.md", "submission.json", "train_seed1.log", "train_seed2.log", "train_seed3.log",
             "train_gpt.py", "requirements.txt", pk.INSTALL, pk.PLOT, *pk.SMOKE_FILES}
    assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == files
    packed = (folder / "train_gpt.py").read_bytes()
    assert packed == tg.packed_source(SCRIPT.read_bytes()) and len(packed) <= 0.3 * len(SCRIPT.read_bytes())
    for name in pk.SMOKE_FILES:  # SMOKE=1 loads them from beside train_gpt.py
        assert (folder / name).read_bytes() == (ROOT / name).read_bytes()
    assert (folder / "requirements.txt").read_bytes() == (ROOT / "requirements.txt").read_bytes()
    assert (folder / pk.INSTALL).read_bytes() == (ROOT / "tools" / "install_gpu.sh").read_bytes()
    for i, p in enumerate(paths, 1):
        assert (folder / f"train_seed{i}.log").read_bytes() == p.read_bytes()
    png = (folder / pk.PLOT).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000

    S = [Run(p).summary for p in paths]
    sub = json.loads((folder / "submission.json").read_text())
    assert RECORD_KEYS <= set(sub)
    assert sub["name"] == "Smoke hybrid" and sub["author"] == "Tester" and sub["github_id"] == "tester"
    assert sub["track"] == "10min_16mb" and sub["date"] == "2026-05-01" and sub["seeds"] == [1, 2, 3]
    assert sub["val_bpb"] == pytest.approx(statistics.fmean(s["val_bpb"] for s in S), abs=1e-8)
    assert sub["val_loss"] == pytest.approx(statistics.fmean(s["val_loss"] for s in S), abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(statistics.stdev(s["val_bpb"] for s in S), abs=1e-8)
    assert sub["bytes_total"] == max(s["artifact_bytes"] for s in S)
    assert sub["bytes_code"] == len(packed)
    for seed, s in zip(("1", "2", "3"), S):
        r = sub["seed_results"][seed]
        assert r["val_bpb"] == pytest.approx(s["val_bpb"], abs=1e-8) and r["artifact_bytes"] == s["artifact_bytes"]
        assert r["steps"] == s["steps"] and r["train_time_s"] == s["train_seconds"]
    assert all(sub["compliance"].values())
    sig = pk.significance([s["val_bpb"] for s in S], 0.65)
    assert sub["p_value"] == pytest.approx(sig["p"]) and sub["t_statistic"] == pytest.approx(sig["t"], abs=1e-8)

    readme = (folder / "README.md").read_text()
    assert "| seed | RUN_ID | val_bpb |" in readme and "| **mean** |" in readme
    for s in S:
        assert f"| {s['config']['SEED']} | {s['config']['RUN_ID']} | {s['val_bpb']:.5f} |" in readme
    test_line = pk.describe_test(sig, "val_bpb")
    assert test_line in readme and "p = " in test_line and "one-sample" in test_line
    assert "margin is applied in bpb units" in readme and "SMOKE=1 runs" in readme
    # the env differing from the script's (SMOKE) defaults: SMOKE=1 and whatever the script's defaults have
    # moved on from since the fixtures were made; never SEED, RUN_ID or SMOKE's temporary data paths
    defaults, smoke, _ = pk.script_defaults(SCRIPT.read_text())
    env = pk.launch_env(S[0]["config"], 1, defaults, smoke)
    assert "SMOKE=1" in env and not any(e.split("=")[0] in pk.PER_RUN_KEYS for e in env)
    assert "    export " + " ".join(env) + "\n" in readme
    assert "    SEED=2 RUN_ID=smoke_seed2 python3 train_gpt.py" in readme
    assert f"![training curves]({pk.PLOT})" in readme
    assert f"sha256 `{hashlib.sha256(packed).hexdigest()}`, {len(packed):,} bytes" in readme
    assert f"readable train_gpt.py of sha256 `{hashlib.sha256(SCRIPT.read_bytes()).hexdigest()}`" in readme
    assert test_line in capsys.readouterr().out
    # the README's command to read the packed code prints the program it runs: the source without docstrings
    assert f"    {pk.UNPACK}\n" in readme
    shown = subprocess.run(pk.UNPACK, shell=True, cwd=folder, capture_output=True, text=True, check=True).stdout
    tree = ast.parse(shown)
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert {"main", "packed_source", "HybridGPT", "Hyperparameters"} <= names
    assert ast.get_docstring(tree) is None and not any(ast.get_docstring(n) for n in tree.body if hasattr(n, "name"))


def test_loss_baseline_and_welch(tmp_path):
    S = [Run(p).summary for p in FIXTURES]
    assert package(tmp_path, logs(tmp_path), "--baseline-loss", "1.2", "--baseline-scores", "1.19,1.2,1.21") == 0
    folder = next((tmp_path / "out" / "track_10min_16mb").iterdir())
    sub = json.loads((folder / "submission.json").read_text())
    sig = pk.significance([s["val_loss"] for s in S], None, baseline_scores=[1.19, 1.2, 1.21])
    assert sig["kind"].startswith("Welch") and sub["p_value"] == pytest.approx(sig["p"]) and sub["significant"]
    readme = (folder / "README.md").read_text()
    assert pk.describe_test(sig, "val_loss") in readme and "applied to val_loss as the rule states" in readme


@pytest.mark.parametrize("edits, drop, expect", [
    ({1: {"artifact_bytes": 16_000_001}}, (), ["smoke_seed2.txt: artifact_bytes 16,000,001 > 16,000,000"]),
    ({0: {"train_seconds": 600.4}}, (), ["smoke_seed1.txt: train_seconds 600.4 > 600"]),
    ({2: {"eval_seconds": 612.0}}, (), ["smoke_seed3.txt: eval_seconds 612.0 > 600"]),
    ({1: {"code_sha256": "0" * 64}}, (), ["smoke_seed2.txt: code_sha256 000000000000... is not the sha256",
                                           "code_sha256 differs between the logs"]),
    ({2: {"SEED": 1}}, (), ["smoke_seed3.txt: SEED 1 again (also in"]),
    ({}, (1,), ["smoke_seed2.txt: no final_summary line"]),
    ({0: {"artifact_bytes": 17_000_000}, 2: {"train_seconds": 700.0, "eval_seconds": 650.0}}, (0,),
     ["smoke_seed1.txt: no final_summary", "smoke_seed3.txt: train_seconds 700.0", "smoke_seed3.txt: eval_seconds 650.0"]),
], ids=["oversize", "train_time", "eval_time", "code_hash", "dup_seed", "no_summary", "several"])
def test_failures_listed_nothing_written(tmp_path, capsys, edits, drop, expect):
    assert package(tmp_path, logs(tmp_path, edits=edits, drop_summary=drop)) == 1
    err = capsys.readouterr().err
    assert "nothing written" in err
    for e in expect:
        assert e in err, err
    assert not (tmp_path / "out").exists()


def test_other_script_version_is_refused(tmp_path, capsys):
    """The logs match train_gpt.py; a train script with one more function is another version: every log is named."""
    other = tmp_path / "train_gpt.py"
    other.write_bytes(SCRIPT.read_bytes() + b"\n\ndef one_more(x):\n    return [x * 2 for _ in range(3)]\n")
    assert package(tmp_path, logs(tmp_path), script=other) == 1
    err = capsys.readouterr().err
    counted = len(tg.packed_source(SCRIPT.read_bytes()))
    for p in FIXTURES:
        assert f"{p.name}: code_sha256" in err and f"{p.name}: code_bytes {counted} != " in err
    assert not (tmp_path / "out").exists()


def test_scripts_that_cannot_be_packed_are_refused(tmp_path, capsys):
    packed = tmp_path / "packed" / "train_gpt.py"
    packed.parent.mkdir()
    packed.write_bytes(tg.packed_source(SCRIPT.read_bytes()))
    no_packer = tmp_path / "old" / "train_gpt.py"
    no_packer.parent.mkdir()
    no_packer.write_text("def main():\n    pass\n")
    broken = tmp_path / "broken.py"
    broken.write_text("def main(:\n")
    for script, needle in [(packed, "already packed (it sets READABLE_SOURCE_BYTES); pass the readable"),
                           (no_packer, "has no packed_source()"), (broken, "not Python"),
                           (tmp_path / "none.py", "none.py: no such file")]:
        assert package(tmp_path, logs(tmp_path), script=script) == 1
        err = capsys.readouterr().err
        assert needle in err and "nothing written" in err, err
    assert not (tmp_path / "out").exists()


def test_smoke_logs_refused_for_the_projects_records(tmp_path, capsys, monkeypatch):
    """records/ holds real FineWeb packages only: SMOKE logs are refused there, anywhere inside it. The check
    runs against a stand-in records/ in tmp_path, so a failing test writes nothing into the project."""
    assert pk.PROJECT_RECORDS == ROOT / "records"
    assert not pk.DEFAULT_OUT.resolve().is_relative_to(ROOT)  # the default --out is outside the project
    monkeypatch.setattr(pk, "PROJECT_RECORDS", tmp_path / "records")
    for out in (tmp_path / "records", tmp_path / "records" / "sub"):
        argv = [str(p) for p in logs(tmp_path)] + [
            "--name", "n", "--author", "a", "--github-id", "g", "--track", "track_10min_16mb", "--baseline-bpb",
            "0.65", "--out", str(out), "--requirements", str(ROOT / "requirements.txt"), "--train-script", str(SCRIPT)]
        assert pk.main(argv) == 1
        err = capsys.readouterr().err
        assert "inside the project's records/" in err and "these logs are SMOKE=1 runs: " in err and "pass --out elsewhere" in err
    assert not (tmp_path / "records").exists()
    assert pk.parse_args(argv[:3] + argv[3:13]).out == pk.DEFAULT_OUT  # without --out


def test_existing_folder_and_config_mismatch_refused(tmp_path, capsys):
    paths = logs(tmp_path)
    lines = paths[1].read_text().splitlines()
    s = json.loads(lines[-1][len("final_summary "):])
    s["config"]["NUM_LAYERS"] = 5
    paths[1].write_text("\n".join(lines[:-1] + ["final_summary " + json.dumps(s)]) + "\n")
    (tmp_path / "out" / "track_10min_16mb" / "2026-05-01_Smoke_hybrid").mkdir(parents=True)
    assert package(tmp_path, paths) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "smoke_seed2.txt: config NUM_LAYERS=5 differs" in err
    assert list((tmp_path / "out" / "track_10min_16mb" / "2026-05-01_Smoke_hybrid").iterdir()) == []


def test_launch_env_against_script_defaults():
    defaults, smoke, consts = pk.script_defaults(SCRIPT.read_text())
    assert "RUN_ID" not in defaults and defaults["SEED"] == 1337 and "DOWNLOAD_HINT" in consts
    config = dict(defaults, RUN_ID="r", SEED=7, GRAD_ACCUM_STEPS=1, NUM_LAYERS=12, MAMBA_LAYERS="")
    assert pk.launch_env(config, 8, defaults, smoke) == ["MAMBA_LAYERS=''", "NUM_LAYERS=12"]
    assert pk.launch_env(dict(config, GRAD_ACCUM_STEPS=2), 8, defaults, smoke)[0] == "GRAD_ACCUM_STEPS=2"
    assert pk.launcher(8) == "torchrun --standalone --nproc_per_node=8 train_gpt.py"

# ---- logs and the plot ------------------------------------------------------------------------

def test_run_parsing_and_times(tmp_path):
    run = Run(FIXTURES[0])
    assert run.steps[0][0] == 1 and [v[0] for v in run.vals] == [50, 100, 150, 200, 250, 300]
    assert len(run.steps) > 50  # SMOKE logs every 5 steps: enough points for a curve
    assert set(run.evals) == {"prequant", "roundtrip", "sliding", "ttt"}
    assert run.evals["ttt"][1] == pytest.approx(run.summary["val_bpb_ttt"], abs=1e-4)
    step_ms = {s: ms for s, _, ms in run.steps}
    assert run.seconds_at(100) == pytest.approx(100 * step_ms[100] / 1000)   # a step line at the val step
    log = tmp_path / "x.txt"  # a val step between step lines: linear in between, last step_ms beyond
    log.write_text("step:10/100 train_loss:2.0 step_ms:100.0 tok/s:1 train_time:1s eta:9s\n"
                   "step:20/100 train_loss:1.5 step_ms:150.0 tok/s:1 train_time:3s eta:9s\n"
                   "step:15/100 val_loss:1.6 val_bpb:1.1\n")
    r = Run(log)
    assert r.summary is None and "no final_summary" in r.summary_error
    assert r.seconds_at(15) == pytest.approx(2.0) and r.seconds_at(30) == pytest.approx(3.0 + 10 * 0.15)


def saved_figures(monkeypatch):
    """The figures plot_runs saves, kept for the test to read (their axes, lines, legends and title)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), savefig(fig, *a, **k))[1])
    return figures


def test_plot_runs_cli(tmp_path, capsys, monkeypatch):
    figures = saved_figures(monkeypatch)
    out = tmp_path / "runs.png"
    assert plot_runs.main([str(p) for p in FIXTURES] + ["-o", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    loss, bpb = figures[-1].axes
    assert loss.get_yscale() == "log" and bpb.get_yscale() == "log"
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["seed 1", "seed 2", "seed 3"]  # short
    assert "SMOKE" in figures[-1]._suptitle.get_text()
    runs = [Run(p) for p in FIXTURES]
    raw, smooth = loss.lines[:2]  # run 1: each logged step, then the moving average, both at the same times
    assert list(raw.get_ydata()) == [l for _, l, _ in runs[0].steps] and len(smooth.get_ydata()) == len(runs[0].steps)
    assert bpb.lines[0].get_linestyle() == "-" and list(bpb.lines[0].get_ydata()) == [b for *_, b in runs[0].vals]

    assert plot_runs.main([str(FIXTURES[0]), str(FIXTURES[1]), "-o", str(out), "--label", "hybrid", "--label",
                           "attention", "--title", "A vs B"]) == 0
    loss, bpb = figures[-1].axes
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["hybrid", "attention"]
    assert figures[-1]._suptitle.get_text() == "A vs B"
    assert "hybrid final" in " ".join(t.get_text() for t in bpb.get_legend().get_texts())

    assert plot_runs.main([str(tmp_path / "missing.txt"), "-o", str(tmp_path / "m.png")]) == 2
    assert plot_runs.main([str(FIXTURES[0]), "-o", str(tmp_path / "m.png"), "--label", "a", "--label", "b"]) == 2
    assert "2 --label for 1 logs" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_smoothing_and_default_labels(tmp_path):
    from runlog import default_labels, smoothed
    assert smoothed([1.0, 2.0, 3.0, 10.0, 5.0], 3) == pytest.approx([1.5, 2.0, 5.0, 6.0, 7.5])  # centred, no lag
    assert smoothed([4.0, 2.0], 1) == [4.0, 2.0]
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"  # the same seed twice: the RUN_IDs tell them apart
    for path, run_id in ((a, "hyb"), (b, "att")):
        path.write_text("config " + json.dumps({"SEED": 1, "RUN_ID": run_id}) + "\n")
    assert default_labels([Run(a), Run(b)]) == ["hyb", "att"]
    assert default_labels([Run(p) for p in FIXTURES]) == ["seed 1", "seed 2", "seed 3"]
