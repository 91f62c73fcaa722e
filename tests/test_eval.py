"""Tests for train_gpt.py's EVALUATION section and the bits-per-byte accounting: sliding windows
score every target exactly once with maximal context, evaluate() agrees with a direct computation,
bytes are counted by the challenge's rule, and score-first TTT never lets a token influence its own
score (or any earlier one).

A SentencePiece model is trained inside the tests (byte fallback, like the challenge's tokenizer);
the language model is a real, tiny HybridGPT with random weights on the CPU.
"""
import copy
import math
import random
import re
import signal
import types

import pytest
import torch

import train_gpt as tg
from util import free_port, join_gloo, leave_gloo, randomize_weights

spm = pytest.importorskip("sentencepiece")

CTX = types.SimpleNamespace(device=torch.device("cpu"), distributed=False, rank=0, world_size=1, is_main=True)
VOCAB = 320
SEQ, STRIDE, CHUNK = 32, 16, 64
ENV = {"SMOKE": "1", "VOCAB_SIZE": str(VOCAB), "NUM_LAYERS": "2", "MAMBA_LAYERS": "0",
       "TRAIN_SEQ_LEN": str(SEQ), "EVAL_STRIDE": str(STRIDE), "MAMBA_CHUNK_SIZE": "16",
       "TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": str(CHUNK), "TTT_EPOCHS": "1", "TTT_LR": "0.02",
       "SEED": "0", "RUN_ID": "test_eval"}
SYLLABLES = ["ka", "to", "ri", "ne", "su", "mo", "la", "pi", "de", "fu", "go", "ya"]


def make_hp(**overrides):
    env = dict(ENV)
    env.update({k: str(v) for k, v in overrides.items()})
    return tg.Hyperparameters(env)


def make_model(hp, seed=0):
    torch.manual_seed(seed)
    return randomize_weights(tg.HybridGPT(hp), seed + 1)


