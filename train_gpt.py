"""Hybrid Mamba-2 / GQA-attention U-Net for the Parameter Golf challenge.

One file holds everything a submission counts: env-var hyperparameters, the shard loader, the model
(attention, Mamba-2 with a chunked SSD scan, the hybrid U-Net), Muon + Adam, the training loop, int6
GPTQ + LZMA export, and sliding-window / score-first TTT evaluation. Launch:
    torchrun --standalone --nproc_per_node=8 train_gpt.py
    DRY_RUN=1 python3 train_gpt.py     # resolved config, layer map, parameter counts; no data needed
    SMOKE=1 python3 train_gpt.py       # whole pipeline on a tiny self-made corpus (data/smoke_corpus.py), CPU
"""
from __future__ import annotations

import atexit, contextlib, copy, glob, hashlib, heapq, importlib.util, json, lzma, math, os, random, re, shutil, signal, sys, tempfile, time, uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------
# HYPERPARAMETERS
# Every knob is read here, once, from the environment; bad values stop the run before any work.

class ConfigError(ValueError):
    pass

# the challenge's tokenizers are named for their vocabulary: a VOCAB_SIZE that disagrees is caught from the name
TOKENIZER_NAME = re.compile(r"(?:^|/)fineweb_(\d+)_bpe\.model$")
DATA_PATH_NAME = re.compile(r"(?:^|/)fineweb\w*_sp(\d+)$")

DOWNLOAD_HINT = ("MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf python3 data/cached_challenge_fineweb.py "
                 "--variant sp8192 --train-shards 128")
# Mamba-2 everywhere but the last layer, which keeps attention: a placeholder on the record stack (docs/experiments.md)
DEFAULT_MAMBA_LAYERS = "0,1,2,3,4,5,6,7,8,9"
# SMOKE swaps in these defaults (a user's env still wins) so the whole pipeline runs in minutes on a CPU.
SMOKE_DEFAULTS = dict(
    VOCAB_SIZE=320, NUM_LAYERS=4, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2.0,
    MAMBA_LAYERS="0,2,3", MAMBA_D_STATE=16, MAMBA_HEADDIM=16, MAMBA_EXPAND=2.0, MAMBA_CHUNK_SIZE=32,
    RECUR_LAYERS="1,2", RECUR_LOOPS=1, PARALLEL_FROM=3, ROPE_DIMS=8,
    BIGRAM_VOCAB_SIZE=256, BIGRAM_DIM=16, TRAIN_SEQ_LEN=128, TRAIN_BATCH_TOKENS=4096, GRAD_ACCUM_STEPS=1,
    ITERATIONS=300, WARMDOWN_FRAC=0.33, WARMUP_STEPS=0, LR_WARMUP_STEPS=10, VAL_BATCH_SIZE=16384,
    VAL_LOSS_EVERY=50, TRAIN_LOG_EVERY=5, MAX_WALLCLOCK_SECONDS=90, MATRIX_LR=0.02, MAMBA_MATRIX_LR=0.02,
    SCALAR_LR=0.02, TIED_EMBED_LR=0.05, EMA_DECAY=0.9, MUON_MOMENTUM_WARMUP_STEPS=100, GPTQ_CALIB_TOKENS=16384,
    GPTQ_RESERVE_SECONDS=5, EVAL_STRIDE=64, TTT_CHUNK_TOKENS=8192, TTT_EPOCHS=1, TTT_LR=0.002, COMPILE=0)
# knobs that no longer exist, with what replaced them: setting one is an error, not silently ignored
RETIRED = {"WARMDOWN_ITERS": "WARMDOWN_FRAC, the warmdown's fraction of training (default 0.72)"}

