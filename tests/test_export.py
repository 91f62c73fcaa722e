"""Tests for train_gpt.py's QUANTIZATION AND EXPORT section: int6 packing, round-to-nearest and GPTQ
quantizers, the per-tensor format rule, the pickle-free LZMA artifact, and fitting the size cap.

Everything runs the real functions on a real (tiny) HybridGPT on the CPU; nothing is mocked except
pickle/torch.load, which are booby-trapped to prove the artifact reader never touches them.
"""
import hashlib
import json
import lzma
import math
import os
import pickle
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import train_gpt as tg
from util import free_port, join_gloo, leave_gloo, randomize_weights

CTX = types.SimpleNamespace(device=torch.device("cpu"), distributed=False, rank=0, world_size=1, is_main=True)
# Two layers: layer 0 Mamba-2, layer 1 attention + MLP; SMOKE supplies the other small defaults.
SMALL_ENV = {"SMOKE": "1", "NUM_LAYERS": "2", "MAMBA_LAYERS": "0", "TRAIN_SEQ_LEN": "32",
             "EVAL_STRIDE": "16", "MAMBA_CHUNK_SIZE": "16", "SEED": "0", "RUN_ID": "test_export"}
ROOT = Path(__file__).resolve().parents[1]


def small_hp(**overrides):
    env = dict(SMALL_ENV)
    env.update({k: str(v) for k, v in overrides.items()})
    return tg.Hyperparameters(env)


def small_model(seed=0, **overrides):
    hp = small_hp(**overrides)
    torch.manual_seed(seed)
    return randomize_weights(tg.HybridGPT(hp), seed + 1), hp


def hessian_error(W, Wq, H):
    """tr((W - Wq) H (W - Wq)^T): the summed squared output error over the calibration inputs."""
    E = (W - Wq).double()
    return float(torch.trace(E @ H.double() @ E.T))


@pytest.fixture(scope="module")
def calibrated():
    """A small model with random weights, and Hessians of every int6 matrix from random token batches."""
    model, hp = small_model(seed=0)
    g = torch.Generator().manual_seed(123)
    batches = [(torch.randint(0, hp.vocab_size, (4, hp.train_seq_len), generator=g),
                torch.randint(0, hp.vocab_size, (4, hp.train_seq_len), generator=g)) for _ in range(4)]
    names = [n for n, p in model.state_dict().items() if tg.quant_kind(n, p) == "int6"]
    hessians = tg.collect_hessians(model, batches, CTX, names)
    return model, hp, hessians, batches


@pytest.fixture(scope="module")
def quantized(calibrated):
    model, _, hessians, _ = calibrated
    return tg.quantize_model(model, hessians, log=lambda m: None)


@pytest.fixture(scope="module")
def blob(quantized):
    return tg.serialize(quantized)


# ---------------------------------------------------------------------------------------------
# int6 storage: one signed byte per value, exact, and smaller under LZMA than 6-bit packing
# ---------------------------------------------------------------------------------------------

def test_int6_values_roundtrip_exactly_through_the_artifact():
    q = torch.arange(-31, 32, dtype=torch.int8).repeat(3).view(9, 21)
    s = torch.linspace(0.5, 2.0, 9).half().float()
    state = tg.deserialize(tg.serialize({"w": ("int6", q, s)}))
    torch.testing.assert_close(state["w"], q.float() * s[:, None], rtol=0, atol=0)


def test_int6_byte_layout_compresses_better_than_bit_packing():
    """The measurement behind the layout: Gaussian-like weights quantized per row."""
    g = torch.Generator().manual_seed(0)
    q, _ = tg.quantize_rtn(torch.randn(256, 1024, generator=g), tg.INT6_MAX)
    as_bytes = len(lzma.compress(q.numpy().astype(np.int8).tobytes()))
    u = (q.reshape(-1, 4).to(torch.int32) + 32).numpy().astype(np.uint32)  # 4 values -> 3 bytes
    word = u[:, 0] | (u[:, 1] << 6) | (u[:, 2] << 12) | (u[:, 3] << 18)
    packed = np.stack([word & 255, (word >> 8) & 255, word >> 16], axis=1).astype(np.uint8).tobytes()
    assert as_bytes < 0.95 * len(lzma.compress(packed))


# ---------------------------------------------------------------------------------------------
# round to nearest
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qmax", [tg.INT6_MAX, tg.INT8_MAX])
def test_quantize_rtn_range_scales_and_error(qmax):
    g = torch.Generator().manual_seed(qmax)
    row_mag = torch.logspace(-2, 1, 24)[:, None]  # rows of very different magnitude: scales are per row
    w = torch.randn(24, 40, generator=g) * row_mag
    q, s = tg.quantize_rtn(w, qmax)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (24,)
    assert int(q.abs().max()) <= qmax
    # the scale is per row, about amax / qmax, and exactly representable in fp16 (how it is stored)
    amax = w.abs().amax(dim=1)
    assert torch.allclose(s, amax / qmax, rtol=1e-3)
    assert torch.equal(s, s.half().float())
    # each row's largest weight lands on the edge of the grid
    assert torch.equal(q.abs().amax(dim=1), torch.full((24,), qmax, dtype=torch.int8))
    # reconstruction is within half a step of every weight
    err = (q.float() * s[:, None] - w).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-5)).all())


def test_quantize_rtn_rows_are_independent():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, generator=g)
    q, s = tg.quantize_rtn(w, tg.INT6_MAX)
    w2 = w.clone()
    w2[3] *= 1000.0  # blow up one row
    q2, s2 = tg.quantize_rtn(w2, tg.INT6_MAX)
    others = [0, 1, 2, 4, 5]
    assert torch.equal(q2[others], q[others]) and torch.equal(s2[others], s[others])
    assert s2[3] > 500 * s[3]


