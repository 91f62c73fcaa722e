"""HYPERPARAMETERS: every knob read once, validated, logged; DRY_RUN needs no data."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt as tg
from util import make_inputs, run_train_gpt, stop_lines

ROOT = Path(__file__).resolve().parents[1]
SEED_ENV = dict(MAMBA_LAYERS="0,1,2,3,4,5,6,7,8,9,10,11,15,16,17", NUM_LAYERS="18", MAMBA_D_STATE="32",
                MAMBA_D_CONV="4", MAMBA_EXPAND="1.5", MAMBA_MATRIX_LR="0.015", BIGRAM_VOCAB_SIZE="2048",
                BIGRAM_DIM="128", TARGET_MB="15.9", SEED="42")


def run_script(env, timeout=120):
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    full.update(env)
    return subprocess.run([sys.executable, "train_gpt.py"], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


def test_seed_command_accepted_by_dry_run(tmp_path):
    """The first draft's literal command still runs: on today's defaults, so with the recurrence, parallel
    residuals and MLPs after its Mamba layers; MAMBA_MLP=0 gives them none, as in the draft."""
    r = run_script(dict(SEED_ENV, DRY_RUN="1", DATA_PATH=str(tmp_path / "none")))
    assert r.returncode == 0, r.stderr
    assert "layer 23 (block 17) decoder: mamba2||mlp <- skip from layer 0" in r.stdout
    r = run_script(dict(SEED_ENV, MAMBA_MLP="0", DRY_RUN="1", DATA_PATH=str(tmp_path / "none")))
    assert r.returncode == 0, r.stderr
    assert "layer 18 (block 12) decoder: attention||mlp" in r.stdout and "layer 17 (block 11) decoder: mamba2 <-" in r.stdout
    assert '"MAMBA_EXPAND": 1.5' in r.stdout and '"TARGET_MB": 15.9' in r.stdout
    assert "WARNING" not in r.stdout  # 31.6M parameters: at the std-based grids, about 14.4 MB by the estimate
    params = dict(kv.split(":") for kv in r.stdout.split("params ")[1].split("\n")[0].split())
    assert int(params["total"].replace(",", "")) == sum(int(v.replace(",", "")) for k, v in params.items() if k != "total")


def test_default_dry_run_prints_layer_map_and_counts():
    r = run_script(dict(DRY_RUN="1"))
    assert r.returncode == 0, r.stderr
    hp = tg.Hyperparameters({})
    with __import__("torch").device("meta"):
        model = tg.HybridGPT(hp)
    assert f"total:{sum(p.numel() for p in model.parameters()):,}" in r.stdout
    assert "layer 16 (block 10) decoder: attention||mlp" in r.stdout
    assert "layer  6 (block 3, again) encoder: mamba2+mlp" in r.stdout
    # the record stack's pure attention: 16,028,196 model bytes measured on the proxy before fitting (fp32 floats,
    # now fp16: about 47 KB less) + the packed code; the estimate within 1% of that
    r = run_script(dict(DRY_RUN="1", MAMBA_LAYERS=""))
    assert r.returncode == 0 and "total:35,944,536" in r.stdout, r.stdout[-2000:]
    estimate = int(re.search(r"about ([\d,]+) bytes", r.stdout).group(1).replace(",", ""))
    assert abs(estimate - (16_028_196 - 47_000 + 27_000)) < 0.01 * 16e6, estimate


@pytest.mark.parametrize("env, needle", [
    ({"NUM_LAYERS": "abc"}, "NUM_LAYERS='abc': expected an integer in [1, 128]"),
    ({"NUM_LAYERS": "0"}, "NUM_LAYERS=0: expected an integer in [1, 128]"),
    ({"TARGET_MB": "16.5"}, "TARGET_MB=16.5: expected a number in [0.1, 16.0]"),
    ({"TTT_ENABLED": "2"}, "TTT_ENABLED=2: expected 0 or 1"),
    ({"MATRIX_LR": "nan"}, "MATRIX_LR=nan"),
    ({"MAMBA_LAYERS": "0,1,x"}, "MAMBA_LAYERS='0,1,x'"),
    ({"MAMBA_LAYERS": "0,11"}, "MAMBA_LAYERS has [11]"),
    ({"MAMBA_BRANCH_LAYERS": "12"}, "MAMBA_BRANCH_LAYERS has [12]: expected indices in [0, 10]"),
    ({"MAMBA_BRANCH_LAYERS": "1,10"}, "MAMBA_BRANCH_LAYERS and MAMBA_LAYERS both have [1]: a branch sits beside a "
                                      "block's attention, and there a Mamba-2 block has none: try MAMBA_BRANCH_LAYERS=10"),
    ({"MAMBA_LAYERS": "", "MAMBA_BRANCH_LAYERS": "3", "MAMBA_HEADDIM": "100"}, "must be a multiple of MAMBA_HEADDIM=100"),
    ({"NUM_HEADS": "6"}, "MODEL_DIM=512 must split into NUM_HEADS=6"),
    ({"NUM_KV_HEADS": "3"}, "NUM_HEADS=8 must be a multiple of NUM_KV_HEADS=3"),
    ({"MAMBA_HEADDIM": "100"}, "must be a multiple of MAMBA_HEADDIM=100"),
    ({"EVAL_STRIDE": "4096"}, "EVAL_STRIDE=4096 must be at most TRAIN_SEQ_LEN=2048"),
    ({"EVAL_STRIDE": "2048", "EVAL_SEQ_LEN": "1024"}, "EVAL_STRIDE=2048 must be at most EVAL_SEQ_LEN=1024: try EVAL_STRIDE=64"),
    ({"EVAL_SEQ_LEN": "4"}, "EVAL_SEQ_LEN=4: expected 0 (TRAIN_SEQ_LEN) or a length in [8, 65536]"),
    ({"TTT_DOC_LR": "0.001"}, "TTT_DOC_LR=0.001 is read only with TTT_MODE=doc (this run: TTT_MODE=chunk): set "
                              "TTT_MODE=doc, or leave TTT_DOC_LR unset"),
    ({"TTT_MODE": "doc", "TTT_CHUNK_TOKENS": "4096"}, "TTT_CHUNK_TOKENS=4096 is read only with TTT_MODE=chunk"),
    ({"EVAL_STRIDE": "0"}, "TTT_ENABLED=1 scores through sliding windows"),
    ({"REQUIRE_FAST_KERNELS": "1", "FAST_KERNELS": "0"}, "REQUIRE_FAST_KERNELS=1 needs FAST_KERNELS=1"),
    ({"QUANT_MIN_BITS": "3"}, "QUANT_MIN_BITS=3: expected an integer in [4, 6]"),
    ({"ROPE_DIMS": "15"}, "ROPE_DIMS=15 must be even and at most the head dim (64)"),
    ({"ROPE_DIMS": "128"}, "ROPE_DIMS=128 must be even and at most the head dim (64)"),
    ({"QUANT_MIN_BITS": "8"}, "QUANT_MIN_BITS=8: expected an integer in [4, 6]"),
    ({"GPTQ_CLIP_SEARCH": "yes"}, "GPTQ_CLIP_SEARCH='yes': expected 0 or 1"),
    ({"QUANT_SIGMAS": "-1"}, "QUANT_SIGMAS=-1.0: expected a number in [0.0, 100.0]"),
    ({"QUANT_EMBED_SIGMAS": "abc"}, "QUANT_EMBED_SIGMAS='abc': expected a number in [0.0, 1000.0]"),
    ({"WARMDOWN_ITERS": "3500"}, "WARMDOWN_ITERS is retired: use WARMDOWN_FRAC"),
    ({"WARMDOWN_FRAC": "1.5"}, "WARMDOWN_FRAC=1.5: expected a number in [0.0, 1.0]"),
    ({"RECUR_LOOPS": "0"}, "RECUR_LOOPS=0: expected an integer in [1, 16]"),
    ({"MAX_WALLCLOCK_SECONDS": "5"}, "MAX_WALLCLOCK_SECONDS=5 leaves no training time after GPTQ_RESERVE_SECONDS=12"),
])
def test_bad_values_rejected_naming_the_variable(env, needle):
    with pytest.raises(tg.ConfigError) as e:
        tg.Hyperparameters(env)
    assert needle in str(e.value)


def test_bad_value_stops_the_script_before_work():
    r = run_script(dict(MODEL_DIM="-3"))
    assert r.returncode == 2
    assert "MODEL_DIM=-3" in r.stderr and "Traceback" not in r.stderr


def test_all_errors_reported_together():
    with pytest.raises(tg.ConfigError) as e:
        tg.Hyperparameters({"SEED": "-1", "ITERATIONS": "x"})
    assert "SEED=-1" in str(e.value) and "ITERATIONS='x'" in str(e.value)


def test_a_knob_of_the_other_ttt_mode_is_an_error_unless_it_holds_its_default():
    tg.Hyperparameters({"TTT_DOC_LR": "0.0003", "TTT_CHUNK_TOKENS": "32768"})  # defaults: as a rescoring passes them
    tg.Hyperparameters({"TTT_MODE": "doc", "TTT_DOC_LR": "0.001", "TTT_LR": "0.001"})  # TTT_LR: the phases' SGD


def test_eval_seq_len_follows_train_seq_len_unless_set():
    assert tg.Hyperparameters({}).eval_seq_len == 2048
    hp = tg.Hyperparameters({"TRAIN_SEQ_LEN": "1024"})
    assert hp.eval_seq_len == hp.resolved["EVAL_SEQ_LEN"] == 1024  # logged as the length it uses
    assert tg.Hyperparameters({"EVAL_SEQ_LEN": "8192", "EVAL_STRIDE": "4096"}).eval_seq_len == 8192
    with pytest.raises(tg.ConfigError) as e:  # one line: no stride error built on a bad length
        tg.Hyperparameters({"EVAL_SEQ_LEN": "4", "EVAL_STRIDE": "64"})
    assert str(e.value).count("\n") == 1


def test_mamba_layers_unset_empty_and_explicit():
    assert tg.Hyperparameters({}).mamba_layers == list(range(10))
    assert tg.Hyperparameters({"MAMBA_LAYERS": ""}).mamba_layers == []
    assert tg.Hyperparameters({"MAMBA_LAYERS": "3, 1,1"}).mamba_layers == [1, 3]


def test_every_knob_is_logged_and_smoke_defaults_yield_to_user():
    hp = tg.Hyperparameters({"SMOKE": "1", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1"})
    assert hp.model_dim == 32 and hp.resolved["MODEL_DIM"] == 32
    assert hp.num_layers == tg.SMOKE_DEFAULTS["NUM_LAYERS"]
    # every attribute that comes from a knob appears in the logged config
    knob_attrs = {k for k in vars(hp) if not k.startswith("_") and k not in ("resolved", "notes")}
    assert len(hp.resolved) == len(knob_attrs)


def test_grad_accum_default_and_batch_geometry():
    hp = tg.Hyperparameters({})
    hp.resolve_world(8)
    assert hp.grad_accum_steps == 1
    hp = tg.Hyperparameters({})
    hp.resolve_world(2)
    assert hp.grad_accum_steps == 4
    hp = tg.Hyperparameters({"TRAIN_BATCH_TOKENS": "1000"})
    with pytest.raises(tg.ConfigError, match="TRAIN_BATCH_TOKENS=1000 must be a multiple"):
        hp.resolve_world(1)


CONFIG_DOC = ROOT / "docs" / "configuration.md"  # the table of environment variables (the README links it)


def test_every_knob_is_in_the_readme_table():
    """Users read the variables' table to launch runs: a knob missing there is a knob nobody can find."""
    table = {line.split("|")[1].strip().strip("`") for line in CONFIG_DOC.read_text().splitlines()
             if line.startswith("| `")}
    knobs = set(tg.Hyperparameters({}).resolved)
    assert knobs and not knobs - table, sorted(knobs - table)


