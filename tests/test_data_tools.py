"""CPU tests for data/shard_format.py, data/tokenize_corpus.py and data/cached_challenge_fineweb.py.

The downloader tests never touch the network (CI has none): `download_file`, the downloader's single
network function, is monkeypatched to copy from a fake mirror of the HF dataset repo built in tmp_path,
or the tool's own --mirror option is used.
"""
import gzip
import json
import lzma
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

spm = pytest.importorskip("sentencepiece")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import cached_challenge_fineweb as dl  # noqa: E402
import shard_format as sf  # noqa: E402
import tokenize_corpus as tc  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
         "near golden rivers under pale winter skies and parameter golf models learn tiny compressed weights").split()


def sentences(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))).capitalize() + "." for _ in range(n)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    (d / "train.txt").write_text("\n".join(sentences(400, seed=0)) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "train.txt"), model_prefix=str(d / "tok"), vocab_size=200, model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2,
    )
    path = d / "tok.model"
    return path, spm.SentencePieceProcessor(model_file=str(path))


def expected_stream(sp, docs):
    return [t for doc in docs for t in [1] + sp.encode(doc)]


def read_split(out, split):
    paths = sorted(Path(out).glob(f"fineweb_{split}_*.bin"))
    return paths, (np.concatenate([sf.read_shard(p) for p in paths]) if paths else np.zeros(0, np.uint16))


def text_file(path, content):
    path.write_text(content, encoding="utf-8")
    return path


def write_jsonl(path, docs, key="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, key: d}) + "\n")
    return path


# ----------------------------------------------------------------------------- shard_format

def test_shard_roundtrip_header_and_size(tmp_path):
    toks = np.array([0, 1, 2, 65535, 300, 7], dtype=np.int64)
    path = tmp_path / "s.bin"
    assert sf.write_shard(path, toks) == 6
    header = np.fromfile(path, dtype="<i4", count=256)
    assert (header[0], header[1], header[2]) == (20240520, 1, 6)
    assert not header[3:].any()
    assert path.stat().st_size == 256 * 4 + 2 * 6
    assert np.fromfile(path, dtype="<u2", offset=1024).tolist() == toks.tolist()
    out = sf.read_shard(path)
    assert out.dtype == np.uint16 and out.tolist() == toks.tolist()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("bad", [[-1], [65536], [1.5]])
def test_write_shard_rejects_values_outside_uint16(tmp_path, bad):
    with pytest.raises(ValueError, match="uint16"):
        sf.write_shard(tmp_path / "s.bin", np.array(bad))


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda b: b[:100], "shorter than"),
        (lambda b: b"\x00\x00\x00\x00" + b[4:], "bad magic"),
        (lambda b: b[:4] + np.int32(2).tobytes() + b[8:], "version 2"),
        (lambda b: b[:-2], "size mismatch"),
        (lambda b: b + b"\x00\x00", "size mismatch"),
    ],
)
def test_read_shard_validation_names_file_and_problem(tmp_path, corrupt, match):
    path = tmp_path / "broken_shard.bin"
    sf.write_shard(path, np.arange(10))
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ValueError, match=match) as exc:
        sf.read_shard(path)
    assert "broken_shard.bin" in str(exc.value)


# ----------------------------------------------------------------------------- tokenize_corpus

