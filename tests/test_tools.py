"""tools/: the proxy table maker and the side-by-side launcher (the GPU tools need a GPU and run on the
device only; the launcher is tested here with a stand-in for the proxy runner, which needs a GPU)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import train_gpt as tg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import proxy_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def summary(val_bpb, **config_overrides):
    config = dict(tg.Hyperparameters({}).resolved, RUN_ID="x", SEED=1, MAX_WALLCLOCK_SECONDS=150.0)
    config.update(config_overrides)
    return dict(val_bpb=val_bpb, val_bpb_prequant=val_bpb + 0.01, val_bpb_roundtrip=val_bpb + 0.011,
                val_bpb_sliding=val_bpb, val_bpb_ttt=None, steps=700, step_ms=170.0, artifact_bytes=15_500_000,
                config=config)


def test_rows_show_only_model_differences_and_the_table_averages_seeds(tmp_path):
    files = []
    for name, s in (("hybrid-default-seed1.json", summary(1.44, SEED=1)),
                    ("hybrid-default-seed2.json", summary(1.46, SEED=2, TRAIN_LOG_EVERY=50)),
                    ("attention-only-seed1.json", summary(1.40, MAMBA_LAYERS="", NUM_LAYERS=9, MAMBA_D_STATE=99)),
                    ("mamba-wide-seed1.json", summary(1.42, MAMBA_D_STATE=99))):
        (tmp_path / name).write_text(json.dumps(s))
        files.append(tmp_path / name)
    rows = {(r["label"], r["seed"]): r for r in proxy_table.rows(files)}
    assert rows[("hybrid-default", 1)]["diff"] == "defaults"
    assert rows[("hybrid-default", 2)]["diff"] == "defaults"  # logging cadence is not a model difference
    # without Mamba layers the MAMBA_* knobs are not differences; with them they are
    assert rows[("attention-only", 1)]["diff"] == "MAMBA_LAYERS= NUM_LAYERS=9"
    assert rows[("mamba-wide", 1)]["diff"] == "MAMBA_D_STATE=99"
    text = proxy_table.table(list(rows.values()))
    assert "| hybrid-default | 150 | 2 | 1.4500 |" in text and "| attention-only | 150 | 1 | 1.4000 |" in text
    assert "| attention-only | 1 | MAMBA_LAYERS= NUM_LAYERS=9 | 150 | 700 | 170.0 |" in text
    # TTT off shows as such; a summary from before the sliding field shows a dash
    assert "| 1.4100 | 1.4110 | 1.4000 | off | 1.4000 |" in text
    old = summary(1.43)
    del old["val_bpb_sliding"], old["val_bpb_ttt"]
    (tmp_path / "old-seed1.json").write_text(json.dumps(old))
    assert "| 1.4400 | 1.4410 | - | off | 1.4300 |" in proxy_table.table(proxy_table.rows([tmp_path / "old-seed1.json"]))


def test_means_and_the_ladder_keep_budgets_apart_and_take_every_kind_of_summary(tmp_path):
    """A label's runs at 150 and 600 s are two means (never one over both tiers); the record script's summaries
    (no config) and rescored artifacts (tools/eval_artifact.py: no steps) get rows too."""
    record = {k: v for k, v in summary(1.36).items() if k != "config"}
    record.update(budget_s=600.0)
    rescored = dict(artifact_of="hybrid-seed1", settings=["EVAL_SEQ_LEN=4096"], val_bpb=1.37, val_bpb_roundtrip=1.39,
                    val_bpb_sliding=1.37, val_bpb_ttt=None, eval_seconds=60.0, config=summary(0)["config"])
    files = []
    for name, s in (("hybrid-seed1.json", summary(1.44)), ("hybrid-seed2.json", summary(1.46, SEED=2)),
                    ("hybrid-seed3.json", summary(1.30, SEED=3, MAX_WALLCLOCK_SECONDS=600.0)),
                    ("record-seed1.json", record), ("hybrid-e4096-seed1.json", rescored)):
        (tmp_path / name).write_text(json.dumps(s))
        files.append(tmp_path / name)
    rows = proxy_table.rows(files)
    text = proxy_table.table(rows)
    assert "| hybrid | 150 | 2 | 1.4500 |" in text and "| hybrid | 600 | 1 | 1.3000 |" in text
    assert "| record | 1 | the record script | 600 |" in text
    assert "| hybrid-e4096 | 1 | hybrid-seed1 rescored: EVAL_SEQ_LEN=4096 | 150 | - | - | - | 1.3900 |" in text
    assert proxy_table.ladder(rows).splitlines() == [
        "| label | 150 s | 600 s |", "| --- | --- | --- |", "| hybrid | 1.4500 (2) | 1.3000 (1) |",
        "| hybrid-e4096 | 1.3700 (1) |  |", "| record |  | 1.3600 (1) |"]


# A stand-in for .bench/run_proxy.sh (which needs a GPU): it records the environment it was given as the
# summary the real runner would write, and for one label writes nothing, as a crashed run would.
STUB_RUNNER = r'''
if [ "$RUN_ID" = "crashed-seed1337" ]; then exit 1; fi
python3 -c "import json, os; d = {k: os.environ.get(k) for k in ('CUDA_VISIBLE_DEVICES', 'NGPU', 'SEED', 'RUN_ID', 'MAMBA_LAYERS', 'NUM_LAYERS', 'MAX_WALLCLOCK_SECONDS')}; d.update(steps=10, step_ms=1.5, val_bpb_prequant=1.2, val_bpb_roundtrip=1.21, val_bpb=1.19, artifact_bytes=123); json.dump(d, open(os.path.join(os.environ['OUT'], os.environ['RUN_ID'] + '.json'), 'w'))"
'''


def side_by_side(tmp_path, *specs, gpus=4):
    (tmp_path / "runner.sh").write_text(STUB_RUNNER)
    env = dict(os.environ, PROXY_RUNNER=str(tmp_path / "runner.sh"), PROXY_GPUS=str(gpus), OUT=str(tmp_path / "out"),
               MAX_WALLCLOCK_SECONDS="150", TMPDIR=str(tmp_path))  # its mktemp folder inside tmp_path
    script = Path(__file__).resolve().parents[1] / "tools" / "proxy_side_by_side.sh"
    return subprocess.run(["bash", str(script), *specs], env=env, capture_output=True, text=True, timeout=60)


def test_side_by_side_gives_each_run_its_gpu_settings_and_seeded_run_id(tmp_path):
    r = side_by_side(tmp_path, "hybrid-default", "attention-only MAMBA_LAYERS= NUM_LAYERS=7",
                     "attention-only SEED=42 MAMBA_LAYERS= NUM_LAYERS=7", "crashed")
    assert r.returncode == 0, r.stderr
    runs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")}
    assert set(runs) == {"hybrid-default-seed1337", "attention-only-seed1337", "attention-only-seed42"}
    assert runs["hybrid-default-seed1337"]["CUDA_VISIBLE_DEVICES"] == "0" and runs["hybrid-default-seed1337"]["MAMBA_LAYERS"] is None
    a, b = runs["attention-only-seed1337"], runs["attention-only-seed42"]
    assert (a["CUDA_VISIBLE_DEVICES"], a["SEED"], a["MAMBA_LAYERS"], a["NUM_LAYERS"]) == ("1", "1337", "", "7")
    assert (b["CUDA_VISIBLE_DEVICES"], b["SEED"]) == ("2", "42")
    assert all(run["NGPU"] == "1" and run["MAX_WALLCLOCK_SECONDS"] == "150" for run in runs.values())
    lines = r.stdout.splitlines()
    assert lines[0].startswith("hybrid-default-seed1337: steps 10 step_ms 1.5 prequant 1.2000") and "artifact 123" in lines[0]
    assert lines[3].startswith("crashed-seed1337: no summary")
    # only the run without a summary leaves its console output beside the summaries
    assert [p.name for p in (tmp_path / "out").glob("*.console")] == ["crashed-seed1337.console"]


def test_side_by_side_refuses_bad_input_before_starting_anything(tmp_path):
    for specs, message in ((("a", "b", "c"), "3 runs but 2 GPUs"),
                           (("NUM_LAYERS=7",), "must start with a label"),
                           (("attention-only layers7",), "'layers7' in 'attention-only layers7' is not a VAR=value")):
        r = side_by_side(tmp_path, *specs, gpus=2)
        assert r.returncode == 2 and message in r.stderr, (specs, r.stderr)
        assert not (tmp_path / "out").exists()


def queue(tmp_path, *args, runner=None, **env):
    """tools/proxy_queue.sh with a stub runner (written when given: the queue's worker reads it later)."""
    tmp_path.mkdir(exist_ok=True)
    if runner is not None:
        (tmp_path / "runner.sh").write_text(runner)
    env = dict(os.environ, PROXY_RUNNER=str(tmp_path / "runner.sh"), PROXY_QUEUE_DIR=str(tmp_path / "queue"),
               OUT=str(tmp_path / "out"), MAX_WALLCLOCK_SECONDS="150", **env)
    script = Path(__file__).resolve().parents[1] / "tools" / "proxy_queue.sh"
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60)


