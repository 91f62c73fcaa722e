#!/usr/bin/env python3
"""GPU timings (CUDA events, medians) for the issue tracker's questions, configured by train_gpt.py's
env vars:
  step: one training step (fwd+bwd) of the configured model, fast kernels vs PyTorch fallbacks,
        eager or compiled, with the compiled graph-break count;
  ssd:  the SSD scan alone, fwd+bwd, at 48 x 2048 tokens (kernel vs fallback);
  ssdprof: the Triton SSD's fwd+bwd at the issue's shape and today's default: CUDA-event time, the same
        replayed as one CUDA graph (no host launch gaps), and the profiler's per-kernel GPU times;
  attn: causal GQA attention alone, fwd+bwd, per SDPA backend and the flash-attention library;
  layer: one Mamba-2 block and one attention block, compiled, fwd+bwd, with the profiler's top kernels;
  train: train_gpt's own train_step (COMPILE as configured, real optimizers, EMA) split into its parts
         (fwd+bwd, grad clip + optimizers, EMA, the loss sync), with the profiler's top kernels.
  eval: sliding-window scoring and score-first TTT on random tokens, eager vs compiled, first call (with
        compile) and second; run with the per-rank shapes of the real run, e.g. 8 GPUs, 32768-token TTT
        chunks: VAL_BATCH_SIZE=65536 TTT_CHUNK_TOKENS=4096 (one rank's share on one GPU).
usage: python3 tools/bench_step.py [--what step,ssd,ssdprof,attn,layer,train,eval] [--batch-seqs 64] [--iters 10] [--compile]"""
import argparse, os, statistics, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def timed(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_bwd(fn, inputs):
    def run():
        y = fn(*inputs)
        torch.autograd.grad(y, inputs, torch.ones_like(y))
    return run


def bench_step(hp, a):
    torch.manual_seed(0)
    model = tg.HybridGPT(hp).cuda()
    ids = torch.randint(0, hp.vocab_size, (a.batch_seqs, hp.train_seq_len + 1), device="cuda")
    for fast in (1, 0):
        tg.configure_kernels(tg.Hyperparameters(dict(os.environ, FAST_KERNELS=str(fast))),
                             torch.device("cuda"), print)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        run = torch.compile(model, dynamic=False) if a.compile else model

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = run(ids[:, :-1], ids[:, 1:]).mean()
            loss.backward()
        torch.cuda.reset_peak_memory_stats()
        ms = timed(step, a.iters)
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        print(f"step fast_kernels={fast} {'compiled' if a.compile else 'eager'}: {ms:.1f} ms/step fwd+bwd, "
              f"{a.batch_seqs * hp.train_seq_len / ms * 1000:,.0f} tok/s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
              + (f", {breaks} graph breaks" if a.compile else ""))


def bench_ssd(a):
    found = tg.load_fast_kernels()["ssd"]
    tg.KERNELS["ssd_fwd"], tg.KERNELS["ssd_bwd"] = found[0] or (None, None)
    for H, P, N, chunk in ((16, 64, 128, 128), (16, 64, 128, 256), (12, 64, 64, 128), (12, 64, 64, 256), (12, 64, 32, 128)):
        inputs = ssd_inputs(H, P, N)
        line = f"ssd 48x2048 H={H} P={P} N={N} chunk={chunk}:"
        if found[0] is not None:
            line += f" kernel fwd {timed(lambda: tg.ssd_scan_kernel(*inputs, chunk), a.iters):.2f} ms"
            line += f" fwd+bwd {timed(fwd_bwd(lambda *t: tg.ssd_scan_kernel(*t, chunk), inputs), a.iters):.2f} ms;"
        line += f" eager pytorch fwd+bwd {timed(fwd_bwd(lambda *t: tg.ssd_scan_torch(*t, chunk), inputs), 3):.2f} ms"
        print(line)


def ssd_inputs(H, P, N, b=48, L=2048):
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(b, L, H, P, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    dt = F.softplus(torch.randn(b, L, H, device="cuda", generator=g) - 2).requires_grad_()
    A = (-torch.rand(H, device="cuda", generator=g) * 4).requires_grad_()
    B, C = (torch.randn(b, L, 1, N, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(2))
    return x, dt, A, B, C


def bench_ssd_profile(a):
    """Where the scan's fwd+bwd time goes: kernels (GPU busy) vs the host's launch gaps between them."""
    from torch.profiler import ProfilerActivity, profile
    found = tg.load_fast_kernels()["ssd"]
    assert found[0] is not None, found[1]
    tg.KERNELS["ssd_fwd"], tg.KERNELS["ssd_bwd"] = found[0]
    for H, P, N, chunk in (tuple(map(int, shape.split("x"))) for shape in a.ssd_shapes.split(",")):
        inputs = ssd_inputs(H, P, N)
        grads = [torch.ones(inp.shape, device="cuda", dtype=inp.dtype) for inp in inputs]
        dy = torch.ones(inputs[0].shape, device="cuda", dtype=torch.bfloat16)

        def run():
            y = tg.ssd_scan_kernel(*inputs, chunk)
            for g, d in zip(grads, torch.autograd.grad(y, inputs, dy)):
                g.copy_(d)
        eager = timed(run, a.iters)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        replay = timed(graph.replay, a.iters)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.iters):
                run()
            torch.cuda.synchronize()
        kernels = sorted(((e.self_device_time_total / a.iters / 1000, e.count // a.iters, e.key)
                          for e in prof.key_averages() if e.self_device_time_total > 0), reverse=True)
        busy = sum(k[0] for k in kernels)
        print(f"ssdprof 48x2048 H={H} P={P} N={N} chunk={chunk}: fwd+bwd {eager:.2f} ms (CUDA events), "
              f"{replay:.2f} ms as one CUDA graph, kernels busy {busy:.2f} ms in {sum(k[1] for k in kernels)} launches")
        for ms, count, name in kernels[:12]:
            print(f"  {ms:6.3f} ms  x{count:<3d} {name[:90]}")


def bench_attention(a):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(48, 2048, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(48, 2048, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    print("attention default sdpa choice:", torch._fused_sdp_choice(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                                    is_causal=True, enable_gqa=True))
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                print(f"attention 48x2048 GQA 8/4x64 sdpa {name}: fwd+bwd {timed(fwd_bwd(tg.attention_sdpa, (q, k, v)), a.iters):.2f} ms")
        except RuntimeError as e:
            print(f"attention sdpa {name}: unavailable ({str(e).splitlines()[0][:120]})")
    with torch.enable_grad():
        print(f"attention sdpa default: fwd+bwd {timed(fwd_bwd(tg.attention_sdpa, (q, k, v)), a.iters):.2f} ms")
    impl, name = tg.load_fast_kernels()["attention"]
    if impl is not None:
        tg.KERNELS["attention"] = impl
        print(f"attention {name}: fwd+bwd {timed(fwd_bwd(tg.attention_op, (q, k, v)), a.iters):.2f} ms")
    else:
        print(f"attention library: {name}")


def bench_layers(hp, a):
    from torch.profiler import ProfilerActivity, profile
    tg.configure_kernels(hp, torch.device("cuda"), print)
    x = torch.randn(a.batch_seqs, hp.train_seq_len, hp.model_dim, device="cuda", requires_grad=True)
    for is_mamba in (True, False):
        torch.manual_seed(0)
        block = tg.Block(hp, is_mamba).cuda()
        for p in block.parameters():  # non-zero output projections, so the backward does its full work
            torch.nn.init.normal_(p, std=0.02) if p.ndim == 2 else None
        run = torch.compile(block, dynamic=False)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = run(x, x)
            y.float().square().mean().backward()
        ms = timed(step, a.iters)
        name = "mamba2" if is_mamba else "attention+mlp"
        params = sum(p.numel() for p in block.parameters())
        print(f"layer {name}: {ms:.2f} ms fwd+bwd at {a.batch_seqs}x{hp.train_seq_len}, {params:,} params")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


class RandomTokens:
    """train_step's loader interface over uniform random ids: the timings do not depend on the data."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def next_batch(self, tokens, seq_len):
        ids = torch.randint(0, self.vocab_size, (tokens // seq_len, seq_len + 1), device="cuda")
        return ids[:, :-1], ids[:, 1:]


def bench_train(hp, a):
    from torch.profiler import ProfilerActivity, profile
    hp.resolve_world(1)
    hp.grad_accum_steps, hp.train_batch_tokens = 1, a.batch_seqs * hp.train_seq_len
    ctx = tg.Context()
    tg.configure_kernels(hp, ctx.device, print)
    torch.manual_seed(0)
    base = tg.HybridGPT(hp).cuda()
    model = tg.compile_model(base, hp.compile)
    opts, ema = tg.build_optimizers(base, hp), tg.EMA(base, hp.ema_decay)
    # real shards (a skewed token distribution: hot embedding rows in the backward) or uniform random ids
    loader = (tg.DistributedTokenLoader(tg.shard_files(a.data, "train"), 0, 1, ctx.device) if a.data
              else RandomTokens(hp.vocab_size))
    print(f"train: tokens from {a.data or 'uniform random ids'}")
    x, y = loader.next_batch(hp.train_batch_tokens, hp.train_seq_len)

    def fwd_bwd():
        with tg.autocast(ctx.device):
            model(x, y).mean().backward()

    def optimize():
        torch.nn.utils.clip_grad_norm_(base.parameters(), hp.grad_clip_norm)
        for opt in opts:
            opt.step()

    def whole_step():
        tg.train_step(model, opts, loader, hp, ctx, 100, 1.0)
        ema.update(base)
    t0 = time.time()
    whole_step()
    print(f"train: first step (compile) {time.time() - t0:.0f}s; {sum(p.numel() for p in base.parameters()):,} params, "
          f"{a.batch_seqs}x{hp.train_seq_len} tokens")
    parts = {"whole train_step + EMA": whole_step, "fwd+bwd": fwd_bwd, "clip + optimizers": optimize,
             "EMA": lambda: ema.update(base)}
    for name, fn in parts.items():
        print(f"train {name}: {timed(fn, a.iters):.1f} ms")
    host = []
    for _ in range(a.iters):  # host-side launch time: if it exceeds the GPU time, the step is CPU-bound
        fwd_bwd()
        torch.cuda.synchronize()
        t0 = time.time()
        optimize()
        ema.update(base)
        host.append(1000 * (time.time() - t0))
        torch.cuda.synchronize()
        base.zero_grad(set_to_none=True)
    print(f"train host time to launch clip + optimizers + EMA: {statistics.median(host):.1f} ms")
    # back to back without a host sync in between: what the GPU alone needs per step
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(a.iters):
        fwd_bwd()
        optimize()
        base.zero_grad(set_to_none=True)
        ema.update(base)
    torch.cuda.synchronize()
    print(f"train unsynced step (fwd+bwd, optimizers, EMA): {1000 * (time.time() - t0) / a.iters:.1f} ms")
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            whole_step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))


def bench_eval(hp, a):
    hp.resolve_world(1)
    ctx = tg.Context()
    tg.configure_kernels(hp, ctx.device, print)
    torch.manual_seed(0)
    base = tg.HybridGPT(hp).cuda()
    L, batch_seqs = hp.train_seq_len, max(1, hp.val_batch_size // hp.train_seq_len)
    tokens = torch.randint(0, hp.vocab_size, (a.eval_chunks * hp.ttt_chunk_tokens + 1,), dtype=torch.int32)
    luts = (torch.ones(hp.vocab_size, dtype=torch.int16, device=ctx.device),
            torch.zeros(hp.vocab_size, dtype=torch.bool, device=ctx.device), torch.ones(hp.vocab_size, dtype=torch.bool, device=ctx.device))
    windows = len(tg.sliding_windows(0, tokens.numel() - 1, L, hp.eval_stride))
    print(f"eval: {tokens.numel() - 1:,} tokens, {windows} sliding windows in batches of {batch_seqs}, "
          f"{a.eval_chunks} TTT chunks of {hp.ttt_chunk_tokens}, {hp.ttt_epochs} epochs")
    for name, model in (("eager", base), ("compiled", torch.compile(base, dynamic=False))):
        for call in ("first", "second"):
            t0 = time.time()
            tg.evaluate(model, tokens, L, hp.eval_stride, batch_seqs, ctx, luts)
            torch.cuda.synchronize()
            s = time.time() - t0
            print(f"eval {name} sliding {call}: {s:.1f}s, {1000 * s / -(-windows // batch_seqs):.1f} ms/batch")
            t0 = time.time()
            tg.evaluate_ttt(model, tokens, hp, batch_seqs, ctx, luts, log=lambda m: print("  " + m) if m.startswith("ttt:") else None)
            torch.cuda.synchronize()
            s = time.time() - t0
            print(f"eval {name} ttt {call}: {s:.1f}s, {1000 * s / a.eval_chunks:.1f} ms/chunk")


ap = argparse.ArgumentParser()
ap.add_argument("--what", default="step,ssd,attn")
ap.add_argument("--batch-seqs", type=int, default=64)
ap.add_argument("--iters", type=int, default=10)
ap.add_argument("--compile", action="store_true")
ap.add_argument("--eval-chunks", type=int, default=64)
ap.add_argument("--ssd-shapes", default="16x64x128x128,16x64x128x256,8x64x32x256",
                help="ssdprof: heads x headdim x d_state x chunk, comma-separated")
ap.add_argument("--data", default="", help="train: a shard folder to read tokens from instead of random ids")
a = ap.parse_args()
what = a.what.split(",")
if "attn" in what:
    bench_attention(a)
if "ssd" in what:
    bench_ssd(a)
if "ssdprof" in what:
    bench_ssd_profile(a)
if "layer" in what:
    bench_layers(tg.Hyperparameters(), a)
if "eval" in what:
    bench_eval(tg.Hyperparameters(), a)
if "train" in what:
    bench_train(tg.Hyperparameters(), a)
if "step" in what:
    bench_step(tg.Hyperparameters(), a)
