"""Token shards in llm.c / modded-nanogpt `.bin` layout.

A shard is a 256 x int32 little-endian header (1024 bytes) followed by the tokens:
    header[0] = magic, header[1] = version, header[2] = token count,
    header[3:11] = SHA-256 of the tokenizer that made the tokens (Furnace only; zero = not recorded), rest zero.
    magic 20240520, version 1 -> uint16 tokens (GPT-2 era layout, vocabularies up to 65536)
    magic 20240801, version 7 -> uint32 tokens (llm.c's Llama-3 layout, larger vocabularies)
Shards written by llm.c's and modded-nanogpt's FineWeb scripts are read as they are.
A headerless nanoGPT `train.bin` (plain uint16) is read with `read_raw_uint16`.

Writers never leave a file that looks complete when interrupted: tokens go to a hidden temporary
name and the header's count is filled in, fsynced and renamed at the very end.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kernels.common import FurnaceError
from model.fileio import atomic_open, disk_full_guard

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
LAYOUTS = {  # dtype name -> (magic, version)
    "uint16": (20240520, 1),
    "uint32": (20240801, 7),
}
_BY_MAGIC = {magic: (version, np.dtype(name)) for name, (magic, version) in LAYOUTS.items()}


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest shard dtype that holds every id of a vocabulary of `vocab_size` tokens."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


SHA_SLOTS = slice(3, 11)  # 8 int32 = the 32 bytes of a SHA-256; llm.c readers ignore them


def make_header(count: int, dtype: str = "uint16", tokenizer_sha256: str | None = None) -> np.ndarray:
    if dtype not in LAYOUTS:
        raise FurnaceError(f"shard dtype {dtype!r}: expected one of {sorted(LAYOUTS)}")
    magic, version = LAYOUTS[dtype]
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = magic, version, count
    if tokenizer_sha256:
        header[SHA_SLOTS] = np.frombuffer(bytes.fromhex(tokenizer_sha256), dtype="<i4")
    return header


def shard_tokenizer_sha256(path: str | os.PathLike) -> str | None:
    """The tokenizer hash recorded in a shard's header, or None (llm.c shards and older Furnace ones)."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    sha = np.frombuffer(raw, dtype="<i4")[SHA_SLOTS].tobytes()
    return sha.hex() if any(sha) else None


def check_ids(tokens: np.ndarray, dtype: str, where: str) -> None:
    """Refuse ids that the shard dtype cannot hold (no silent wrap-around at 65536)."""
    if tokens.size == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    limit = np.iinfo(np.dtype(dtype)).max
    if lo < 0 or hi > limit:
        bad = lo if lo < 0 else hi
        raise FurnaceError(f"{where}: token id {bad} does not fit in a {dtype} shard (ids must be in 0..{limit}); "
                           f"use dtype='uint32' (llm.c's Llama-3 layout) for vocabularies over 65536 tokens")


class ShardWriter:
    """Stream tokens into one shard: `append` arrays, then `close()` (atomic) or `abort()`."""

    def __init__(self, path: str | os.PathLike, dtype: str = "uint16", tokenizer_sha256: str | None = None):
        self.path = Path(path)
        self.dtype, self.tokenizer_sha256 = dtype, tokenizer_sha256
        make_header(0, dtype, tokenizer_sha256)  # validates dtype and hash
        self._atomic = atomic_open(self.path, "wb")  # closed by close() (replaces path) or abort() (removed)
        self.f = self._atomic.__enter__()
        self.count = 0
        self._write(b"\0" * HEADER_BYTES)  # placeholder: an all-zero header has no valid magic

    def _write(self, data: bytes) -> None:
        try:
            with disk_full_guard(self.path):
                self.f.write(data)
        except BaseException as e:
            self._atomic.__exit__(type(e), e, e.__traceback__)  # removes the partial file
            raise

    def append(self, tokens) -> None:
        arr = np.asarray(tokens)
        check_ids(arr, self.dtype, str(self.path))
        self._write(arr.astype(np.dtype(self.dtype).newbyteorder("<"), copy=False).tobytes())
        self.count += int(arr.size)

    def close(self) -> Path:
        self.f.seek(0)
        self._write(make_header(self.count, self.dtype, self.tokenizer_sha256).tobytes())
        self._atomic.__exit__(None, None, None)  # flush, fsync, rename
        return self.path

    def abort(self) -> None:
        if not self.f.closed:
            err = RuntimeError("shard writer aborted")
            self._atomic.__exit__(RuntimeError, err, None)


def write_shard(path: str | os.PathLike, tokens, dtype: str | None = None, tokenizer_sha256: str | None = None) -> Path:
    """Write `tokens` (any int array-like) as one shard. `dtype` None picks uint16 when every id
    fits, else uint32; an explicit 'uint16' refuses ids >= 65536 with a FurnaceError."""
    arr = np.asarray(tokens)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise FurnaceError(f"{path}: tokens must be a 1-D sequence of integer ids, got shape {arr.shape} "
                           f"dtype {arr.dtype}")
    if dtype is None:
        dtype = "uint16" if arr.size == 0 or int(arr.max()) < 2**16 else "uint32"
    w = ShardWriter(path, dtype, tokenizer_sha256)
    try:
        w.append(arr)
    except BaseException:
        w.abort()
        raise
    return w.close()


def read_header(path: str | os.PathLike) -> tuple[int, np.dtype]:
    """Check a shard's header and size; returns (token count, dtype). Errors name the file."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise FurnaceError(f"shard {p}: cannot read ({e.strerror or e})") from None
    if len(raw) < HEADER_BYTES:
        raise FurnaceError(f"shard {p} [size check]: {size} bytes, shorter than the {HEADER_BYTES}-byte header; the file is "
                           f"truncated or not a token shard (re-run data/prepare.py; for a headerless "
                           f"nanoGPT train.bin use --raw-uint16)")
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, count = int(header[0]), int(header[1]), int(header[2])
    if magic not in _BY_MAGIC:
        raise FurnaceError(f"shard {p} [header check]: wrong magic number {magic}, expected 20240520 (uint16 tokens) or "
                           f"20240801 (uint32 tokens); not an llm.c-format shard, or an unfinished one "
                           f"(for a headerless nanoGPT train.bin use --raw-uint16)")
    want_version, dt = _BY_MAGIC[magic]
    if version != want_version:
        raise FurnaceError(f"shard {p} [header check]: magic {magic} expects version {want_version}, found version {version}")
    expected = HEADER_BYTES + count * dt.itemsize
    if count < 0 or size != expected:
        raise FurnaceError(f"shard {p} [size check]: header says {count} {dt.name} tokens, so the file should be {expected} "
                           f"bytes, but it is {size} bytes (truncated or damaged: prepare the data again)")
    return count, dt


def read_shard(path: str | os.PathLike) -> np.memmap:
    """Memory-map a shard's tokens (no copy) after checking magic, version and file size."""
    count, dt = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=dt.newbyteorder("<")).view(np.memmap)
    return np.memmap(path, dtype=dt.newbyteorder("<"), mode="r", offset=HEADER_BYTES, shape=(count,))


def read_raw_uint16(path: str | os.PathLike) -> np.memmap:
    """Memory-map a headerless nanoGPT-style uint16 token file."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise FurnaceError(f"raw token file {p}: cannot read ({e.strerror or e})") from None
    if size % 2:
        raise FurnaceError(f"raw token file {p}: {size} bytes is not a whole number of uint16 tokens "
                           f"(truncated, or not a nanoGPT train.bin)")
    if size == 0:
        raise FurnaceError(f"raw token file {p}: empty")
    return np.memmap(p, dtype="<u2", mode="r")
