"""Small shared helpers for the tests: tiny configurations, a CPU context, shard files."""
import datetime
import getpass
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import train_gpt as tg


def make_hp(**env):
    """SMOKE-sized hyperparameters (CPU friendly), with string overrides as a user would set them."""
    base = {"SMOKE": "1"}
    base.update({k: str(v) for k, v in env.items()})
    return tg.Hyperparameters(base)


class CPUContext:
    def __init__(self, rank=0, world_size=1):
        self.device, self.rank, self.world_size = torch.device("cpu"), rank, world_size
        self.distributed, self.is_main, self.local_rank = world_size > 1, rank == 0, 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo(rank, world_size, port):
    """Inside an mp.spawn worker: join a CPU process group, with a short collective timeout so that a rank
    left waiting in an all-reduce fails the test instead of hanging it. Returns the rank's CPUContext."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    return CPUContext(rank, world_size)


def leave_gloo():
    """End an mp.spawn worker's process group. The barrier first: a rank that tears down its connections
    while the other still uses them can make gloo abort the other ("terminate called without an active
    exception", seen once in a full CPU run)."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def write_shard(path, tokens, magic=tg.SHARD_MAGIC, version=tg.SHARD_VERSION, count=None):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if count is None else count)
    with open(path, "wb") as f:
        f.write(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def randomize_weights(model, seed):
    """Random non-zero matrices everywhere: zero-initialised projections would make later layers ignore
    their context (context checks could not fail) and leave all-zero rows for the quantizer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and name.endswith(".weight") and "conv_weight" not in name:
                std = 1.0 if tg.quant_kind(name, p) == "int8" else p.size(1) ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def torchrun_smoke(cwd, nproc, timeout=300):
    """The whole SMOKE pipeline under torchrun on nproc ranks (GPUs if there are, else gloo on the CPU),
    compiled where CUDA is, with TTT. The LR schedule, the recurrence's switch-on and the stop run by the
    wall clock (huge ITERATIONS): each rank reading its own clock once made the replicas diverge on the
    proxy. Returns the CompletedProcess; train_gpt itself stops if the ranks' weights differ."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(SMOKE="1", COMPILE="1", WARMUP_STEPS="2", MAX_WALLCLOCK_SECONDS="20", ITERATIONS="1000000",
               TTT_ENABLED="1", EVAL_STRIDE="128", RUN_ID="torchrun_smoke",
               PYTHONPATH=str(root), PYTHONUNBUFFERED="1", **temp_under(cwd))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(root / "train_gpt.py")], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def temp_under(folder):
    """Environment that sends a child's temporary files (SMOKE's corpus, torchrun's torchelastic_* logs) into
    folder/tmp, inside the test's tmp_path; the compile cache stays where it was, shared by every test."""
    tmp = Path(folder) / "tmp"
    tmp.mkdir(exist_ok=True)
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    return dict(TMPDIR=str(tmp), TORCHINDUCTOR_CACHE_DIR=cache)


def run_train_gpt(env, cwd, timeout=60):
    """train_gpt.py as a user starts it (no torchrun variables unless env sets them), from cwd, with its temporary
    files under cwd/tmp. Returns (CompletedProcess, seconds until it stopped)."""
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full.update(PYTHONUNBUFFERED="1", **temp_under(cwd))
    full.update({k: str(v) for k, v in env.items()})
    t0 = time.time()
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "train_gpt.py")], cwd=cwd, env=full,
                       capture_output=True, text=True, timeout=timeout)
    return r, time.time() - t0


def make_inputs(folder, vocab_size=320):
    """A tokenizer and train/val shards a run accepts (SMOKE's corpus maker): -> the env that points at them."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    from smoke_corpus import make_smoke_corpus
    data, tokenizer = make_smoke_corpus(folder, vocab_size)
    return dict(DATA_PATH=data, TOKENIZER_PATH=tokenizer, VOCAB_SIZE=str(vocab_size))


STOP_SECONDS = 15  # importing torch is most of it: about 1.4 s measured on 2 shared cores


def stop_lines(r, seconds):
    """The run's error lines, after checking that it stopped as a settings check does."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and r.stdout == "", r.stdout[-2000:] + r.stderr[-2000:]
    assert seconds < STOP_SECONDS, seconds
    lines = r.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), lines
    return [line[len("error: "):] for line in lines]
