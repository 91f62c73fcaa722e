"""DATA: the shard format, the rank-sharded loader."""
import numpy as np
import pytest
import torch

import train_gpt as tg
from util import write_shard


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