def test_readme_table_defaults_match_the_code():
    """A default the variables' table misstates launches a different model than the reader thinks (MAMBA_EXPAND
    once read 2.0 there while the code said 1.5)."""
    resolved = tg.Hyperparameters({}).resolved
    wrong = []
    for line in CONFIG_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if not line.startswith("| `") or len(cells) < 2 or cells[0].strip("`") not in resolved:
            continue
        name, shown = cells[0].strip("`"), cells[1].strip('"')
        if name == "RUN_ID":
            continue
        actual = resolved[name]
        same = (float(shown.replace("_", "")) == float(actual)) if isinstance(actual, (int, float)) else shown == str(actual)
        if not same:
            wrong.append(f"{name}: README {cells[1]!r}, code {actual!r}")
    assert not wrong, wrong


# ---------------------------------------------------------------------------------------------
# the check before any work, as a user meets it: train_gpt.py started with one bad input stops with one
# 'error:' line naming the variable, its value and a value that works, exit code 2, no traceback, in seconds
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tokenizer and shards a run accepts, and ALLOW_CPU=1 so that the CPU running the tests is no problem."""
    return dict(make_inputs(tmp_path_factory.mktemp("inputs")), ALLOW_CPU="1")


@pytest.mark.parametrize("env, message", [
    # follow-on checks are skipped: no layer-index error for NUM_LAYERS=0, no EVAL_STRIDE error for TRAIN_SEQ_LEN=-5
    ({"NUM_LAYERS": "0"}, "NUM_LAYERS=0: expected an integer in [1, 128] (default 11)"),
    ({"TRAIN_SEQ_LEN": "-5"}, "TRAIN_SEQ_LEN=-5: expected an integer in [8, 65536] (default 2048)"),
    ({"MODEL_DIM": "500"}, "MODEL_DIM=500 must split into NUM_HEADS=8 heads of even size; MAMBA_EXPAND*MODEL_DIM=500 "
                           "must be a multiple of MAMBA_HEADDIM=64: try MODEL_DIM=512 or 448"),
    ({"MODEL_DIM": "500", "MAMBA_LAYERS": ""}, "MODEL_DIM=500 must split into NUM_HEADS=8 heads of even size: "
                                               "try MODEL_DIM=496 or 512"),
    ({"NUM_HEADS": "6"}, "MODEL_DIM=512 must split into NUM_HEADS=6 heads of even size; NUM_HEADS=6 must be a "
                         "multiple of NUM_KV_HEADS=4: try NUM_HEADS=4 or 8"),
    ({"MAMBA_LAYERS": "0,11"}, "MAMBA_LAYERS has [11]: expected indices in [0, 10] (NUM_LAYERS=11): try "
                               "MAMBA_LAYERS=0 or NUM_LAYERS=12"),
    ({"MAX_WALLCLOCK_SECONDS": "5"}, "MAX_WALLCLOCK_SECONDS=5 leaves no training time after GPTQ_RESERVE_SECONDS=12: "
                                     "try MAX_WALLCLOCK_SECONDS=600, or 0 for no cap"),
    ({"GPTQ_RESERVE_SECONDS": "700"}, "MAX_WALLCLOCK_SECONDS=600 leaves no training time after "
                                      "GPTQ_RESERVE_SECONDS=700: try GPTQ_RESERVE_SECONDS=12"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS=1000 must be a multiple of world size (1) x GRAD_ACCUM_STEPS "
                                     "(8) x TRAIN_SEQ_LEN (2048) = 16384: try TRAIN_BATCH_TOKENS=16384"),
    ({"VOCAB_SIZE": "1024"}, "VOCAB_SIZE=1024 but the tokenizer TOKENIZER_PATH={tok} has 320 pieces: try VOCAB_SIZE=320"),
    ({"ALLOW_CPU": "yes"}, "ALLOW_CPU='yes': expected 0 or 1 in [0, 1] (default 0)"),
])
def test_one_bad_input_one_line(inputs, tmp_path, env, message):
    r, seconds = run_train_gpt(dict(inputs, **env), tmp_path)
    assert stop_lines(r, seconds) == [message.format(tok=inputs["TOKENIZER_PATH"])]


def test_vocab_size_checked_against_the_tokenizer_name_before_it_loads(inputs, tmp_path):
    named = tmp_path / "fineweb_320_bpe.model"
    named.write_bytes(Path(inputs["TOKENIZER_PATH"]).read_bytes())
    r, seconds = run_train_gpt(dict(inputs, TOKENIZER_PATH=named, VOCAB_SIZE=8192), tmp_path)
    assert stop_lines(r, seconds) == [f"VOCAB_SIZE=8192 but TOKENIZER_PATH={named} is named for 320 tokens: try "
                                      f"VOCAB_SIZE=320, or TOKENIZER_PATH={tmp_path}/fineweb_8192_bpe.model"]
    # and by the names alone, as DRY_RUN sees them (no file needed)
    with pytest.raises(tg.ConfigError, match="are named for 8192 tokens: try VOCAB_SIZE=8192"):
        tg.Hyperparameters({"VOCAB_SIZE": "1024"})


def test_all_problems_at_once_in_the_order_a_user_fixes_them(inputs, tmp_path):
    r, seconds = run_train_gpt(dict(inputs, NUM_LAYERS=0, MODEL_DIM=500, DATA_PATH=tmp_path / "nowhere",
                                    TOKENIZER_PATH=tmp_path / "none.model"), tmp_path)
    lines = stop_lines(r, seconds)
    assert [line.split(" ")[0].split("=")[0] for line in lines] == ["NUM_LAYERS", "MODEL_DIM", "DATA_PATH",
                                                                      "TOKENIZER_PATH"], lines
    assert lines[2].startswith(f"DATA_PATH={tmp_path / 'nowhere'} does not exist: download the data: "
                               f"{tg.DOWNLOAD_HINT}")
    assert lines[3] == f"TOKENIZER_PATH={tmp_path / 'none.model'} does not exist: the command above fetches it too"


def test_a_gpu_run_on_a_cpu_stops_naming_smoke_and_dry_run(inputs, tmp_path):
    """The default configuration on a CPU was OOM-killed after 106 s without a word; now it says what to run."""
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    r, seconds = run_train_gpt(dict(inputs, ALLOW_CPU=0), tmp_path)
    (line,) = stop_lines(r, seconds)
    assert line.startswith("no CUDA GPU on this machine") and "SMOKE=1" in line and "DRY_RUN=1" in line
    assert "ALLOW_CPU=1" in line
    hp = tg.Hyperparameters({})
    assert hp.machine_problems(cuda=False) and not hp.machine_problems(cuda=True)
    for knob in ("SMOKE", "DRY_RUN", "ALLOW_CPU"):
        assert tg.Hyperparameters({knob: "1"}).machine_problems(cuda=False) == []


def test_dry_run_under_torchrun_prints_on_rank_0_only(tmp_path):
    """torchrun --nproc_per_node=8 starts 8 copies: the other 7 print nothing (and make no process group)."""
    for env in (dict(RANK="1", WORLD_SIZE="8", LOCAL_RANK="1"), dict(LOCAL_RANK="3")):
        r, _ = run_train_gpt(dict(DRY_RUN=1, **env), tmp_path)
        assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout[-500:] + r.stderr[-500:]
    r, _ = run_train_gpt(dict(DRY_RUN=1, RANK="1", WORLD_SIZE="8", NUM_LAYERS=0), tmp_path)  # every rank stops, one says
    assert r.returncode == 2 and r.stderr == ""
    r, _ = run_train_gpt(dict(DRY_RUN=1, RANK="0", WORLD_SIZE="8", LOCAL_RANK="0"), tmp_path)
    assert r.returncode == 0 and r.stdout.count("layer map:") == 1


def test_follow_on_checks_wait_for_the_values_they_read():
    for env, only in [({"NUM_LAYERS": "0", "PARALLEL_FROM": "3", "MAMBA_LAYERS": "0,1"}, "NUM_LAYERS"),
                      ({"TRAIN_SEQ_LEN": "x", "EVAL_STRIDE": "64"}, "TRAIN_SEQ_LEN"),
                      ({"MODEL_DIM": "-3", "ROPE_DIMS": "16"}, "MODEL_DIM"),
                      ({"NUM_HEADS": "0"}, "NUM_HEADS"),
                      ({"MAX_WALLCLOCK_SECONDS": "-1"}, "MAX_WALLCLOCK_SECONDS")]:
        hp = tg.Hyperparameters(env, raise_errors=False)
        assert [p.split("=")[0] for p in hp.problems()] == [only], hp.problems()
        assert hp.world_problems(1) == []
