#!/usr/bin/env python3
"""Tokenize a text corpus into challenge-format shards (fineweb_{train,val}_NNNNNN.bin).

Inputs are JSONL files (one JSON object per line; the text lives under --text-key, default "text")
or plain .txt files (one document per non-blank line, or --whole-file for one document per file),
optionally .gz / .xz compressed. Every document becomes [BOS] + SentencePiece ids (no EOS), and
documents are concatenated into shards of --shard-tokens tokens (a document may span two shards),
exactly like the official export.

Validation split: the first --val-docs N documents (or the first round(F * total) with
--val-fraction F) go to val, the rest to train; or give separate --train and --val files.

    python3 data/tokenize_corpus.py corpus.jsonl.gz --tokenizer data/tokenizers/fineweb_8192_bpe.model \
        --out data/datasets/mycorpus_sp8192 --val-docs 50000 --workers 8
"""
from __future__ import annotations

import argparse
import collections
import gzip
import itertools
import json
import lzma
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

try:
    from shard_format import MAX_TOKEN_ID, write_shard
except ImportError:  # imported as part of a package, e.g. `data.tokenize_corpus`
    from .shard_format import MAX_TOKEN_ID, write_shard

OPENERS = {".gz": gzip.open, ".xz": lzma.open}
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "txt"}


class CorpusError(ValueError):
    """A problem with the inputs, tokenizer or output directory, reported to the user as-is."""


# ----------------------------------------------------------------------------- reading documents

def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    name = path.name[: -len(path.suffix)] if path.suffix in OPENERS else path.name
    found = FORMATS.get(Path(name).suffix.lower())
    if found is None:
        raise CorpusError(f"{path}: cannot tell the format from the file name; pass --format jsonl or --format txt")
    return found