def test_jsonl_val_docs_split_and_multi_shard(tmp_path, sp_model):
    model, sp = sp_model
    docs = sentences(40, seed=1)
    inp = write_jsonl(tmp_path / "corpus.jsonl", docs)
    out = tmp_path / "out"
    assert tc.main([str(inp), "--tokenizer", str(model), "--out", str(out), "--val-docs", "5",
                    "--shard-tokens", "64"]) == 0
    val_paths, val = read_split(out, "val")
    train_paths, train = read_split(out, "train")
    assert val.tolist() == expected_stream(sp, docs[:5])
    assert train.tolist() == expected_stream(sp, docs[5:])
    assert len(train_paths) == -(-len(train) // 64) > 2  # documents span shard boundaries
    assert [p.name for p in train_paths] == [f"fineweb_train_{i:06d}.bin" for i in range(len(train_paths))]
    for p in train_paths + val_paths:
        n = np.fromfile(p, dtype="<i4", count=3)[2]
        assert p.stat().st_size == 1024 + 2 * n
        assert n == 64 or p in (train_paths[-1], val_paths[-1])  # only the last shard is partial


def test_txt_lines_gzip_and_workers_match_single_process(tmp_path, sp_model):
    model, sp = sp_model
    docs = sentences(300, seed=2)
    inp = tmp_path / "corpus.txt.gz"
    with gzip.open(inp, "wt", encoding="utf-8") as f:
        f.write("\n\n".join(docs) + "\n   \n")  # blank lines are not documents
    stats = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        stats[workers] = tc.tokenize_corpus([inp], out, model, val_docs=10, workers=workers, log=lambda *a: None)
    assert stats[1] == stats[2] == {"train": {"docs": 290, "tokens": len(expected_stream(sp, docs[10:])), "shards": 1},
                                    "val": {"docs": 10, "tokens": len(expected_stream(sp, docs[:10])), "shards": 1}}
    for split in ("train", "val"):
        assert read_split(tmp_path / "out1", split)[1].tolist() == read_split(tmp_path / "out2", split)[1].tolist()
    assert read_split(tmp_path / "out2", "train")[1].tolist() == expected_stream(sp, docs[10:])


def test_whole_file_xz_and_separate_train_val_inputs(tmp_path, sp_model):
    model, sp = sp_model
    train_docs, val_docs = ["\n".join(sentences(3, seed=s)) for s in (3, 4, 5)], ["\n".join(sentences(4, seed=6))]
    train_files = []
    for i, d in enumerate(train_docs):
        train_files.append(tmp_path / f"train{i}.txt.xz")
        with lzma.open(train_files[-1], "wt", encoding="utf-8") as f:
            f.write(d + "\n")
    (tmp_path / "val.txt").write_text(val_docs[0], encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--train", *map(str, train_files), "--val", str(tmp_path / "val.txt"), "--whole-file",
            "--tokenizer", str(model), "--out", str(out)]
    assert tc.main(argv) == 0
    assert read_split(out, "train")[1].tolist() == expected_stream(sp, train_docs)
    assert read_split(out, "val")[1].tolist() == expected_stream(sp, val_docs)
    assert (read_split(out, "train")[1] == 1).sum() == 3  # one BOS per file: multi-line files stayed whole


def test_val_fraction_and_custom_text_key(tmp_path, sp_model):
    model, sp = sp_model
    docs = sentences(50, seed=7)
    inp = write_jsonl(tmp_path / "c.jsonl.gz", docs, key="content", opener=gzip.open)
    stats = tc.tokenize_corpus([inp], tmp_path / "out", model, val_fraction=0.1, text_key="content",
                               log=lambda *a: None)
    assert stats["val"]["docs"] == 5 and stats["train"]["docs"] == 45
    assert read_split(tmp_path / "out", "val")[1].tolist() == expected_stream(sp, docs[:5])


def test_refuses_to_mix_with_existing_shards_unless_overwrite(tmp_path, sp_model, capsys):
    model, _ = sp_model
    inp = write_jsonl(tmp_path / "c.jsonl", sentences(30, seed=8))
    out = tmp_path / "out"
    base = [str(inp), "--tokenizer", str(model), "--out", str(out), "--val-docs", "2"]
    assert tc.main(base + ["--shard-tokens", "50"]) == 0
    n_before = len(list(out.glob("fineweb_train_*.bin")))
    assert tc.main(base) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert tc.main(base + ["--overwrite"]) == 0
    assert n_before > 1 and len(list(out.glob("fineweb_train_*.bin"))) == 1  # stale shards removed


@pytest.mark.parametrize(
    "make_input, extra, match",
    [
        (lambda d: write_jsonl(d / "c.jsonl", ["a b", "c d"], key="body"), [], r"c\.jsonl:1: no 'text' field"),
        (lambda d: text_file(d / "c.jsonl", '{"text": "ok"}\n{"text": \n'), [], r"c\.jsonl:2: invalid JSON"),
        (lambda d: text_file(d / "c.jsonl", '{"text": 5}\n'), [], "not a string"),
        (lambda d: text_file(d / "e.txt", "\n  \n"), [], "no documents found"),
        (lambda d: text_file(d / "bad.txt.gz", "not gzip"), [], r"bad\.txt\.gz: cannot read"),
        (lambda d: d / "missing.jsonl", [], "input file not found: .*missing.jsonl"),
        (lambda d: write_jsonl(d / "c.csv", ["a"]), [], "cannot tell the format"),
        (lambda d: write_jsonl(d / "c.jsonl", ["a b", "c d"]), ["--val-docs", "2"], "leaving none for train"),
        (lambda d: write_jsonl(d / "c.jsonl", ["a b"]), ["--val-docs", "0", "--val-fraction", "0.1"], "not both"),
    ],
)
def test_bad_inputs_give_clear_errors(tmp_path, sp_model, capsys, make_input, extra, match):
    model, _ = sp_model
    path = make_input(tmp_path)
    out = tmp_path / "out"
    argv = [str(path), "--tokenizer", str(model), "--out", str(out)] + (extra or ["--val-docs", "0"])
    assert tc.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(match, err), err
    assert not out.exists() or not list(out.glob("*.bin"))  # nothing written on bad input


def test_split_option_is_required_and_tokenizer_must_exist(tmp_path, sp_model):
    model, _ = sp_model
    inp = write_jsonl(tmp_path / "c.jsonl", ["a b"])
    with pytest.raises(tc.CorpusError, match="choose a validation split"):
        tc.tokenize_corpus([inp], tmp_path / "o", model)
    with pytest.raises(tc.CorpusError, match="tokenizer model not found"):
        tc.tokenize_corpus([inp], tmp_path / "o", tmp_path / "nope.model", val_docs=0)


def test_tokenizer_vocab_must_fit_uint16_and_have_bos():
    class FakeSP:
        def __init__(self, vocab, bos):
            self.vocab, self.bos = vocab, bos

        def get_piece_size(self):
            return self.vocab

        def bos_id(self):
            return self.bos

    assert tc.check_tokenizer(FakeSP(65536, 1), "ok.model") == 1  # ids 0..65535 fit
    with pytest.raises(tc.CorpusError, match="vocab size 65537 is too large"):
        tc.check_tokenizer(FakeSP(65537, 1), "big.model")
    with pytest.raises(tc.CorpusError, match="no BOS"):
        tc.check_tokenizer(FakeSP(1024, -1), "nobos.model")


# ----------------------------------------------------------------------------- cached_challenge_fineweb

ROOT = "datasets"  # remote root prefix inside the HF dataset repo, as upstream


def build_mirror(base, variants=("sp1024",), n_train=3, n_val=1, shard_len=50):
    """Fake copy of the HF dataset repo: <root>/manifest.json, <root>/datasets/..., <root>/tokenizers/..."""
    rng = np.random.default_rng(0)
    manifest = {"datasets": [], "tokenizers": []}
    for v in variants:
        vocab = int(v[2:])
        ddir = base / ROOT / "datasets" / f"fineweb10B_{v}"
        ddir.mkdir(parents=True)
        for split, n in (("val", n_val), ("train", n_train)):
            for i in range(n):
                sf.write_shard(ddir / f"fineweb_{split}_{i:06d}.bin", rng.integers(0, vocab, shard_len + i))
        tdir = base / ROOT / "tokenizers"
        tdir.mkdir(parents=True, exist_ok=True)
        for ext in ("model", "vocab"):
            (tdir / f"fineweb_{vocab}_bpe.{ext}").write_text(f"fake {ext}")
        manifest["datasets"].append({
            "name": f"fineweb10B_{v}", "tokenizer_name": f"sp_bpe_{vocab}", "vocab_size": vocab,
            "stats": {"files_train": n_train, "files_val": n_val,
                      "tokens_val": sum(shard_len + i for i in range(n_val))},
        })
        manifest["tokenizers"].append({"name": f"sp_bpe_{vocab}", "kind": "sentencepiece_bpe",
                                       "model_path": f"tokenizers/fineweb_{vocab}_bpe.model",
                                       "vocab_path": f"tokenizers/fineweb_{vocab}_bpe.vocab"})
    (base / ROOT / "manifest.json").write_text(json.dumps(manifest))
    return base


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Mock the network: download_file copies from a local mirror and records what was requested."""
    mirror = build_mirror(tmp_path / "hub")
    calls = []

    def fake_download(repo_id, remote_path, destination, mirror_arg=None):
        calls.append((repo_id, remote_path))
        src = mirror / remote_path
        if not src.is_file():
            raise dl.DownloadError(f"{remote_path} not found in {repo_id}")
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, destination)

    monkeypatch.setattr(dl, "download_file", fake_download)
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)
    return mirror, calls, tmp_path / "data"


@pytest.mark.parametrize("variant, expected", [("sp1024", "fineweb10B_sp1024"), ("sp8192", "fineweb10B_sp8192"),
                                               ("byte260", "fineweb10B_byte260")])
def test_variant_names(variant, expected):
    assert dl.dataset_dir_for_variant(variant) == expected


@pytest.mark.parametrize("variant", ["sp", "spx", "sp01024", "gpt2", "SP1024", "byte256"])
def test_unknown_variant_rejected_before_any_download(fake_hub, capsys, variant):
    _, calls, data = fake_hub
    assert dl.main(["--variant", variant, "--data-dir", str(data)]) == 1
    assert f"unknown variant {variant!r}" in capsys.readouterr().err
    assert calls == []


def test_download_flow_layout_and_summary(fake_hub, capsys):
    mirror, calls, data = fake_hub
    assert dl.main(["--variant", "sp1024", "--train-shards", "2", "--data-dir", str(data)]) == 0
    ds = "datasets/datasets/fineweb10B_sp1024"
    assert calls == [(dl.DEFAULT_REPO_ID, p) for p in [
        "datasets/manifest.json", f"{ds}/fineweb_val_000000.bin", f"{ds}/fineweb_train_000000.bin",
        f"{ds}/fineweb_train_000001.bin", "datasets/tokenizers/fineweb_1024_bpe.model",
        "datasets/tokenizers/fineweb_1024_bpe.vocab"]]
    local = data / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in local.iterdir()) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                       "fineweb_val_000000.bin"]
    assert (data / "manifest.json").is_file() and (data / "tokenizers" / "fineweb_1024_bpe.model").is_file()
    assert sf.read_shard(local / "fineweb_train_000001.bin").tolist() == \
        sf.read_shard(mirror / ds / "fineweb_train_000001.bin").tolist()
    out = capsys.readouterr().out
    assert "val  : 1 shard(s), 50 tokens" in out and "train: 2 shard(s), 101 tokens" in out
    assert f"DATA_PATH={local}" in out

    # Re-running fetches nothing new; asking for more fetches only the missing shard (legacy positional arg).
    calls.clear()
    assert dl.main(["3", "--variant", "sp1024", "--data-dir", str(data)]) == 0
    assert calls == [(dl.DEFAULT_REPO_ID, f"{ds}/fineweb_train_000002.bin")]


def test_env_overrides_repo_and_remote_root(fake_hub, monkeypatch):
    mirror, calls, data = fake_hub
    shutil.move(mirror / ROOT, mirror / "export50B")
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/other-repo")
    monkeypatch.setenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "export50B")
    assert dl.main(["--variant", "sp1024", "--train-shards", "1", "--data-dir", str(data)]) == 0
    assert calls[0] == ("someone/other-repo", "export50B/manifest.json")
    assert (data / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin").is_file()


@pytest.mark.parametrize("shards, match", [("4", "only has 3 training shards"), ("-1", "non-negative")])
def test_bad_shard_counts(fake_hub, capsys, shards, match):
    _, _, data = fake_hub
    assert dl.main(["--variant", "sp1024", "--train-shards", shards, "--data-dir", str(data)]) == 1
    assert match in capsys.readouterr().err
    assert not (data / "datasets").exists()


def test_variant_missing_from_repo_lists_available_and_hints(fake_hub, capsys):
    _, _, data = fake_hub
    assert dl.main(["--variant", "sp8192", "--train-shards", "1", "--data-dir", str(data)]) == 1
    err = capsys.readouterr().err
    assert "available: sp1024" in err and "MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf" in err


def test_stale_cached_manifest_is_refreshed(fake_hub, tmp_path):
    mirror, calls, data = fake_hub
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"datasets": [], "tokenizers": []}))  # e.g. from another repo
    assert dl.main(["--variant", "sp1024", "--train-shards", "1", "--data-dir", str(data)]) == 0
    assert calls[0] == (dl.DEFAULT_REPO_ID, "datasets/manifest.json")
    # --skip-manifest keeps the local manifest as-is.
    (data / "manifest.json").write_text(json.dumps({"datasets": [], "tokenizers": []}))
    assert dl.main(["--variant", "sp1024", "--skip-manifest", "--data-dir", str(data)]) == 1


def test_corrupt_remote_shard_is_detected(fake_hub, capsys):
    mirror, _, data = fake_hub
    bad = mirror / ROOT / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-10])  # truncated upload
    assert dl.main(["--variant", "sp1024", "--train-shards", "2", "--data-dir", str(data)]) == 1
    err = capsys.readouterr().err
    assert "fineweb_train_000001.bin" in err and "size mismatch" in err
    assert "fineweb_train_000000.bin" not in err


def test_invalid_local_shard_is_redownloaded(fake_hub):
    _, calls, data = fake_hub
    assert dl.main(["--variant", "sp1024", "--train-shards", "1", "--data-dir", str(data)]) == 0
    local = data / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin"
    local.write_bytes(b"garbage")
    calls.clear()
    assert dl.main(["--variant", "sp1024", "--train-shards", "1", "--data-dir", str(data)]) == 0
    assert [c[1] for c in calls] == ["datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin"]
    assert len(sf.read_shard(local)) == 50


def test_val_token_total_checked_against_manifest(fake_hub, capsys):
    mirror, _, data = fake_hub
    man = json.loads((mirror / ROOT / "manifest.json").read_text())
    man["datasets"][0]["stats"]["tokens_val"] = 999
    (mirror / ROOT / "manifest.json").write_text(json.dumps(man))
    assert dl.main(["--variant", "sp1024", "--train-shards", "0", "--data-dir", str(data)]) == 1
    assert "val split has 50 tokens but the manifest says 999" in capsys.readouterr().err


def test_local_mirror_option_without_mock(tmp_path):
    mirror = build_mirror(tmp_path / "hub")
    data = tmp_path / "data"
    assert dl.main(["--variant", "sp1024", "--train-shards", "3", "--data-dir", str(data), "--mirror", str(mirror)]) == 0
    assert len(list((data / "datasets" / "fineweb10B_sp1024").glob("fineweb_train_*.bin"))) == 3
    src = mirror / ROOT / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin"
    assert (data / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin").read_bytes() == src.read_bytes()


def test_missing_huggingface_hub_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(dl.DownloadError, match="pip install huggingface_hub"):
        dl.download_file("r/r", "datasets/manifest.json", tmp_path / "m.json")