# the stub runner, slowed, and logging when each run starts and ends
ORDERED_RUNNER = 'echo "start $RUN_ID" >> "$OUT/../order"; sleep 1\n' + STUB_RUNNER + 'echo "end $RUN_ID" >> "$OUT/../order"\n'


def test_queue_runs_one_after_another_detached_and_wait_brings_them_back(tmp_path):
    r = queue(tmp_path, "hybrid-default", "attention-only SEED=42 MAMBA_LAYERS=", "crashed", runner=ORDERED_RUNNER)
    assert r.returncode == 0 and "queue: started 3 runs" in r.stdout, r.stderr
    again = queue(tmp_path, "other")  # one queue at a time
    assert again.returncode == 2 and "a queue is still running" in again.stderr
    r = queue(tmp_path, "wait", "30")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "queue: done", r.stdout
    order = (tmp_path / "queue" / "order").read_text().split("\n")
    assert order[:4] == ["start hybrid-default-seed1337", "end hybrid-default-seed1337",
                         "start attention-only-seed42", "end attention-only-seed42"]  # never two at once
    runs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")}
    assert set(runs) == {"hybrid-default-seed1337", "attention-only-seed42"}
    b = runs["attention-only-seed42"]
    assert (b["SEED"], b["MAMBA_LAYERS"], b["CUDA_VISIBLE_DEVICES"], b["MAX_WALLCLOCK_SECONDS"]) == ("42", "", None, "150")
    assert "hybrid-default-seed1337: steps 10 step_ms 1.5" in r.stdout and "crashed-seed1337: no summary" in r.stdout
    assert [p.name for p in (tmp_path / "out").glob("*.console")] == ["crashed-seed1337.console"]
    # a later wait brings back only what it has not brought yet, unless asked for all
    shutil.rmtree(tmp_path / "out")
    r = queue(tmp_path, "wait", "1")
    assert "hybrid-default-seed1337: steps 10" in r.stdout and not list((tmp_path / "out").iterdir())
    queue(tmp_path, "wait", "1", PROXY_COLLECT_ALL="1")
    assert len(list((tmp_path / "out").glob("*.json"))) == 2


