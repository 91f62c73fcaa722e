"""DATA: the shard format, the rank-sharded loader; the data and tokenizer checked before any work."""
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from util import make_inputs, run_train_gpt, stop_lines, write_shard


def test_shard_roundtrip(tmp_path):
    toks = np.arange(1000) % 65535
    write_shard(tmp_path / "fineweb_train_000000.bin", toks)
    assert torch.equal(tg.load_data_shard(tmp_path / "fineweb_train_000000.bin"), torch.from_numpy(toks.astype(np.int32)))


@pytest.mark.parametrize("kwargs, cut, needle", [
    (dict(magic=12345), 0, "bad header"),
    (dict(version=2), 0, "bad header"),
    (dict(), 7, "truncated or corrupt"),
    (dict(count=2000), 0, "header says 2000 tokens"),
    (dict(count=0), 0, "header says 0 tokens"),
])
def test_corrupt_shard_rejected(tmp_path, kwargs, cut, needle):
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, np.arange(1000), **kwargs)
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(ValueError) as e:
        tg.load_data_shard(path)
    assert needle in str(e.value) and str(path) in str(e.value) and "cached_challenge_fineweb.py" in str(e.value)


def test_short_file_rejected(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="bad header"):
        tg.load_data_shard(path)


def test_missing_data_names_the_download_command(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        tg.shard_files(str(tmp_path), "train")
    assert "fineweb_train_*.bin" in str(e.value) and "cached_challenge_fineweb.py" in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tg.load_data_shard(tmp_path / "nope.bin")


def test_validation_too_short(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(10))
    with pytest.raises(ValueError, match="too short for TRAIN_SEQ_LEN=16"):
        tg.load_validation_tokens(str(tmp_path), 16)


def test_stream_crosses_shards_and_wraps(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(0, 10))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(10, 15))
    files = tg.shard_files(str(tmp_path), "train")
    s = tg.TokenStream(files)
    assert s.take(12).tolist() == list(range(12))
    assert s.take(6).tolist() == [12, 13, 14, 0, 1, 2]


def test_loader_rank_slices_tile_the_global_batch(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(5000) % 997)
    files = tg.shard_files(str(tmp_path), "train")
    single = tg.DistributedTokenLoader(files, 0, 1, torch.device("cpu"))
    ranks = [tg.DistributedTokenLoader(files, r, 2, torch.device("cpu")) for r in range(2)]
    for _ in range(3):
        # one rank with two micro-batches sees exactly what two ranks see in one
        x0, y0 = single.next_batch(64, 16)
        x1, y1 = single.next_batch(64, 16)
        (a0, b0), (a1, b1) = [r.next_batch(64, 16) for r in ranks]
        assert torch.equal(x0, a0) and torch.equal(x1, a1) and torch.equal(y0, b0) and torch.equal(y1, b1)
        assert torch.equal(x0.reshape(-1)[1:], y0.reshape(-1)[:-1])  # targets are inputs shifted by one


# ---------------------------------------------------------------------------------------------
# the data and the tokenizer, checked before any work in the order a user fixes them (train_gpt.py started
# as a user starts it: one 'error:' line a problem, exit code 2, in seconds)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return dict(make_inputs(tmp_path_factory.mktemp("inputs")), ALLOW_CPU="1")


def copy_inputs(inputs, folder):
    """The good inputs copied into folder/data, to be broken there: -> the env pointing at the copy."""
    data = folder / "data"
    data.mkdir()
    for f in Path(inputs["DATA_PATH"]).glob("*.bin"):
        (data / f.name).write_bytes(f.read_bytes())
    return dict(inputs, DATA_PATH=str(data))


def test_a_wrong_data_path_is_missing_data_not_a_missing_tokenizer(inputs, tmp_path):
    wrong = tmp_path / "fineweb10B_sp320"
    r, seconds = run_train_gpt(dict(inputs, DATA_PATH=wrong), tmp_path)
    assert stop_lines(r, seconds) == [f"DATA_PATH={wrong} does not exist: download the data: {tg.DOWNLOAD_HINT} (or set "
                                      "DATA_PATH to your shards)"]