def test_quantize_rtn_zero_and_tiny_rows():
    w = torch.zeros(3, 8)
    w[1] = 5e-7           # amax/31 = 1.6e-8: rounds to 0 in fp16
    w[2, :4] = 1.0        # a normal row, for contrast
    q, s = tg.quantize_rtn(w, tg.INT6_MAX)
    assert bool((s > 0).all()) and bool(torch.isfinite(s).all()), f"scales {s.tolist()}"
    err = (q.float() * s[:, None] - w).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-5)).all())


# ---------------------------------------------------------------------------------------------
# std-based grids (QUANT_SIGMAS, QUANT_EMBED_SIGMAS): a chosen bin width, bought with bytes
# ---------------------------------------------------------------------------------------------

def test_sigma_grid_step_is_sigmas_stds_over_qmax_and_clips_beyond():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 512, generator=g) * torch.logspace(-2, 1, 16)[:, None]
    w[:, 0] = 20 * w.std(dim=1)  # one outlier per row, far past a 3-std range
    q, s = tg.quantize_rtn(w, tg.INT6_MAX, sigmas=3.0)
    assert torch.allclose(s, 3.0 * w.std(dim=1) / tg.INT6_MAX, rtol=1e-3) and torch.equal(s, s.half().float())
    assert torch.equal(q[:, 0], torch.full((16,), tg.INT6_MAX, dtype=torch.int8))  # the outlier clips
    inside = w.abs() <= tg.INT6_MAX * s[:, None]
    err = (q.float() * s[:, None] - w).abs()
    assert bool((err[inside] <= (s[:, None] / 2 * (1 + 1e-5)).expand_as(w)[inside]).all())
    # sigmas 0 is the max-abs step, unchanged
    assert torch.equal(tg.quantize_rtn(w, tg.INT6_MAX, sigmas=0.0)[1], tg.quantize_rtn(w, tg.INT6_MAX)[1])


def test_sigma_grid_keeps_a_constant_row_exact():
    w = torch.zeros(3, 8)
    w[0] = 0.75  # std 0: a std-based step would be 0
    w[2] = torch.linspace(-1, 1, 8)
    q, s = tg.quantize_rtn(w, tg.INT6_MAX, sigmas=12.85)
    assert bool((s > 0).all()) and torch.allclose(q[0].float() * s[0], w[0], rtol=1e-3)