def test_queue_rescores_an_artifact_without_training(tmp_path):
    """A spec with ARTIFACT_OF runs the evaluation command (tools/eval_artifact.py on a GPU machine; a stand-in
    here, which echoes what it was given) on that run with the spec's other settings, not the proxy runner."""
    (tmp_path / "eval.sh").write_text(
        'echo "scoring $*"; python3 -c "import json, sys; print(\'eval_summary \' + json.dumps(dict(artifact_of=sys.argv[1], '
        'settings=sys.argv[2:], val_bpb=1.18, val_bpb_roundtrip=1.21, val_bpb_sliding=1.18, eval_seconds=40.0)))" "$@"\n')
    r = queue(tmp_path, "trained", "longer ARTIFACT_OF=trained-seed1337 EVAL_SEQ_LEN=4096 TTT_ENABLED=0",
              runner=STUB_RUNNER, PROXY_EVAL=f"bash {tmp_path / 'eval.sh'}")
    assert r.returncode == 0, r.stderr
    r = queue(tmp_path, "wait", "30")
    assert "longer-seed1337: trained-seed1337 rescored with EVAL_SEQ_LEN=4096 TTT_ENABLED=0: roundtrip 1.2100 " \
           "sliding 1.1800 val_bpb 1.1800 eval 40s" in r.stdout, r.stdout
    assert "scoring trained-seed1337 EVAL_SEQ_LEN=4096 TTT_ENABLED=0" in (tmp_path / "out" / "longer-seed1337.log").read_text()
    assert json.loads((tmp_path / "out" / "longer-seed1337.json").read_text())["artifact_of"] == "trained-seed1337"
    assert "trained-seed1337: steps 10" in r.stdout  # the training run went through the runner