class Hyperparameters:
    def __init__(self, environ=None, raise_errors=True):
        self._env = dict(os.environ if environ is None else environ)
        self._errors, self.resolved, self.smoke, self.notes = [], {}, False, []
        self._bad, self._ranges, self._defaults = set(), {}, {}  # _bad: knobs whose own value is wrong
        self.smoke = self._flag("SMOKE", 0)
        self.dry_run = self._flag("DRY_RUN", 0)
        # data and run
        self.data_path = self._str("DATA_PATH", "./data/datasets/fineweb10B_sp8192")
        self.tokenizer_path = self._str("TOKENIZER_PATH", "./data/tokenizers/fineweb_8192_bpe.model")
        self.vocab_size = self._int("VOCAB_SIZE", 8192, 2, 65536)
        self.run_id = self._str("RUN_ID", time.strftime("run_%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6])
        self.seed = self._int("SEED", 1337, 0, 2**31 - 1)
        self.compile = self._int("COMPILE", 1, 0, 2)  # on CUDA: 0 eager, 1 whole model, 2 each block
        self.fast_kernels = self._flag("FAST_KERNELS", 1)  # 0: PyTorch fallbacks even where the GPU libraries import
        self.require_fast_kernels = self._flag("REQUIRE_FAST_KERNELS", 0)  # 1: a missing kernel is an error
        self.allow_cpu = self._flag("ALLOW_CPU", 0)  # 1: train without CUDA anyway (else only SMOKE, DRY_RUN)
        # training length and batch
        self.iterations = self._int("ITERATIONS", 20000, 1, 10**7)
        self.warmdown_frac = self._float("WARMDOWN_FRAC", 0.72, 0.0, 1.0)  # the LR's linear fall to MIN_LR x peak
        self.min_lr = self._float("MIN_LR", 0.0, 0.0, 1.0)
        self.warmup_steps = self._int("WARMUP_STEPS", 20, 0, 1000)  # compile warm-up, then weights reset
        self.lr_warmup_steps = self._int("LR_WARMUP_STEPS", 0, 0, 10**6)
        self.train_batch_tokens = self._int("TRAIN_BATCH_TOKENS", 786_432, 1, 2**30)
        self.train_seq_len = self._int("TRAIN_SEQ_LEN", 2048, 8, 65536)
        self.grad_accum_steps = self._int("GRAD_ACCUM_STEPS", 0, 0, 1024)  # 0: 8 // world size
        self.val_batch_size = self._int("VAL_BATCH_SIZE", 524_288, 1, 2**30)
        self.val_loss_every = self._int("VAL_LOSS_EVERY", 0, 0, 10**7)
        self.train_log_every = self._int("TRAIN_LOG_EVERY", 200, 1, 10**7)
        self.max_wallclock_seconds = self._float("MAX_WALLCLOCK_SECONDS", 600.0, 0.0, 1e6)
        # model shape
        self.num_layers = self._int("NUM_LAYERS", 11, 1, 128)
        self.model_dim = self._int("MODEL_DIM", 512, 8, 16384)
        self.num_heads = self._int("NUM_HEADS", 8, 1, 256)
        self.num_kv_heads = self._int("NUM_KV_HEADS", 4, 1, 256)
        self.mlp_mult = self._float("MLP_MULT", 4.0, 0.0, 64.0)
        self.tie_embeddings = self._flag("TIE_EMBEDDINGS", 1)
        self.rope_base = self._float("ROPE_BASE", 10000.0, 1.0, 1e9)
        self.rope_dims = self._int("ROPE_DIMS", 16, 0, 1024)  # rotated dims per head (partial RoPE); 0: all
        self.attn_xsa = self._flag("ATTN_XSA", 1)  # 1: remove each output's component along its own value
        self.attn_gate = self._flag("ATTN_GATE", 0)  # 1: each head's output times sigmoid(0.5 w_h . x[:12])
        self.logit_softcap = self._float("LOGIT_SOFTCAP", 30.0, 0.0, 1e4)  # 0: off
        self.logit_softcap_neg = self._float("LOGIT_SOFTCAP_NEG", 0.0, 0.0, 1e4)  # the negative logits'; 0: the same
        self.qk_gain_init = self._float("QK_GAIN_INIT", 5.25, 0.0, 100.0)  # per-head query gain, learned
        self.ln_scale = self._flag("LN_SCALE", 1)  # 1: block i's normalized inputs scaled by 1/sqrt(i+1)
        # where a Mamba block takes LN_SCALE's factor: on its mixer's input, or on the mixer's output
        self.mamba_norm_scale = self._choice("MAMBA_NORM_SCALE", "input", ("input", "output"))
        self.skip_gates = self._flag("SKIP_GATES", 1)  # 1: U-Net skips mixed in by learned sigmoid gates
        self.smear_gate = self._flag("SMEAR_GATE", 0)  # 1: each embedding takes in the previous one's, gated
        self.tied_embed_init_std = self._float("TIED_EMBED_INIT_STD", 0.005, 0.0, 1.0)
        self.mamba_layers = self._layers("MAMBA_LAYERS", DEFAULT_MAMBA_LAYERS)
        self.mamba_branch_layers = self._layers("MAMBA_BRANCH_LAYERS", "")  # attention blocks with a Mamba-2 beside
        self.mamba_d_state = self._int("MAMBA_D_STATE", 32, 1, 512)
        self.mamba_d_conv = self._int("MAMBA_D_CONV", 4, 1, 16)
        self.mamba_expand = self._float("MAMBA_EXPAND", 1.0, 0.25, 8.0)
        self.mamba_headdim = self._int("MAMBA_HEADDIM", 64, 1, 1024)
        self.mamba_ngroups = self._int("MAMBA_NGROUPS", 1, 1, 64)
        self.mamba_chunk_size = self._int("MAMBA_CHUNK_SIZE", 256, 1, 4096)
        self.mamba_mlp = self._flag("MAMBA_MLP", 1)
        # depth recurrence (depth for no bytes): these consecutive layers run RECUR_LOOPS more times
        self.recur_layers = self._layers("RECUR_LAYERS", "3,4,5")
        self.recur_loops = self._int("RECUR_LOOPS", 2, 1, 16)
        self.recur_start_frac = self._float("RECUR_START_FRAC", 0.35, 0.0, 1.0)
        self.parallel_from = self._int("PARALLEL_FROM", 7, 0, 128)  # blocks from here on: parallel residual; 0: off
        self.bigram_vocab_size = self._int("BIGRAM_VOCAB_SIZE", 0, 0, 2**20)  # 0: off
        self.bigram_dim = self._int("BIGRAM_DIM", 128, 1, 4096)
        # optimizers
        self.matrix_lr = self._float("MATRIX_LR", 0.022, 0.0, 10.0)
        self.mamba_matrix_lr = self._float("MAMBA_MATRIX_LR", 0.022, 0.0, 10.0)
        self.scalar_lr = self._float("SCALAR_LR", 0.02, 0.0, 10.0)
        self.tied_embed_lr = self._float("TIED_EMBED_LR", 0.03, 0.0, 10.0)
        self.embed_lr = self._float("EMBED_LR", 0.6, 0.0, 10.0)
        self.head_lr = self._float("HEAD_LR", 0.008, 0.0, 10.0)
        self.muon_momentum = self._float("MUON_MOMENTUM", 0.99, 0.0, 0.9999)
        self.muon_backend_steps = self._int("MUON_BACKEND_STEPS", 5, 1, 20)
        self.muon_ns = self._choice("MUON_NS", "quintic", ("quintic", "polar-express"))  # Newton-Schulz coefficients
        self.muon_row_norm = self._flag("MUON_ROW_NORM", 1)  # 1: the update's rows to unit norm before orthogonalizing
        self.muon_momentum_warmup_start = self._float("MUON_MOMENTUM_WARMUP_START", 0.92, 0.0, 0.9999)
        self.muon_momentum_warmup_steps = self._int("MUON_MOMENTUM_WARMUP_STEPS", 1500, 0, 10**6)
        self.beta1 = self._float("BETA1", 0.9, 0.0, 0.9999)
        self.beta2 = self._float("BETA2", 0.95, 0.0, 0.99999)
        self.adam_eps = self._float("ADAM_EPS", 1e-8, 1e-12, 1e-2)
        # decoupled weight decay (p -= lr * wd * p). Mamba's SSM parameters and an untied head are never decayed:
        # a pull toward 0 there changes memory lengths, not just scale
        self.muon_wd = self._float("MUON_WD", 0.095, 0.0, 1.0)
        self.embed_wd = self._float("EMBED_WD", 0.085, 0.0, 1.0)
        self.adam_wd = self._float("ADAM_WD", 0.02, 0.0, 1.0)
        self.grad_clip_norm = self._float("GRAD_CLIP_NORM", 0.3, 0.0, 1e6)  # 0: off
        self.ema_decay = self._float("EMA_DECAY", 0.9965, 0.0, 0.99999)    # 0: off
        # export
        self.target_mb = self._float("TARGET_MB", 16.0, 0.1, 16.0)
        self.gptq_calib_tokens = self._int("GPTQ_CALIB_TOKENS", 1_048_576, 0, 2**28)  # per rank; 0: RTN
        self.gptq_reserve_seconds = self._float("GPTQ_RESERVE_SECONDS", 12.0, 0.0, 3600.0)
        self.gptq_clip_search = self._flag("GPTQ_CLIP_SEARCH", 1)  # also try clipped scales, keep the better
        self.quant_sigmas = self._float("QUANT_SIGMAS", 12.85, 0.0, 100.0)  # grid step: this x row std / qmax; 0: max
        self.quant_embed_sigmas = self._float("QUANT_EMBED_SIGMAS", 20.0, 0.0, 1000.0)  # the same for the int8 tables
        self.quant_min_bits = self._int("QUANT_MIN_BITS", 4, 4, 6)  # over the cap, matrices may go down to this
        # evaluation
        self.eval_stride = self._int("EVAL_STRIDE", 64, 0, 65536)  # 0: no sliding eval
        self.eval_seq_len = self._int("EVAL_SEQ_LEN", 0, 0, 65536)  # sliding and TTT windows; 0: TRAIN_SEQ_LEN
        self.ttt_enabled = self._flag("TTT_ENABLED", 1)
        # chunk: the whole model adapts by SGD on each TTT_CHUNK_TOKENS once scored (TTT_LR, _EPOCHS, _MOMENTUM);
        # doc: each document alone, a fresh LoRA adapted by Adam after each TTT_DOC_CHUNK tokens scored
        self.ttt_mode = self._choice("TTT_MODE", "chunk", ("chunk", "doc"))
        self.ttt_lr = self._float("TTT_LR", 0.005, 0.0, 10.0)
        self.ttt_epochs = self._int("TTT_EPOCHS", 3, 1, 100)
        self.ttt_chunk_tokens = self._int("TTT_CHUNK_TOKENS", 32768, 16, 2**30)
        self.ttt_momentum = self._float("TTT_MOMENTUM", 0.9, 0.0, 0.9999)
        self.ttt_doc_chunk = self._int("TTT_DOC_CHUNK", 64, 1, 65536)
        self.ttt_doc_lr = self._float("TTT_DOC_LR", 3e-4, 0.0, 10.0)
        self.ttt_doc_rank = self._int("TTT_DOC_RANK", 32, 1, 1024)
        self.ttt_doc_batch = self._int("TTT_DOC_BATCH", 64, 1, 65536)  # documents adapted side by side, per rank
        self.ttt_doc_ssm = self._flag("TTT_DOC_SSM", 0)  # 1: each Mamba-2's dt bias adapts per document too
        # phased doc TTT: after each of TTT_DOC_PHASES parts of the first TTT_DOC_PREFIX of the documents, the whole
        # model trains (TTT_LR, _MOMENTUM, _EPOCHS) on every document scored so far
        self.ttt_doc_phases = self._int("TTT_DOC_PHASES", 0, 0, 100)
        self.ttt_doc_prefix = self._float("TTT_DOC_PREFIX", 0.05, 0.0, 1.0)
        self._errors += [f"{name} is retired: use {instead}" for name, instead in RETIRED.items() if name in self._env]
        self._cross_checks()
        if self._errors and raise_errors:
            raise ConfigError("bad settings:\n  " + "\n  ".join(self._errors))

    def problems(self):
        """The settings' problems, one line each (with raise_errors=False they are kept here, not raised)."""
        return list(self._errors)

    def _raw(self, name, default):
        return self._env.get(name), SMOKE_DEFAULTS.get(name, default) if self.smoke else default

    def _num(self, name, default, lo, hi, cast, what):
        raw, default = self._raw(name, default)
        self._ranges[name], self._defaults[name] = (lo, hi), default
        try:
            value = default if raw is None or raw.strip() == "" else cast(raw)
        except ValueError:  # not a number: named as written, left out of the config, the default used
            value = None
        if value is None or not lo <= value <= hi or (cast is float and not math.isfinite(value)):
            self._bad.add(name)
            self._errors.append(f"{name}={repr(raw) if value is None else value}: expected {what} in [{lo}, {hi}] "
                                f"(default {default})")
        if value is None:
            return default
        self.resolved[name] = value
        return value

    def _int(self, name, default, lo, hi):
        return self._num(name, default, lo, hi, int, "an integer")

    def _float(self, name, default, lo, hi):
        return self._num(name, default, lo, hi, float, "a number")

    def _flag(self, name, default):
        return bool(self._num(name, default, 0, 1, int, "0 or 1"))

    def _str(self, name, default):
        raw, default = self._raw(name, default)
        self.resolved[name] = raw if raw else default
        return self.resolved[name]

    def _choice(self, name, default, choices):
        value = self._str(name, default)
        if value not in choices:
            self._errors.append(f"{name}={value!r}: expected one of {', '.join(choices)}")
        return value

    def _layers(self, name, default):
        raw, default = self._raw(name, default)
        text = default if raw is None else raw  # set-but-empty means: no Mamba layers
        try:
            layers = sorted({int(t) for t in text.replace(" ", "").split(",") if t})
        except ValueError:
            self._bad.add(name)
            self._errors.append(f"{name}={text!r}: expected comma-separated layer indices, e.g. 0,1,2")
            layers = []
        self.resolved[name] = ",".join(map(str, layers))
        return layers

    def _user_set(self, name):
        return self._env.get(name) is not None

    def _changed(self, name):  # set, to other than its default (a rescoring passes every value of its run)
        return self._user_set(name) and self.resolved.get(name) != self._defaults.get(name)

    def _fit_layer_defaults(self):
        """With another NUM_LAYERS, a default layer list (never a user's) keeps the layers that exist, and says so."""
        for name in ("MAMBA_LAYERS", "RECUR_LAYERS"):
            layers = getattr(self, name.lower())
            kept = [i for i in layers if i < self.num_layers]
            if not self._user_set(name) and kept != layers:
                setattr(self, name.lower(), kept)
                self.resolved[name] = ",".join(map(str, kept))
                self.notes.append(f"{name}: default {','.join(map(str, layers))} cut to '{self.resolved[name]}' "
                                  f"for NUM_LAYERS={self.num_layers}")
        if not self._user_set("PARALLEL_FROM") and self.parallel_from >= self.num_layers:
            self.notes.append(f"PARALLEL_FROM: default {self.parallel_from} is past NUM_LAYERS={self.num_layers}: off")
            self.parallel_from = self.resolved["PARALLEL_FROM"] = 0

    def _cross_checks(self):
        """Checks between knobs, each only where the knobs it reads are valid; each message names a value that works."""
        e = self._errors.append
        n = self.num_layers
        if self.is_valid("NUM_LAYERS"):
            self._fit_layer_defaults()
        self._shape_checks()
        for name, layers in (("MAMBA_LAYERS", self.mamba_layers), ("MAMBA_BRANCH_LAYERS", self.mamba_branch_layers),
                             ("RECUR_LAYERS", self.recur_layers)):
            bad = [i for i in layers if not 0 <= i < n]
            if bad and self.is_valid("NUM_LAYERS", name):
                fixes = [f"{name}={','.join(str(i) for i in layers if 0 <= i < n)}"]
                fixes += [f"NUM_LAYERS={max(bad) + 1}"] if n <= max(bad) < self._ranges["NUM_LAYERS"][1] else []
                e(f"{name} has {bad}: expected indices in [0, {n - 1}] (NUM_LAYERS={n}): try {' or '.join(fixes)}")
        both = sorted(set(self.mamba_layers) & set(self.mamba_branch_layers))
        if both:
            e(f"MAMBA_BRANCH_LAYERS and MAMBA_LAYERS both have {both}: a branch sits beside a block's attention, and "
              f"there a Mamba-2 block has none: try MAMBA_BRANCH_LAYERS="
              f"{','.join(str(i) for i in self.mamba_branch_layers if i not in both)}")
        recur = self.recur_layers
        if recur and recur != list(range(recur[0], recur[-1] + 1)):
            e(f"RECUR_LAYERS={self.resolved['RECUR_LAYERS']}: expected consecutive layers: try "
              f"RECUR_LAYERS={','.join(map(str, range(recur[0], recur[-1] + 1)))}")
        if self.is_valid("NUM_LAYERS", "PARALLEL_FROM") and self.parallel_from >= n:
            e(f"PARALLEL_FROM={self.parallel_from} must be a block index in [1, {n - 1}] (NUM_LAYERS={n}), or 0 (off)")
        if self.is_valid("EVAL_SEQ_LEN", "TRAIN_SEQ_LEN"):
            if 0 < self.eval_seq_len < 8:
                self._bad.add("EVAL_SEQ_LEN")
                e(f"EVAL_SEQ_LEN={self.eval_seq_len}: expected 0 (TRAIN_SEQ_LEN) or a length in [8, 65536]")
            self.eval_seq_len = self.resolved["EVAL_SEQ_LEN"] = self.eval_seq_len or self.train_seq_len
            window = "EVAL_SEQ_LEN" if self._user_set("EVAL_SEQ_LEN") else "TRAIN_SEQ_LEN"
            if self.is_valid("EVAL_STRIDE", "EVAL_SEQ_LEN") and self.eval_stride > self.eval_seq_len:
                e(f"EVAL_STRIDE={self.eval_stride} must be at most {window}={self.eval_seq_len}: try "
                  f"EVAL_STRIDE={min(64, self.eval_seq_len)}")
        cap, reserve = self.max_wallclock_seconds, self.gptq_reserve_seconds
        if self.is_valid("MAX_WALLCLOCK_SECONDS", "GPTQ_RESERVE_SECONDS") and 0 < cap <= reserve:
            # a cap at or below the reserve would leave a training budget of 0, which the loop reads as no cap
            if self._user_set("GPTQ_RESERVE_SECONDS") and not self._user_set("MAX_WALLCLOCK_SECONDS"):
                fix = f"GPTQ_RESERVE_SECONDS={min(self._defaults['GPTQ_RESERVE_SECONDS'], cap / 2):g}"
            else:
                fix = f"MAX_WALLCLOCK_SECONDS={max(self._defaults['MAX_WALLCLOCK_SECONDS'], 2 * reserve):g}, or 0 for no cap"
            e(f"MAX_WALLCLOCK_SECONDS={cap:g} leaves no training time after GPTQ_RESERVE_SECONDS={reserve:g}: try {fix}")
        if self.is_valid("LOGIT_SOFTCAP", "LOGIT_SOFTCAP_NEG"):
            if self.logit_softcap_neg and not self.logit_softcap:
                e(f"LOGIT_SOFTCAP_NEG={self.logit_softcap_neg:g} caps the negative logits of a softcap, but "
                  "LOGIT_SOFTCAP=0 turns it off: set LOGIT_SOFTCAP (e.g. 30), or LOGIT_SOFTCAP_NEG=0")
            self.logit_softcap_neg = self.resolved["LOGIT_SOFTCAP_NEG"] = self.logit_softcap_neg or self.logit_softcap
        if self.require_fast_kernels and not self.fast_kernels:
            e("REQUIRE_FAST_KERNELS=1 needs FAST_KERNELS=1")
        for k in ("TTT_DOC_CHUNK", "TTT_DOC_LR", "TTT_DOC_RANK", "TTT_DOC_BATCH", "TTT_DOC_SSM", "TTT_DOC_PHASES",
                  "TTT_DOC_PREFIX", "TTT_CHUNK_TOKENS"):  # a knob of the other TTT mode would be ignored: say so
            mode = "chunk" if k == "TTT_CHUNK_TOKENS" else "doc"
            if self._changed(k) and (mode == "doc") != (self.ttt_mode == "doc"):
                e(f"{k}={self.resolved[k]} is read only with TTT_MODE={mode} (this run: TTT_MODE={self.ttt_mode}): "
                  f"set TTT_MODE={mode}, or leave {k} unset")
        if self.is_valid("TTT_ENABLED", "EVAL_STRIDE") and self.ttt_enabled and self.eval_stride == 0:
            e("TTT_ENABLED=1 scores through sliding windows: set EVAL_STRIDE > 0 (e.g. 64), or TTT_ENABLED=0")
        if not self.smoke and self.is_valid("VOCAB_SIZE"):  # SMOKE makes its own tokenizer and data
            self._vocab_name_checks()

    def _vocab_name_checks(self):
        """A VOCAB_SIZE that the challenge's file names (fineweb_8192_bpe.model, fineweb10B_sp8192) disagree with."""
        v, tok, data = self.vocab_size, self.tokenizer_path, self.data_path.rstrip("/")
        named = {}  # knob -> (the size its name says, the path it would have for VOCAB_SIZE)
        if m := TOKENIZER_NAME.search(tok):
            named["TOKENIZER_PATH"] = (int(m[1]), tok[:m.start(1)] + str(v) + tok[m.end(1):])
        if m := DATA_PATH_NAME.search(data):
            named["DATA_PATH"] = (int(m[1]), data[:m.start(1)] + str(v))
        wrong = {k: x for k, x in named.items() if x[0] != v}
        if wrong:
            self._bad.add("VOCAB_SIZE")  # one line for it: not again when the tokenizer's real size is checked
            sizes = sorted({size for size, _ in wrong.values()})
            fixes = [f"VOCAB_SIZE={sizes[0]}"] if len(sizes) == 1 and len(wrong) == len(named) else []
            fixes.append(" with ".join(f"{k}={other}" for k, (_, other) in wrong.items()))
            self._errors.append(f"VOCAB_SIZE={v} but {' and '.join(f'{k}={self.resolved[k]}' for k in wrong)} "
                                f"{'is' if len(wrong) == 1 else 'are'} named for {'/'.join(map(str, sizes))} "
                                f"tokens: try {', or '.join(fixes)}")

    def _shape_checks(self):
        """MODEL_DIM, the head counts and Mamba's shape must divide into each other. A broken rule is blamed on the
        first of its knobs the user set, one line a knob, with its nearest values that pass every rule."""
        names = ("MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "ROPE_DIMS", "MAMBA_EXPAND", "MAMBA_HEADDIM", "MAMBA_NGROUPS")
        now = {k: self.resolved[k] for k in names}
        head_dim = lambda v: v["MODEL_DIM"] // v["NUM_HEADS"]
        d_inner = lambda v: int(round(v["MAMBA_EXPAND"] * v["MODEL_DIM"]))
        # (key, knobs in the order they are blamed, holds, says, the rule that must hold before this one means anything)
        rules = [
            ("heads", ("MODEL_DIM", "NUM_HEADS"), lambda v: v["MODEL_DIM"] % v["NUM_HEADS"] == 0 and head_dim(v) % 2 == 0,
             lambda v: f"MODEL_DIM={v['MODEL_DIM']} must split into NUM_HEADS={v['NUM_HEADS']} heads of even size", None),
            ("kv", ("NUM_KV_HEADS", "NUM_HEADS"), lambda v: v["NUM_HEADS"] % v["NUM_KV_HEADS"] == 0,
             lambda v: f"NUM_HEADS={v['NUM_HEADS']} must be a multiple of NUM_KV_HEADS={v['NUM_KV_HEADS']}", None),
            ("rope", ("ROPE_DIMS", "MODEL_DIM", "NUM_HEADS"), lambda v: v["ROPE_DIMS"] % 2 == 0 and v["ROPE_DIMS"] <= head_dim(v),
             lambda v: f"ROPE_DIMS={v['ROPE_DIMS']} must be even and at most the head dim ({head_dim(v)}), 0 rotates all",
             "heads")]
        if self.mamba_layers or self.mamba_branch_layers:  # without a Mamba-2 its shape is never built
            rules += [
                ("mamba", ("MAMBA_HEADDIM", "MAMBA_EXPAND", "MODEL_DIM"), lambda v: d_inner(v) % v["MAMBA_HEADDIM"] == 0,
                 lambda v: f"MAMBA_EXPAND*MODEL_DIM={d_inner(v)} must be a multiple of MAMBA_HEADDIM={v['MAMBA_HEADDIM']}",
                 None),
                ("groups", ("MAMBA_NGROUPS", "MAMBA_HEADDIM", "MAMBA_EXPAND", "MODEL_DIM"),
                 lambda v: (d_inner(v) // v["MAMBA_HEADDIM"]) % v["MAMBA_NGROUPS"] == 0,
                 lambda v: f"Mamba heads ({d_inner(v) // v['MAMBA_HEADDIM']}) must be a multiple of "
                           f"MAMBA_NGROUPS={v['MAMBA_NGROUPS']}", "mamba")]
        rules = [r for r in rules if self.is_valid(*r[1])]

        def verdicts(v):  # key -> True / False, or None where the rule before it failed
            out = {}
            for key, _, holds, _, after in rules:
                out[key] = None if after is not None and out.get(after) is not True else holds(v)
            return out
        blamed = {}
        for key, knobs, _, says, _ in rules:
            if verdicts(now)[key] is False:
                blamed.setdefault(next((k for k in knobs if self._user_set(k)), knobs[0]), []).append(says(now))
        for name, said in blamed.items():
            fits = self._nearest(name, now, lambda v: False not in verdicts(v).values())
            lo, hi = self._ranges[name]
            fix = f"try {name}={' or '.join(f'{x:g}' for x in fits)}" if fits else f"no {name} in [{lo}, {hi}] fits the others"
            self._errors.append("; ".join(said) + f": {fix}")

    def _nearest(self, name, values, ok):
        """The nearest values of knob `name` below and above its current one (nearest first) that pass ok."""
        lo, hi = self._ranges[name]
        now = values[name]
        if name == "MAMBA_EXPAND":  # a float: the expansions that give whole Mamba heads
            step = values["MAMBA_HEADDIM"] / values["MODEL_DIM"]
            candidates = [round(k * step, 4) for k in range(1, int(hi / step) + 1) if lo <= round(k * step, 4) <= hi]
        else:
            candidates = range(lo, hi + 1)
        below = next((c for c in sorted((c for c in candidates if c < now), reverse=True) if ok({**values, name: c})), None)
        above = next((c for c in sorted(c for c in candidates if c > now) if ok({**values, name: c})), None)
        return sorted((c for c in (below, above) if c is not None), key=lambda c: abs(c - now))

    def is_valid(self, *names):
        """True when none of these knobs has a problem of its own (checks built on them are skipped otherwise)."""
        return not self._bad.intersection(names)

    def world_problems(self, world_size):
        """The batch geometry for this many ranks, one line a problem, each with a value that works."""
        problems, seq = [], self.train_seq_len
        accum = self.grad_accum_steps or max(1, 8 // world_size)
        if self.is_valid("TRAIN_BATCH_TOKENS", "GRAD_ACCUM_STEPS", "TRAIN_SEQ_LEN"):
            per_micro, tokens = world_size * accum * seq, self.train_batch_tokens
            if tokens % per_micro:
                fits = sorted({max(per_micro, tokens // per_micro * per_micro), (tokens // per_micro + 1) * per_micro},
                              key=lambda t: abs(t - tokens))
                problems.append(f"TRAIN_BATCH_TOKENS={tokens} must be a multiple of world size ({world_size}) x "
                                f"GRAD_ACCUM_STEPS ({accum}) x TRAIN_SEQ_LEN ({seq}) = {per_micro}: try "
                                f"TRAIN_BATCH_TOKENS={' or '.join(map(str, fits))}")
        if self.is_valid("VAL_BATCH_SIZE", "TRAIN_SEQ_LEN") and self.val_batch_size < world_size * seq:
            problems.append(f"VAL_BATCH_SIZE={self.val_batch_size} must give each of {world_size} ranks at least one "
                            f"TRAIN_SEQ_LEN={seq} sequence: try VAL_BATCH_SIZE={world_size * seq}")
        return problems

    def machine_problems(self, cuda):
        """A run sized for GPUs on a machine without CUDA stops here (else the kernel kills it, without a word)."""
        if cuda or not self.is_valid("SMOKE", "DRY_RUN", "ALLOW_CPU") or self.smoke or self.dry_run or self.allow_cpu:
            return []
        return ["no CUDA GPU on this machine, and this run is sized for GPUs: SMOKE=1 runs the whole pipeline small "
                "on a CPU, DRY_RUN=1 prints the config and sizes; ALLOW_CPU=1 trains this configuration on the CPU anyway"]

    def resolve_world(self, world_size):
        """Batch geometry depends on the number of ranks; checked once they are known."""
        if problems := self.world_problems(world_size):
            raise ConfigError("\n".join(problems))
        self.grad_accum_steps = self.resolved["GRAD_ACCUM_STEPS"] = self.grad_accum_steps or max(1, 8 // world_size)

# ----------------------------------------------------------------------------------------------
# DATA: the challenge's shard format, a deterministic rank-sharded loader, bits-per-byte tables

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256

def shard_token_count(path) -> int:
    """The tokens a shard holds, by its header, checked against the file's size (reads 1 KB)."""
    path = Path(path)
    fix = f"re-download the data: {DOWNLOAD_HINT}"
    if not path.is_file():
        raise FileNotFoundError(f"data shard {path} does not exist; {fix}")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size != HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"data shard {path}: bad header (want magic {SHARD_MAGIC}, version {SHARD_VERSION}); {fix}")
    n = int(header[2])
    expected = HEADER_INTS * 4 + 2 * n
    if n <= 0 or path.stat().st_size != expected:
        raise ValueError(f"data shard {path}: size {path.stat().st_size} bytes, header says {n} tokens "
                         f"({expected} bytes): truncated or corrupt; {fix}")
    return n

def load_data_shard(path) -> Tensor:
    n = shard_token_count(path)
    tokens = np.fromfile(path, dtype="<u2", count=n, offset=HEADER_INTS * 4)
    return torch.from_numpy(tokens.astype(np.int32))

def shard_paths(data_path, split):
    return sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_*.bin")))

def data_problems(hp, splits=("train", "val")):
    """What the data and the tokenizer lack, one line a problem, in the order a user fixes them (headers only).
    splits: the shards needed (an evaluation alone needs only val)."""
    problems, where = [], f"DATA_PATH={hp.data_path}"
    files = {split: shard_paths(hp.data_path, split) for split in splits}
    if not os.path.isdir(hp.data_path):
        problems.append(f"{where} does not exist: download the data: {DOWNLOAD_HINT} (or set DATA_PATH to your shards)")
    else:
        problems += [f"{where} has no {split} shards (fineweb_{split}_*.bin): download them: {DOWNLOAD_HINT} (or "
                     "tokenize your own: data/tokenize_corpus.py)" for split, found in files.items() if not found]
    if not os.path.isfile(hp.tokenizer_path):  # the download that fetches the data fetches the tokenizer too
        get = "the command above fetches it too" if problems else f"download it: {DOWNLOAD_HINT}"
        problems.append(f"TOKENIZER_PATH={hp.tokenizer_path} does not exist: {get}")
    else:
        import sentencepiece as spm
        try:
            sp = spm.SentencePieceProcessor(model_file=hp.tokenizer_path)
            pieces = sp.vocab_size()
        except (RuntimeError, OSError) as e:
            problems.append(f"TOKENIZER_PATH={hp.tokenizer_path} is not a SentencePiece model ({e}): download the "
                            f"tokenizer: {DOWNLOAD_HINT}")
        else:
            if hp.is_valid("VOCAB_SIZE") and pieces != hp.vocab_size:
                problems.append(f"VOCAB_SIZE={hp.vocab_size} but the tokenizer TOKENIZER_PATH={hp.tokenizer_path} has "
                                f"{pieces} pieces: try VOCAB_SIZE={pieces}")
            for needs, what, off in ((hp.smear_gate, "SMEAR_GATE=1 masks document starts", "SMEAR_GATE=0"),
                                     (hp.ttt_enabled and hp.ttt_mode == "doc", "TTT_MODE=doc splits documents",
                                      "TTT_MODE=chunk")):
                if needs and sp.bos_id() < 0:
                    problems.append(f"{what} by the BOS token, but TOKENIZER_PATH={hp.tokenizer_path} has none: use "
                                    f"a tokenizer with a BOS, or {off}")
    counts, bad = {}, []
    for path in sum(files.values(), []):
        try:
            counts[path] = shard_token_count(path)
        except (ValueError, OSError) as e:
            bad.append(str(e))
    problems += bad[:3] + ([f"{where}: {len(bad) - 3} more bad shards"] if len(bad) > 3 else [])
    val_tokens = sum(counts.get(path, 0) for path in files["val"])
    if files["val"] and all(p in counts for p in files["val"]) and hp.is_valid("TRAIN_SEQ_LEN") \
            and val_tokens <= hp.train_seq_len:
        fits = 2 ** int(math.log2(val_tokens - 1)) if val_tokens > 8 else None
        problems.append(f"{where}: the validation split has {val_tokens} tokens, too few for TRAIN_SEQ_LEN="
                        f"{hp.train_seq_len}: " + (f"try TRAIN_SEQ_LEN={fits}" if fits and fits >= 8 else "add validation data"))
    return problems

def validation_problems(hp, val_tokens, bos_id):
    """What only the validation tokens themselves show (read before the model is built), one line a problem."""
    problems, where, top = [], f"DATA_PATH={hp.data_path}", int(val_tokens.max())
    if top >= hp.vocab_size:
        problems.append(f"{where}: the validation shards hold token id {top} >= VOCAB_SIZE="
                        f"{hp.vocab_size}: the shards are for another tokenizer; use the one they were made with, and its VOCAB_SIZE")
    if hp.ttt_enabled and hp.ttt_mode == "doc" and not bool((val_tokens == bos_id).any()):
        problems.append(f"TTT_MODE=doc: the validation shards in {where} hold no BOS token (id {bos_id}) to split "
                        "documents at: use shards made as the challenge's ([BOS] + tokens per document), or TTT_MODE=chunk")
    return problems

def shard_files(data_path, split):
    files = shard_paths(data_path, split)
    if not files:
        raise FileNotFoundError(f"no {split} shards (fineweb_{split}_*.bin) in DATA_PATH={data_path}; "
                                f"download them: {DOWNLOAD_HINT} (or tokenize your own: data/tokenize_corpus.py)")
    return files

class TokenStream:
    """Reads the shards in order, wrapping around; every rank walks the same stream."""

    def __init__(self, files):
        self.files, self.file_idx = files, 0
        self.tokens, self.pos = load_data_shard(files[0]), 0

    def take(self, n):
        parts = []
        while n > 0:
            if self.pos >= self.tokens.numel():
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = load_data_shard(self.files[self.file_idx]), 0
            k = min(n, self.tokens.numel() - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return torch.cat(parts)

class DistributedTokenLoader:
    """Each call takes one global micro-batch from the stream; rank r keeps slice r of it."""

    def __init__(self, files, rank, world_size, device):
        self.stream, self.rank, self.world_size, self.device = TokenStream(files), rank, world_size, device

    def next_batch(self, local_tokens, seq_len):
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)[self.rank * span:(self.rank + 1) * span]
        chunk = chunk.to(self.device, dtype=torch.int64, non_blocking=True)
        return chunk[:-1].view(-1, seq_len), chunk[1:].view(-1, seq_len)

def load_validation_tokens(data_path, seq_len):
    tokens = torch.cat([load_data_shard(f) for f in shard_files(data_path, "val")])
    if tokens.numel() <= seq_len:
        raise ValueError(f"validation split has {tokens.numel()} tokens: too short for TRAIN_SEQ_LEN={seq_len}")
    return tokens

def build_byte_luts(sp, vocab_size):
    """Byte length of each token as the challenge counts it: a piece's UTF-8 bytes without its leading
    '▁'; the '▁' adds one byte unless the previous token is a boundary (control/unknown) token."""
    n = max(int(sp.vocab_size()), vocab_size)
    base_bytes = np.zeros(n, dtype=np.int16)
    leading_space = np.zeros(n, dtype=np.bool_)
    is_boundary = np.ones(n, dtype=np.bool_)
    for i in range(int(sp.vocab_size())):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        is_boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            leading_space[i], piece = True, piece[1:]
        base_bytes[i] = len(piece.encode("utf-8"))
    return torch.from_numpy(base_bytes), torch.from_numpy(leading_space), torch.from_numpy(is_boundary)

def target_bytes(prev_ids, target_ids, luts):
    base_bytes, leading_space, is_boundary = luts
    return base_bytes[target_ids].to(torch.float64) + (leading_space[target_ids] & ~is_boundary[prev_ids]).to(torch.float64)

# ----------------------------------------------------------------------------------------------
# MODEL. Kernel call sites (attention_op, causal_conv1d, ssd_scan) are single functions so a fast
# GPU path can be dispatched there; the PyTorch versions below run anywhere.

def attention_sdpa(q, k, v):
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)

def attention_op(q, k, v):
    """Causal GQA attention. q: (B, L, H, D); k, v: (B, L, Hkv, D) -> (B, L, H, D)."""
    if KERNELS["attention"] is not None and q.is_cuda:
        y = KERNELS["attention"](q, k, v, causal=True)
        return y[0] if isinstance(y, tuple) else y  # some FA3 builds also return the log-sum-exp
    return attention_sdpa(q, k, v)

def causal_conv1d_torch(x, weight, bias):
    K, L = weight.size(1), x.size(1)
    xp = F.pad(x, (0, 0, K - 1, 0))
    out = bias.to(x.dtype) + sum(xp[:, j:j + L] * weight[:, j].to(x.dtype) for j in range(K))
    return F.silu(out)

def causal_conv1d(x, weight, bias):
    """Depthwise causal conv + SiLU, channels last. x: (B, L, C); weight: (C, K); bias: (C,). The fallback is
    shift-and-add, not F.conv1d: the (B, L, C) layout needs no transposes and compiles into one fused kernel."""
    if KERNELS["causal_conv1d"] is not None and x.is_cuda:
        # a contiguous (B, C, L): with the channel-last view the kernel writes a strided out=, a torch.compile break
        return KERNELS["causal_conv1d"](x.transpose(1, 2).contiguous(), weight.to(x.dtype), bias.to(x.dtype),
                                        activation="silu").transpose(1, 2)
    return causal_conv1d_torch(x, weight, bias)

# torch.cumsum over the last dim as an opaque op. Inductor's split scan (129+ elements, few rows) fails to
# compile an input with a broadcast in it, as dt * A has, in torch 2.11 (pytorch/pytorch#180221, fixed later)
@torch.library.custom_op("pgolf::cumsum_last", mutates_args=())
def cumsum_last(x: Tensor) -> Tensor:
    return torch.cumsum(x.contiguous(), dim=-1)  # contiguous out, whatever the input's strides: as the fake says

cumsum_last.register_fake(lambda x: x.new_empty(x.shape))
cumsum_last.register_autograd(lambda ctx, grad: cumsum_last(grad.flip(-1)).flip(-1))

def segment_sums(cum):
    """cum: (..., T) running sums of a -> (..., T, T) with [t, s] = cum[t] - cum[s] = a[s+1] + ... + a[t]
    for t >= s, and -inf above the diagonal."""
    T = cum.size(-1)
    diff = cum[..., :, None] - cum[..., None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=cum.device).tril()
    return diff.masked_fill(~causal, float("-inf"))

# Each call site's implementation, chosen once by configure_kernels(); None means the PyTorch path
KERNELS = {"ssd_fwd": None, "ssd_bwd": None, "causal_conv1d": None, "attention": None}

def import_without_package_init(package, module):
    """Import package.module without running package/__init__.py: mamba_ssm 2.3's __init__ needs its
    Mamba-1 CUDA extension, which the SSD path never uses (pip's MAMBA_SKIP_CUDA_BUILD leaves it out)."""
    if package not in sys.modules:
        spec = importlib.util.find_spec(package)
        if spec is None:
            raise ImportError(f"{package} is not installed")
        sys.modules[package] = importlib.util.module_from_spec(spec)  # the package object, its code not run
    return importlib.import_module(f"{package}.{module}")

def load_fast_kernels():
    """{call site: (implementation, name) or (None, why not)} for the GPU libraries that import here."""
    found = {}
    # mamba_ssm's kernels autotune per shape (minutes): Triton's disk cache keeps the choices of those whose
    # configs have no pre-hook (forward ones) for the next run on the machine. Read at import, so set first
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    try:
        ssd = import_without_package_init("mamba_ssm", "ops.triton.ssd_combined")
        found["ssd"] = ((ssd._mamba_chunk_scan_combined_fwd, ssd._mamba_chunk_scan_combined_bwd), "mamba_ssm-triton")
    except Exception as e:  # a broken install must not stop a run that can fall back
        found["ssd"] = (None, f"mamba_ssm SSD: {e!r}")
    try:
        from causal_conv1d import causal_conv1d_fn
        found["causal_conv1d"] = (causal_conv1d_fn, "causal_conv1d-cuda")
    except Exception as e:
        found["causal_conv1d"] = (None, f"causal_conv1d: {e!r}")
    found["attention"] = (None, "neither flash_attn_interface (FA3) nor flash_attn (FA2) imports")
    for module, name in (("flash_attn_interface", "fa3"), ("flash_attn", "fa2")):
        try:
            found["attention"] = (importlib.import_module(module).flash_attn_func, name)
            break
        except Exception:
            pass
    return found

FALLBACKS = {"ssd": "pytorch-chunked", "causal_conv1d": "pytorch-shift-add", "attention": "torch-sdpa"}

def configure_kernels(hp, device, log=print):
    """Each call site's implementation, chosen once and logged; on CUDA a missing one warns (REQUIRE_FAST_KERNELS)."""
    use = hp.fast_kernels and device.type == "cuda"
    found = load_fast_kernels() if use else {site: (None, None) for site in FALLBACKS}
    KERNELS.update(causal_conv1d=found["causal_conv1d"][0], attention=found["attention"][0])
    KERNELS["ssd_fwd"], KERNELS["ssd_bwd"] = found["ssd"][0] or (None, None)
    log("kernels: " + " ".join(f"{site}={name if impl else FALLBACKS[site]}" for site, (impl, name) in found.items())
        + ("" if use else f" ({'FAST_KERNELS=0' if not hp.fast_kernels else 'no CUDA device'})"))
    missing = [why for impl, why in found.values() if use and impl is None]
    if missing:
        msg = "fast kernels unavailable, PyTorch fallbacks in use (slower): " + "; ".join(missing)
        if hp.require_fast_kernels:
            raise SystemExit(f"REQUIRE_FAST_KERNELS=1: {msg}")
        log(f"WARNING: {msg}")

# The Triton SSD as custom ops: torch.compile sees an opaque op with known output shapes instead of
# tracing into (or breaking the graph at) the library's autograd.Function.
@torch.library.custom_op("pgolf::ssd_scan", mutates_args=())
def ssd_scan_kernel(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int) -> Tensor:
    return KERNELS["ssd_fwd"](x, dt, A, B, C, chunk_size)[0].contiguous()

ssd_scan_kernel.register_fake(lambda x, dt, A, B, C, chunk_size: x.new_empty(x.shape))

@torch.library.custom_op("pgolf::ssd_scan_backward", mutates_args=())
def ssd_scan_kernel_backward(grad: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, y: Tensor,
                             chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = KERNELS["ssd_bwd"](grad.contiguous(), x, dt, A, B, C, y, chunk_size)[:5]
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (x, dt, A, B, C)))

ssd_scan_kernel_backward.register_fake(
    lambda grad, x, dt, A, B, C, y, chunk_size: tuple(t.new_empty(t.shape) for t in (x, dt, A, B, C)))

def _ssd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5], output)
    ctx.chunk_size = inputs[5]

def _ssd_backward(ctx, grad):
    return (*ssd_scan_kernel_backward(grad, *ctx.saved_tensors, ctx.chunk_size), None)

ssd_scan_kernel.register_autograd(_ssd_backward, setup_context=_ssd_setup_context)

def ssd_scan(x, dt, A, B, C, chunk_size):
    """Mamba-2's SSD scan: mamba_ssm's Triton kernel on CUDA when configured, else ssd_scan_torch."""
    if KERNELS["ssd_fwd"] is not None and x.is_cuda:
        return ssd_scan_kernel(x, dt, A, B, C, chunk_size)
    return ssd_scan_torch(x, dt, A, B, C, chunk_size)

def ssd_scan_torch(x, dt, A, B, C, chunk_size, initial_state=None, return_final_state=False):
    """Mamba-2's state-space dual scan, chunked, in plain PyTorch; per head h:
    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t B_t^T;  y_t = state_t C_t.
    x: (B, L, H, P); dt: (B, L, H) (already softplus'd); A: (H,); B, C: (B, L, G, N); H % G == 0."""
    out_dtype = x.dtype
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    pad = (-L) % chunk_size
    x, dt, B, C = (F.pad(t.to(work), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    T, c = L + pad, (L + pad) // chunk_size
    B = B.repeat_interleave(H // G, dim=2).view(b, c, chunk_size, H, N)
    C = C.repeat_interleave(H // G, dim=2).view(b, c, chunk_size, H, N)
    xdt = (x * dt[..., None]).view(b, c, chunk_size, H, P)
    log_decay = (dt * A.to(work)).view(b, c, chunk_size, H).permute(0, 3, 1, 2)  # (b, H, c, l)
    cum = cumsum_last(log_decay)
    # 1. within each chunk: y_t = sum_{s<=t} C_t.B_s exp(cum_t - cum_s) x_s dt_s
    decay_in = torch.exp(segment_sums(cum))                                       # (b, H, c, l, l)
    y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay_in, xdt)
    # 2. each chunk's own contribution to the state at its end
    decay_to_end = torch.exp(cum[..., -1:] - cum)                                 # (b, H, c, l)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, xdt)
    # 3. carry states across chunks: entering[k] = sum_{j<k} decay(j->k) chunk_states[j] (+ initial)
    if initial_state is None:
        initial_state = torch.zeros(b, H, P, N, dtype=work, device=x.device)
    states = torch.cat([initial_state.to(work)[:, None], chunk_states], dim=1)  # (b, c+1, H, P, N)
    chunk_decay = torch.exp(segment_sums(cumsum_last(F.pad(cum[..., -1], (1, 0)))))  # (b, H, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    entering, final_state = states[:, :-1], states[:, -1]
    # 4. the entering state's contribution to each position
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, torch.exp(cum))
    y = y.reshape(b, T, H, P)[:, :L].to(out_dtype)
    return (y, final_state) if return_final_state else y

def lora_delta(x, lora):
    """Document TTT's low-rank delta, one per batch row: x (rows, L, in) @ A^T @ B^T, A (n, r, in), B (n, out, r),
    n >= rows: the batch holds the first rows of the LoRA's (finished documents leave it from the end)."""
    a, b = (f[:x.size(0)] for f in lora)
    return (x @ a.to(x.dtype).mT) @ b.to(x.dtype).mT

class CastedLinear(nn.Linear):
    """Weights stay fp32 for the optimizer; matmuls run in the activations' dtype."""

    def __init__(self, in_features, out_features, zero_init=False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init, self.lora = zero_init, None
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x):
        y = F.linear(x, self.weight.to(x.dtype))
        return y if self.lora is None else y + lora_delta(x, self.lora)

class Rotary(nn.Module):
    """RoPE on the first `dims` of each head (all of them by default); the rest carry position-free content."""

    def __init__(self, dims, base):
        super().__init__()
        self.dims = dims
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, dims, 2).float() / dims), persistent=False)

    def forward(self, x):  # x: (B, L, H, D)
        t = torch.arange(x.size(1), device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(x.device))
        cos, sin = freqs.cos()[None, :, None].to(x.dtype), freqs.sin()[None, :, None].to(x.dtype)
        x1, x2, rest = x[..., :self.dims // 2], x[..., self.dims // 2:self.dims], x[..., self.dims:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)

class Attention(nn.Module):
    def __init__(self, hp):
        super().__init__()
        dim, self.heads, self.kv_heads = hp.model_dim, hp.num_heads, hp.num_kv_heads
        self.head_dim = dim // self.heads
        self.q = CastedLinear(dim, dim)
        self.k = CastedLinear(dim, self.kv_heads * self.head_dim)
        self.v = CastedLinear(dim, self.kv_heads * self.head_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((self.heads,), hp.qk_gain_init))
        self.rotary = Rotary(hp.rope_dims or self.head_dim, hp.rope_base)
        self.xsa = hp.attn_xsa
        # zero at init: every gate starts at 1/2. The 0.5 in the gate halves its effective learning rate (as in the records)
        self.gate_w = nn.Parameter(torch.zeros(self.heads, min(12, dim))) if hp.attn_gate else None

    def forward(self, x):
        b, L, _ = x.shape
        q = self.q(x).view(b, L, self.heads, self.head_dim)
        k = self.k(x).view(b, L, self.kv_heads, self.head_dim)
        v = self.v(x).view(b, L, self.kv_heads, self.head_dim)
        q = self.rotary(F.rms_norm(q, (self.head_dim,))) * self.q_gain.to(x.dtype)[:, None]
        k = self.rotary(F.rms_norm(k, (self.head_dim,)))
        y = attention_op(q, k, v)
        if self.xsa:  # the token's own value is already in the residual stream: keep only what is new
            v_dir = F.normalize(v.repeat_interleave(self.heads // self.kv_heads, dim=2), dim=-1)
            y = y - (y * v_dir).sum(-1, keepdim=True) * v_dir
        if self.gate_w is not None:
            y = y * torch.sigmoid(0.5 * F.linear(x[..., :self.gate_w.size(1)], self.gate_w.to(x.dtype)))[..., None]
        return self.proj(y.reshape(b, L, -1))

class Mamba2(nn.Module):
    """in_proj -> [z, x, B, C, dt]; causal conv on (x, B, C); SSD scan (scalar A per head); skip D; z-gated RMSNorm."""

    def __init__(self, hp):
        super().__init__()
        dim, self.d_state, self.ngroups = hp.model_dim, hp.mamba_d_state, hp.mamba_ngroups
        self.d_inner, self.headdim = int(round(hp.mamba_expand * dim)), hp.mamba_headdim
        self.nheads, self.chunk_size = self.d_inner // self.headdim, hp.mamba_chunk_size
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        self.in_proj = CastedLinear(dim, self.d_inner + self.conv_dim + self.nheads)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, hp.mamba_d_conv).uniform_(-1, 1) / math.sqrt(hp.mamba_d_conv))
        self.conv_bias = nn.Parameter(torch.zeros(self.conv_dim))
        # dt in [1e-3, 1e-1] log-uniformly at init; A in [-16, -1]: a spread of memory lengths per head
        dt = torch.exp(torch.empty(self.nheads).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = CastedLinear(self.d_inner, dim, zero_init=True)
        self.dt_delta = None  # document TTT with TTT_DOC_SSM: a (rows, nheads) shift of dt_bias, one per batch row

    def forward(self, u):
        b, L, _ = u.shape
        gn = self.ngroups * self.d_state
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        x, B, C = causal_conv1d(xBC, self.conv_weight, self.conv_bias).split([self.d_inner, gn, gn], dim=-1)
        x = x.reshape(b, L, self.nheads, self.headdim)
        dt = F.softplus(dt.float() + self.dt_bias + (0 if self.dt_delta is None else self.dt_delta[:b, None]))
        y = ssd_scan(x, dt, -torch.exp(self.A_log.float()), B.view(b, L, self.ngroups, -1),
                     C.view(b, L, self.ngroups, -1), self.chunk_size)
        y = (y + x * self.D.to(x.dtype)[:, None]).reshape(b, L, self.d_inner)
        y = F.rms_norm(y * F.silu(z), (self.d_inner,)) * self.norm_weight.to(y.dtype)
        return self.out_proj(y)

class MLP(nn.Module):
    def __init__(self, dim, mult):
        super().__init__()
        hidden = int(round(mult * dim))
        self.fc = CastedLinear(dim, hidden)
        self.proj = CastedLinear(hidden, dim, zero_init=True)

    def forward(self, x):
        return self.proj(F.leaky_relu(self.fc(x), 0.5).square())

class Block(nn.Module):
    """Pre-norm residual block: a mixer (attention, maybe with a Mamba-2 branch beside it, or Mamba-2), then an MLP;
    `parallel`: x + mixer(x) + mlp(x). LN_SCALE: inputs scaled by 1/sqrt(i+1): deeper blocks write smaller updates."""

    def __init__(self, hp, index, is_mamba):
        super().__init__()
        dim = hp.model_dim
        self.mixer = Mamba2(hp) if is_mamba else Attention(hp)
        self.mlp = MLP(dim, hp.mlp_mult) if hp.mlp_mult > 0 and (hp.mamba_mlp or not is_mamba) else None
        self.mixer_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim)) if self.mlp is not None else None
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(dim), torch.zeros(dim)]))
        self.norm_scale = 1 / math.sqrt(index + 1) if hp.ln_scale else 1.0
        # Mamba-2 RMS-normalizes its own output: a smaller input cannot shrink its update, a scaled output can
        self.scale_mixer_output = is_mamba and hp.mamba_norm_scale == "output"
        self.parallel = bool(hp.parallel_from) and index >= hp.parallel_from and self.mlp is not None
        self.branch = Mamba2(hp) if not is_mamba and index in hp.mamba_branch_layers else None
        self.branch_scale = nn.Parameter(torch.ones(dim)) if self.branch is not None else None

    def norm(self, x, scale):
        return F.rms_norm(x, (x.size(-1),)) * scale

    def forward(self, x, x0):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        inner, outer = (1.0, self.norm_scale) if self.scale_mixer_output else (self.norm_scale, 1.0)
        h = self.norm(x, inner)
        out = x + (self.mixer_scale * outer).to(x.dtype) * self.mixer(h)  # on the gain, not the activations
        if self.branch is not None:  # its out_proj starts at zero: the block starts as attention alone
            out = out + self.branch_scale.to(x.dtype) * self.branch(h)
        if self.mlp is None:
            return out
        return out + self.mlp_scale.to(x.dtype) * self.mlp(self.norm(x if self.parallel else out, self.norm_scale))

