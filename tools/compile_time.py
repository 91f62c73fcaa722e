#!/usr/bin/env python3
"""First-step (compile) and steady-step time of the configured model under COMPILE=1 (whole model) or
COMPILE=2 (each block), on whatever device is here (CPU works: inductor compiles C++ there).
usage: python3 tools/compile_time.py {1,2} [--seq 256] [--threads 2]"""
import argparse, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("mode", type=int, choices=(1, 2))
ap.add_argument("--seq", type=int, default=256)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
hp = tg.Hyperparameters({"TRAIN_SEQ_LEN": str(a.seq), "MAMBA_CHUNK_SIZE": str(min(64, a.seq))})
tg.configure_kernels(hp, device, print)
model = tg.HybridGPT(hp).to(device)
run = tg.compile_model(model, a.mode)
ids = torch.randint(0, hp.vocab_size, (1, a.seq + 1), device=device)


def step():
    with tg.autocast(device):
        loss = run(ids[:, :-1], ids[:, 1:]).mean()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()


t = time.time()
step()
first = time.time() - t
t = time.time()
for _ in range(3):
    step()
print(f"COMPILE={a.mode} on {device}: first step {first:.1f} s, then {(time.time() - t) / 3:.3f} s/step")