def test_queue_brings_back_artifacts_and_rescores_one_from_an_earlier_machine(tmp_path):
    """A training run's artifact comes back with its log; a spec whose run is not on this machine takes the
    artifact and log from the kept folder (carried there) and scores them on the staged validation data."""
    (tmp_path / "eval.sh").write_text('echo "scoring $*"; ls "$PROXY_LOGS"\n')
    dirs = dict(PROXY_LOGS=str(tmp_path / "logs"), PROXY_ARTIFACTS=str(tmp_path / "kept"), PROXY_DATA="staged/val",
                PROXY_EVAL=f"bash {tmp_path / 'eval.sh'}")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "crashed-seed1337.artifact").write_bytes(b"stale")  # from before the queue: never sent back
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "earlier-seed1337.artifact").write_bytes(b"weights")
    (tmp_path / "kept" / "earlier-seed1337.log").write_text("config {}\n")
    time.sleep(1.1)  # file times have a second's resolution on some file systems
    trains = STUB_RUNNER + 'echo weights > "$PROXY_LOGS/$RUN_ID.artifact"\n'
    r = queue(tmp_path, "fresh", "crashed", "doc ARTIFACT_OF=earlier-seed1337 TTT_MODE=doc", runner=trains, **dirs)
    assert r.returncode == 0, r.stderr
    r = queue(tmp_path, "wait", "30", **dirs)
    assert r.stdout.splitlines()[-1] == "queue: done", r.stdout
    assert (tmp_path / "out" / "fresh-seed1337.artifact").read_text() == "weights\n"
    assert not (tmp_path / "out" / "crashed-seed1337.artifact").exists()  # it crashed: the stale one stays
    log = (tmp_path / "out" / "doc-seed1337.log").read_text()
    assert "scoring earlier-seed1337 TTT_MODE=doc DATA_PATH=staged/val" in log
    assert "earlier-seed1337.artifact" in log and "earlier-seed1337.txt" in log  # copied where eval_artifact reads
    (tmp_path / "kept" / "earlier-seed1337.log").unlink()  # a run found nowhere: passed on as it is, eval says so
    shutil.rmtree(tmp_path / "logs")
    queue(tmp_path / "q2", "doc ARTIFACT_OF=earlier-seed1337", **dirs)
    r = queue(tmp_path / "q2", "wait", "30", **dirs)
    assert "scoring earlier-seed1337\n" in (tmp_path / "q2" / "out" / "doc-seed1337.log").read_text()


def test_queue_wait_brings_back_no_more_than_a_call_returns(tmp_path):
    """The device tool returns at most 8 files a call: a run whose files would not fit waits for the next call,
    and is never marked as brought back before it is."""
    trains = STUB_RUNNER + 'echo weights > "$PROXY_LOGS/$RUN_ID.artifact"\n'
    env = dict(PROXY_LOGS=str(tmp_path / "logs"), PROXY_MAX_FILES="3")
    (tmp_path / "logs").mkdir(parents=True)
    assert queue(tmp_path, "a", "b", runner=trains, **env).returncode == 0
    r = queue(tmp_path, "wait", "30", **env)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a-seed1337.artifact", "a-seed1337.json"]
    assert "b-seed1337: finished; its files come with the next wait" in r.stdout
    assert r.stdout.splitlines()[-1] == "queue: 1 runs' files still to bring back; wait again"
    shutil.rmtree(tmp_path / "out")
    r = queue(tmp_path, "wait", "1", **env)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b-seed1337.artifact", "b-seed1337.json"]
    assert r.stdout.splitlines()[-1] == "queue: done"