class BigramHash(nn.Module):
    """An embedding of a hash of (previous token, token), projected into the residual stream."""

    def __init__(self, buckets, dim, model_dim):
        super().__init__()
        self.buckets = buckets
        self.embed = nn.Embedding(buckets, dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # proj starts at zero; a zero table too would never train
        self.proj = CastedLinear(dim, model_dim, zero_init=True)

    def forward(self, ids):
        prev = F.pad(ids[:, :-1], (1, 0), value=-1)
        h = torch.where(prev < 0, self.buckets - 1, (prev * 36313 + ids * 27191) % (self.buckets - 1))
        return self.proj(self.embed(h))

def layer_order(num_layers, recur_layers, loops):
    """The blocks in the order they run: RECUR_LAYERS' segment `loops` more times right after its first pass."""
    if not recur_layers:
        return list(range(num_layers))
    last = recur_layers[-1] + 1
    return list(range(last)) + recur_layers * loops + list(range(last, num_layers))

class HybridGPT(nn.Module):
    """U-Net over layers: the first half's outputs feed the second half in reverse order through learned skip
    weights (and gates). `order`: the blocks as they run, with the recurrence once `looping` is switched on."""

    def __init__(self, hp):
        super().__init__()
        self.softcap, self.softcap_neg, self.vocab_size = hp.logit_softcap, hp.logit_softcap_neg, hp.vocab_size
        self.tok_emb = nn.Embedding(hp.vocab_size, hp.model_dim)
        self.bigram = BigramHash(hp.bigram_vocab_size, hp.bigram_dim, hp.model_dim) if hp.bigram_vocab_size else None
        self.is_mamba = [i in hp.mamba_layers for i in range(hp.num_layers)]
        self.blocks = nn.ModuleList(Block(hp, i, m) for i, m in enumerate(self.is_mamba))
        self.plain_order = list(range(hp.num_layers))
        self.looped_order = layer_order(hp.num_layers, hp.recur_layers, hp.recur_loops)
        self.looping = False
        num_skips = max(min(len(o) // 2, len(o) - len(o) // 2) for o in (self.plain_order, self.looped_order))
        self.skip_weights = nn.Parameter(torch.ones(num_skips, hp.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, hp.model_dim)) if hp.skip_gates else None
        self.lm_head = None if hp.tie_embeddings else CastedLinear(hp.model_dim, hp.vocab_size, zero_init=True)
        # the smear gate reads the first 12 dims of each token's embedding, as in the records; both start at 0
        self.smear_w = nn.Parameter(torch.zeros(min(12, hp.model_dim))) if hp.smear_gate else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if hp.smear_gate else None
        self.bos_id = 1  # the challenge's tokenizers' BOS; main() sets the loaded tokenizer's
        self.head_lora = None  # document TTT's (A, B) on the output head, as CastedLinear.lora
        for m in self.modules():  # orthogonal matrices: every direction of the input starts with the same gain
            if isinstance(m, CastedLinear) and not m.zero_init and min(m.weight.shape) >= 64:
                nn.init.orthogonal_(m.weight)
        nn.init.normal_(self.tok_emb.weight, std=hp.tied_embed_init_std)

    @property
    def order(self):
        return self.looped_order if self.looping else self.plain_order

    @property
    def num_encoder(self):
        return len(self.order) // 2

    def skip_map(self):
        """{decoder position: encoder position whose output it receives}, positions in `order`."""
        n = self.num_encoder
        return {n + j: n - 1 - j for j in range(min(n, len(self.order) - n))}

    def embed(self, ids):
        """Token (+ bigram) embeddings; with SMEAR_GATE, x_t + g_t x_{t-1}, g_t = lambda sigmoid(w . x_t[:12]),
        zero where token t starts a document (ids == bos_id), so nothing leaks across documents."""
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids)
        if self.smear_w is not None:
            w = self.smear_w.to(x.dtype)
            g = self.smear_lambda.to(x.dtype) * torch.sigmoid(x[:, 1:, :w.numel()] @ w)[..., None]
            keep = (ids[:, 1:] != self.bos_id).to(x.dtype)[..., None]
            x = torch.cat([x[:, :1], x[:, 1:] + g * keep * x[:, :-1]], dim=1)
        return x

    def hidden(self, ids):
        """The final normalized residual stream: what the output head reads."""
        x = self.embed(ids)
        x = x0 = F.rms_norm(x, (x.size(-1),))
        skips, skip_map = [], self.skip_map()
        for i, layer in enumerate(self.order):
            if i in skip_map:
                j = i - self.num_encoder
                skip = self.skip_weights[j].to(x.dtype) * skips.pop()
                gates = self.skip_gates
                x = x + skip if gates is None else torch.lerp(skip, x, torch.sigmoid(gates[j]).to(x.dtype))
            x = self.blocks[layer](x, x0)
            if i < self.num_encoder:
                skips.append(x)
        return F.rms_norm(x, (x.size(-1),))

    def logits(self, ids):
        x = self.hidden(ids)
        logits = F.linear(x, (self.tok_emb.weight if self.lm_head is None else self.lm_head.weight).to(x.dtype))
        if self.head_lora is not None:
            logits = logits + lora_delta(x, self.head_lora)
        if self.softcap > 0:
            cap = self.softcap if self.softcap_neg == self.softcap else torch.where(logits > 0, self.softcap, self.softcap_neg)
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(self, ids, targets):
        """Per-token cross-entropy in fp32, shape of targets."""
        logits = self.logits(ids).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view_as(targets)

def parameter_report(model):
    """Parameter counts by part, for the DRY_RUN and startup logs."""
    parts = {}
    for name, p in model.named_parameters():
        if name.startswith("blocks."):
            kind = "mamba" if model.is_mamba[int(name.split(".")[1])] else "attention"
            part = (f"{kind}_mixers" if ".mixer." in name else "mamba_branches" if ".branch." in name
                    else "mlps" if ".mlp." in name else "block_scalars")
        else:
            part = {"tok_emb": "embedding", "bigram": "bigram", "lm_head": "lm_head", "smear_w": "block_scalars",
                    "smear_lambda": "block_scalars"}.get(name.split(".")[0], "skips")
        parts[part] = parts.get(part, 0) + p.numel()
    parts["total"] = sum(p.numel() for p in model.parameters())
    return parts

# ----------------------------------------------------------------------------------------------
# OPTIMIZERS: Muon for every 2-D matrix (attention, MLP, Mamba projections), Adam for the rest

NS_COEFFS = {
    "quintic": [(3.4445, -4.7750, 2.0315)],  # one polynomial for every step, tuned for speed over exactness
    # Polar Express (arXiv 2505.16932): the optimal polynomial for each of 5 steps; later steps repeat the last
    "polar-express": [(8.156554524902461, -22.48329292557795, 15.878769915207462),
                      (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                      (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                      (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                      (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)],
}

def newton_schulz_orthogonalize(G, steps, eps=1e-7, coeffs="quintic"):
    """U V^T of G = U S V^T (each matrix of a stack), by `steps` odd polynomials a X + b (X X^T) X + c (X X^T)^2 X."""
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    # Polar Express's first polynomial assumes singular values at most 1: the 2% margin keeps them there
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * (1.02 if coeffs == "polar-express" else 1.0) + eps)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    table = NS_COEFFS[coeffs]
    for i in range(steps):
        a, b, c = table[min(i, len(table) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if transposed else X

class Muon(torch.optim.Optimizer):
    """Momentum, then orthogonalized updates. Same-shape matrices are orthogonalized as one batch; ranks split
    each batch and share the results in one all-reduce, so every rank applies the same update."""

    def __init__(self, params, lr, momentum, backend_steps, weight_decay=0.0, row_norm=False, ns="quintic"):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay,
                                      row_norm=row_norm, ns=ns))

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                by_shape.setdefault(tuple(p.shape), []).append(p)
            # the flat buffer holds, per shape, each rank's share of that shape's matrices back to back
            shares = [(r, same[r::world]) for same in by_shape.values() for r in range(world) if same[r::world]]
            order = [p for _, share in shares for p in share]
            flat = torch.zeros(sum(p.numel() for p in order), device=order[0].device, dtype=torch.float32)
            offset = 0
            for r, share in shares:
                size = sum(p.numel() for p in share)
                if r == rank:
                    grads = [p.grad for p in share]
                    bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad)) for p in share]
                    torch._foreach_mul_(bufs, group["momentum"])
                    torch._foreach_add_(bufs, grads)
                    g = torch.stack(torch._foreach_add(grads, bufs, alpha=group["momentum"]))  # Nesterov
                    if group["row_norm"]:  # every output unit's row gets an equal say in the orthogonalization
                        g = g / (g.norm(dim=-1, keepdim=True) + 1e-7)
                    g = newton_schulz_orthogonalize(g, group["backend_steps"], coeffs=group["ns"])
                    flat[offset:offset + size] = (g * max(1.0, g.size(-2) / g.size(-1)) ** 0.5).reshape(-1)
                offset += size
            if distributed:
                dist.all_reduce(flat)
            updates = flat.split([p.numel() for p in order])
            if group["weight_decay"]:
                torch._foreach_mul_(order, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(order, [u.view_as(p).to(p.dtype) for u, p in zip(updates, order)], alpha=-group["lr"])

MAMBA_SSM_PARAMS = ("A_log", "dt_bias", "D", "conv_weight", "conv_bias", "norm_weight")

def param_group(name, p):
    if name.startswith(("tok_emb.", "bigram.embed.")):
        return "embeddings"
    if name.startswith("lm_head."):
        return "head"
    if p.ndim == 2 and name.endswith(".weight"):
        return "mamba_matrices" if name.split(".")[-2] in ("in_proj", "out_proj") else "matrices"
    return "ssm" if name.rsplit(".", 1)[-1] in MAMBA_SSM_PARAMS else "controls"  # gains, mixes, skip weights

def build_optimizers(model, hp):
    """Muon for the matrices, Adam for the rest; each group's base_lr is scaled by the schedule."""
    g = {k: [] for k in ("matrices", "mamba_matrices", "embeddings", "head", "controls", "ssm")}
    for name, p in model.named_parameters():
        g[param_group(name, p)].append(p)
    muon_groups = [dict(params=ps, lr=lr, base_lr=lr) for ps, lr in
                   ((g["matrices"], hp.matrix_lr), (g["mamba_matrices"], hp.mamba_matrix_lr)) if ps]
    embed_lr = hp.tied_embed_lr if hp.tie_embeddings else hp.embed_lr
    adam_groups = [dict(params=ps, lr=lr, base_lr=lr, weight_decay=wd) for ps, lr, wd in
                   ((g["embeddings"], embed_lr, hp.embed_wd), (g["head"], hp.head_lr, 0.0),
                    (g["controls"], hp.scalar_lr, hp.adam_wd), (g["ssm"], hp.scalar_lr, 0.0)) if ps]
    opts = [torch.optim.AdamW(adam_groups, betas=(hp.beta1, hp.beta2), eps=hp.adam_eps,
                              fused=next(model.parameters()).is_cuda)]
    if muon_groups:
        opts.append(Muon(muon_groups, lr=hp.matrix_lr, momentum=hp.muon_momentum, backend_steps=hp.muon_backend_steps,
                         weight_decay=hp.muon_wd, row_norm=hp.muon_row_norm, ns=hp.muon_ns))
    return opts

# ----------------------------------------------------------------------------------------------
# TRAINING

class NonFiniteLoss(RuntimeError):
    pass

def training_fraction(step, elapsed_s, hp, train_budget_s):
    """How far training is, in [0, 1]: by the wall clock when there is a budget, else by steps."""
    frac = elapsed_s / train_budget_s if train_budget_s > 0 else step / hp.iterations
    return min(max(frac, 0.0), 1.0)

def lr_scale(step, frac, hp):
    """Linear warmup over LR_WARMUP_STEPS, flat, then a linear fall to MIN_LR over the last WARMDOWN_FRAC."""
    warm = min(1.0, (step + 1) / hp.lr_warmup_steps) if hp.lr_warmup_steps else 1.0
    if hp.warmdown_frac == 0 or frac < 1 - hp.warmdown_frac:
        return warm
    return warm * max((1 - frac) / hp.warmdown_frac, hp.min_lr)

class EMA:
    """Weights' moving average; the decay ramps up as (1 + t) / (10 + t), so that the random init soon fades."""

    def __init__(self, model, decay):
        self.decay, self.updates = decay, 0
        self.params = [p.detach().float().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model):
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        torch._foreach_lerp_(self.params, [p.detach().float() for p in model.parameters()], 1 - decay)

    @torch.no_grad()
    def copy_to(self, model):
        for p, e in zip(model.parameters(), self.params):
            p.copy_(e.to(p.dtype))

def autocast(device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

def average_gradients(params, ctx):
    """Every rank's gradients replaced by their mean, in one all-reduce (a missing gradient counts as zeros). Not
    DDP: it makes torch.compile split the model into a graph per gradient bucket, to overlap a ~1 ms all-reduce."""
    for p in params:  # on one rank too, so that a step without data does the same everywhere
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not ctx.distributed:
        return
    flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.AVG)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).to(p.dtype)

def train_step(model, opts, loader, hp, ctx, step, lr_mult):
    """One optimizer step over GRAD_ACCUM_STEPS micro-batches at lr_mult x each group's base LR -> mean loss."""
    local_tokens = hp.train_batch_tokens // (ctx.world_size * hp.grad_accum_steps)
    total = torch.zeros((), device=ctx.device)
    for micro in range(hp.grad_accum_steps):
        x, y = loader.next_batch(local_tokens, hp.train_seq_len)
        with autocast(ctx.device):
            loss = model(x, y).mean()
        (loss / hp.grad_accum_steps).backward()
        total += loss.detach() / hp.grad_accum_steps
    average_gradients(list(model.parameters()), ctx)
    frac = min(1.0, step / hp.muon_momentum_warmup_steps) if hp.muon_momentum_warmup_steps else 1.0
    for opt in opts:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_mult
            if isinstance(opt, Muon):
                g["momentum"] = (1 - frac) * hp.muon_momentum_warmup_start + frac * hp.muon_momentum
    if hp.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip_norm)
    for opt in opts:
        opt.step()
    model.zero_grad(set_to_none=True)
    if ctx.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return total.item()