def test_a_folder_without_shards(inputs, tmp_path):
    r, seconds = run_train_gpt(dict(inputs, DATA_PATH=tmp_path), tmp_path)
    lines = stop_lines(r, seconds)
    assert [line.split(": ")[0] for line in lines] == [f"DATA_PATH={tmp_path} has no train shards (fineweb_train_*.bin)",
                                                       f"DATA_PATH={tmp_path} has no val shards (fineweb_val_*.bin)"]
    assert all(tg.DOWNLOAD_HINT in line and "data/tokenize_corpus.py" in line for line in lines)


@pytest.mark.parametrize("content, message", [
    (None, "TOKENIZER_PATH={path} does not exist: download it: {hint}"),
    (b"not a model", "TOKENIZER_PATH={path} is not a SentencePiece model"),
])
def test_a_missing_or_foreign_tokenizer(inputs, tmp_path, content, message):
    path = tmp_path / "tokenizer.model"
    if content is not None:
        path.write_bytes(content)
    r, seconds = run_train_gpt(dict(inputs, TOKENIZER_PATH=path), tmp_path)
    (line,) = stop_lines(r, seconds)
    assert line.startswith(message.format(path=path, hint=tg.DOWNLOAD_HINT)), line


def test_a_truncated_shard_is_named_before_training(inputs, tmp_path):
    env = copy_inputs(inputs, tmp_path)
    shard = Path(env["DATA_PATH"]) / "fineweb_val_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    r, seconds = run_train_gpt(env, tmp_path)
    (line,) = stop_lines(r, seconds)
    assert line.startswith(f"data shard {shard}: size ") and "truncated or corrupt; re-download the data: " in line


def test_validation_split_too_short_for_the_sequence(inputs, tmp_path):
    val = sum(tg.shard_token_count(f) for f in Path(inputs["DATA_PATH"]).glob("fineweb_val_*.bin"))
    r, seconds = run_train_gpt(dict(inputs, TRAIN_SEQ_LEN=65536, TRAIN_BATCH_TOKENS=524288), tmp_path)
    assert stop_lines(r, seconds) == [f"DATA_PATH={inputs['DATA_PATH']}: the validation split has {val} tokens, too few "
                                      f"for TRAIN_SEQ_LEN=65536: try TRAIN_SEQ_LEN={2 ** int(np.log2(val - 1))}"]


def test_token_ids_past_the_vocabulary(inputs, tmp_path):
    env = copy_inputs(inputs, tmp_path)
    write_shard(Path(env["DATA_PATH"]) / "fineweb_val_000000.bin", np.arange(10000) % 400)
    r, seconds = run_train_gpt(env, tmp_path)
    (line,) = stop_lines(r, seconds)
    assert line.startswith(f"DATA_PATH={env['DATA_PATH']}: the validation shards hold token id 399 >= VOCAB_SIZE=320")


def test_smear_gate_and_document_ttt_need_a_tokenizer_with_a_bos(inputs, tmp_path):
    """SMEAR_GATE and TTT_MODE=doc find document starts by the BOS id: a tokenizer without one stops the run
    before any work, a line for each."""
    import sentencepiece as spm
    text = tmp_path / "text.txt"
    rng = np.random.default_rng(0)  # varied enough words for 320 pieces
    text.write_text("\n".join(" ".join("".join(rng.choice(list("abcdefghijklmnop"), rng.integers(2, 8))) for _ in range(12))
                              for _ in range(2000)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "nobos"), vocab_size=320,
                                   bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1, minloglevel=2)
    env = dict(inputs, TOKENIZER_PATH=str(tmp_path / "nobos.model"), SMEAR_GATE="1", TTT_MODE="doc")
    r, seconds = run_train_gpt(env, tmp_path)
    assert stop_lines(r, seconds) == [f"SMEAR_GATE=1 masks document starts by the BOS token, but TOKENIZER_PATH="
                                      f"{tmp_path / 'nobos.model'} has none: use a tokenizer with a BOS, or SMEAR_GATE=0",
                                      f"TTT_MODE=doc splits documents by the BOS token, but TOKENIZER_PATH="
                                      f"{tmp_path / 'nobos.model'} has none: use a tokenizer with a BOS, or TTT_MODE=chunk"]