def test_queue_wait_reports_a_run_still_going_and_refuses_bad_input(tmp_path):
    r = queue(tmp_path, "slow", runner="sleep 4\n" + STUB_RUNNER)
    assert r.returncode == 0, r.stderr
    r = queue(tmp_path, "wait", "1")
    assert "slow-seed1337: running" in r.stdout and r.stdout.splitlines()[-1] == "queue: still running; wait again"
    for args, message in ((("NUM_LAYERS=7",), "must start with a label"), (("a x",), "'x' in 'a x' is not a VAR=value"),
                          (("a", "a SEED=1337"), "two runs would share a RUN_ID: a-seed1337"),
                          (("wait", "soon"), "wait takes seconds")):
        bad = queue(tmp_path / "fresh", *args, runner=STUB_RUNNER)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)
        assert not (tmp_path / "fresh" / "queue").exists()
    r = queue(tmp_path / "fresh", "wait", "1")
    assert r.returncode == 1 and "no queue on this machine" in r.stderr
    assert queue(tmp_path, "wait", "30").stdout.splitlines()[-2:] == [  # and none left running after the test
        "slow-seed1337: steps 10 step_ms 1.5 prequant 1.2000 roundtrip 1.2100 val_bpb 1.1900 artifact 123", "queue: done"]


# ---- tools/install_gpu.sh: the kernel pins come from requirements.txt ------------------------------

def install_gpu(folder, **env):
    return subprocess.run(["bash", str(folder / "install_gpu.sh")], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PRINT_ONLY="1", **env))


def kernel_pins(requirements):
    return {m[1]: m[0] for m in re.findall(r"^#kernel ((\S+)==\S+)", requirements, re.M)}