def test_wider_bins_cost_fewer_bytes_and_more_error():
    """The trade the knob makes, on Gaussian rows: bytes fall about as the Gaussian entropy on the grid says
    (2.05 - log2(step / std) bits a value, which the DRY_RUN estimate uses) while the error grows."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 1024, generator=g)
    sizes, errors = [], []
    for sigmas in (0.0, 6.0, 12.85, 19.3):
        q, s = tg.quantize_rtn(w, tg.INT6_MAX, sigmas=sigmas)
        sizes.append(len(lzma.compress(q.numpy().astype(np.int8).tobytes(), format=lzma.FORMAT_XZ,
                                       filters=tg.LZMA_FILTERS)))
        errors.append(float((q.float() * s[:, None] - w).square().mean()))
    assert sizes == sorted(sizes, reverse=True) and errors == sorted(errors)
    bits = 8 * sizes[2] / w.numel()
    assert abs(bits - (2.05 - math.log2(12.85 / tg.INT6_MAX))) < 0.25, bits  # 3.32 bits expected
    assert sizes[2] < 0.7 * sizes[0]


def test_gptq_on_a_sigma_grid_keeps_the_step_and_beats_rtn(calibrated):
    model, _, hessians, _ = calibrated
    state = model.state_dict()
    for name, H in list(hessians.items())[:3]:
        W = state[name].float()
        qg, sg = tg.quantize_gptq(W, H, tg.INT6_MAX, clip=True, sigmas=12.85)  # clip search: not with sigmas
        qr, sr = tg.quantize_rtn(W, tg.INT6_MAX, sigmas=12.85)
        assert torch.equal(sg, sr), name
        assert hessian_error(W, qg.float() * sg[:, None], H) < hessian_error(W, qr.float() * sr[:, None], H), name


def test_quantize_model_applies_each_grid_to_its_kind(calibrated):
    model, _, hessians, _ = calibrated
    state = model.state_dict()
    out = tg.quantize_model(model, hessians, log=lambda m: None, sigmas=12.85, embed_sigmas=20.0)
    for name, (kind, q, s) in out.items():
        if kind == "int6":
            assert torch.equal(s, tg.row_scales(state[name].float(), tg.INT6_MAX, 12.85)), name
        elif kind == "int8":
            assert torch.equal(q, tg.quantize_rtn(state[name].float(), tg.INT8_MAX, 20.0)[0]), name
    assert len(tg.serialize(out)) < len(tg.serialize(tg.quantize_model(model, hessians, log=lambda m: None)))


def test_dry_run_estimate_follows_the_grids():
    """DRY_RUN's byte estimate: about 0.74 bytes a parameter by default (as measured on the proxy), and
    smaller with wider grids."""
    def estimate(**env):
        r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, DRY_RUN="1", **env))
        return int(re.search(r"about ([\d,]+) bytes", r.stdout).group(1).replace(",", ""))
    # the 7-layer hybrid that was the default until the record stack, at max-abs grids: 15.85-15.89 MB measured
    # on the proxy (results/proxy/h200x4/hybrid-default-seed*.json)
    old = dict(NUM_LAYERS="7", MLP_MULT="3", MAMBA_LAYERS="0,1,2,3,4,5", BIGRAM_VOCAB_SIZE="2048", RECUR_LAYERS="",
               PARALLEL_FROM="0")
    max_abs, wide = estimate(**old, QUANT_SIGMAS="0", QUANT_EMBED_SIGMAS="0"), estimate(**old)
    assert 15_500_000 < max_abs < 16_000_000
    assert wide < 0.7 * max_abs


# ---------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------

def test_collect_hessians_is_the_sum_of_input_outer_products(calibrated):
    model, hp, hessians, batches = calibrated
    name = "blocks.1.mlp.fc.weight"
    inputs = []
    handle = model.blocks[1].mlp.fc.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    with torch.no_grad():
        for x, y in batches:
            model(x, y)
    handle.remove()
    X = torch.cat([i.reshape(-1, i.size(-1)) for i in inputs]).double()
    assert X.shape == (4 * 4 * hp.train_seq_len, hp.model_dim)
    assert torch.allclose(hessians[name].double(), X.T @ X, rtol=1e-4, atol=1e-3)
    for n, H in hessians.items():
        assert torch.allclose(H, H.T, atol=1e-3), n
        assert torch.linalg.eigvalsh(H.double()).min() > -1e-3 * H.diagonal().max(), n


@pytest.mark.parametrize("name", ["blocks.1.mlp.fc.weight", "blocks.0.mixer.in_proj.weight",
                                  "blocks.1.mixer.q.weight"])
def test_gptq_beats_round_to_nearest_on_a_real_layer(calibrated, name):
    model, _, hessians, _ = calibrated
    W, H = model.state_dict()[name].float(), hessians[name]
    assert float(H.trace()) > 0
    W0, H0 = W.clone(), H.clone()
    qg, sg = tg.quantize_gptq(W, H, tg.INT6_MAX, clip=False)
    qr, sr = tg.quantize_rtn(W, tg.INT6_MAX)
    tg.quantize_gptq(W, H, tg.INT6_MAX, clip=True)
    assert torch.equal(W, W0) and torch.equal(H, H0), "quantize_gptq must not modify its inputs"
    assert torch.equal(sg, sr), "same int6 grid for both"
    assert qg.dtype == torch.int8 and qg.shape == W.shape and int(qg.abs().max()) <= tg.INT6_MAX
    e_gptq = hessian_error(W, qg.float() * sg[:, None], H)
    e_rtn = hessian_error(W, qr.float() * sr[:, None], H)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)


def test_gptq_with_isotropic_hessian_is_round_to_nearest(calibrated):
    model, _, _, _ = calibrated
    W = model.state_dict()["blocks.1.mlp.fc.weight"].float()
    qg, sg = tg.quantize_gptq(W, 3.0 * torch.eye(W.size(1)), clip=False)
    qr, sr = tg.quantize_rtn(W, tg.INT6_MAX)
    assert torch.equal(qg, qr) and torch.equal(sg, sr)


def test_gptq_block_size_and_column_order_do_not_matter(calibrated):
    model, _, hessians, _ = calibrated
    name = "blocks.0.mixer.in_proj.weight"
    W, H = model.state_dict()[name].float(), hessians[name]
    q, s = tg.quantize_gptq(W, H, clip=False)
    q8, s8 = tg.quantize_gptq(W, H, block=8, clip=False)  # lazy block updates are exact, up to float rounding
    assert torch.equal(s8, s)
    assert (q8 != q).float().mean() <= 1e-3
    # GPTQ orders columns by the Hessian diagonal itself, so permuting the inputs permutes the result
    perm = torch.randperm(W.size(1), generator=torch.Generator().manual_seed(0))
    qp, sp = tg.quantize_gptq(W[:, perm], H[perm][:, perm], clip=False)
    assert torch.equal(qp, q[:, perm]) and torch.equal(sp, s)


def test_gptq_handles_dead_input_columns(calibrated):
    model, _, hessians, _ = calibrated
    name = "blocks.1.mlp.fc.weight"
    W, H = model.state_dict()[name].float(), hessians[name].clone()
    dead = [3, 17, 40]
    H[dead, :] = 0.0
    H[:, dead] = 0.0  # those inputs were always zero
    q, s = tg.quantize_gptq(W, H, clip=False)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    assert int(q.abs().max()) <= tg.INT6_MAX
    assert bool((q[:, dead] == 0).all()), "a dead column carries nothing: store zeros (compress best)"
    # the grid comes from the live columns only
    live = [i for i in range(W.size(1)) if i not in dead]
    assert torch.equal(s, tg.row_scales(W[:, live], tg.INT6_MAX))
    e_gptq = hessian_error(W, q.float() * s[:, None], H)
    qr, sr = tg.quantize_rtn(W, tg.INT6_MAX)
    assert math.isfinite(e_gptq) and e_gptq < hessian_error(W, qr.float() * sr[:, None], H)


def rtn_on(W, scale, qmax):
    return torch.clamp(torch.round(W / scale[:, None]), -qmax, qmax) * scale[:, None]


@pytest.mark.parametrize("qmax", [tg.QMAX["int6"], tg.QMAX["int5"], tg.QMAX["int4"]])
def test_clip_scales_never_worse_per_row_and_within_range(calibrated, qmax):
    model, _, hessians, _ = calibrated
    for name in ("blocks.1.mlp.fc.weight", "blocks.0.mixer.in_proj.weight"):
        W, H = model.state_dict()[name].float(), hessians[name]
        full, clipped = tg.row_scales(W, qmax), tg.clip_scales(W, H, qmax)
        assert torch.equal(clipped, clipped.half().float()), "scales are stored as fp16"
        assert bool((clipped <= full).all()) and bool((clipped >= 0.69 * full - 1e-6).all())

        def row_err(scale):
            E = W - rtn_on(W, scale, qmax)
            return ((E @ H) * E).sum(dim=1)
        assert bool((row_err(clipped) <= row_err(full) * (1 + 1e-6)).all()), name
    if qmax == tg.QMAX["int4"]:  # at 4 bits some rows must gain from clipping, or the search is inert
        assert bool((clipped < full).any())


@pytest.mark.parametrize("kind", ["int6", "int5", "int4"])
def test_gptq_clip_keeps_the_better_of_full_range_and_clipped(calibrated, kind):
    model, _, hessians, _ = calibrated
    qmax, total = tg.QMAX[kind], {True: 0.0, False: 0.0}
    for name in ("blocks.1.mlp.fc.weight", "blocks.0.mixer.in_proj.weight", "blocks.0.mixer.out_proj.weight"):
        W, H = model.state_dict()[name].float(), hessians[name]
        for clip in (True, False):
            q, s = tg.quantize_gptq(W, H, qmax, clip=clip)
            assert int(q.abs().max()) <= qmax
            total[clip] += hessian_error(W, q.float() * s[:, None], H)
        assert hessian_error(W, rtn_on(W, s, qmax), H) > 0
    assert total[True] <= total[False] * (1 + 1e-9), total
    if kind == "int4":
        assert total[True] < 0.98 * total[False], total


# ---------------------------------------------------------------------------------------------
# which format each tensor gets
# ---------------------------------------------------------------------------------------------

def test_quant_kind_by_module_type():
    model, _ = small_model(seed=0, TIE_EMBEDDINGS=0)  # untied: lm_head exists too
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    embedding_like = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)} | {"lm_head.weight"}
    state = model.state_dict()
    for name, p in state.items():
        want = "int6" if name in linear_weights else "int8" if name in embedding_like else "float"
        assert tg.quant_kind(name, p) == want, name
    kinds = {n: tg.quant_kind(n, p) for n, p in state.items()}
    assert kinds["tok_emb.weight"] == kinds["bigram.embed.weight"] == kinds["lm_head.weight"] == "int8"
    for n in ["blocks.0.mixer.in_proj.weight", "blocks.0.mixer.out_proj.weight", "blocks.1.mixer.q.weight",
              "blocks.1.mixer.k.weight", "blocks.1.mixer.v.weight", "blocks.1.mixer.proj.weight",
              "blocks.1.mlp.fc.weight", "blocks.1.mlp.proj.weight", "bigram.proj.weight"]:
        assert kinds[n] == "int6", n
    for n in ["blocks.0.mixer.A_log", "blocks.0.mixer.dt_bias", "blocks.0.mixer.D", "blocks.0.mixer.conv_weight",
              "blocks.0.mixer.conv_bias", "blocks.0.mixer.norm_weight", "blocks.1.mixer.q_gain",
              "blocks.0.mixer_scale", "blocks.1.mlp_scale", "blocks.0.resid_mix", "skip_weights"]:
        assert kinds[n] == "float", n
    # the 2-D control tensors are the trap: conv_weight, resid_mix and skip_weights are matrices
    assert state["blocks.0.mixer.conv_weight"].ndim == state["blocks.0.resid_mix"].ndim == 2


# ---------------------------------------------------------------------------------------------
# whole-model quantization and the artifact
# ---------------------------------------------------------------------------------------------

def test_quantize_model_payloads(calibrated, quantized):
    model, _, hessians, _ = calibrated
    state = model.state_dict()
    assert list(quantized) == list(state)
    for name, (kind, q, s) in quantized.items():
        assert kind == tg.quant_kind(name, state[name]), name
        if kind == "float":
            assert s is None and q.dtype == torch.float32 and torch.equal(q, state[name]), name
            continue
        qmax = tg.QMAX[kind]
        assert q.dtype == torch.int8 and q.shape == state[name].shape and int(q.abs().max()) <= qmax, name
        assert s.shape == (q.size(0),) and torch.equal(s, s.half().float()), name
        if kind == "int6":  # every int6 matrix had a Hessian: GPTQ, exactly
            assert torch.equal(q, tg.quantize_gptq(state[name].float(), hessians[name])[0]), name
        else:
            assert torch.equal(q, tg.quantize_rtn(state[name].float(), tg.INT8_MAX)[0]), name


def test_tied_embedding_hessian_is_the_head_input_and_gets_gptq(calibrated):
    """The tied embedding is the output head too: its Hessian sums h h^T over the final hidden states h the
    head reads, and with it the embedding is GPTQ-quantized (int8); the bigram table, with none, stays RTN."""
    model, hp, hessians, batches = calibrated
    H = tg.collect_hessians(model, batches, CTX, ["tok_emb.weight"])["tok_emb.weight"]
    with torch.no_grad():
        hs = [model.hidden(x).reshape(-1, hp.model_dim).float() for x, _ in batches]
    torch.testing.assert_close(H, sum(h.T @ h for h in hs), rtol=1e-4, atol=1e-3)
    state = model.state_dict()
    out = tg.quantize_model(model, {**hessians, "tok_emb.weight": H}, log=lambda m: None, embed_sigmas=20.0)
    W = state["tok_emb.weight"].float()
    assert torch.equal(out["tok_emb.weight"][1], tg.quantize_gptq(W, H, tg.INT8_MAX, sigmas=20.0)[0])
    rtn = tg.quantize_rtn(W, tg.INT8_MAX, 20.0)
    head_error = lambda q, s: float(tg.hessian_row_errors(W - q.float() * s[:, None], H).sum())
    assert head_error(*out["tok_emb.weight"][1:]) < 0.9 * head_error(*rtn)  # 0.70x here, random weights
    bigram = state["bigram.embed.weight"].float()
    assert torch.equal(out["bigram.embed.weight"][1], tg.quantize_rtn(bigram, tg.INT8_MAX, 20.0)[0])


def test_untied_head_has_no_embedding_hessian():
    model, _ = small_model(seed=0, TIE_EMBEDDINGS=0)
    with pytest.raises(AssertionError, match="tied head"):
        tg.collect_hessians(model, [], CTX, ["tok_emb.weight"])


def test_quantize_model_falls_back_to_rtn_past_the_deadline(calibrated):
    model, _, hessians, _ = calibrated
    logs = []
    out = tg.quantize_model(model, hessians, deadline=0.0, log=logs.append)  # long past
    state = model.state_dict()
    for name in hessians:
        assert torch.equal(out[name][1], tg.quantize_rtn(state[name].float(), tg.INT6_MAX)[0]), name
    assert len(logs) == 1 and "WARNING" in logs[0] and f"{len(hessians)} matrices" in logs[0]


def _quantize_on_rank(rank, world_size, port, out_dir):
    ctx = join_gloo(rank, world_size, port)
    model, hp = small_model(seed=0)
    g = torch.Generator().manual_seed(123)
    batches = [(torch.randint(0, hp.vocab_size, (4, hp.train_seq_len), generator=g),) * 2 for _ in range(2)]
    names = [n for n, p in model.state_dict().items() if tg.quant_kind(n, p) == "int6"]
    hessians = tg.collect_hessians(model, batches, ctx, names)
    logs = []
    # rank 1's clock says GPTQ's time is up, rank 0's that it is not: rank 0 decides for both
    out = tg.quantize_model(model, hessians, deadline=None if rank == 0 else 0.0, log=logs.append,
                            agree=lambda in_time: bool(tg.rank0_value(in_time, ctx)))
    torch.save({"q": {n: out[n][1] for n in names}, "logs": logs}, f"{out_dir}/q_r{rank}.pt")
    leave_gloo()


def test_ranks_agree_on_which_matrices_get_gptq(tmp_path):
    """Near the deadline each rank's clock could send a matrix to GPTQ on one rank and to round-to-nearest on
    another; rank 0's decision is taken by all, so every rank builds the same artifact."""
    import torch.multiprocessing as mp
    mp.spawn(_quantize_on_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = torch.load(tmp_path / "q_r0.pt"), torch.load(tmp_path / "q_r1.pt")
    assert r0["logs"] == r1["logs"] == []  # no fallback anywhere: rank 0 was in time
    assert r0["q"].keys() == r1["q"].keys() and all(torch.equal(r0["q"][n], r1["q"][n]) for n in r0["q"])


def decoded_parts(blob):
    """{part: its decompressed bytes}, read back through the artifact's own layout."""
    return {part: b"".join(tg.decompress_part(c, payload, part) for c, payload in chunks)
            for part, chunks in tg.artifact_parts(blob).items()}


def test_artifact_format_is_four_checksummed_parts(quantized, blob):
    """Magic, SHA-256 of the rest, then the header, the integer values, the fp16 scales and the fp16 tensors,
    each ( uint32 chunk count | per chunk: codec byte | uint32 length | payload )."""
    assert blob[:4] == tg.ARTIFACT_MAGIC and hashlib.sha256(blob[36:]).digest() == blob[4:36]
    parts = tg.artifact_parts(blob)
    assert list(parts) == ["header", "values", "scales", "floats"]
    assert 36 + sum(4 + sum(5 + len(p) for _, p in chunks) for chunks in parts.values()) == len(blob)
    raw = decoded_parts(blob)
    entries = json.loads(raw["header"].decode("utf-8"))
    assert [e["name"] for e in entries] == list(quantized)
    for e in entries:
        kind, q, s = quantized[e["name"]]
        assert e["kind"] == kind and e["shape"] == list(q.shape)
    ints = [quantized[e["name"]] for e in entries if e["kind"] != "float"]
    assert raw["values"] == b"".join(q.numpy().astype(np.int8).tobytes() for _, q, _ in ints)
    assert raw["scales"] == b"".join(s.numpy().astype("<f2").tobytes() for _, _, s in ints)
    assert raw["floats"] == b"".join(q.numpy().astype("<f2").tobytes() for k, q, _ in quantized.values() if k == "float")
    assert b"\x80\x02" not in raw["header"] and b"torch" not in raw["header"]  # no pickled object anywhere


def test_each_part_gets_the_smallest_codec(blob):
    """Every chunk is coded by whichever of xz, brotli and byte-shuffled brotli measured smallest."""
    import brotli
    for part, chunks in tg.artifact_parts(blob).items():
        for codec, payload in chunks:
            raw = tg.decompress_part(codec, payload, part)
            assert len(raw) <= tg.CHUNK_BYTES
            candidates = [len(lzma.compress(raw, format=lzma.FORMAT_XZ, filters=tg.PART_FILTERS[part])),
                          len(brotli.compress(raw, quality=11, lgwin=24))]
            if tg.PART_WIDTH[part] > 1:
                candidates.append(len(brotli.compress(tg.byte_shuffle(raw, tg.PART_WIDTH[part]), quality=11, lgwin=24)))
            assert len(payload) == min(candidates), part


def test_large_parts_are_cut_into_chunks_and_joined_back(quantized, monkeypatch):
    monkeypatch.setattr(tg, "CHUNK_BYTES", 4096)
    small = tg.serialize(quantized)
    parts = tg.artifact_parts(small)
    values = decoded_parts(small)["values"]
    assert len(parts["values"]) == -(-len(values) // 4096) > 1
    monkeypatch.undo()
    assert tg.deserialize(small).keys() == quantized.keys()
    assert all(torch.equal(a, b) for a, b in zip(tg.deserialize(small).values(), tg.deserialize(tg.serialize(quantized)).values()))


def test_byte_shuffle_is_undone_exactly():
    data = bytes(np.random.default_rng(0).integers(0, 256, 4 * 1000, dtype=np.uint8))
    for width in (1, 2, 4):
        shuffled = tg.byte_shuffle(data, width)
        assert tg.byte_shuffle(shuffled, width, inverse=True) == data
        assert width == 1 or shuffled[:1000 * 4 // width] == data[::width]  # byte 0 of every element first


def test_without_brotli_the_artifact_is_all_xz_and_a_brotli_one_says_what_to_install(quantized, blob, monkeypatch):
    content = decoded_parts(blob)
    monkeypatch.setitem(sys.modules, "brotli", None)  # import brotli now raises ImportError
    plain = tg.serialize(quantized)
    assert all(c == 0 for chunks in tg.artifact_parts(plain).values() for c, _ in chunks)
    assert decoded_parts(plain) == content  # the same content, only the coding differs
    state = tg.deserialize(plain)
    assert set(state) == set(quantized)
    if any(c for chunks in tg.artifact_parts(blob).values() for c, _ in chunks):
        with pytest.raises(ValueError, match="pip install brotli"):
            tg.deserialize(blob)


def test_parts_apart_compress_smaller_than_one_stream(blob):
    raw = b"".join(decoded_parts(blob).values())
    assert len(blob) < len(lzma.compress(raw, format=lzma.FORMAT_XZ, filters=tg.LZMA_FILTERS))


def test_serialize_deserialize_roundtrip(calibrated, quantized, blob, monkeypatch):
    model, hp, _, _ = calibrated

    def no_pickle(*a, **k):
        raise AssertionError("the artifact reader must not unpickle anything")
    for attr in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, attr, no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    state = tg.deserialize(bytes(blob))
    monkeypatch.undo()

    ref = model.state_dict()
    assert list(state) == list(ref)
    for name, t in state.items():
        kind, q, s = quantized[name]
        assert t.shape == ref[name].shape and t.dtype == torch.float32, name
        if kind == "float":  # exactly the fp16 value
            assert torch.equal(t, ref[name].half().float()), name
        else:               # exactly the dequantized grid value q * fp16 scale
            assert torch.equal(t, q.float() * s[:, None]), name

    fresh = tg.HybridGPT(hp)
    fresh.load_state_dict(state)  # strict: every key, every shape
    for name, p in fresh.state_dict().items():
        assert torch.equal(p, state[name]), name
    # the dequantized model still computes close to the original
    x = torch.randint(0, hp.vocab_size, (2, hp.train_seq_len), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        l_ref, l_q = model(x, x).mean(), fresh(x, x).mean()
    assert torch.isfinite(l_q) and abs(float(l_q - l_ref)) < 0.1 * float(l_ref)


def test_lzma_settings_beat_the_default_preset(blob):
    """LZMA_FILTERS (no literal-context bits) against plain preset 9 on the same quantized values."""
    values = decoded_parts(blob)["values"]
    assert len(lzma.compress(values, format=lzma.FORMAT_XZ, filters=tg.LZMA_FILTERS)) < len(lzma.compress(values, preset=9))


def test_serialize_is_deterministic(quantized, blob):
    assert tg.serialize(quantized) == blob


def reseal(body):
    """An artifact whose checksum matches `body`: for layouts that are wrong inside a sound file."""
    return tg.ARTIFACT_MAGIC + hashlib.sha256(body).digest() + body


def test_deserialize_rejects_bad_bytes(blob):
    with pytest.raises(ValueError, match="not an artifact of this train_gpt.py"):
        tg.deserialize(b"definitely not an artifact")
    with pytest.raises(ValueError, match="not an artifact"):  # a foreign file: the old single-XZ format
        tg.deserialize(lzma.compress(b"x" * 100, format=lzma.FORMAT_XZ))
    with pytest.raises(ValueError, match="SHA-256 check: truncated or corrupted"):
        tg.deserialize(blob[: len(blob) // 2])  # truncated download
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x10
    with pytest.raises(ValueError, match="SHA-256 check"):
        tg.deserialize(bytes(flipped))
    parts = decoded_parts(blob)

    def body(raws):
        return b"".join((1).to_bytes(4, "little") + bytes([0]) + len(p).to_bytes(4, "little") + p for p in
                        (lzma.compress(r, format=lzma.FORMAT_XZ) for r in raws))
    with pytest.raises(ValueError, match="header describes"):  # a part short, the file itself sound
        tg.deserialize(reseal(body([parts["header"], parts["values"][:-7], parts["scales"], parts["floats"]])))
    with pytest.raises(ValueError):  # a header that is not JSON
        tg.deserialize(reseal(body([b'[{"name": ', parts["values"], parts["scales"], parts["floats"]])))


# ---------------------------------------------------------------------------------------------
# size guard
# ---------------------------------------------------------------------------------------------

def total_hessian_error(state, blob, hessians):
    after = tg.deserialize(blob)
    return sum(hessian_error(state[n].float(), after[n], H) for n, H in hessians.items())


def test_fit_to_cap_under_the_cap_changes_nothing(calibrated, quantized, blob):
    model, _, hessians, _ = calibrated
    logs = []
    assert tg.fit_to_cap(quantized, model, hessians, len(blob), log=logs.append) == blob
    assert logs[0].startswith("export: compressing") and logs[1].startswith(f"export: {len(blob):,} model bytes in")
    assert len(logs) == 2


def test_fit_to_cap_lowers_bit_widths(calibrated, quantized, blob):
    """Over the cap, whole matrices go to int5/int4 until the model fits, each one named in the log.
    (tools/quant_study.py measures this against zeroing +-1 weights: far less Hessian-weighted error.)"""
    model, _, hessians, _ = calibrated
    limit = int(0.97 * len(blob))
    logs = []
    fitted = tg.fit_to_cap(quantized, model, hessians, limit, log=logs.append)
    assert len(fitted) <= limit
    assert logs[2].startswith(f"export: {len(blob):,} model bytes > {limit:,}: lowering bit widths")
    summary = [m for m in logs if m.startswith("export: lowered ")]
    assert len(summary) == 1 and any("model bytes after lowering" in m for m in logs)
    lowered = dict(pair.split("=") for pair in summary[0].rsplit(" model bytes: ", 1)[1].split(", "))
    assert lowered and set(lowered.values()) <= {"int5", "int4"}
    entries = json.loads(decoded_parts(fitted)["header"])
    assert {e["name"] for e in entries if e["kind"] in ("int5", "int4")} == set(lowered)
    after = tg.deserialize(fitted)
    for name, kind in lowered.items():  # each row holds at most 2 * qmax + 1 distinct levels of its width
        assert max(len(torch.unique(row)) for row in after[name]) <= 2 * tg.QMAX[kind] + 1, name
    state = model.state_dict()
    assert total_hessian_error(state, fitted, hessians) > total_hessian_error(state, blob, hessians)
    assert all(torch.equal(after[n], tg.deserialize(blob)[n]) for n in after if n not in lowered)


def test_fit_to_cap_stops_loudly_when_min_bits_is_not_enough(calibrated, quantized, blob):
    model, _, hessians, _ = calibrated
    with pytest.raises(SystemExit, match=r"QUANT_MIN_BITS=6, over the cap of [\d,]+ model bytes: allow fewer bits"):
        tg.fit_to_cap(quantized, model, hessians, len(blob) - 1, min_bits=6, log=lambda m: None)
    with pytest.raises(SystemExit, match="QUANT_MIN_BITS=4") as e:
        tg.fit_to_cap(quantized, model, hessians, 1000, log=lambda m: None)
    assert "allow fewer bits" not in str(e.value) and "shrink the model" in str(e.value)  # 4 is the floor


def test_batched_gptq_equals_one_matrix_at_a_time():
    """quantize_gptq_batch runs one column loop for a stack of matrices, each with its own Hessian: the same
    levels and scales as quantizing each alone (up to float rounding of the batched products)."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(3, 24, 40, generator=g)
    X = torch.randn(3, 200, 40, generator=g) * torch.rand(3, 1, 40, generator=g)  # uneven input scales
    H = X.mT @ X
    H[1, :, 7] = H[1, 7, :] = 0  # a dead input column in one matrix only
    for sigmas, clip in ((0.0, True), (12.85, False)):
        Q, S = tg.quantize_gptq_batch(W, H, tg.INT6_MAX, clip=clip, sigmas=sigmas)
        for i in range(3):
            q, s = tg.quantize_gptq(W[i], H[i], tg.INT6_MAX, clip=clip, sigmas=sigmas)
            assert torch.equal(s, S[i])
            assert (q != Q[i]).float().mean() < 0.002, (sigmas, i)
        assert torch.all(Q[1][:, 7] == 0)


# ---------------------------------------------------------------------------------------------
# the packed train_gpt.py (packed_source): the code a submission holds and the challenge counts
# ---------------------------------------------------------------------------------------------

def run_file(script, cwd, timeout=300, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full.update(PYTHONUNBUFFERED="1", **env)
    return subprocess.run([sys.executable, str(script)], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=timeout)


def test_packed_source_runs_the_program_without_its_docstrings():
    code = (b'"""Module doc."""\nimport math  # a comment\n\nclass Box:\n    """Class doc."""\n    size = 3\n\n'
            b'def area(r):\n    """Function doc."""\n    return math.pi * r * r\n\ndef only_doc():\n    """Nothing else."""\n')
    packed = tg.packed_source(code)
    assert packed == tg.packed_source(code)  # deterministic: a run and the packager agree on the bytes
    assert packed.startswith(b"import lzma,base64\nREADABLE_SOURCE_BYTES=%d\n" % len(code)) and packed.count(b"\n") == 3
    namespace = {"__name__": "packed_test"}
    exec(packed, namespace)
    assert namespace["READABLE_SOURCE_BYTES"] == len(code) and namespace["area"](1.0) == pytest.approx(math.pi)
    assert namespace["Box"].size == 3 and namespace["only_doc"]() is None
    assert namespace["area"].__doc__ is None and namespace["Box"].__doc__ is None and namespace.get("__doc__") is None
    with pytest.raises(SyntaxError):
        tg.packed_source(b"def broken(:\n")


def packed_text(packed):
    """The source a packed file execs."""
    import base64, lzma
    return lzma.decompress(base64.b85decode(re.search(rb'b85decode\("(.*)"\)', packed).group(1)))


def test_packed_source_keeps_the_text_as_written_less_comments_docstrings_and_blank_lines():
    """Line for line the source, not a re-printed syntax tree: quotes, parentheses and f-strings as written
    (ast.unparse re-quoted f-strings on Python 3.12 into a form 3.10 and 3.11 cannot parse, and packed to other
    bytes there), a multi-line string's text untouched (blank lines, trailing spaces, a '#'), a body that was only
    a docstring left a pass, UTF-8 columns right after a non-ASCII character."""
    code = ('"""Module doc, \u2581 non-ASCII."""\n\nimport math  # a comment\nx = ("a")  # \u2581\n'
            'y = f"{\', \'.join([\'p\', \'q\'])}"\n\n# a line of comment\nTEXT = """first   \n\n# kept\n"""\n'
            'def f(): """one line."""; return x\n'
            'def g():\n    """Two\n    lines."""\n').encode()
    want = ('import math\nx = ("a")\ny = f"{\', \'.join([\'p\', \'q\'])}"\nTEXT = """first   \n\n# kept\n"""\n'
            'def f(): ; return x\ndef g():\n    pass\n')
    with pytest.raises(ValueError, match="changed the program"):  # a docstring with a statement after it on its line
        tg.packed_source(code)
    code = code.replace(b'def f(): """one line."""; return x', b'def f(): """one line."""\n')
    want = want.replace("def f(): ; return x\n", "def f(): pass\n")
    text = packed_text(tg.packed_source(code)).decode()
    assert text == want, text
    namespace = {}
    exec(text, namespace)
    assert namespace["TEXT"] == "first   \n\n# kept\n" and namespace["y"] == "p, q" and namespace["g"]() is None


def test_packed_source_is_the_same_bytes_on_every_python_here():
    """A run on the GPU machine's Python and the packager on another count the same code_bytes: every python3.N
    on PATH packs train_gpt.py to one file (skipped where this is the only Python)."""
    import shutil
    others = [p for p in {shutil.which(f"python3.{minor}") for minor in range(10, 15)} - {None}
              if subprocess.run([p, "-c", "import sys; sys.exit(sys.version_info[:2] == %r)" % (sys.version_info[:2],)]
                                ).returncode == 0]
    if not others:
        pytest.skip("no other python3.N on PATH")
    script = ("import ast, sys; tree = ast.parse(open(sys.argv[1]).read()); ns = {}\n"
              "fn = next(n for n in tree.body if getattr(n, 'name', '') == 'packed_source')\n"
              "exec(compile(ast.Module([fn], []), 'packer', 'exec'), ns)\n"
              "sys.stdout.buffer.write(ns['packed_source'](open(sys.argv[1], 'rb').read()))")
    ours = tg.packed_source((ROOT / "train_gpt.py").read_bytes())
    for python in others:
        r = subprocess.run([python, "-c", script, str(ROOT / "train_gpt.py")], capture_output=True, timeout=120)
        assert r.returncode == 0 and r.stdout == ours, (python, r.stderr[-500:])


def test_packed_file_dry_run_prints_what_the_readable_source_does_and_counts_itself(tmp_path):
    """The packed file is at most 30% of the readable bytes, counts its own size (what the readable run
    said it would be) and prints the same config, layer map, parameter counts and estimate."""
    readable = (ROOT / "train_gpt.py").read_bytes()
    packed = tmp_path / "train_gpt.py"
    packed.write_bytes(tg.packed_source(readable))
    size = packed.stat().st_size
    assert size <= 0.30 * len(readable)
    for env in ({}, {"SMOKE": "1", "NUM_LAYERS": "5", "MAMBA_LAYERS": "0,1"}):
        env = dict(env, DRY_RUN="1", RUN_ID="dry")
        a, b = run_file(ROOT / "train_gpt.py", tmp_path, **env), run_file(packed, tmp_path, **env)
        assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
        assert a.stdout == b.stdout
        assert f"code_bytes:{size} (packed) readable_bytes:{len(readable)}\n" in a.stdout
        assert "layer map:" in a.stdout and "config {" in a.stdout


def test_packed_file_runs_smoke_and_counts_its_own_bytes(tmp_path):
    """The packed file from a submission folder: without data/smoke_corpus.py beside it SMOKE says what it
    needs; with it the whole pipeline runs, and the summary counts the file itself."""
    packed = tmp_path / "train_gpt.py"
    packed.write_bytes(tg.packed_source((ROOT / "train_gpt.py").read_bytes()))
    r = run_file(packed, tmp_path, SMOKE="1")
    assert r.returncode != 0 and "SMOKE=1 needs" in r.stderr and "data/smoke_corpus.py" in r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "data").mkdir()
    for name in ("smoke_corpus.py", "shard_format.py"):
        (tmp_path / "data" / name).write_bytes((ROOT / "data" / name).read_bytes())
    r = run_file(packed, tmp_path, SMOKE="1", ITERATIONS="10", VAL_LOSS_EVERY="5",
                 TTT_ENABLED="0", RUN_ID="packed_smoke")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    s = json.loads(r.stdout.strip().splitlines()[-1][len("final_summary "):])
    data = packed.read_bytes()
    assert s["code_bytes"] == len(data) and s["code_sha256"] == __import__("hashlib").sha256(data).hexdigest()
    assert s["artifact_bytes"] == s["code_bytes"] + s["model_bytes"] and s["steps"] == 10
    assert "step:10/10 val_loss:" in r.stdout and s["val_bpb"] == s["val_bpb_sliding"]