class TrainClock:
    """Training wall clock that can be paused (validation and the pre-quantization eval do not count)."""

    def __init__(self):
        self.start, self.excluded = time.time(), 0.0

    def elapsed(self):
        return time.time() - self.start - self.excluded

    @contextlib.contextmanager
    def paused(self):
        t = time.time()
        try:
            yield
        finally:
            self.excluded += time.time() - t

def rank0_value(value, ctx):
    """Rank 0's value on every rank: decisions by the clock (LR, stopping, GPTQ's deadline) must agree."""
    if not ctx.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.broadcast(t, 0)
    return t.item()

def train_loop(model, base_model, opts, loader, hp, ctx, clock, log=print, validate=None):
    """Steps until ITERATIONS or the wall clock (less the GPTQ reserve) -> (steps, EMA or None); NonFiniteLoss."""
    ema = EMA(base_model, hp.ema_decay) if hp.ema_decay > 0 else None
    cap = hp.max_wallclock_seconds
    budget = max(cap - hp.gptq_reserve_seconds, 0.0) if cap > 0 else 0.0
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step, last_finite = 0, None
    while step < hp.iterations:
        elapsed = rank0_value(clock.elapsed(), ctx)
        if cap > 0 and elapsed >= budget:
            break
        frac = training_fraction(step, elapsed, hp, budget)
        if hp.recur_layers and not base_model.looping and frac >= hp.recur_start_frac:
            base_model.looping = True
            log(f"recurrence on at step {step} ({frac:.0%} of training): {len(base_model.order)} layers as run")
        loss = train_step(model, opts, loader, hp, ctx, step, lr_scale(step, frac, hp))
        if not math.isfinite(loss):
            last = "none yet" if last_finite is None else f"{last_finite[1]:.4f} at step {last_finite[0]}"
            raise NonFiniteLoss(f"non-finite train loss {loss} at step {step}; last finite loss: {last}. "
                                "Lower the learning rates or raise GRAD_CLIP_NORM's strength.")
        last_finite = (step, loss)
        if ema is not None:
            ema.update(base_model)
        step += 1
        if step % hp.train_log_every == 0 or step == 1:
            elapsed = clock.elapsed()
            step_s = elapsed / step
            eta = min((hp.iterations - step) * step_s, budget - elapsed if cap > 0 else math.inf)
            log(f"step:{step}/{hp.iterations} train_loss:{loss:.4f} step_ms:{1000 * step_s:.1f} "
                f"tok/s:{hp.train_batch_tokens / step_s:,.0f} train_time:{elapsed:.0f}s eta:{max(eta, 0):.0f}s")
        if validate is not None and hp.val_loss_every and step % hp.val_loss_every == 0:
            validate(step)
    return step, ema

