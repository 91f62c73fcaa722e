#!/usr/bin/env python3
"""Time one training step (forward + backward) of a configuration on the GPU, with the fast SSD kernel
and with the PyTorch fallback, eager and compiled. Configure with train_gpt.py's env vars.
usage: python3 tools/bench_step.py [--batch-seqs 64] [--iters 10] [--compile]"""
import argparse, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--batch-seqs", type=int, default=64)
ap.add_argument("--iters", type=int, default=10)
ap.add_argument("--compile", action="store_true")
a = ap.parse_args()
hp = tg.Hyperparameters()
torch.manual_seed(0)
model = tg.HybridGPT(hp).cuda()
ids = torch.randint(0, hp.vocab_size, (a.batch_seqs, hp.train_seq_len + 1), device="cuda")
fast, why = tg.load_mamba_ssd()
for kernel, label in ((fast, "mamba_ssm-triton"), (None, "pytorch-chunked")):
    if label == "mamba_ssm-triton" and fast is None:
        print(f"skip {label}: {why}")
        continue
    tg.KERNELS["ssd_scan"] = kernel
    run = torch.compile(model) if a.compile else model
    torch._dynamo.reset()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = run(ids[:, :-1], ids[:, 1:]).mean()
        loss.backward()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(a.iters):
        step()
    torch.cuda.synchronize()
    ms = 1000 * (time.time() - t) / a.iters
    print(f"{label} {'compiled' if a.compile else 'eager'}: {ms:.1f} ms/step fwd+bwd, "
          f"{a.batch_seqs * hp.train_seq_len / ms * 1000:,.0f} tok/s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    torch.cuda.reset_peak_memory_stats()
