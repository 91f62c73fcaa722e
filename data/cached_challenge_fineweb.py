#!/usr/bin/env python3
"""Download the challenge's pre-tokenized FineWeb shards and tokenizer from Hugging Face.

Same usage as the official openai/parameter-golf script:

    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 10

Files land in data/manifest.json, data/datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin
and data/tokenizers/. The export is manifest-driven: <root>/manifest.json in the dataset repo lists
every dataset (shard counts under "stats") and its tokenizer files. The whole val split is always
fetched; --train-shards N fetches the first N train shards. Every shard's header and size are
checked afterwards. Environment overrides (as upstream): MATCHED_FINEWEB_REPO_ID (default
willdepueoai/parameter-golf) and MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (default "datasets").
--mirror DIR copies from a local directory laid out like the repo instead (offline use).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

try:
    from shard_format import read_header
except ImportError:  # imported as part of a package, e.g. `data.cached_challenge_fineweb`
    from .shard_format import read_header

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
DATA_DIR = Path(__file__).resolve().parent
# Variants missing from the default repo but published elsewhere (per the upstream record READMEs).
KNOWN_ALT_REPOS = {"sp8192": "kevclark/parameter-golf"}


class DownloadError(RuntimeError):
    """A problem reported to the user as-is."""


def dataset_dir_for_variant(variant: str) -> str:
    if variant == "byte260" or re.fullmatch(r"sp[1-9][0-9]*", variant):
        return f"fineweb10B_{variant}"
    raise DownloadError(f"unknown variant {variant!r}: expected byte260 or sp<VOCAB_SIZE>, e.g. sp1024 or sp8192")


def download_file(repo_id: str, remote_path: str, destination: Path, mirror: Path | None = None) -> None:
    """Fetch one file of the dataset repo to `destination`. The only function that uses the network."""
    if mirror is not None:
        source = Path(mirror) / remote_path
        if not source.is_file():
            raise DownloadError(f"{remote_path} not found in mirror {mirror}")
        link = False
    else:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise DownloadError("downloading needs huggingface_hub: pip install huggingface_hub (or use --mirror DIR)") from None
        try:
            cached = hf_hub_download(repo_id=repo_id, filename=remote_path, repo_type="dataset")
        except Exception as e:  # network, auth, missing file: all fatal here
            raise DownloadError(f"failed to download {remote_path} from {repo_id}: {e}") from None
        source, link = Path(cached).resolve(strict=True), True  # HF cache entries are symlinks to blobs
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    part.unlink(missing_ok=True)
    try:
        if not link:
            raise OSError
        os.link(source, part)  # hard link into the HF cache: no second copy on disk
    except OSError:
        shutil.copyfile(source, part)
    os.replace(part, destination)


class Fetcher:
    """Maps <remote root>/<rel> in the repo to data_dir/<rel> locally and downloads on demand."""

    def __init__(self, repo_id: str, remote_root: str, data_dir: Path, mirror: Path | None = None):
        self.repo_id, self.remote_root, self.data_dir, self.mirror = repo_id, remote_root.strip("/"), data_dir, mirror
        self.downloaded: list[str] = []

    def get(self, rel: str, force: bool = False) -> Path:
        local = self.data_dir / rel
        if force or not local.is_file():
            remote = f"{self.remote_root}/{rel}" if self.remote_root else rel
            download_file(self.repo_id, remote, local, self.mirror)
            self.downloaded.append(rel)
        return local


def shard_error(path: Path) -> str | None:
    try:
        read_header(path)
    except (ValueError, OSError) as e:
        return str(e)
    return None


def download(variant: str, train_shards: int, *, data_dir: Path = DATA_DIR, repo_id: str = DEFAULT_REPO_ID,
             remote_root: str = DEFAULT_REMOTE_ROOT, mirror: Path | None = None, skip_manifest: bool = False,
             with_docs: bool = False, log=print) -> dict:
    dataset_dir = dataset_dir_for_variant(variant)
    if train_shards < 0:
        raise DownloadError(f"--train-shards must be non-negative, got {train_shards}")
    fetch = Fetcher(repo_id, remote_root, Path(data_dir), mirror)

    manifest_path = fetch.data_dir / "manifest.json"
    if not manifest_path.is_file() and skip_manifest:
        raise DownloadError(f"--skip-manifest given but no manifest at {manifest_path}; it holds the shard counts")
    fresh = not manifest_path.is_file()
    manifest = json.loads(fetch.get("manifest.json").read_text(encoding="utf-8"))

    def find(kind, name):
        return next((x for x in manifest.get(kind, []) if x.get("name") == name), None)

    entry = find("datasets", dataset_dir)
    if entry is None and not fresh and not skip_manifest:  # cached manifest may come from another repo
        log(f"{dataset_dir} not in cached {manifest_path}; fetching the manifest again from {repo_id}")
        manifest = json.loads(fetch.get("manifest.json", force=True).read_text(encoding="utf-8"))
        entry = find("datasets", dataset_dir)
    if entry is None:
        names = sorted(x.get("name", "").removeprefix("fineweb10B_") for x in manifest.get("datasets", []))
        msg = f"variant {variant} ({dataset_dir}) is not in the manifest of {repo_id}; available: {', '.join(names) or 'none'}"
        if variant in KNOWN_ALT_REPOS and repo_id != KNOWN_ALT_REPOS[variant]:
            msg += (f". {variant} is published in {KNOWN_ALT_REPOS[variant]}: MATCHED_FINEWEB_REPO_ID="
                    f"{KNOWN_ALT_REPOS[variant]} python3 data/cached_challenge_fineweb.py --variant {variant}")
        raise DownloadError(msg)
    stats = entry.get("stats") or {}
    max_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards > max_train:
        raise DownloadError(f"{variant} only has {max_train} training shards on {repo_id}, requested {train_shards}")
    tok_entry = find("tokenizers", entry.get("tokenizer_name"))
    if tok_entry is None:
        raise DownloadError(f"tokenizer {entry.get('tokenizer_name')!r} of {dataset_dir} is not in the manifest")
    tok_files = [str(tok_entry[k]) for k in ("model_path", "vocab_path", "path") if tok_entry.get(k)]
    if not tok_files:
        raise DownloadError(f"manifest tokenizer entry has no files to download: {tok_entry}")

    if with_docs:
        fetch.get("docs_selected.jsonl")
        fetch.get("docs_selected.source_manifest.json")
    shards = {"val": [f"datasets/{dataset_dir}/fineweb_val_{i:06d}.bin" for i in range(n_val)],
              "train": [f"datasets/{dataset_dir}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]}
    errors, tokens = [], {"val": 0, "train": 0}
    for split, rels in shards.items():
        for n, rel in enumerate(rels, 1):
            local = fetch.data_dir / rel
            if not local.is_file():
                log(f"[{split} {n}/{len(rels)}] {rel}")
                fetch.get(rel)
            elif err := shard_error(local):
                log(f"re-downloading invalid local shard: {err}")
                fetch.get(rel, force=True)
            if err := shard_error(local):
                errors.append(err)
            else:
                tokens[split] += read_header(local)
    for rel in tok_files:
        fetch.get(rel)

    if not errors and stats.get("tokens_val") is not None and tokens["val"] != int(stats["tokens_val"]):
        errors.append(f"val split has {tokens['val']} tokens but the manifest says {stats['tokens_val']}")
    if errors:
        raise DownloadError("corrupt download(s); delete them and re-run:\n  " + "\n  ".join(errors))

    model = next((f for f in tok_files if f.endswith(".model")), tok_files[0])
    log(f"{dataset_dir} from {repo_id}: {len(fetch.downloaded)} file(s) downloaded, all shards verified")
    for split in ("val", "train"):
        log(f"  {split:5s}: {len(shards[split])} shard(s), {tokens[split]:,} tokens")
    log(f"  tokenizer: {', '.join(tok_files)}")
    log(f"  DATA_PATH={fetch.data_dir / 'datasets' / dataset_dir} TOKENIZER_PATH={fetch.data_dir / model}")
    return {"dataset_dir": fetch.data_dir / "datasets" / dataset_dir, "shards": len(shards["val"]) + train_shards,
            "tokens": tokens, "tokenizer_files": tok_files, "downloaded": fetch.downloaded}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Download challenge FineWeb shards from Hugging Face")
    p.add_argument("train_shards_positional", nargs="?", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--train-shards", type=int, default=80, help="number of training shards to download (default: 80)")
    p.add_argument("--variant", default="sp1024", help="tokenizer family, e.g. sp1024, sp4096, sp8192 or byte260")
    p.add_argument("--skip-manifest", action="store_true", help="use the local data/manifest.json; don't download it")
    p.add_argument("--with-docs", action="store_true", help="also download docs_selected.jsonl and its sidecar")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="where datasets/ and tokenizers/ go (default: data/)")
    p.add_argument("--mirror", type=Path, default=None, help="copy from this local directory laid out like the HF repo")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    train_shards = args.train_shards if args.train_shards_positional is None else args.train_shards_positional
    try:
        download(args.variant, train_shards, data_dir=args.data_dir, mirror=args.mirror,
                 repo_id=os.environ.get("MATCHED_FINEWEB_REPO_ID", DEFAULT_REPO_ID),
                 remote_root=os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT),
                 skip_manifest=args.skip_manifest, with_docs=args.with_docs)
    except (DownloadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