# ----------------------------------------------------------------------------------------------
# QUANTIZATION AND EXPORT: int6 GPTQ for large matrices, int8 embeddings, float for the small and
# SSM-control tensors; a JSON header + raw bytes, LZMA-compressed. No pickle anywhere.

QMAX = {"int4": 7, "int5": 15, "int6": 31, "int8": 127}  # the kinds of integer payload; int6 is the default
INT6_MAX, INT8_MAX = QMAX["int6"], QMAX["int8"]
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)

def quant_kind(name, p):
    if name.startswith(("tok_emb.", "bigram.embed.", "lm_head.")):
        return "int8"
    if p.ndim == 2 and name.endswith(".weight"):
        return "int6"
    return "float"

def row_scales(w, qmax, sigmas=0.0):
    """Per-row grid step: max |w| / qmax, so nothing clips; or with sigmas > 0, sigmas x the row's std / qmax (values
    past qmax steps clip): wider bins leave fewer distinct values, which LZMA codes in fewer bits."""
    spread = w.abs().amax(dim=-1)
    if sigmas:
        std = w.std(dim=-1)
        spread = torch.where(std > 0, sigmas * std, spread)  # a constant row (std 0) keeps its exact max step
    # fp16 is how scales are stored, so round first: the quantizer then sees the exact stored scale
    return (spread / qmax).half().float().clamp_min(2**-24)  # 2**-24: fp16's smallest step

def round_to_grid(w, scale, qmax):
    """Round to nearest on per-row grids: integer levels (as floats) in [-qmax, qmax]."""
    return torch.clamp(torch.round(w / scale[..., None]), -qmax, qmax)

def hessian_row_errors(E, H):
    """Per row r of a weight error E, E_r H E_r^T: that output's summed squared error on inputs whose x x^T sum to H."""
    E = E.to(H.device)
    return ((E @ H) * E).sum(dim=-1)

def quantize_rtn(w, qmax, sigmas=0.0):
    scale = row_scales(w, qmax, sigmas)
    return round_to_grid(w, scale, qmax).to(torch.int8), scale

def clip_scales(W, H, qmax, ratios=CLIP_RATIOS):
    """Per row, the clipped scale (ratio x max |w| / qmax, ratio 1 included) of least Hessian-weighted RTN error."""
    amax = W.abs().amax(dim=-1)
    best_err = best_scale = None
    for ratio in ratios:
        scale = (amax * ratio / qmax).half().float().clamp_min(2**-24)
        err = hessian_row_errors(W - round_to_grid(W, scale, qmax) * scale[..., None], H)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
    return best_scale

def quantize_gptq(w, H, qmax=INT6_MAX, block=128, damp=0.01, clip=True, sigmas=0.0):
    """GPTQ of one matrix: quantize_gptq_batch for a batch of one."""
    q, s = quantize_gptq_batch(w[None], H[None], qmax, block, damp, clip, sigmas)
    return q[0], s[0]

def quantize_gptq_batch(W, H, qmax=INT6_MAX, block=128, damp=0.01, clip=True, sigmas=0.0):
    """GPTQ on a stack W (n, rows, cols) with Hessians H (n, cols, cols) in one (launch-bound) column loop: columns
    largest Hessian diagonal first, each one's rounding error pushed onto the rest. With clip, full-range and
    clip_scales' scales are both tried, the better kept per matrix; with sigmas > 0 the row's std fixes the step."""
    H = H.float().clone()
    W = W.float().to(H.device).clone()
    n, rows, cols = W.shape
    diag = H.diagonal(dim1=-2, dim2=-1)  # a view: writes go to H
    dead = diag == 0
    diag[dead] = 1.0
    W.masked_fill_(dead[:, None, :], 0.0)
    order = torch.argsort(diag, dim=-1, descending=True)
    unorder = torch.argsort(order, dim=-1)
    Hd = H.gather(1, order[:, :, None].expand(n, cols, cols)).gather(2, order[:, None, :].expand(n, cols, cols))
    Hd += damp * Hd.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(cols, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    Wo = W.gather(2, order[:, None, :].expand(n, rows, cols))
    best = None
    for scale in [row_scales(W, qmax, sigmas)] + ([clip_scales(W, H, qmax)] if clip and not sigmas else []):
        Q = gptq_columns(Wo.clone(), Hinv, scale, qmax, block).gather(2, unorder[:, None, :].expand(n, rows, cols))
        err = hessian_row_errors(W - Q.float() * scale[..., None], H).sum(-1)
        if best is None:
            best = (err, Q, scale)
        else:
            better = err < best[0]
            best = (torch.where(better, err, best[0]), torch.where(better[:, None, None], Q, best[1]),
                    torch.where(better[:, None], scale, best[2]))
    return best[1], best[2]

def gptq_columns(W, Hinv, scale, qmax, block):
    """GPTQ's column loop on a stack W (n, rows, cols), columns already in quantization order (W is
    overwritten); Hinv (n, cols, cols) upper Cholesky factors, scale (n, rows)."""
    n, rows, cols = W.shape
    Q = torch.zeros(n, rows, cols, dtype=torch.int8, device=W.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, :, i1:i2].clone(), Hinv[:, i1:i2, i1:i2]
        errors = torch.zeros_like(W1)
        for i in range(i2 - i1):
            q = torch.clamp(torch.round(W1[:, :, i] / scale), -qmax, qmax)
            Q[:, :, i1 + i] = q.to(torch.int8)
            err = (W1[:, :, i] - q * scale) / Hinv1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * Hinv1[:, i, i:][:, None, :]
            errors[:, :, i] = err
        W[:, :, i2:] -= errors @ Hinv[:, i1:i2, i2:]
    return Q

@contextlib.contextmanager
def tf32_matmuls():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before

def collect_hessians(model, batches, ctx, names, log=None):
    """H = sum over calibration tokens of x x^T for the input x of each named matrix: a linear layer's, or
    for the tied embedding ("tok_emb.weight", also the output head) the final hidden state."""
    modules = dict(model.named_modules())
    hessians, hooks = {}, []

    def accumulate(key, x):
        x = x.detach().reshape(-1, x.size(-1)).float()
        with tf32_matmuls():  # fp32 x^T x over millions of tokens: TF32 is several times faster, error ~1e-3
            hessians[key].addmm_(x.T, x)
    for name in names:
        if name == "tok_emb.weight":
            assert model.lm_head is None, "the embedding reads no hidden state unless it is the tied head"
            hessians[name] = torch.zeros(model.tok_emb.embedding_dim, model.tok_emb.embedding_dim, device=ctx.device)
            continue
        mod = modules[name.removesuffix(".weight")]
        hessians[name] = torch.zeros(mod.in_features, mod.in_features, device=ctx.device)
        hooks.append(mod.register_forward_pre_hook(lambda m, inputs, key=name: accumulate(key, inputs[0])))
    model.eval()
    every, t0 = max(1, len(batches) // 10), time.time()
    with torch.no_grad(), autocast(ctx.device):
        for n, (x, y) in enumerate(batches):
            if log is not None and n and n % every == 0:  # rank 0 reports about every tenth of the way
                log(f"  hessians {n}/{len(batches)} batches elapsed:{time.time() - t0:.0f}s")
            h = model.hidden(x)
            if "tok_emb.weight" in hessians:
                accumulate("tok_emb.weight", h)
    for h in hooks:
        h.remove()
    if ctx.distributed:
        for H in hessians.values():
            dist.all_reduce(H)
    return hessians

def quantize_model(model, hessians, deadline=None, log=print, clip=True, agree=bool, sigmas=0.0, embed_sigmas=0.0):
    """-> {name: (kind, q, scale)}: int6 matrices and int8 tables (sigmas, embed_sigmas: their row_scales), by batched
    GPTQ where a Hessian exists (RTN without one, or past the deadline); float (q the tensor, scale None) the rest."""
    state = {n: p.detach().float().cpu() for n, p in model.state_dict().items()}
    out, batches, late = {}, {}, 0
    for name, p in model.state_dict().items():
        kind = quant_kind(name, p)
        if kind == "float":
            out[name] = (kind, state[name], None)
        elif name in hessians:
            batches.setdefault((kind, tuple(p.shape)), []).append(name)
        else:  # the int8 tables without a Hessian: all but the tied embedding
            out[name] = (kind, *quantize_rtn(state[name], QMAX[kind], sigmas if kind == "int6" else embed_sigmas))
    t0 = time.time()
    for (kind, _), names in batches.items():
        step = sigmas if kind == "int6" else embed_sigmas
        if agree(deadline is None or time.time() < deadline):
            H = torch.stack([hessians[n] for n in names])
            Q, S = quantize_gptq_batch(torch.stack([state[n] for n in names]).to(H.device), H, QMAX[kind], clip=clip,
                                       sigmas=step)
            out.update({n: (kind, q.cpu(), s.cpu()) for n, q, s in zip(names, Q, S)})
            if time.time() - t0 > 5:  # progress only where GPTQ is slow (a CPU, a huge model)
                log(f"  gptq {len(names)} x {kind} {tuple(Q.shape[1:])} done, elapsed:{time.time() - t0:.0f}s")
        else:
            late += len(names)
            out.update({n: (kind, *quantize_rtn(state[n], QMAX[kind], step)) for n in names})
    if late:
        log(f"WARNING: wall clock reached during GPTQ: {late} matrices fell back to round-to-nearest")
    return {name: out[name] for name in state}

# lc=lp=pb=0: quantized weights are near-iid bytes, so LZMA's literal-context and position bits only cost.
# The fp16 scales and tensors, in streams of their own, get their field width as position bits
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9, "lc": 0, "lp": 0, "pb": 0}]
PART_FILTERS = {"header": LZMA_FILTERS, "values": LZMA_FILTERS, "scales": [dict(LZMA_FILTERS[0], lp=1)],
                "floats": [dict(LZMA_FILTERS[0], lp=1)]}