def random_tokens(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64).to(torch.int32)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(200)})
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) + "." for _ in range(1500)]
    (d / "train.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "train.txt"), model_prefix=str(d / "tok"), vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2, num_threads=1)
    proc = spm.SentencePieceProcessor(model_file=str(d / "tok.model"))
    assert proc.vocab_size() == VOCAB
    return proc


@pytest.fixture(scope="module")
def luts(sp):
    return tg.build_byte_luts(sp, VOCAB)


@pytest.fixture(scope="module")
def hp():
    return make_hp()


@pytest.fixture(scope="module")
def model(hp):
    return make_model(hp)


# ---------------------------------------------------------------------------------------------
# sliding windows
# ---------------------------------------------------------------------------------------------

def check_windows(lo, hi, seq_len, stride):
    windows = tg.sliding_windows(lo, hi, seq_len, stride)
    scored = []
    for start, end, done in windows:
        assert 0 <= start <= done < end <= hi, (start, end, done)
        assert end - start <= seq_len, "a window reads at most seq_len input tokens"
        assert end - start == min(seq_len, end), "a window is as long as it can be (maximal context)"
        for j in range(done + 1, end + 1):
            # target j reads tokens start..j-1 as context: all there is, or at least seq_len - stride + 1
            assert j - start >= min(j, seq_len - stride + 1), (j, start, end, done)
        scored.extend(range(done + 1, end + 1))
    assert scored == list(range(lo + 1, hi + 1)), "every target scored exactly once, in order"
    # no wasted windows
    if hi <= lo:
        assert windows == []
    elif lo == 0:
        assert len(windows) == 1 + math.ceil(max(0, hi - seq_len) / stride)
    else:
        assert len(windows) == math.ceil((hi - lo) / stride)
    return windows


@pytest.mark.parametrize("seq_len", [1, 2, 3, 4, 7, 8, 16, 32])
def test_sliding_windows_many_shapes(seq_len):
    strides = sorted({1, 2, 3, max(1, seq_len // 2), max(1, seq_len - 1), seq_len})
    for stride in (s for s in strides if s <= seq_len):
        for hi in list(range(0, 3 * seq_len + 5)) + [200, 257]:
            check_windows(0, hi, seq_len, stride)
            for lo in (1, seq_len // 2, seq_len, seq_len + 3, 64):
                if lo <= hi:
                    check_windows(lo, hi, seq_len, stride)


def test_sliding_windows_known_layouts():
    # stride == seq_len: plain non-overlapping sequences; the tail window keeps full context
    assert tg.sliding_windows(0, 96, 32, 32) == [(0, 32, 0), (32, 64, 32), (64, 96, 64)]
    assert tg.sliding_windows(0, 100, 32, 32) == [(0, 32, 0), (32, 64, 32), (64, 96, 64), (68, 100, 96)]
    assert tg.sliding_windows(0, 64, 32, 16) == [(0, 32, 0), (16, 48, 32), (32, 64, 48)]
    assert tg.sliding_windows(0, 10, 32, 16) == [(0, 10, 0)]            # n < seq_len
    assert tg.sliding_windows(64, 128, 32, 16) == [(48, 80, 64), (64, 96, 80), (80, 112, 96), (96, 128, 112)]
    assert tg.sliding_windows(5, 5, 32, 16) == []


def test_sliding_windows_rejects_zero_stride():
    def alarm(*a):
        raise TimeoutError("sliding_windows(0, 100, 32, 0) did not return")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.05)  # short: the runaway loop grows a list
    try:
        with pytest.raises(ValueError):
            tg.sliding_windows(0, 100, 32, 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------
# bytes per token
# ---------------------------------------------------------------------------------------------

TEXTS = ["kato rine", "ka", "mo la pi de fu go ya", "ne.su mo", "café au lait", "naïve 🙂 test",
         "x", "42 is 6x7", "Zebra QUIZ jumps", "su, ri; ka! (ya)", "über straße ñandú"]


@pytest.mark.parametrize("text", TEXTS)
def test_target_bytes_sum_to_utf8_length(sp, luts, text):
    ids = sp.encode(text)
    assert sp.decode(ids) == text, "test string must survive SentencePiece normalization"
    seq = torch.tensor([sp.bos_id()] + ids)
    nbytes = tg.target_bytes(seq[:-1], seq[1:], luts)
    assert nbytes.dtype == torch.float64
    # the dummy-prefix '▁' that SentencePiece adds after BOS is not a byte of the text
    assert int(nbytes.sum()) == len(text.encode("utf-8"))


def test_target_bytes_of_a_document_stream(sp, luts):
    """Documents joined as the shards store them (BOS before each): bytes add up per document."""
    docs = TEXTS[:6]
    stream = []
    for d in docs:
        stream += [sp.bos_id()] + sp.encode(d)
    seq = torch.tensor(stream)
    assert int(tg.target_bytes(seq[:-1], seq[1:], luts).sum()) == sum(len(d.encode("utf-8")) for d in docs)


def test_byte_lut_rule_on_hand_picked_tokens(sp, luts):
    base, space, boundary = luts
    assert base.shape == space.shape == boundary.shape == (VOCAB,)
    bos, eos, pad, unk = sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()
    byte_a = sp.piece_to_id("<0x41>")
    assert sp.is_byte(byte_a)
    word = next(i for i in range(VOCAB) if sp.id_to_piece(i).startswith("\u2581") and len(sp.id_to_piece(i)) == 3)
    bare = next(i for i in range(VOCAB) if not sp.is_byte(i) and not sp.is_control(i)
                and len(sp.id_to_piece(i)) == 2 and not sp.id_to_piece(i).startswith("\u2581"))
    space_only = sp.piece_to_id("\u2581")
    assert sp.id_to_piece(space_only) == "\u2581"

    def nb(prev, tgt):
        return float(tg.target_bytes(torch.tensor([prev]), torch.tensor([tgt]), luts)[0])

    for ctrl in (bos, eos, pad, unk):
        assert boundary[ctrl] and base[ctrl] == 0
        assert nb(word, ctrl) == 0 and nb(bos, ctrl) == 0          # control / unknown: 0 bytes
    assert nb(bos, byte_a) == 1 and nb(word, byte_a) == 1           # a byte piece: 1 byte, never a space
    assert nb(bos, word) == 2                                        # '▁ka' after BOS: the dummy prefix
    assert nb(unk, word) == 2 and nb(eos, word) == 2                 # after any boundary token: no space
    assert nb(bare, word) == 3 and nb(byte_a, word) == 3             # after a normal token: ' ka' = 3 bytes
    assert nb(word, bare) == 2 and nb(bos, bare) == 2                # no '▁': just its own bytes
    assert nb(bos, space_only) == 0 and nb(bare, space_only) == 1    # the bare '▁' is one space


def test_byte_luts_pad_to_a_larger_vocab(sp):
    base, space, boundary = tg.build_byte_luts(sp, VOCAB + 64)
    assert base.shape == (VOCAB + 64,)
    assert bool(boundary[VOCAB:].all()) and int(base[VOCAB:].abs().sum()) == 0 and not bool(space[VOCAB:].any())


# ---------------------------------------------------------------------------------------------
# evaluate()
# ---------------------------------------------------------------------------------------------

def direct_stats(model, tokens, seq_len, luts):
    """Mean cross-entropy over non-overlapping sequences, computed without the eval code."""
    t = tokens.long()
    n = (t.numel() - 1) // seq_len * seq_len
    x, y = t[:n].view(-1, seq_len), t[1:n + 1].view(-1, seq_len)
    with torch.no_grad():
        logits = model.logits(x).float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
    nbytes = tg.target_bytes(x.reshape(-1), y.reshape(-1), luts).sum()
    return float(loss), n, float(nbytes)


@pytest.mark.parametrize("batch_seqs", [1, 3, 64])
def test_evaluate_plain_equals_direct_cross_entropy(model, luts, batch_seqs):
    tokens = random_tokens(4 * SEQ + 1, seed=1)
    loss_sum, count, nbytes = direct_stats(model, tokens, SEQ, luts)
    val_loss, val_bpb = tg.evaluate(model, tokens, SEQ, SEQ, batch_seqs, CTX, luts)
    assert val_loss == pytest.approx(loss_sum / count, rel=1e-5)
    assert val_bpb == pytest.approx(loss_sum / math.log(2) / nbytes, rel=1e-5)
    assert model.training, "evaluate() hands the model back in train mode"


def test_evaluate_shorter_than_one_sequence_pads_exactly(model, luts):
    tokens = random_tokens(20, seed=2)  # 19 targets, seq_len 32: one right-padded window
    loss_sum, count, nbytes = direct_stats(model, tokens, 19, luts)
    val_loss, val_bpb = tg.evaluate(model, tokens, SEQ, SEQ, 4, CTX, luts)
    assert val_loss == pytest.approx(loss_sum / count, rel=1e-5)
    assert val_bpb == pytest.approx(loss_sum / math.log(2) / nbytes, rel=1e-5)


def test_sliding_eval_scores_each_token_once(model, luts):
    tokens = random_tokens(6 * SEQ + 11, seed=3)  # not a multiple of seq_len
    n = tokens.numel() - 1
    all_bytes = float(tg.target_bytes(tokens[:-1].long(), tokens[1:].long(), luts).sum())
    per_stride = {}
    for stride in (SEQ, STRIDE, 5, 1):
        windows = tg.sliding_windows(0, n, SEQ, stride)
        stats = tg.score_windows(model, tokens, windows, SEQ, 8, CTX, luts)
        assert stats.dtype == torch.float64
        assert int(stats[1]) == n and float(stats[2]) == all_bytes, stride
        val_loss, val_bpb = tg.evaluate(model, tokens, SEQ, stride, 8, CTX, luts)
        assert (val_loss, val_bpb) == pytest.approx(tg.stats_to_metrics(stats), rel=1e-9)
        per_stride[stride] = val_loss
    # more context really changes the scores (the model is context dependent)
    assert per_stride[1] != pytest.approx(per_stride[SEQ], rel=1e-6)
    assert all(math.isfinite(v) and v > 0 for v in per_stride.values())


def test_sliding_window_scores_match_per_target_recomputation(model, luts):
    """Target j of a sliding eval is scored with the model run on exactly its window's tokens."""
    tokens = random_tokens(3 * SEQ + 1, seed=4)
    n = tokens.numel() - 1
    windows = tg.sliding_windows(0, n, SEQ, STRIDE)
    total = 0.0
    with torch.no_grad():
        for s, e, done in windows:
            x, y = tokens[s:e].long()[None], tokens[s + 1:e + 1].long()[None]
            total += float(model(x, y)[0, done - s:].sum())
    stats = tg.score_windows(model, tokens, windows, SEQ, 16, CTX, luts)
    assert float(stats[0]) == pytest.approx(total, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# score-first test-time training
# ---------------------------------------------------------------------------------------------

NTTT = 4 * CHUNK + 1   # 4 chunks of 64 targets


def run_ttt(model, tokens, hp, luts, batch_seqs=2):
    m = copy.deepcopy(model)
    loss, bpb, per_chunk = tg.evaluate_ttt(m, tokens, hp, batch_seqs, CTX, luts, log=lambda msg: None)
    return m, loss, bpb, [c.clone() for c in per_chunk]


@pytest.fixture(scope="module")
def ttt_base(model, hp, luts):
    tokens = random_tokens(NTTT, seed=5)
    return tokens, run_ttt(model, tokens, hp, luts)


def test_ttt_progress_lines(model, hp, luts, monkeypatch):
    """A line per chunk but the last (4 chunks), with the running score; the ETA comes from the chunks after
    the first, whose time is mostly compiling. The fake clock answers evaluate_ttt's start, then per chunk
    its scoring start, score_windows' start, scoring end and chunk end: chunk 1 ends at 102 s, chunk 2 at
    104 s, so 2 s a chunk and 4 s left after chunk 2 (a rate from the elapsed time would say 102 s)."""
    clock = iter([0.0] + [100.0, 100.0, 100.0] + [102.0, 102.0] + [104.0, 104.0, 104.0] + [106.0] * 10)
    monkeypatch.setattr(tg.time, "time", lambda: next(clock))
    lines = []
    tg.evaluate_ttt(copy.deepcopy(model), random_tokens(NTTT, seed=5), hp, 2, CTX, luts, log=lines.append)
    chunks = [line for line in lines if line.startswith("ttt chunk")]
    assert [c.split()[2] for c in chunks] == ["1/4", "2/4", "3/4", "4/4"][:len(chunks)] and len(chunks) == 3
    assert "eta:from chunk 2" in chunks[0] and "running_bpb:" in chunks[0]
    assert chunks[1].endswith("eta:4s"), chunks[1]
    assert lines[-1].startswith("ttt: 4 chunks in ")


def changed_after(tokens, pos, seed):
    """A copy with every token at index >= pos replaced by a different one."""
    t = tokens.clone()
    shift = torch.randint(1, VOCAB, (t.numel() - pos,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    t[pos:] = (t[pos:] + shift) % VOCAB
    assert bool((t[pos:] != tokens[pos:]).all())
    return t


def test_ttt_totals_and_training(model, hp, luts, ttt_base):
    tokens, (m, loss, bpb, per_chunk) = ttt_base
    assert len(per_chunk) == 4
    total = torch.stack(per_chunk).sum(0)
    assert (loss, bpb) == pytest.approx(tg.stats_to_metrics(total), rel=1e-12)
    assert [int(c[1]) for c in per_chunk] == [CHUNK] * 4, "each chunk scores its own targets"
    assert float(total[2]) == float(tg.target_bytes(tokens[:-1].long(), tokens[1:].long(), luts).sum())
    # the first chunk is scored by the untouched model, exactly as a sliding eval would
    first = tg.score_windows(model, tokens, tg.sliding_windows(0, CHUNK, SEQ, STRIDE), SEQ, 2, CTX, luts)
    assert torch.allclose(per_chunk[0], first, rtol=1e-9, atol=0)
    # and the weights did move
    assert any(not torch.equal(a, b) for a, b in zip(m.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("i", [0, 1, 2])
def test_ttt_future_tokens_never_change_past_scores(model, hp, luts, ttt_base, i):
    tokens, (_, _, _, base_chunks) = ttt_base
    hi_i = (i + 1) * CHUNK        # chunk i scores targets i*CHUNK+1 .. hi_i
    other = changed_after(tokens, hi_i + 1, seed=10 + i)
    _, _, _, chunks = run_ttt(model, other, hp, luts)
    for k in range(i + 1):
        assert int(chunks[k][1]) == int(base_chunks[k][1]) and float(chunks[k][2]) == float(base_chunks[k][2])
        assert float(chunks[k][0]) == pytest.approx(float(base_chunks[k][0]), rel=0, abs=1e-6), \
            f"chunk {k} score depends on tokens after chunk {i}"
    assert abs(float(chunks[i + 1][0]) - float(base_chunks[i + 1][0])) > 1e-3


def test_ttt_never_trains_on_the_last_chunk(model, hp, luts, ttt_base):
    tokens, (m_base, _, _, base_chunks) = ttt_base
    last_lo = 3 * CHUNK
    m_last, _, _, chunks = run_ttt(model, changed_after(tokens, last_lo + 1, seed=20), hp, luts)
    for (name, a), b in zip(m_base.state_dict().items(), m_last.state_dict().values()):
        assert torch.equal(a, b), f"{name}: the last chunk's tokens reached the weights"
    # the last chunk was scored with exactly those final weights (trained on chunks 0..2 only)
    rescored = tg.score_windows(m_base, tokens, tg.sliding_windows(last_lo, 4 * CHUNK, SEQ, STRIDE), SEQ, 2, CTX, luts)
    assert torch.allclose(base_chunks[3], rescored, rtol=1e-9, atol=0)
    assert float(chunks[3][0]) != pytest.approx(float(base_chunks[3][0]), abs=1e-3)
    # whereas an earlier chunk's tokens do reach the weights (so the check above can fail)
    m_mid, _, _, _ = run_ttt(model, changed_after(tokens, CHUNK + 1, seed=21), hp, luts)
    assert any(not torch.equal(a, b) for a, b in zip(m_base.state_dict().values(), m_mid.state_dict().values()))


def test_ttt_trains_only_on_already_scored_tokens(model, hp, luts):
    """Watch every forward pass of a TTT run (a hook only records, it changes nothing). With all
    validation tokens distinct, a token's value tells its position: a training pass (grad on) may
    only see targets that some earlier scoring pass (grad off) already scored."""
    tokens = (torch.randperm(VOCAB - 4, generator=torch.Generator().manual_seed(7))[:NTTT] + 4).to(torch.int32)
    position = {int(v): i for i, v in enumerate(tokens.tolist())}  # ids 0..3 never occur: padding is 0
    m = copy.deepcopy(model)
    events = []

    def watch(module, args):
        seen = [position[v] for v in args[1].reshape(-1).tolist() if v in position]
        events.append((torch.is_grad_enabled(), max(seen)))
    m.register_forward_pre_hook(watch)
    tg.evaluate_ttt(m, tokens, hp, 2, CTX, luts, log=lambda msg: None)
    scored = 0
    for training, last_target in events:
        if training:
            assert last_target <= scored, f"trained on target {last_target} before it was scored ({scored})"
        else:
            scored = max(scored, last_target)
    assert scored == NTTT - 1
    trained = sorted({t for training, t in events if training})
    assert trained == [CHUNK, 2 * CHUNK, 3 * CHUNK], "chunks 0..2 trained on in full, the last chunk never"


def test_ttt_with_zero_lr_is_the_sliding_eval(model, luts):
    hp0 = make_hp(TTT_LR=0)
    tokens = random_tokens(NTTT, seed=6)
    m, loss, bpb, _ = run_ttt(model, tokens, hp0, luts)
    ref_loss, ref_bpb = tg.evaluate(copy.deepcopy(model), tokens, SEQ, STRIDE, 4, CTX, luts)
    assert loss == pytest.approx(ref_loss, rel=1e-6) and bpb == pytest.approx(ref_bpb, rel=1e-6)
    for a, b in zip(m.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_ttt_config_needs_a_stride():
    with pytest.raises(tg.ConfigError, match="EVAL_STRIDE"):
        make_hp(EVAL_STRIDE=0)
    with pytest.raises(tg.ConfigError, match="EVAL_STRIDE"):
        make_hp(EVAL_STRIDE=SEQ + 1)


def _ttt_rank(rank, world_size, port, out_dir):
    ctx = join_gloo(rank, world_size, port)
    _ttt_once(ctx, out_dir)
    leave_gloo()


def _ttt_once(ctx, out_dir):
    hp = make_hp()
    model = make_model(hp)
    luts = (torch.ones(VOCAB, dtype=torch.int16), torch.zeros(VOCAB, dtype=torch.bool), torch.ones(VOCAB, dtype=torch.bool))
    tokens = random_tokens(NTTT, seed=5)
    loss, bpb, _ = tg.evaluate_ttt(model, tokens, hp, 2 // ctx.world_size, ctx, luts, log=lambda msg: None)
    torch.save({"loss": loss, "state": model.state_dict()}, f"{out_dir}/ttt_w{ctx.world_size}_r{ctx.rank}.pt")


def test_two_rank_ttt_equals_one_process(tmp_path):
    """Ranks score their share of each chunk's windows and adapt on their share of its sequences with
    averaged gradients (one flat all-reduce): the result is the one-process result, on every rank."""
    import torch.multiprocessing as mp
    _ttt_once(CTX, tmp_path)
    mp.spawn(_ttt_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    one, r0, r1 = (torch.load(tmp_path / f) for f in ("ttt_w1_r0.pt", "ttt_w2_r0.pt", "ttt_w2_r1.pt"))
    assert r0["loss"] == r1["loss"] and r0["loss"] == pytest.approx(one["loss"], rel=1e-5)
    for k in one["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), f"ranks differ at {k}"
        torch.testing.assert_close(r0["state"][k], one["state"][k], rtol=1e-4, atol=1e-6, msg=k)
    assert any(not torch.equal(one["state"][k], v) for k, v in make_model(make_hp()).state_dict().items()), "TTT trained"


class ShapeRecorder(torch.nn.Module):
    """The model, recording the (shape, grad mode) of every call: a compiled model compiles once per pair."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, set()

    def forward(self, x, y):
        self.calls.add((tuple(x.shape), torch.is_grad_enabled()))
        return self.model(x, y)


def test_each_evaluation_use_has_one_batch_shape(model, hp, luts):
    """Compiled evaluation compiles once per shape: plain and sliding scoring pad every batch to
    batch_seqs rows, TTT scores every chunk (the last, shorter one too) with one shape and adapts with one."""
    tokens = random_tokens(4 * CHUNK + 21, seed=8)  # 4 full chunks and a short fifth
    rec = ShapeRecorder(copy.deepcopy(model))
    tg.evaluate(rec, tokens, SEQ, SEQ, 3, CTX, luts)
    tg.evaluate(rec, tokens, SEQ, STRIDE, 3, CTX, luts)
    assert rec.calls == {((3, SEQ), False)}
    rec.calls.clear()
    tg.evaluate_ttt(rec, tokens, hp, 8, CTX, luts, log=lambda msg: None)
    rows = math.ceil(CHUNK / STRIDE)  # a chunk's windows, fewer than batch_seqs
    assert rec.calls == {((rows, SEQ), False), ((CHUNK // SEQ, SEQ), True)}


def test_final_evaluation_scores_sliding_and_ttt_at_eval_seq_len(model, luts):
    """EVAL_SEQ_LEN widens the sliding and TTT windows (scores as the sliding eval at that length, with that
    shape); the plain roundtrip stays at TRAIN_SEQ_LEN, comparable with the score before quantization."""
    tokens = random_tokens(4 * CHUNK + 1, seed=9)
    long = 2 * SEQ
    hp_long = make_hp(EVAL_SEQ_LEN=long, VAL_BATCH_SIZE=4 * long, TTT_LR=0)
    rec = ShapeRecorder(copy.deepcopy(model))
    scores = tg.final_evaluation(rec, tokens, hp_long, CTX, luts, log=lambda msg: None)
    plain = tg.evaluate(copy.deepcopy(model), tokens, SEQ, SEQ, 8, CTX, luts)[1]
    sliding_long = tg.evaluate(copy.deepcopy(model), tokens, long, STRIDE, 4, CTX, luts)[1]
    sliding_short = tg.evaluate(copy.deepcopy(model), tokens, SEQ, STRIDE, 8, CTX, luts)[1]
    assert scores["val_bpb_roundtrip"] == pytest.approx(plain, rel=1e-6)
    assert scores["val_bpb_sliding"] == pytest.approx(sliding_long, rel=1e-6)
    assert scores["val_bpb_ttt"] == pytest.approx(sliding_long, rel=1e-6)  # TTT at lr 0 scores as sliding does
    assert sliding_long != pytest.approx(sliding_short, rel=1e-6)  # the longer context really is used
    rows = math.ceil(CHUNK / STRIDE)
    assert rec.calls == {((8, SEQ), False), ((4, long), False), ((rows, long), False), ((CHUNK // long, long), True)}
    default = tg.final_evaluation(copy.deepcopy(model), tokens, make_hp(TTT_ENABLED=0), CTX, luts, log=lambda msg: None)
    assert default["val_bpb_sliding"] == pytest.approx(sliding_short, rel=1e-6) and default["val_bpb_ttt"] is None



# ---------------------------------------------------------------------------------------------
# document TTT (TTT_MODE=doc): a fresh LoRA per document, score-first chunk by chunk
# ---------------------------------------------------------------------------------------------

BOS = 1


def doc_stream(lengths, seed):
    """Documents as the challenge's shards hold them: [BOS] + tokens (none of them BOS), back to back."""
    parts = []
    for i, n in enumerate(lengths):
        body = torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed + i))
        parts += [torch.tensor([BOS]), body]
    return torch.cat(parts).to(torch.int32)


def test_document_targets_cover_every_target_once():
    t = torch.tensor([1, 5, 6, 1, 7, 1, 1, 8, 9])
    assert tg.document_targets(t, 1) == [(0, 3), (3, 5), (5, 6), (6, 8)]  # targets 1..8, each once
    assert tg.document_targets(torch.tensor([4, 5, 1, 6, 7]), 1) == [(0, 2), (2, 4)]  # text before the first BOS
    assert tg.document_targets(torch.tensor([4, 5, 6]), 1) == [(0, 2)]  # no BOS: one document


def doc_hp(**env):
    """ENV for document TTT (less the chunk mode's TTT_CHUNK_TOKENS, which doc mode would refuse)."""
    base = {k: v for k, v in ENV.items() if k != "TTT_CHUNK_TOKENS"}
    base.update(TTT_MODE="doc", TTT_DOC_CHUNK="8", TTT_DOC_RANK="4", TTT_DOC_BATCH="3")
    base.update({k: str(v) for k, v in env.items()})
    return tg.Hyperparameters(base)


def run_doc_ttt(model, tokens, hp, luts):
    m = copy.deepcopy(model)
    m.bos_id = BOS
    return m, *tg.evaluate_doc_ttt(m, tokens, hp, CTX, luts, log=lambda msg: None)


def test_doc_ttt_without_learning_scores_each_document_on_its_own_chunk_windows(model, luts):
    """At lr 0 the LoRA stays zero: target j of a document is scored by the model run on that document's tokens
    up to the end of j's chunk (at most EVAL_SEQ_LEN of them), nothing from the document before."""
    tokens = doc_stream([5, 40, 17, 3, 70], seed=20)  # 70 > EVAL_SEQ_LEN = 32: windows slide within the document
    hp = doc_hp(TTT_DOC_LR=0)
    m, loss, bpb, per_target = run_doc_ttt(model, tokens, hp, luts)
    ref = torch.zeros(tokens.numel())
    with torch.no_grad():
        for lo, hi in tg.document_targets(tokens, BOS):
            for c0 in range(lo, hi, 8):
                t = min(c0 + 8, hi)
                w = max(lo, t - SEQ)
                out = model(tokens[w:t].long()[None], tokens[w + 1:t + 1].long()[None])[0]
                ref[c0 + 1:t + 1] = out[c0 - w:]
    torch.testing.assert_close(per_target[1:], ref[1:], rtol=1e-5, atol=1e-6)
    assert per_target[0] == 0
    nbytes = float(tg.target_bytes(tokens[:-1].long(), tokens[1:].long(), luts).sum())
    assert loss == pytest.approx(float(ref.sum()) / (tokens.numel() - 1), rel=1e-5)
    assert bpb == pytest.approx(float(ref.sum()) / math.log(2) / nbytes, rel=1e-5)


def test_doc_ttt_is_score_first_and_documents_never_see_each_other(model, luts):
    """Changing one token changes no score before it in its document and none in any other document (one batch
    holds them all); it does change later scores of its own document (the LoRA learned from it)."""
    lengths = [30, 45, 28]
    tokens = doc_stream(lengths, seed=30)
    hp = doc_hp(TTT_DOC_LR=0.05)
    base, _, _, before = run_doc_ttt(model, tokens, hp, luts)
    for name, p in model.state_dict().items():  # the model's own weights are untouched, the LoRA is gone
        assert torch.equal(base.state_dict()[name], p), name
    assert all(m.lora is None for m in base.modules() if isinstance(m, tg.CastedLinear)) and base.head_lora is None
    assert all(p.requires_grad for p in base.parameters())
    docs = tg.document_targets(tokens, BOS)
    lo, hi = docs[1]
    pos = lo + 20  # inside document 2, in its third chunk of 8
    changed = tokens.clone()
    changed[pos] = 2 + (int(changed[pos]) - 1) % (VOCAB - 2)
    _, _, _, after = run_doc_ttt(model, changed, hp, luts)
    assert torch.equal(after[:pos], before[:pos])  # earlier targets, this document and the first
    assert torch.equal(after[hi + 1:], before[hi + 1:])  # the next document
    assert not torch.equal(after[pos:hi + 1], before[pos:hi + 1])
    _, _, _, frozen = run_doc_ttt(model, tokens, doc_hp(TTT_DOC_LR=0), luts)
    assert not torch.allclose(frozen[lo + 9:hi + 1], before[lo + 9:hi + 1])  # it learns: later chunks score otherwise
    torch.testing.assert_close(frozen[lo + 1:lo + 9], before[lo + 1:lo + 9])  # the first chunk is scored before any step


def test_doc_ttt_runs_only_the_documents_with_targets_left(model, luts):
    """A finished document leaves its batch: each step runs only the rows of the documents with targets left
    (at the proxy's document lengths, finished rows were most of the work)."""
    lengths = [5, 40, 17, 3, 26]  # targets 6, 41, 18, 4, 26 (each up to the next BOS): chunks of 8: 1, 6, 3, 1, 4
    tokens = doc_stream(lengths, seed=40)
    rows = []
    m = copy.deepcopy(model)
    m.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    m.bos_id = BOS
    hp = doc_hp(TTT_DOC_LR=0.05, TTT_DOC_BATCH=5)
    _, _, together = tg.evaluate_doc_ttt(m, tokens, hp, CTX, luts, log=lambda msg: None)
    assert rows == [5, 3, 3, 2, 1, 1]  # the 6-, 4- and 3-chunk documents outlast the two short ones
    assert bool((together[1:] > 0).all())  # every target scored (which rows' LoRA scores them: the score-first test)


def test_doc_ttt_ssm_also_shifts_each_mamba2_dt_bias_per_document(model, luts):
    """TTT_DOC_SSM=1: a per-document shift of every Mamba-2's dt bias adapts beside the LoRA. It starts at zero (the
    first chunk of each document scores as without it), then changes later scores; it is gone afterwards."""
    assert any(isinstance(m, tg.Mamba2) for m in model.modules())
    tokens = doc_stream([30, 25], seed=70)
    _, _, _, plain = run_doc_ttt(model, tokens, doc_hp(TTT_DOC_LR=0.05), luts)
    m, _, _, ssm = run_doc_ttt(model, tokens, doc_hp(TTT_DOC_LR=0.05, TTT_DOC_SSM=1), luts)
    for lo, hi in tg.document_targets(tokens, BOS):
        torch.testing.assert_close(ssm[lo + 1:lo + 9], plain[lo + 1:lo + 9])
        assert not torch.allclose(ssm[lo + 9:hi + 1], plain[lo + 9:hi + 1])
    assert all(x.dt_delta is None for x in m.modules() if isinstance(x, tg.Mamba2))
    factors = tg.attach_doc_lora(m, 3, 4, torch.Generator().manual_seed(0), ssm=True)
    for x in (x for x in m.modules() if isinstance(x, tg.Mamba2)):  # a zero shift per row and head, adapted
        assert x.dt_delta.shape == (3, x.nheads) and not x.dt_delta.any() and any(x.dt_delta is f for f in factors)
    tg.detach_doc_lora(m)


def test_doc_ttt_says_what_it_will_do_then_its_progress_and_time(model, luts):
    lines = []
    m = copy.deepcopy(model)
    m.bos_id = BOS
    hp = doc_hp(TTT_DOC_BATCH=1, TTT_DOC_PHASES=1, TTT_DOC_PREFIX=0.5)
    tg.evaluate_doc_ttt(m, doc_stream([20, 9, 14, 30], seed=60), hp, CTX, luts, log=lines.append)
    assert lines[0] == "ttt doc: 4 documents, 4 batches of up to 1 a rank, a step every 8 targets, LoRA rank 4, phases after batches [2]"
    assert sum(line.startswith("ttt doc batch ") and " eta:" in line for line in lines) == 4
    assert any(line.startswith("ttt doc phase after batch 2: the model trained on 2 documents") for line in lines)
    assert re.fullmatch(r"ttt: 4 documents in \d+\.\ds", lines[-1])


def test_doc_ttt_settings_and_inputs_are_checked(sp):
    with pytest.raises(tg.ConfigError, match="TTT_MODE='global': expected one of chunk, doc"):
        make_hp(TTT_MODE="global")
    hp = doc_hp()
    assert tg.validation_problems(hp, doc_stream([4, 4], seed=1), BOS) == []
    problems = tg.validation_problems(hp, torch.tensor([5, 6, 7], dtype=torch.int32), BOS)
    assert len(problems) == 1 and problems[0].startswith("TTT_MODE=doc: the validation shards in DATA_PATH=")
    assert tg.validation_problems(make_hp(), torch.tensor([5, 6, 7], dtype=torch.int32), BOS) == []  # chunk mode


def test_phased_doc_ttt_trains_the_model_only_on_documents_already_scored(model, luts):
    """TTT_DOC_PHASES=1 with half the documents as prefix: after the first two (the longest, which go first), the
    whole model trains on them; the two after are scored by it. A token changed in the third document changes
    no score outside it (it is never trained on before it is scored); one changed in the first changes the last
    two documents' scores (learned in the phase), not the second's (scored before the phase)."""
    lengths = [40, 12, 30, 20]  # order of processing: 40, 30, 20, 12
    tokens = doc_stream(lengths, seed=40)
    docs = dict(zip(lengths, tg.document_targets(tokens, BOS)))

    def scores(stream, **env):
        return run_doc_ttt(model, stream, doc_hp(**dict(dict(TTT_DOC_PHASES=1, TTT_DOC_PREFIX=0.5, TTT_DOC_BATCH=1,
                                                             TTT_LR=0.05, TTT_DOC_LR=0.01), **env)), luts)

    def part(per_target, length):
        lo, hi = docs[length]
        return per_target[lo + 1:hi + 1]
    trained, _, _, phased = scores(tokens)
    _, _, _, plain = scores(tokens, TTT_DOC_PHASES=0)
    for n in (40, 30):
        assert torch.equal(part(phased, n), part(plain, n))
    for n in (20, 12):
        assert not torch.allclose(part(phased, n), part(plain, n))
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), model.state_dict().values()))

    def changed_in(length, offset):
        out = tokens.clone()
        pos = docs[length][0] + offset
        out[pos] = 2 + (int(out[pos]) - 1) % (VOCAB - 2)
        return scores(out)[3], pos
    after, pos = changed_in(20, 10)  # the third document scored, after the phase
    lo, hi = docs[20]
    assert torch.equal(after[:pos], phased[:pos]) and torch.equal(after[hi + 1:], phased[hi + 1:])
    assert not torch.equal(after[pos:hi + 1], phased[pos:hi + 1])
    after, _ = changed_in(40, 5)
    assert torch.equal(part(after, 30), part(phased, 30))
    for n in (20, 12):
        assert not torch.equal(part(after, n), part(phased, n))


def _doc_phase_rank(rank, world_size, port, out_dir):
    ctx = join_gloo(rank, world_size, port)
    hp = doc_hp(TTT_DOC_PHASES=2, TTT_DOC_PREFIX=1.0, TTT_DOC_BATCH=1, TTT_LR=0.05)
    model = make_model(hp)
    model.bos_id = BOS
    luts = (torch.ones(VOCAB, dtype=torch.int16), torch.zeros(VOCAB, dtype=torch.bool), torch.ones(VOCAB, dtype=torch.bool))
    # rank 0 gets the 50- and 9-token documents, rank 1 the 20-token one: unequal shares, unequal phase steps
    loss, bpb, _ = tg.evaluate_doc_ttt(model, doc_stream([50, 20, 9], seed=50), hp, ctx, luts, log=lambda msg: None)
    torch.save({"loss": loss, "state": model.state_dict()}, f"{out_dir}/doc_r{rank}.pt")
    leave_gloo()


def test_two_rank_phased_doc_ttt_keeps_ranks_identical(tmp_path):
    """Ranks score their own documents; each phase averages the whole model's gradients over ranks with the same
    number of steps on each (the rank with fewer spans adds zeros): no rank waits forever, all end alike."""
    import torch.multiprocessing as mp
    mp.spawn(_doc_phase_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"doc_r{r}.pt") for r in (0, 1))
    assert r0["loss"] == r1["loss"]
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k