def iter_documents(path, fmt: str = "auto", text_key: str = "text", whole_file: bool = False):
    """Yield the non-empty document texts of one input file, in order."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    opener = OPENERS.get(path.suffix, open)
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if fmt == "txt" and whole_file:
                text = f.read().rstrip("\r\n")
                if text.strip():
                    yield text
                return
            for lineno, line in enumerate(f, 1):
                if fmt == "txt":
                    line = line.rstrip("\r\n")
                    if line.strip():
                        yield line
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or text_key not in obj:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise CorpusError(f"{path}:{lineno}: no {text_key!r} field (found {keys}); use --text-key")
                text = obj[text_key]
                if not isinstance(text, str):
                    raise CorpusError(f"{path}:{lineno}: field {text_key!r} is {type(text).__name__}, not a string")
                if text:
                    yield text
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not valid UTF-8 ({e.reason})") from None
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise CorpusError(f"{path}: cannot read: {e}") from None


# ----------------------------------------------------------------------------- tokenizer

def check_tokenizer(sp, name) -> int:
    """Check that ids fit uint16 and that a BOS token exists; return the BOS id."""
    vocab = sp.get_piece_size()
    if vocab - 1 > MAX_TOKEN_ID:
        raise CorpusError(f"{name}: vocab size {vocab} is too large; shard tokens are uint16 (ids 0..{MAX_TOKEN_ID})")
    if sp.bos_id() < 0:
        raise CorpusError(f"{name}: tokenizer has no BOS token (train it with bos_id >= 0)")
    return sp.bos_id()


def load_tokenizer(path):
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"tokenizer model not found: {path}")
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # sentencepiece raises OSError/RuntimeError depending on version
        raise CorpusError(f"{path}: cannot load SentencePiece model: {e}") from None
    return sp, check_tokenizer(sp, path)


def encode_docs(sp, bos: int, texts: list[str]) -> list[np.ndarray]:
    return [np.array([bos, *ids], dtype=np.uint16) for ids in sp.encode(texts)]


_worker_state = None  # (sp, bos) in worker processes


def _init_worker(model_path: str) -> None:
    global _worker_state
    _worker_state = load_tokenizer(model_path)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return encode_docs(*_worker_state, texts)


def encoded_batches(batches, model_path, sp, bos, workers: int):
    """Yield (splits, token arrays) per batch, in input order; at most 4*workers batches in flight."""
    if workers <= 1:
        for splits, texts in batches:
            yield splits, encode_docs(sp, bos, texts)
        return
    with mp.Pool(workers, _init_worker, (str(model_path),)) as pool:
        pending = collections.deque()
        for splits, texts in batches:
            pending.append((splits, pool.apply_async(_encode_in_worker, (texts,))))
            if len(pending) >= 4 * workers:
                splits, result = pending.popleft()
                yield splits, result.get()
        while pending:
            splits, result = pending.popleft()
            yield splits, result.get()


# ----------------------------------------------------------------------------- writing shards

class ShardWriter:
    """Concatenates documents into fixed-size shards named fineweb_<split>_NNNNNN.bin."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split = out_dir, split
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = self.docs = self.tokens = 0
        self.paths: list[Path] = []

    def add(self, toks: np.ndarray) -> None:
        self.docs += 1
        self.tokens += len(toks)
        pos = 0
        while pos < len(toks):
            take = min(len(self.buf) - self.fill, len(toks) - pos)
            self.buf[self.fill : self.fill + take] = toks[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == len(self.buf):
                self.flush()

    def flush(self) -> None:
        if self.fill:
            path = self.out_dir / f"fineweb_{self.split}_{len(self.paths):06d}.bin"
            write_shard(path, self.buf[: self.fill])
            self.paths.append(path)
            self.fill = 0


# ----------------------------------------------------------------------------- driver

def tokenize_corpus(
    train_files,
    out_dir,
    tokenizer,
    *,
    val_files=None,
    val_docs: int | None = None,
    val_fraction: float | None = None,
    text_key: str = "text",
    fmt: str = "auto",
    whole_file: bool = False,
    shard_tokens: int = 100_000_000,
    workers: int = 1,
    overwrite: bool = False,
    batch_docs: int = 256,
    log_every: int = 100_000,
    log=print,
) -> dict:
    """Tokenize the inputs into out_dir; returns {"train": {...}, "val": {...}} with docs/tokens/shards."""
    train_files, val_files = [Path(p) for p in train_files], [Path(p) for p in val_files or []]
    out_dir = Path(out_dir)
    if not train_files:
        raise CorpusError("no input files given")
    for p in train_files + val_files:
        if not p.is_file():
            raise CorpusError(f"input file not found: {p}")
    if val_files and (val_docs is not None or val_fraction is not None):
        raise CorpusError("use either --val files or --val-docs/--val-fraction, not both")
    if val_docs is not None and val_fraction is not None:
        raise CorpusError("use either --val-docs or --val-fraction, not both")
    if not val_files and val_docs is None and val_fraction is None:
        raise CorpusError("choose a validation split: --val-docs N, --val-fraction F, or --val FILES")
    if val_docs is not None and val_docs < 0:
        raise CorpusError(f"--val-docs must be >= 0, got {val_docs}")
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens <= 0:
        raise CorpusError(f"--shard-tokens must be positive, got {shard_tokens}")
    if workers < 1:
        raise CorpusError(f"--workers must be >= 1, got {workers}")
    sp, bos = load_tokenizer(tokenizer)

    def docs_of(files):
        return itertools.chain.from_iterable(iter_documents(p, fmt, text_key, whole_file) for p in files)

    # A first pass counts documents (needed for --val-fraction) and catches malformed input
    # before anything is written.
    log(f"counting documents in {len(train_files) + len(val_files)} file(s)...")
    n_train_in = sum(1 for _ in docs_of(train_files))
    n_val_in = sum(1 for _ in docs_of(val_files))
    total = n_train_in + n_val_in
    if total == 0:
        raise CorpusError("no documents found in the inputs (all files empty or blank?)")
    if not val_files:
        if val_fraction is not None:
            val_docs = max(1, round(val_fraction * total)) if val_fraction > 0 else 0
        if val_docs >= total:
            raise CorpusError(f"--val-docs/--val-fraction selects {val_docs} of {total} documents, leaving none for train")
    elif n_train_in == 0:
        raise CorpusError("no documents found in the train inputs")
    if (val_files and n_val_in == 0) or val_docs == 0:
        log("warning: the validation split is empty; no fineweb_val_*.bin will be written")

    out_dir.mkdir(parents=True, exist_ok=True)
    stale = sorted(out_dir.glob("fineweb_*.bin"))
    if stale and not overwrite:
        raise CorpusError(f"{out_dir} already contains {len(stale)} fineweb_*.bin shard(s); pass --overwrite to replace them")
    for p in stale:
        p.unlink()

    if val_files:
        labeled = itertools.chain(zip(itertools.repeat("val"), docs_of(val_files)),
                                  zip(itertools.repeat("train"), docs_of(train_files)))
    else:
        labeled = (("val" if i < val_docs else "train", t) for i, t in enumerate(docs_of(train_files)))

    def batches():
        while chunk := list(itertools.islice(labeled, batch_docs)):
            yield [s for s, _ in chunk], [t for _, t in chunk]

    writers = {s: ShardWriter(out_dir, s, shard_tokens) for s in ("train", "val")}
    start, done, next_log = time.time(), 0, log_every if log_every > 0 else float("inf")
    for splits, arrays in encoded_batches(batches(), tokenizer, sp, bos, workers):
        for split, toks in zip(splits, arrays):
            writers[split].add(toks)
        done += len(splits)
        if done >= next_log:
            ntok = sum(w.tokens for w in writers.values())
            log(f"{done:,}/{total:,} docs, {ntok:,} tokens, {done / (time.time() - start):,.0f} docs/s")
            next_log += log_every
    for w in writers.values():
        w.flush()

    stats = {s: {"docs": w.docs, "tokens": w.tokens, "shards": len(w.paths)} for s, w in writers.items()}
    log(f"done in {time.time() - start:.1f}s -> {out_dir}")
    for s, st in stats.items():
        log(f"  {s:5s}: {st['docs']:,} docs, {st['tokens']:,} tokens, {st['shards']} shard(s)")
    log(f"  vocab size {sp.get_piece_size()}, BOS id {bos}, shard size {shard_tokens:,} tokens")
    return stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="*", help="corpus files (.jsonl/.json/.txt, optionally .gz/.xz)")
    p.add_argument("--train", nargs="+", default=[], metavar="FILE", help="training inputs (same as positional)")
    p.add_argument("--val", nargs="+", default=[], metavar="FILE", help="separate validation inputs")
    p.add_argument("--val-docs", type=int, help="put the first N documents in the val split")
    p.add_argument("--val-fraction", type=float, help="put the first round(F * total) documents in val")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    p.add_argument("--out", required=True, help="output directory for the shards")
    p.add_argument("--text-key", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "txt"], help="input format (default: by extension)")
    p.add_argument("--whole-file", action="store_true", help="each .txt file is one document (default: one per line)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default: 100M)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument("--overwrite", action="store_true", help="delete existing fineweb_*.bin in --out first")
    p.add_argument("--log-every", type=int, default=100_000, help="progress line every N docs")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tokenize_corpus(
            args.inputs + args.train, args.out, args.tokenizer, val_files=args.val, val_docs=args.val_docs,
            val_fraction=args.val_fraction, text_key=args.text_key, fmt=args.format, whole_file=args.whole_file,
            shard_tokens=args.shard_tokens, workers=args.workers, overwrite=args.overwrite, log_every=args.log_every,
        )
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