PART_WIDTH = {"header": 1, "values": 1, "scales": 2, "floats": 2}  # bytes per element
ARTIFACT_MAGIC = b"PGQ3"
CODECS = ("xz", "brotli", "brotli-shuffled")  # shuffled: byte k of every element together (fields compress apart)
# parts are coded in 4 MiB chunks, all at once in threads (brotli is slow on one large piece; chunks compress as well)
CHUNK_BYTES = 2**22

def byte_shuffle(data, width, inverse=False):
    if width == 1:
        return data
    a = np.frombuffer(data, np.uint8)
    return (a.reshape(width, -1).T if inverse else a.reshape(-1, width).T).tobytes()

def codec_jobs(data, part):
    """{codec index: a function compressing data}: xz, and brotli plain and byte-shuffled where it imports."""
    jobs = {0: lambda: lzma.compress(data, format=lzma.FORMAT_XZ, filters=PART_FILTERS[part])}
    try:
        import brotli
        jobs[1] = lambda: brotli.compress(data, quality=11, lgwin=24)
        if PART_WIDTH[part] > 1:
            jobs[2] = lambda: brotli.compress(byte_shuffle(data, PART_WIDTH[part]), quality=11, lgwin=24)
    except ImportError:
        pass
    return jobs

def decompress_part(codec, payload, part):
    if codec == 0:
        return lzma.decompress(payload)
    try:
        import brotli
    except ImportError:
        raise ValueError(f"the artifact's {part} are brotli-compressed: pip install brotli") from None
    return byte_shuffle(brotli.decompress(payload), PART_WIDTH[part], inverse=True) if codec == 2 else brotli.decompress(payload)

def serialize(quantized):
    """The artifact: magic, the SHA-256 of the rest, then four parts, each ( uint32 chunk count | per chunk: codec
    byte | uint32 length | payload ): the JSON header, the integer values (one byte each), the fp16 row scales,
    the fp16 tensors, the last three in the header's tensor order. Each chunk gets its smallest codec."""
    entries, parts = [], {"values": [], "scales": [], "floats": []}
    for name, (kind, q, s) in quantized.items():
        entries.append(dict(name=name, kind=kind, shape=list(q.shape)))
        if kind == "float":  # gains, mixes and SSM controls
            parts["floats"].append(q.numpy().astype("<f2").tobytes())
        else:  # a byte per value: the compressors code the peaked distribution better than 6-bit packing
            parts["values"].append(q.numpy().astype(np.int8).tobytes())
            parts["scales"].append(s.numpy().astype("<f2").tobytes())
    data = {"header": json.dumps(entries).encode(), **{k: b"".join(v) for k, v in parts.items()}}
    chunks = {part: [raw[i:i + CHUNK_BYTES] for i in range(0, len(raw), CHUNK_BYTES)] or [b""]
              for part, raw in data.items()}
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # both libraries release the GIL
        futures = {part: [{c: pool.submit(job) for c, job in codec_jobs(chunk, part).items()} for chunk in cs]
                   for part, cs in chunks.items()}
        body = b""
        for part, per_chunk in futures.items():
            body += len(per_chunk).to_bytes(4, "little")
            for candidates in per_chunk:
                codec, payload = min(((c, f.result()) for c, f in candidates.items()), key=lambda cp: len(cp[1]))
                body += bytes([codec]) + len(payload).to_bytes(4, "little") + payload
    return ARTIFACT_MAGIC + hashlib.sha256(body).digest() + body

def artifact_parts(blob):
    """{part: [(codec index, payload) per chunk]} of an artifact, after checking its magic and checksum."""
    if blob[:4] != ARTIFACT_MAGIC:
        raise ValueError(f"not an artifact of this train_gpt.py: it starts {blob[:4]!r}, not {ARTIFACT_MAGIC!r}")
    body = blob[36:]
    if len(blob) < 36 or hashlib.sha256(body).digest() != blob[4:36]:
        raise ValueError(f"the artifact ({len(blob):,} bytes) fails its SHA-256 check: truncated or corrupted")
    parts, pos = {}, 0
    for part in PART_WIDTH:
        count, pos = int.from_bytes(body[pos:pos + 4], "little"), pos + 4
        parts[part] = []
        for _ in range(count):
            codec, size = body[pos], int.from_bytes(body[pos + 1:pos + 5], "little")
            parts[part].append((codec, body[pos + 5:pos + 5 + size]))
            pos += 5 + size
    return parts

def deserialize(blob):
    """Artifact bytes -> state dict of float tensors (dequantized)."""
    raw = {part: b"".join(decompress_part(c, payload, part) for c, payload in chunks)
           for part, chunks in artifact_parts(blob).items()}
    entries = json.loads(raw["header"])
    ints = [e for e in entries if e["kind"] != "float"]
    sizes = {"values": sum(math.prod(e["shape"]) for e in ints), "scales": sum(2 * e["shape"][0] for e in ints),
             "floats": 2 * sum(math.prod(e["shape"]) for e in entries if e["kind"] == "float")}
    for part, size in sizes.items():
        if len(raw[part]) != size:
            raise ValueError(f"artifact {part}: {len(raw[part]):,} bytes where its header describes {size:,}")
    pos = dict.fromkeys(sizes, 0)

    def take(part, size, dtype):
        data = np.frombuffer(raw[part][pos[part]:pos[part] + size], dtype).copy()
        pos[part] += size
        return torch.from_numpy(data)
    state = {}
    for e in entries:
        shape, numel = e["shape"], math.prod(e["shape"])
        if e["kind"] == "float":
            state[e["name"]] = take("floats", 2 * numel, "<f2").float().view(shape)
        else:
            q = take("values", numel, np.int8).view(shape).float()
            state[e["name"]] = q * take("scales", 2 * shape[0], "<f2").float()[:, None]
    return state

def entropy_bytes(q):
    """Bytes an ideal coder needs for q's values (order-0 entropy): LZMA lands near it on weights."""
    counts = torch.bincount(q.flatten().to(torch.int64) + 128, minlength=256).double()
    p = counts[counts > 0] / q.numel()
    return float(-(p * p.log2()).sum()) * q.numel() / 8

def estimated_bytes(quantized):
    return sum(2 * q.numel() if kind == "float" else entropy_bytes(q) + 2 * q.size(0)
               for kind, q, s in quantized.values())

LOWER_KIND = {"int6": "int5", "int5": "int4"}

def fit_to_cap(quantized, model, hessians, limit_bytes, min_bits=4, clip=True, log=print, sigmas=0.0):
    """The serialized model, at most limit_bytes. Over the cap, whole matrices go down one bit width at a time
    (int6 -> int5 -> int4, not below QUANT_MIN_BITS), cheapest first: a step's price is its increase in
    Hessian-weighted error per byte saved (by the values' entropy). Still over at QUANT_MIN_BITS: a loud stop."""
    t0 = time.time()
    raw_mb = sum(q.numel() * (2 if kind == "float" else 1) for kind, q, _ in quantized.values()) / 1e6
    log(f"export: compressing {raw_mb:.1f} MB (xz and brotli each part; minutes at brotli's quality 11)")
    blob = serialize(quantized)
    log(f"export: {len(blob):,} model bytes in {time.time() - t0:.0f}s")
    if len(blob) <= limit_bytes:
        return blob
    log(f"export: {len(blob):,} model bytes > {limit_bytes:,}: lowering bit widths, cheapest first "
        f"(QUANT_MIN_BITS={min_bits})")
    quantized = dict(quantized)
    weights = {n: p.detach().float().cpu() for n, p in model.state_dict().items() if quantized[n][0] in LOWER_KIND}

    def weighted_error(name, q, s):  # Hessian-weighted where there is a Hessian, plain squared error if not
        H = hessians.get(name)
        E = weights[name] - q.float() * s[:, None]
        return float((E.square() if H is None else hessian_row_errors(E, H)).sum())

    errors = {n: weighted_error(n, *quantized[n][1:]) for n in weights}  # of each matrix's current payload

    def next_step(name):  # (price, name, kind, q, scale, error) of going one width down, or None
        kind, q, _ = quantized[name]
        lower = LOWER_KIND.get(kind)
        if lower is None or int(lower[3:]) < min_bits:
            return None
        w, H = weights[name], hessians.get(name)  # GPTQ where there is a Hessian, else round-to-nearest
        q2, s2 = (t.cpu() for t in (quantize_rtn(w, QMAX[lower], sigmas) if H is None else
                                    quantize_gptq(w, H, QMAX[lower], clip=clip, sigmas=sigmas)))
        err2 = weighted_error(name, q2, s2)
        price = max(err2 - errors[name], 0.0) / max(entropy_bytes(q) - entropy_bytes(q2), 1.0)
        return price, name, lower, q2, s2, err2

    steps = [s for s in map(next_step, weights) if s]
    heapq.heapify(steps)
    lz_ratio = len(blob) / estimated_bytes(quantized)
    lowered = {}
    while len(blob) > limit_bytes and steps:
        estimate = estimated_bytes(quantized)
        while steps and estimate * lz_ratio > limit_bytes:
            _, name, kind, q, s, errors[name] = heapq.heappop(steps)
            estimate += entropy_bytes(q) - entropy_bytes(quantized[name][1])
            quantized[name] = (kind, q, s)
            lowered[name] = kind
            if (following := next_step(name)) is not None:
                heapq.heappush(steps, following)
        t0 = time.time()
        blob = serialize(quantized)
        log(f"export: {len(blob):,} model bytes after lowering {len(lowered)} matrices ({time.time() - t0:.0f}s)")
        lz_ratio = len(blob) / estimated_bytes(quantized)
    counts = {k: sum(v == k for v in lowered.values()) for k in ("int5", "int4")}
    log(f"export: lowered {len(lowered)} matrices (now int5: {counts['int5']}, int4: {counts['int4']}) -> "
        f"{len(blob):,} model bytes: " + ", ".join(f"{n}={k}" for n, k in lowered.items()))
    if len(blob) > limit_bytes:
        raise SystemExit(f"the model is {len(blob):,} bytes even with its matrices at QUANT_MIN_BITS={min_bits}, "
                         f"over the cap of {limit_bytes:,} model bytes: "
                         + ("allow fewer bits (QUANT_MIN_BITS=4) or " if min_bits > 4 else "")
                         + "shrink the model (NUM_LAYERS, MODEL_DIM, MLP_MULT, MAMBA_EXPAND, VOCAB_SIZE) or widen the "
                         "grids (QUANT_SIGMAS, QUANT_EMBED_SIGMAS)")
    return blob

def packed_source(code: bytes) -> bytes:
    """The train_gpt.py a submission holds (the counted code): three lines that set READABLE_SOURCE_BYTES and exec
    this source less docstrings, comments and blank lines, from LZMA + base85. The rest is kept as written (not
    ast.unparse, which prints differently on each Python), so every Python packs it to the same bytes."""
    import ast, base64, io, lzma, tokenize  # here: records/package.py compiles this function alone
    tree, lines = ast.parse(code), code.splitlines()
    cuts, kept = {}, set()  # row -> [(start, end or None: the line's end, replacement)] in UTF-8 byte columns
    for tok in tokenize.tokenize(io.BytesIO(code).readline):
        if tok.type == tokenize.COMMENT:
            cuts.setdefault(tok.start[0], []).append((len(tok.line[:tok.start[1]].encode()), None, b""))
        elif tok.start[0] != tok.end[0] and tok.type != tokenize.NL:  # inside a multi-line string: kept as it is
            kept.update(range(tok.start[0], tok.end[0]))
    for node in ast.walk(tree):  # nothing reads __doc__
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            doc, node.body = body[0], body[1:] or [ast.Pass()]
            for row in range(doc.lineno, doc.end_lineno + 1):
                kept.discard(row)
                cuts.setdefault(row, []).append((doc.col_offset if row == doc.lineno else 0,
                                                 doc.end_col_offset if row == doc.end_lineno else None,
                                                 b"pass" if row == doc.lineno and not body[1:] else b""))
    out = []
    for row, line in enumerate(lines, 1):
        for start, end, new in sorted(cuts.get(row, []), reverse=True):
            line = line[:start] + new + (line[end:] if end is not None else b"")
        if row in kept or line.strip():
            out.append(line if row in kept else line.rstrip())
    source = b"\n".join(out) + b"\n"
    try:
        same = ast.dump(ast.parse(source)) == ast.dump(tree)
    except SyntaxError:  # e.g. a docstring with a statement after it on its line
        same = False
    if not same:
        raise ValueError("removing docstrings and comments changed the program; not packing it")
    # LZMA1 in the .lzma container, which lzma.decompress detects by itself; the smallest settings measured
    blob = lzma.compress(source, format=lzma.FORMAT_ALONE, filters=[dict(
        id=lzma.FILTER_LZMA1, preset=9 | lzma.PRESET_EXTREME, lc=3, lp=0, pb=0, nice_len=64)])
    return (f"import lzma,base64\nREADABLE_SOURCE_BYTES={len(code)}\n"
            f'exec(lzma.decompress(base64.b85decode("{base64.b85encode(blob).decode()}")))\n').encode()

# ----------------------------------------------------------------------------------------------
# EVALUATION: every validation target scored exactly once, with as much left context as fits

def sliding_windows(lo, hi, seq_len, stride):
    """Windows (start, end, done) scoring targets lo+1..hi (target j is token j): each reads tokens[start:end+1]
    and scores targets done+1..end. The first (from token 0) scores a whole sequence, each later one `stride`."""
    if stride <= 0 or seq_len <= 0:
        raise ValueError(f"sliding windows need stride > 0 and seq_len > 0, got {stride}, {seq_len}")
    windows, done = [], lo
    while done < hi:
        end = min(hi, done + stride if done > 0 else seq_len)
        start = max(0, end - seq_len)
        windows.append((start, end, done))
        done = end
    return windows

def padded_batch(tokens, spans, rows, width):
    """Inputs tokens[s:e] and targets tokens[s+1:e+1] per span (s, e, done), right-padded to (rows, width), and the
    mask of the targets done+1..e each row scores. Right-padding is exact for a causal model: pads are never scored."""
    x = torch.zeros(rows, width, dtype=torch.int64)
    y, mask = torch.zeros_like(x), torch.zeros(rows, width, dtype=torch.bool)
    for j, (s, e, done) in enumerate(spans):
        x[j, :e - s], y[j, :e - s] = tokens[s:e], tokens[s + 1:e + 1]
        mask[j, done - s:e - s] = True
    return x, y, mask