def test_install_gpu_takes_the_kernel_versions_from_requirements(tmp_path):
    """In a record folder (install_gpu.sh beside train_gpt.py and requirements.txt) the script installs the
    pinned versions of requirements.txt's #kernel lines, with their build flags; the plain lines are pip's."""
    text = (ROOT / "requirements.txt").read_text()
    pins = kernel_pins(text)
    assert set(pins) == {"mamba-ssm", "causal-conv1d", "flash_attn_3"}
    plain = [l.split("#")[0].strip() for l in text.splitlines() if l.strip() and not l.startswith("#")]
    assert {"torch==2.9.1", "numpy", "sentencepiece", "einops", "packaging"} <= set(plain)
    (tmp_path / "install_gpu.sh").write_bytes((ROOT / "tools" / "install_gpu.sh").read_bytes())
    (tmp_path / "train_gpt.py").write_bytes(b"")  # a stand-in: PRINT_ONLY never imports it
    (tmp_path / "requirements.txt").write_text(text.replace(pins["causal-conv1d"], "causal-conv1d==9.9.9"))
    r = install_gpu(tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE python3 -m pip install --no-build-isolation " \
           f"--no-deps {pins['mamba-ssm']}\n" in r.stdout
    assert "+ env MAX_JOBS=16 python3 -m pip install --no-build-isolation causal-conv1d==9.9.9\n" in r.stdout
    assert f"--no-deps {pins['flash_attn_3']} --find-links " in r.stdout
    assert "flash_attn_3" not in install_gpu(tmp_path, SKIP_FA3="1").stdout
    r = install_gpu(ROOT / "tools")  # from the project: tools/ -> the root's requirements.txt
    assert r.returncode == 0 and all(spec in r.stdout for spec in pins.values()), r.stderr


def conv1d_sdist(tmp_path, setup_py):
    """A causal-conv1d sdist at the pinned version's file name, holding only the given setup.py."""
    pin = kernel_pins((ROOT / "requirements.txt").read_text())["causal-conv1d"]
    src = tmp_path / "src" / f"causal_conv1d-{pin.split('==')[1]}"
    src.mkdir(parents=True)
    (src / "setup.py").write_text(setup_py)
    sdist = tmp_path / f"{src.name}.tar.gz"
    subprocess.run(["tar", "czf", str(sdist), "-C", str(src.parent), src.name], check=True)
    return sdist


def sm90_edit(sdist, tmp_path):
    """install_gpu.sh's own setup.py edit, run on the unpacked sdist: (exit code, stderr, setup.py's output)."""
    out = tmp_path / "unpacked"
    out.mkdir()
    subprocess.run(["tar", "xzf", str(sdist), "-C", str(out), "--strip-components=1"], check=True)
    edit = (ROOT / "tools" / "install_gpu.sh").read_text().split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    r = subprocess.run([sys.executable, "-", str(out / "setup.py")], input=edit, text=True, capture_output=True)
    return r.returncode, r.stderr, subprocess.run([sys.executable, str(out / "setup.py")], capture_output=True,
                                                  text=True).stdout.strip()


def test_install_gpu_builds_a_given_conv1d_sdist_for_hopper_only(tmp_path):
    """CONV1D_SDIST: the pinned version's source is unpacked, its -gencode list cut to sm_90, then built with
    FORCE_BUILD (the nvcc build needs a GPU machine; the edit runs here on a setup.py with the line it keys on)."""
    sdist = conv1d_sdist(tmp_path, "if True:\n    cc_flag = ['-gencode', 'arch=compute_80,code=sm_80']\n"
                                   "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI is set to be the same as\n"
                                   "    print(cc_flag)\n")
    r = install_gpu(ROOT / "tools", CONV1D_SDIST=str(sdist))
    assert r.returncode == 0, r.stderr
    assert "+ env CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps /" in r.stdout
    assert "causal-conv1d==" not in r.stdout  # not also fetched from the index
    assert sm90_edit(sdist, tmp_path) == (0, "", "['-gencode', 'arch=compute_90,code=sm_90']")


def test_install_gpu_builds_only_a_conv1d_wheel_when_asked(tmp_path):
    """CONV1D_WHEEL_DIR: the same sm_90 build as a wheel into that folder, and nothing else (no mamba-ssm, no
    FlashAttention, no kernel check: the machine that builds it need not have a GPU); without CONV1D_SDIST it is
    an error before anything runs. The nvcc build itself ran by hand (docs/kernels.md), not here."""
    sdist = conv1d_sdist(tmp_path, "print('setup')\n")
    r = install_gpu(ROOT / "tools", CONV1D_SDIST=str(sdist), CONV1D_WHEEL_DIR=str(tmp_path / "wheels"))
    assert r.returncode == 0, r.stderr
    commands = [line for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == 3 and commands[0].startswith("+ tar xzf ") and commands[1].startswith("+ python3 - "), r.stdout
    assert commands[2].startswith("+ env CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=16 python3 -m pip wheel "
                                  "--no-build-isolation --no-deps /") and commands[2].endswith(f" -w {tmp_path / 'wheels'}")
    r = install_gpu(ROOT / "tools", CONV1D_WHEEL_DIR=str(tmp_path / "wheels"))
    assert r.returncode == 1 and "builds a wheel from CONV1D_SDIST, which is not set" in r.stderr and not r.stdout, r


def test_install_gpu_refuses_a_conv1d_sdist_it_cannot_build_as_asked(tmp_path):
    """A setup.py without the line the edit keys on is an error, not a silent build for every GPU; a missing
    file or another version's sdist stops the script before anything is installed."""
    code, err, _ = sm90_edit(conv1d_sdist(tmp_path, "print('another layout')\n"), tmp_path)
    assert code != 0 and "has no single '# HACK: The compiler flag" in err
    other = tmp_path / "causal_conv1d-0.0.1.tar.gz"
    other.write_bytes(b"")
    for wrong in (other, tmp_path / "missing.tar.gz"):
        r = install_gpu(ROOT / "tools", CONV1D_SDIST=str(wrong))
        assert r.returncode == 1 and "expected an existing causal_conv1d-" in r.stderr and "+ " not in r.stdout, r


def test_install_gpu_without_a_pin_stops_before_installing(tmp_path):
    (tmp_path / "install_gpu.sh").write_bytes((ROOT / "tools" / "install_gpu.sh").read_bytes())
    (tmp_path / "train_gpt.py").write_bytes(b"")
    text = (ROOT / "requirements.txt").read_text()
    (tmp_path / "requirements.txt").write_text("\n".join(l for l in text.splitlines() if "flash_attn_3==" not in l))
    r = install_gpu(tmp_path)
    assert r.returncode == 1 and "no '#kernel flash_attn_3==VERSION' line in" in r.stderr
    assert "+ " not in r.stdout  # nothing was (even pretended to be) installed
    (tmp_path / "requirements.txt").unlink()
    r = install_gpu(tmp_path)
    assert r.returncode == 1 and "no '#kernel mamba-ssm==VERSION' line in" in r.stderr and r.stdout == ""


def eval_artifact(cwd, *args, env=None):
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full.update(PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "tools" / "eval_artifact.py"), *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=300)


def test_eval_artifact_rescores_a_finished_run_at_another_context(tmp_path):
    """A SMOKE run's artifact scored again with a window twice as long and document TTT: the roundtrip repeats
    the run's own exactly (same weights, same data), the sliding score is the one at the longer window (it
    differs), and the TTT the run did not do is scored."""
    from util import make_inputs, run_train_gpt
    r, _ = run_train_gpt(dict(SMOKE=1, MAX_WALLCLOCK_SECONDS=8, WARMUP_STEPS=0, TTT_ENABLED=0, RUN_ID="rescored"),
                         tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = json.loads(r.stdout.strip().splitlines()[-1][len("final_summary "):])
    # SMOKE's corpus is removed at exit; its maker is deterministic, so the same data is made again
    inputs = make_inputs(tmp_path / "data")
    for shard in Path(inputs["DATA_PATH"]).glob("fineweb_train_*.bin"):  # an evaluation needs only the val split
        shard.unlink()
    paths = [f"{k}={inputs[k]}" for k in ("DATA_PATH", "TOKENIZER_PATH")]
    e = eval_artifact(tmp_path, "rescored", "EVAL_SEQ_LEN=256", "TTT_ENABLED=1", "TTT_MODE=doc", *paths)
    assert e.returncode == 0, e.stdout[-3000:] + e.stderr[-3000:]
    assert "sliding window:256 stride:64" in e.stdout and "ttt doc batch" in e.stdout
    s = json.loads(e.stdout.strip().splitlines()[-1][len("eval_summary "):])
    assert s["val_bpb_roundtrip"] == run["val_bpb_roundtrip"]
    assert s["val_bpb_sliding"] != run["val_bpb_sliding"] and s["config"]["EVAL_SEQ_LEN"] == 256
    assert s["artifact_of"] == "rescored" and run["val_bpb_ttt"] is None and s["val_bpb"] == s["val_bpb_ttt"] > 0


def test_eval_artifact_refuses_what_it_cannot_do_before_any_work(tmp_path):
    (tmp_path / "logs").mkdir()
    e = eval_artifact(tmp_path, "nothing-here", "MODEL_DIM=64", "EVAL_SEQ_LEN")
    assert e.returncode == 2 and "Traceback" not in e.stderr, e.stderr
    lines = e.stderr.strip().splitlines()
    assert lines == ["error: MODEL_DIM cannot change after training (the weights are fixed): only "
                     + ", ".join(__import__("eval_artifact").EVALUATION_KNOBS),
                     "error: 'EVAL_SEQ_LEN' is not a VAR=value setting",
                     "error: no log logs/nothing-here.txt: give the RUN_ID of a finished train_gpt.py run, from the "
                     "folder that holds its logs/",
                     "error: no artifact logs/nothing-here.artifact: the run did not finish its export, or ran elsewhere"]
    (tmp_path / "logs" / "x.txt").write_text("config " + json.dumps(tg.Hyperparameters({"SMOKE": "1"}).resolved) + "\n")
    (tmp_path / "logs" / "x.artifact").write_bytes(b"")
    e = eval_artifact(tmp_path, "x", "EVAL_SEQ_LEN=4", "DATA_PATH=/no/such/dir")
    assert e.returncode == 2, e.stderr
    assert "error: EVAL_SEQ_LEN=4: expected 0 (TRAIN_SEQ_LEN)" in e.stderr and "Traceback" not in e.stderr
