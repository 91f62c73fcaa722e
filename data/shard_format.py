"""Read/write the challenge's token shard format.

A shard is a 256-entry little-endian int32 header followed by uint16 little-endian tokens:
    header[0] = 20240520 (magic), header[1] = 1 (version), header[2] = number of tokens.
The file is exactly HEADER_BYTES + 2 * ntokens bytes long.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKEN_ID = np.iinfo(np.uint16).max  # 65535


def write_shard(path: str | os.PathLike, tokens) -> int:
    """Write `tokens` (any int array-like with values in [0, 65535]) as a shard; returns the token count.

    Written to a temporary file and renamed, so an interrupted write never leaves a valid-looking shard.
    """
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"{path}: tokens must be a 1-D array, got shape {arr.shape}")
    if arr.size and (arr.dtype.kind not in "iu" or int(arr.min()) < 0 or int(arr.max()) > MAX_TOKEN_ID):
        raise ValueError(f"{path}: tokens must be integers in [0, {MAX_TOKEN_ID}] to fit uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, arr.size
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(arr.astype("<u2", copy=False).tobytes())
    os.replace(tmp, path)
    return int(arr.size)


def read_header(path: str | os.PathLike) -> int:
    """Validate a shard's header and file size without reading its tokens; returns the token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: file is {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != MAGIC:
        raise ValueError(f"{path}: bad magic {int(header[0])} (expected {MAGIC}); not a token shard")
    if int(header[1]) != VERSION:
        raise ValueError(f"{path}: unsupported version {int(header[1])} (expected {VERSION})")
    ntokens = int(header[2])
    expected = HEADER_BYTES + 2 * ntokens
    if ntokens < 0 or size != expected:
        raise ValueError(
            f"{path}: size mismatch: header says {ntokens} tokens ({expected} bytes) but file is {size} bytes"
        )
    return ntokens


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Return a validated shard's tokens as a native uint16 array."""
    ntokens = read_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=ntokens, offset=HEADER_BYTES)
    return tokens.astype(np.uint16, copy=False)