def score_windows(model, tokens, windows, seq_len, batch_seqs, ctx, luts, log=None):
    """Summed loss (nats), target count and byte count over the windows, each rank scoring its share. Every batch
    has batch_seqs rows (the last padded with unscored rows): a compiled model sees one shape."""
    stats = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    mine = windows[len(windows) * ctx.rank // ctx.world_size: len(windows) * (ctx.rank + 1) // ctx.world_size]
    starts = range(0, len(mine), batch_seqs)
    every, t0 = max(1, len(starts) // 10), time.time()
    model.eval()
    with torch.no_grad():
        for n, i in enumerate(starts):
            if log is not None and ctx.is_main and n and n % every == 0:
                el = time.time() - t0
                log(f"  eval {n}/{len(starts)} batches elapsed:{el:.0f}s eta:{el / n * (len(starts) - n):.0f}s")
            x, y, mask = (t.to(ctx.device) for t in padded_batch(tokens, mine[i:i + batch_seqs], batch_seqs, seq_len))
            with autocast(ctx.device):
                loss = model(x, y)
            stats[0] += loss[mask].double().sum()
            stats[1] += mask.sum()
            stats[2] += target_bytes(x[mask], y[mask], luts).sum()
    if ctx.distributed:
        dist.all_reduce(stats)
    return stats

def eval_rows(hp, ctx, seq_len):
    """Sequences a scoring batch holds on each rank: VAL_BATCH_SIZE tokens over all ranks."""
    return max(1, hp.val_batch_size // (ctx.world_size * seq_len))

def stats_to_metrics(stats):
    loss_sum, count, nbytes = stats.tolist()
    return loss_sum / count, loss_sum / math.log(2) / nbytes

def evaluate(model, tokens, seq_len, stride, batch_seqs, ctx, luts, log=None):
    """(val_loss, val_bpb). stride == seq_len gives plain non-overlapping evaluation."""
    windows = sliding_windows(0, tokens.numel() - 1, seq_len, stride)
    stats = score_windows(model, tokens, windows, seq_len, batch_seqs, ctx, luts, log)
    model.train()
    return stats_to_metrics(stats)

def sgd_on_spans(model, tokens, spans, opt, epochs, rows, steps, ctx):
    """The whole model trained on this rank's spans (s, e) of tokens, rows at a time, `epochs` passes of `steps`
    steps, alike on every rank (gradients are averaged; a rank out of spans adds zeros)."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for _ in range(epochs):
        for i in range(steps):
            batch = spans[i * rows:(i + 1) * rows]
            if batch:
                x, y, valid = (t.to(ctx.device) for t in padded_batch(tokens, [(s, e, s) for s, e in batch], len(batch),
                                                                       max(e - s for s, e in batch)))
                with autocast(ctx.device):
                    loss = model(x, y)[valid].mean()
                loss.backward()
            average_gradients(params, ctx)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

def evaluate_ttt(model, tokens, hp, batch_seqs, ctx, luts, log=print):
    """Score-first test-time training: each chunk of the validation tokens is scored (no grad) with the weights
    adapted on earlier chunks only, then (all but the last) trained on -> (val_loss, val_bpb, per-chunk stats)."""
    n, L = tokens.numel() - 1, hp.eval_seq_len
    bounds = list(range(0, n, hp.ttt_chunk_tokens)) + [n]
    # one scoring batch shape for every chunk (a compiled model compiles it once): this rank's share of a chunk
    rows = min(batch_seqs, math.ceil(math.ceil(hp.ttt_chunk_tokens / hp.eval_stride) / ctx.world_size))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=hp.ttt_lr, momentum=hp.ttt_momentum)
    total, per_chunk, t0, score_s = torch.zeros(3, dtype=torch.float64, device=ctx.device), [], time.time(), 0.0
    num_chunks = len(bounds) - 1
    for ci, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        t_score = time.time()
        stats = score_windows(model, tokens, sliding_windows(lo, hi, L, hp.eval_stride), L, rows, ctx, luts)
        per_chunk.append(stats.cpu())
        score_s += time.time() - t_score
        total += stats
        if ci == num_chunks - 1:
            break
        for g in opt.param_groups:
            g["lr"] = hp.ttt_lr * 0.5 * (1 + math.cos(math.pi * ci / max(num_chunks - 1, 1)))
        seq_len = min(L, hi - lo)
        spans = [(lo + i * seq_len, lo + (i + 1) * seq_len) for i in range(max(1, (hi - lo) // L))]
        steps = math.ceil(math.ceil(len(spans) / ctx.world_size) / batch_seqs)  # the same on every rank
        sgd_on_spans(model, tokens, spans[ctx.rank::ctx.world_size], opt, hp.ttt_epochs, batch_seqs, steps, ctx)
        el = time.time() - t0
        if ci == 0:
            first_s = el  # the first chunk compiles scoring and adapting: no rate from it
        if ctx.is_main and (ci % max(1, num_chunks // 10) == 0):
            eta = f"{(el - first_s) / ci * (num_chunks - ci - 1):.0f}s" if ci else "from chunk 2 (chunk 1 compiles)"
            log(f"ttt chunk {ci + 1}/{num_chunks} running_bpb:{stats_to_metrics(total)[1]:.4f} "
                f"elapsed:{el:.0f}s eta:{eta}")
    model.eval()
    loss, bpb = stats_to_metrics(total)
    el = time.time() - t0
    log(f"ttt: {num_chunks} chunks in {el:.1f}s: scoring {score_s:.1f}s, adapting {el - score_s:.1f}s")
    return loss, bpb, per_chunk

def document_targets(tokens, bos_id):
    """[(lo, hi)]: a document's targets are lo+1..hi (target j is token j). It runs from its BOS to the next BOS,
    which is its last target (predicted from its end), so each target of the stream is in exactly one."""
    n = tokens.numel() - 1
    starts = (tokens[:n] == bos_id).nonzero().flatten().tolist()
    bounds = ([0] if not starts or starts[0] != 0 else []) + starts + [n]
    return [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]

def attach_doc_lora(model, rows, rank, generator, ssm=False):
    """A fresh LoRA per batch row on the blocks' linear maps and the head (A random, B zero: the model starts as it
    is); with ssm, a zero shift of each Mamba-2's dt bias too. -> the factors, what document TTT adapts."""
    factors, dev = [], generator.device

    def new(out_features, in_features):
        a = torch.randn(rows, rank, in_features, generator=generator, device=dev) / math.sqrt(in_features)
        factors.extend([a.requires_grad_(), torch.zeros(rows, out_features, rank, device=dev, requires_grad=True)])
        return factors[-2:]
    for m in model.blocks.modules():
        if isinstance(m, CastedLinear):
            m.lora = new(*m.weight.shape)
        elif isinstance(m, Mamba2) and ssm:
            m.dt_delta = torch.zeros(rows, m.nheads, device=dev, requires_grad=True)
            factors.append(m.dt_delta)
    model.head_lora = new(*(model.tok_emb.weight if model.lm_head is None else model.lm_head.weight).shape)
    return factors

def detach_doc_lora(model):
    for m in model.modules():
        if isinstance(m, CastedLinear):
            m.lora = None
        elif isinstance(m, Mamba2):
            m.dt_delta = None
    model.head_lora = None

def evaluate_doc_ttt(model, tokens, hp, ctx, luts, log=print):
    """Score-first TTT per document (its context: its own tokens, at most EVAL_SEQ_LEN), a fresh LoRA adapted by an
    Adam step after each TTT_DOC_CHUNK of its targets is scored: each target by weights that saw only earlier ones
    (and, phased, earlier documents) -> (val_loss, val_bpb, this rank's loss of each target, 0 for other ranks')."""
    E, K, rows = hp.eval_seq_len, hp.ttt_doc_chunk, hp.ttt_doc_batch
    docs = document_targets(tokens, model.bos_id)
    mine = sorted(docs[ctx.rank::ctx.world_size], key=lambda d: d[0] - d[1])  # longest first: similar rows together
    batches = [mine[i:i + rows] for i in range(0, len(mine), rows)]
    # the batches after which a phase trains the whole model: alike on every rank (each has this many documents)
    prefix = round(hp.ttt_doc_prefix * (len(docs) // ctx.world_size)) if hp.ttt_doc_phases else 0
    phase_after = sorted({math.ceil(prefix * (p + 1) / hp.ttt_doc_phases / rows) - 1 for p in range(hp.ttt_doc_phases)}
                         if prefix else set())
    stats = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    per_target = torch.zeros(tokens.numel(), device=ctx.device)  # on the device: no host sync a step
    frozen = [p for p in model.parameters() if p.requires_grad]

    def trainable(flag):  # the model's own weights: frozen while LoRAs adapt, trained in a phase
        for p in frozen:
            p.requires_grad_(flag)
    trainable(False)
    generator = torch.Generator(device=ctx.device).manual_seed(hp.seed)
    t0, every = time.time(), max(1, len(batches) // 10)
    log(f"ttt doc: {len(docs)} documents, {len(batches)} batches of up to {rows} a rank, a step every {K} targets, "
        f"LoRA rank {hp.ttt_doc_rank}" + (f", phases after batches {[b + 1 for b in phase_after]}" if phase_after else ""))
    model.eval()
    for bi, batch in enumerate(batches):
        opt = torch.optim.Adam(attach_doc_lora(model, len(batch), hp.ttt_doc_rank, generator, hp.ttt_doc_ssm),
                               lr=hp.ttt_doc_lr)
        chunks = [math.ceil((hi - lo) / K) for lo, hi in batch]
        for c in range(max(chunks)):
            # longest first, so the documents with targets left are the batch's first rows: only they run
            live = sum(n > c for n in chunks)
            # row i scores targets lo+cK+1..t from the window tokens[w:t], w >= lo
            spans = [(max(lo, t - E), t, lo + c * K) for lo, hi in batch[:live] for t in [min(lo + (c + 1) * K, hi)]]
            width = max(t - w for w, t, _ in spans)
            x, y, scored = (t.to(ctx.device) for t in padded_batch(tokens, spans, live, width))
            with autocast(ctx.device):
                loss = model(x, y)
            stats += torch.stack([loss.detach()[scored].double().sum(), scored.sum().double(),
                                  target_bytes(x[scored], y[scored], luts).sum()])
            targets = (torch.tensor([w + 1 for w, _, _ in spans])[:, None] + torch.arange(width)).to(ctx.device)
            per_target[targets[scored]] = loss.detach()[scored].float()
            adapt = scored & torch.tensor([c < n - 1 for n in chunks[:live]], device=ctx.device)[:, None]
            if adapt.any():  # each row's factors get only its own document's gradient
                (loss[adapt].sum() / adapt.sum()).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        if bi in phase_after:  # only documents whose every target is scored: this batch's and those before
            detach_doc_lora(model)
            trainable(True)
            scored_docs = mine[:(bi + 1) * rows]
            spans = [(w, min(w + E, hi)) for lo, hi in scored_docs for w in range(lo, hi, E)]
            steps = torch.tensor([math.ceil(len(spans) / rows)], device=ctx.device)
            if ctx.distributed:
                dist.all_reduce(steps, op=dist.ReduceOp.MAX)
            t_phase = time.time()
            sgd_on_spans(model, tokens, spans, torch.optim.SGD(frozen, lr=hp.ttt_lr, momentum=hp.ttt_momentum),
                         hp.ttt_epochs, rows, int(steps), ctx)
            model.eval()
            trainable(False)
            log(f"ttt doc phase after batch {bi + 1}: the model trained on {len(scored_docs)} documents a rank "
                f"({time.time() - t_phase:.1f}s)")
        if ctx.is_main and (bi + 1) % every == 0:
            el = time.time() - t0
            log(f"ttt doc batch {bi + 1}/{len(batches)} running_bpb:{stats_to_metrics(stats)[1]:.4f} "
                f"elapsed:{el:.0f}s eta:{el / (bi + 1) * (len(batches) - bi - 1):.0f}s")
    detach_doc_lora(model)
    trainable(True)
    if ctx.distributed:
        dist.all_reduce(stats)
    log(f"ttt: {len(docs)} documents in {time.time() - t0:.1f}s")
    return (*stats_to_metrics(stats), per_target.cpu())

# ----------------------------------------------------------------------------------------------
# MAIN

class Context:
    @staticmethod
    def launcher(environ=None):
        """(distributed, rank, world size, local rank) as torchrun's variables give them; no process group."""
        env = os.environ if environ is None else environ
        return ("RANK" in env and "WORLD_SIZE" in env, int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                int(env.get("LOCAL_RANK", 0)))

    def __init__(self):
        self.distributed, self.rank, self.world_size, self.local_rank = self.launcher()
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", device_id=self.device if cuda else None)
        self.is_main = self.rank == 0

def compile_model(model, mode):
    """COMPILE=1: one graph for the whole model (most fusion); 2: each block on its own (identical ones share it)."""
    if mode == 1:
        return torch.compile(model, dynamic=False)
    if mode == 2:
        # one cache entry per block kind x shape x grad mode (training, scoring, TTT): more than dynamo's 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
        for block in model.blocks:
            block.compile(dynamic=False)
    return model

def check_ranks_in_sync(model, ctx, log):
    """Every rank must hold the same weights (rank 0 exports what all evaluate): a float64 checksum each, compared."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        local = torch.stack([sum(p.double().sum() for p in model.parameters()),
                             sum(p.double().square().sum() for p in model.parameters())])
    sums = [torch.zeros_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(sums, local)
    if any(not torch.equal(s, sums[0]) for s in sums):
        raise RuntimeError("ranks diverged: parameter checksums " + ", ".join(f"{s[0].item():.17g}" for s in sums))
    log(f"ranks in sync: {ctx.world_size} ranks, parameter checksum {sums[0][0].item():.12g}")

def layer_map(model):
    """The layers as the final model runs them (with the recurrence, if any)."""
    looping, model.looping = model.looping, True
    skips, order, n = model.skip_map(), model.order, model.num_encoder
    model.looping = looping
    lines = []
    for i, block in enumerate(order):  # i: position as run; block: which weights (differ under RECUR_LAYERS)
        role = "encoder" if i < n else "decoder"
        which = "" if block == i else f" (block {block}{', again' if block in order[:i] else ''})"
        skip = f" <- skip from layer {skips[i]}" if i in skips else ""
        b = model.blocks[block]
        mlp = ("||mlp" if b.parallel else "+mlp") if b.mlp is not None else ""
        mixer = "mamba2" if model.is_mamba[block] else "attention&mamba2" if b.branch is not None else "attention"
        lines.append(f"  layer {i:2d}{which} {role}: {mixer}{mlp}{skip}")
    return "\n".join(lines)

def describe(hp, model, log, code_bytes):
    log("config " + json.dumps(hp.resolved, sort_keys=True))
    for note in hp.notes:
        log(f"note: {note}")
    log("layer map:\n" + layer_map(model))
    report = parameter_report(model)
    log("params " + " ".join(f"{k}:{v:,}" for k, v in report.items()))
    kinds = [(quant_kind(n, p), p) for n, p in model.named_parameters()]
    int6, int8 = (sum(p.numel() for k, p in kinds if k == kind) for kind in ("int6", "int8"))
    flt, cap = report["total"] - int6 - int8, int(hp.target_mb * 1e6)
    rows = sum(p.size(0) for k, p in kinds if k != "float")
    # bytes a value after compression: a Gaussian row's entropy on its grid, fitted on trained runs
    # (docs/quantization.md); row scales about a byte each, the float tensors fp16
    def value_bytes(qmax, sigmas):
        return (2.10 + math.log2(qmax / sigmas) if sigmas else 2.25 + math.log2(qmax / 3.3)) / 8
    expected = int(value_bytes(INT6_MAX, hp.quant_sigmas) * int6 + value_bytes(INT8_MAX, hp.quant_embed_sigmas) * int8
                   + rows + 2 * flt + code_bytes)
    log(f"export: int6 {int6:,} int8 {int8:,} float {flt:,} -> about {expected:,} bytes with code (cap {cap:,})")
    if expected > cap:
        log(f"WARNING: this configuration will likely not fit TARGET_MB={hp.target_mb} (about {expected - cap:,} bytes "
            f"over, {100 * (expected - cap) / cap:.2f}%): the export will lower the cheapest matrices' bit widths "
            f"(to QUANT_MIN_BITS={hp.quant_min_bits}) and stop with an error if that is not enough. Shrink NUM_LAYERS, MODEL_DIM, MLP_MULT, "
            "MAMBA_EXPAND or VOCAB_SIZE, or widen the grids (QUANT_SIGMAS, QUANT_EMBED_SIGMAS).")
    return report

def smoke_corpus_maker():
    return Path(__file__).resolve().parent / "data" / "smoke_corpus.py"

def make_smoke_corpus(root, vocab_size):
    """SMOKE's self-made corpus and tokenizer, from data/smoke_corpus.py beside this script (not counted code)."""
    spec = importlib.util.spec_from_file_location("smoke_corpus", smoke_corpus_maker())  # main() checked it exists
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_smoke_corpus(root, vocab_size)

def unigram_bpb(train_tokens, val_tokens, vocab_size, luts):
    """Bits per byte of a unigram model fit on train (add-one), on the validation targets."""
    counts = torch.bincount(train_tokens.long(), minlength=vocab_size).double() + 1
    logp = torch.log2(counts / counts.sum())
    tgt, prev = val_tokens[1:].long(), val_tokens[:-1].long()
    return float(-logp[tgt].sum() / target_bytes(prev, tgt, luts).sum())

def write_artifact(quantized, model, hessians, hp, ctx, code_bytes, log):
    """The model fit under TARGET_MB with the code, written by rank 0 alone -> (path, artifact bytes with code)."""
    t0, cap = time.time(), int(hp.target_mb * 1e6)
    path, failure = f"logs/{hp.run_id}.artifact", None
    if ctx.is_main:  # one rank compresses: eight ranks at once would share the CPU cores eight ways
        try:
            Path(path).write_bytes(fit_to_cap(quantized, model, hessians, cap - code_bytes, hp.quant_min_bits,
                                              hp.gptq_clip_search, log=log, sigmas=hp.quant_sigmas))
        except SystemExit as e:
            failure = e
    if not rank0_value(failure is None, ctx):  # every rank stops when rank 0's export did
        raise failure if failure is not None else SystemExit("rank 0 could not fit the artifact under the cap")
    blob = Path(path).read_bytes()
    total = len(blob) + code_bytes
    parts = " ".join(f"{part}:{'+'.join(sorted({CODECS[c] for c, _ in chunks}))}:{sum(len(p) for _, p in chunks):,}"
                     for part, chunks in artifact_parts(blob).items())
    log(f"artifact: {path} model_bytes:{total - code_bytes} code_bytes:{code_bytes} total:{total} (cap {cap}) "
        f"in {time.time() - t0:.1f}s; parts {parts}")
    return path, total

def final_evaluation(model, val_tokens, hp, ctx, luts, log):
    """The loaded artifact's roundtrip (TRAIN_SEQ_LEN), sliding and TTT scores; val_bpb is the last one run."""
    L, E = hp.train_seq_len, hp.eval_seq_len
    t0 = time.time()
    loss, bpb = evaluate(model, val_tokens, L, L, eval_rows(hp, ctx, L), ctx, luts, log)
    log(f"roundtrip val_loss:{loss:.4f} val_bpb:{bpb:.4f} ({time.time() - t0:.1f}s)")
    scores = dict(val_bpb=bpb, val_loss=loss, val_bpb_roundtrip=bpb, val_bpb_sliding=None, val_bpb_ttt=None)
    if hp.eval_stride:
        t0 = time.time()
        loss, bpb = evaluate(model, val_tokens, E, hp.eval_stride, eval_rows(hp, ctx, E), ctx, luts, log)
        scores.update(val_bpb=bpb, val_loss=loss, val_bpb_sliding=bpb)
        log(f"sliding window:{E} stride:{hp.eval_stride} val_loss:{loss:.4f} val_bpb:{bpb:.4f} ({time.time() - t0:.1f}s)")
    if hp.ttt_enabled:
        t0 = time.time()
        if hp.ttt_mode == "doc":
            with torch.compiler.set_stance("force_eager"):  # a width and a LoRA per step: compiled, each would recompile
                loss, bpb, _ = evaluate_doc_ttt(model, val_tokens, hp, ctx, luts, log)
        else:
            loss, bpb, _ = evaluate_ttt(model, val_tokens, hp, eval_rows(hp, ctx, E), ctx, luts, log)
        scores.update(val_bpb=bpb, val_loss=loss, val_bpb_ttt=bpb)
        log(f"ttt val_loss:{loss:.4f} val_bpb:{bpb:.4f} ({time.time() - t0:.1f}s)")
    return scores

def stop_on_problems(problems, quiet=False):
    """Every problem found before any work, one 'error:' line each, then exit code 2 (no traceback)."""
    if problems:
        if not quiet:  # under torchrun every rank finds the same problems: rank 0 says them
            print("\n".join(f"error: {p}" for p in problems), file=sys.stderr, flush=True)
        sys.exit(2)

def main():
    t_start = time.time()
    # settings, batch geometry, machine, data and tokenizer, all checked before any work and reported together
    _, rank, world_size, local_rank = Context.launcher()
    quiet = rank != 0 or local_rank != 0
    hp = Hyperparameters(raise_errors=False)
    problems = hp.problems()
    if not hp.dry_run:
        problems += hp.world_problems(world_size) + hp.machine_problems(torch.cuda.is_available())
        if hp.smoke and not smoke_corpus_maker().is_file():
            problems.append(f"SMOKE=1 needs {smoke_corpus_maker()}: run it from the project, where data/ holds the "
                            "corpus maker")
        if not hp.smoke and hp.is_valid("SMOKE", "DRY_RUN"):  # SMOKE's data is made below, then checked
            problems += data_problems(hp)
    stop_on_problems(problems, quiet)
    # the challenge counts the packed file (packed_source): run from it (its wrapper sets READABLE_SOURCE_BYTES),
    # count it as it is; run from the readable source, count what packing it gives
    own = Path(__file__).read_bytes()
    code = own if "READABLE_SOURCE_BYTES" in globals() else packed_source(own)
    code_bytes, code_sha256 = len(code), hashlib.sha256(code).hexdigest()
    code_line = f"code_bytes:{code_bytes} (packed) readable_bytes:{globals().get('READABLE_SOURCE_BYTES', len(own))}"
    if hp.dry_run:
        if not quiet:  # torchrun starts every rank: one prints
            with torch.device("meta"):
                model = HybridGPT(hp)
            print(code_line)
            describe(hp, model, print, code_bytes)
        return
    ctx = Context()
    hp.resolve_world(ctx.world_size)  # checked above: sets GRAD_ACCUM_STEPS
    os.makedirs("logs", exist_ok=True)
    logfile = f"logs/{hp.run_id}.txt"

    def log(msg):
        if ctx.is_main:
            print(msg, flush=True)
            with open(logfile, "a") as f:
                f.write(msg + "\n")

    if hp.smoke:
        smoke_dir, problems = None, []
        if ctx.is_main:  # one corpus, made by rank 0, removed at exit whether the run succeeds or fails
            smoke_dir = tempfile.mkdtemp(prefix="smoke_")
            atexit.register(shutil.rmtree, smoke_dir, ignore_errors=True)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed by timeout or torchrun: atexit runs too
            try:
                make_smoke_corpus(smoke_dir, hp.vocab_size)
            except RuntimeError:  # SentencePiece cannot train this VOCAB_SIZE on the smoke text
                problems = [f"SMOKE=1 with VOCAB_SIZE={hp.vocab_size}: SentencePiece cannot make the smoke tokenizer "
                            f"at this size: try VOCAB_SIZE={SMOKE_DEFAULTS['VOCAB_SIZE']}"]
        if ctx.distributed:
            dist.broadcast_object_list(obj := [smoke_dir, problems])
            smoke_dir, problems = obj
        stop_on_problems(problems, not ctx.is_main)
        hp.data_path, hp.tokenizer_path = smoke_dir, str(Path(smoke_dir) / "smoke.model")
        hp.resolved.update(DATA_PATH=hp.data_path, TOKENIZER_PATH=hp.tokenizer_path)
        stop_on_problems(data_problems(hp), not ctx.is_main)
    if hp.smoke and ctx.device.type == "cpu":
        torch.set_num_threads(1)  # a tiny model: more threads only contend on a small shared machine
    random.seed(hp.seed)
    np.random.seed(hp.seed)
    torch.manual_seed(hp.seed)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=hp.tokenizer_path)  # its size against VOCAB_SIZE: checked above
    luts = tuple(t.to(ctx.device) for t in build_byte_luts(sp, hp.vocab_size))  # byte counts stay on device
    train_files = shard_files(hp.data_path, "train")
    val_tokens = load_validation_tokens(hp.data_path, hp.train_seq_len)
    stop_on_problems(validation_problems(hp, val_tokens, sp.bos_id()), not ctx.is_main)
    log(f"device:{ctx.device} world_size:{ctx.world_size} grad_accum_steps:{hp.grad_accum_steps} "
        f"train_shards:{len(train_files)} val_tokens:{val_tokens.numel():,} {code_line} code_sha256:{code_sha256}")
    if ctx.device.type == "cpu" and not hp.smoke:
        log("WARNING: ALLOW_CPU=1: training on the CPU, at the memory and speed of a CPU")
    configure_kernels(hp, ctx.device, log)

    base_model = HybridGPT(hp).to(ctx.device)
    base_model.bos_id = sp.bos_id()  # one exists where SMEAR_GATE reads it: data_problems checked
    report = describe(hp, base_model, log, code_bytes)
    model = compile_model(base_model, hp.compile) if ctx.device.type == "cuda" else base_model
    opts = build_optimizers(base_model, hp)
    loader = DistributedTokenLoader(train_files, ctx.rank, ctx.world_size, ctx.device)
    L = hp.train_seq_len
    batch_seqs = eval_rows(hp, ctx, L)

    if hp.warmup_steps:  # prime compile and kernels, then restore the initial state
        orders = [False, True] if hp.recur_layers else [False]  # both layer orders compile here, untimed
        log(f"warmup: {hp.warmup_steps} steps x {len(orders)} layer orders to compile and prime kernels "
            "(not timed; undone after)")
        t_warm = time.time()
        init_model = copy.deepcopy(base_model.state_dict())
        init_opts = [copy.deepcopy(o.state_dict()) for o in opts]
        for looping in orders:
            base_model.looping = looping
            t_order = time.time()
            for s in range(hp.warmup_steps):
                train_step(model, opts, loader, hp, ctx, s, 1.0)
                if s == 0:  # the first step compiles: minutes on a cold cache
                    log(f"warmup: {'looped' if looping else 'plain'} order, first step {time.time() - t_order:.1f}s")
            log(f"warmup: {'looped' if looping else 'plain'} order, {hp.warmup_steps} steps {time.time() - t_order:.1f}s")
        base_model.looping = False
        base_model.load_state_dict(init_model)
        for o, st in zip(opts, init_opts):
            o.load_state_dict(st)
        loader = DistributedTokenLoader(train_files, ctx.rank, ctx.world_size, ctx.device)
        log(f"warmup: {hp.warmup_steps} steps done in {time.time() - t_warm:.1f}s ({time.time() - t_start:.0f}s since "
            "start), state restored")
    if hp.warmup_steps and hp.compile and ctx.device.type == "cuda":  # compiled during the warm-up
        breaks = torch._dynamo.utils.counters["graph_break"]
        log(f"compile: {sum(breaks.values())} graph breaks" + "".join(f"\n  {n}x {r}" for r, n in breaks.items()))

    cap = hp.max_wallclock_seconds
    clock = TrainClock()

    def validate(step):
        with clock.paused():  # validation is not training time
            vl, vb = evaluate(model, val_tokens, L, L, batch_seqs, ctx, luts)
        log(f"step:{step}/{hp.iterations} val_loss:{vl:.4f} val_bpb:{vb:.4f}")

    step, ema = train_loop(model, base_model, opts, loader, hp, ctx, clock, log, validate)
    base_model.looping = bool(hp.recur_layers)  # the final model runs with its recurrence, however short the run
    check_ranks_in_sync(base_model, ctx, log)
    train_loop_s = clock.elapsed()
    step_ms = 1000 * train_loop_s / max(step, 1)
    log(f"training stopped at step {step} after {train_loop_s:.1f}s ({step_ms:.1f} ms/step)")

    # export: EMA weights, Hessians from training data, GPTQ -- all inside the training wall clock
    log(f"prequant: scoring the weights before quantization (not timed){', the last ones, then their EMA' * (ema is not None)}")
    raw_bpb = None
    if ema is not None:  # the last weights' score too: what the average gains, per model
        t_raw = time.time()
        with clock.paused():
            raw_bpb = evaluate(model, val_tokens, L, L, batch_seqs, ctx, luts, log)[1]
        log(f"raw (before EMA) val_bpb:{raw_bpb:.4f} ({time.time() - t_raw:.1f}s)")
        ema.copy_to(base_model)
    t_pre = time.time()
    with clock.paused():
        prequant_loss, prequant_bpb = evaluate(model, val_tokens, L, L, batch_seqs, ctx, luts, log)
    log(f"prequant val_loss:{prequant_loss:.4f} val_bpb:{prequant_bpb:.4f} ({time.time() - t_pre:.1f}s)")
    # the tied embedding is the output head too: GPTQ on the head's Hessian (tools/quant_study.py)
    names = [n for n, p in base_model.state_dict().items() if quant_kind(n, p) == "int6"]
    names += ["tok_emb.weight"] if base_model.lm_head is None else []
    hessians = {}
    if hp.gptq_calib_tokens >= L:
        ncal = hp.gptq_calib_tokens // L
        cal = [loader.next_batch(L * min(batch_seqs, ncal - i), L) for i in range(0, ncal, batch_seqs)]
        log(f"hessians: {len(names)} matrices from {ncal * L:,} tokens a rank in {len(cal)} batches")
        t_h = time.time()
        hessians = collect_hessians(base_model, cal, ctx, names, log)
        log(f"hessians: done in {time.time() - t_h:.1f}s")
    log(f"gptq: start, {len(hessians)} matrices with Hessians")
    t_q = time.time()
    deadline = time.time() + cap - clock.elapsed() if cap > 0 else None
    quantized = quantize_model(base_model, hessians, deadline, log, clip=hp.gptq_clip_search,
                               agree=lambda in_time: bool(rank0_value(in_time, ctx)), sigmas=hp.quant_sigmas,
                               embed_sigmas=hp.quant_embed_sigmas)
    train_seconds = clock.elapsed()
    grid = lambda sigmas, qmax: f"{sigmas:g} stds/{qmax}" if sigmas else f"max|w|/{qmax}"
    log(f"gptq: {len(hessians)} matrices with Hessians, {time.time() - t_q:.1f}s; train_seconds:{train_seconds:.1f}"
        + (f" (cap {cap:.0f}s)" if cap else "") + f"; steps: int6 {grid(hp.quant_sigmas, INT6_MAX)}"
        + (" or clipped" if hp.gptq_clip_search and not hp.quant_sigmas else "")
        + f", int8 {grid(hp.quant_embed_sigmas, INT8_MAX)}")

    artifact_path, artifact_bytes = write_artifact(quantized, base_model, hessians, hp, ctx, code_bytes, log)
    base_model.load_state_dict(deserialize(Path(artifact_path).read_bytes()))
    t_eval = time.time()
    scores = final_evaluation(model, val_tokens, hp, ctx, luts, log)
    eval_seconds = time.time() - t_eval
    summary = dict(
        **scores, val_bpb_prequant=prequant_bpb, val_bpb_raw=raw_bpb, artifact_bytes=artifact_bytes, code_bytes=code_bytes,
        code_sha256=code_sha256, model_bytes=artifact_bytes - code_bytes, params=report["total"], steps=step,
        train_seconds=round(train_seconds, 2), step_ms=round(step_ms, 2),
        train_tokens_per_s=round(hp.train_batch_tokens * step / max(train_loop_s, 1e-9)),
        eval_seconds=round(eval_seconds, 2),
        peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if ctx.device.type == "cuda" else None,
        world_size=ctx.world_size, config=hp.resolved)
    if hp.smoke:
        summary["unigram_bpb"] = unigram_bpb(torch.cat([load_data_shard(f) for f in train_files]), val_tokens,
                                             hp.vocab_size, tuple(t.cpu() for t in luts))
        log(f"smoke: val_bpb {summary['val_bpb']:.4f} vs unigram baseline {summary['unigram_bpb']:.4f}")
    log("final_summary " + json.dumps(summary))
    if ctx.distributed:
        dist.barrier()  # every rank done with the shards (SMOKE's are removed when rank 0 exits)
        dist.destroy_process_group()

if __name__ == "__main__":
    try:
        main()
    except (NonFiniteLoss, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
