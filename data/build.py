"""`prepare`: documents -> tokenizer -> train/val token shards + tokenizer.json + manifest.json.

Output folder layout:
    train_000000.bin ...  val_000000.bin ...   llm.c-format shards (see data/shards.py)
    tokenizer.json                             the tokenizer (Hugging Face format)
    manifest.json                              tokenizer sha256, vocab size, special ids, shards, sources
Each document is preceded by <|endoftext|> (as llm.c does), so documents can be cut back out exactly.
Documents are assigned to val by whole documents: the first document and then every
1/val_fraction-th one, so the val split is never empty and is spread over the sources.

Atomicity: shards are written into a hidden staging folder (`.staging-<pid>`) and moved into
place only when every shard is complete; manifest.json is written last. An interrupted run leaves
no manifest and no complete-looking shard; the next run removes the stale staging folder.
"""
from __future__ import annotations

import itertools
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from data.shards import ShardWriter, dtype_for_vocab, read_raw_uint16
from data.sources import SourceStats, describe_sources, iter_documents
from data.tokenizer import TOKENIZER_FILE, Tokenizer, gpt2_tokenizer, load_tokenizer, train_bpe
from kernels.common import FurnaceError
from model.fileio import atomic_write_json, read_json_object

log = logging.getLogger("furnace")

MANIFEST_FILE = "manifest.json"
DEFAULT_DATA_DIR = Path("runs") / "data" / "stdlib-bpe4096"  # the default corpus, relative to the working dir
MANIFEST_FORMAT = "furnace-token-shards"
DEFAULT_SHARD_TOKENS = 100_000_000      # llm.c's FineWeb shard size
TOKENIZER_SAMPLE_BYTES = 200_000_000    # the BPE is trained on at most this much text (first documents)
CHUNK_BYTES = 1 << 18                   # documents are sent to the workers in ~256 KB batches


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a folder made by `prepare` (FurnaceError naming the folder otherwise)."""
    d = Path(data_dir)
    f = d / MANIFEST_FILE
    if not f.is_file():
        raise FurnaceError(f"data folder {d}: no {MANIFEST_FILE} (not made by data/prepare.py, or its run was "
                           f"interrupted: prepare it again)")
    m = read_json_object(f, "manifest fields", "; prepare the data again")
    if m.get("format") != MANIFEST_FORMAT:
        raise FurnaceError(f"{f}: not a Furnace data manifest (format {m.get('format')!r})")
    return m


# ---- tokenizer choice ----------------------------------------------------------------------------
def resolve_tokenizer(spec: str, docs_factory, describe: str = "sources") -> Tokenizer:
    """`train:VOCAB` (trained on the documents), `gpt2` (tiktoken) or a tokenizer.json / folder path."""
    if spec.startswith("train:"):
        try:
            vocab = int(spec.split(":", 1)[1])
        except ValueError:
            raise FurnaceError(f"--tokenizer {spec}: expected train:VOCAB with an integer VOCAB, e.g. train:4096") from None

        docs = docs_factory()
        first = next(docs, None)
        if first is None:
            raise FurnaceError(f"{describe}: no documents with text found (empty source)")
        n = 0

        def sample():
            nonlocal n
            for text in itertools.chain([first], docs):
                yield text
                n += len(text)
                if n >= TOKENIZER_SAMPLE_BYTES:
                    log.info(f"tokenizer: trained on the first {n / 1e6:.0f} MB of text (a sample of the corpus)")
                    return

        t0 = time.time()
        tok = train_bpe(sample(), vocab)
        log.info(f"tokenizer: byte-level BPE, {tok.vocab_size} tokens, trained in {time.time() - t0:.1f}s")
        return tok
    if spec == "gpt2":
        return gpt2_tokenizer()
    tok = load_tokenizer(spec)
    tok.eos_id  # noqa: B018  (raises a FurnaceError when the tokenizer has no <|endoftext|>)
    return tok


# ---- multi-core encoding -------------------------------------------------------------------------
_WORKER_TOK: Tokenizer | None = None  # set in the parent before forking; inherited by the workers


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> (all ids concatenated as uint32, per-document lengths): two arrays pickle fast."""
    ids = _WORKER_TOK.encode_batch(texts, ordinary=True)
    lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((i for x in ids for i in x), dtype=np.uint32, count=int(lens.sum()))
    return flat, lens


def _chunks(docs, chunk_bytes=CHUNK_BYTES):
    buf, n = [], 0
    for text in docs:
        buf.append(text)
        n += len(text)
        if n >= chunk_bytes:
            yield buf
            buf, n = [], 0
    if buf:
        yield buf


def encode_stream(tok: Tokenizer, docs, workers: int):
    """Yield (text, ids) in document order, encoding on `workers` processes with bounded read-ahead."""
    global _WORKER_TOK
    _WORKER_TOK = tok
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        if workers > 1:
            log.info("prepare: no fork start method on this platform -> tokenizing in one process")
        for chunk in _chunks(docs):
            flat, lens = _encode_chunk(chunk)
            yield from zip(chunk, np.split(flat, np.cumsum(lens)[:-1]))
        return
    # Forked workers inherit the tokenizer; TOKENIZERS_PARALLELISM=false keeps each one single-threaded
    # (and silences the Rust library's fork warning).
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            pending = deque()
            for chunk in _chunks(docs):
                pending.append((chunk, pool.apply_async(_encode_chunk, (chunk,))))
                while len(pending) > 2 * workers:
                    yield from _finish(pending.popleft())
            while pending:
                yield from _finish(pending.popleft())
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _finish(item):
    chunk, res = item
    flat, lens = res.get()
    return zip(chunk, np.split(flat, np.cumsum(lens)[:-1]))


# ---- shard writing -------------------------------------------------------------------------------
class SplitWriter:
    """Writes one split as a series of shards of at most `shard_tokens` tokens into `staging`."""

    def __init__(self, staging: Path, split: str, dtype: str, shard_tokens: int, tokenizer_sha256: str | None = None):
        self.staging, self.split, self.dtype, self.shard_tokens = staging, split, dtype, shard_tokens
        self.tokenizer_sha256 = tokenizer_sha256
        self.shards: list[dict] = []
        self.writer: ShardWriter | None = None
        self.documents = 0

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + (self.writer.count if self.writer else 0)

    def add(self, ids: np.ndarray) -> None:
        while ids.size:
            if self.writer is None:
                name = f"{self.split}_{len(self.shards):06d}.bin"
                self.writer = ShardWriter(self.staging / name, self.dtype, self.tokenizer_sha256)
            room = self.shard_tokens - self.writer.count
            self.writer.append(ids[:room])
            ids = ids[room:]
            if self.writer.count >= self.shard_tokens:
                self._close()

    def _close(self) -> None:
        self.shards.append({"file": self.writer.path.name, "tokens": self.writer.count})
        self.writer.close()
        self.writer = None

    def finish(self) -> list[dict]:
        if self.writer is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _is_val(i: int, val_fraction: float) -> bool:
    """Document i goes to val: the first one, then one each time i * val_fraction crosses an integer."""
    return i == 0 or math.floor(i * val_fraction) > math.floor((i - 1) * val_fraction)


def _write_docs(encoded, writers: dict, eos: int, val_fraction: float, max_tokens: int | None, bar) -> bool:
    """Route (text, ids) to the val/train writers, each document preceded by EOS. Returns True when
    max_tokens cut the corpus short (the last document written may then be cut)."""
    total = 0
    for i, (_text, ids) in enumerate(encoded):
        doc = np.empty(ids.size + 1, dtype=np.uint32)  # (1 + n,) EOS then the document
        doc[0] = eos
        doc[1:] = ids
        if max_tokens is not None and total + doc.size >= max_tokens:
            doc = doc[:max_tokens - total]
        w = writers["val"] if _is_val(i, val_fraction) else writers["train"]
        w.add(doc)
        w.documents += 1
        total += doc.size
        bar.update(doc.size)
        bar.set_postfix(docs=i + 1, refresh=False)
        if max_tokens is not None and total >= max_tokens:
            return True
    return False


def _write_raw(sources, writers: dict, eos: int, vocab_size: int, val_fraction: float,
               max_tokens: int | None, bar) -> None:
    """Headerless nanoGPT uint16 files -> shards. Val is the tail, starting at an EOS boundary."""
    step = 1 << 22
    arrays = [read_raw_uint16(s) for s in sources]
    total = sum(a.size for a in arrays)
    if max_tokens is not None:
        total = min(total, max_tokens)
    cut = int(total * (1 - val_fraction))
    done = 0
    for src, arr in zip(sources, arrays):
        for start in range(0, arr.size, step):
            chunk = np.asarray(arr[start:start + step])[:max(0, total - done)]
            if chunk.size and int(chunk.max()) >= vocab_size:
                raise FurnaceError(f"raw token file {src}: token id {int(chunk.max())} is outside the tokenizer's "
                                   f"vocabulary of {vocab_size} (wrong --tokenizer for this file?)")
            if done <= cut < done + chunk.size:
                k = cut - done
                eos_pos = np.flatnonzero(chunk[k:] == eos)
                k += int(eos_pos[0]) if eos_pos.size else 0
                writers["train"].add(chunk[:k])
                writers["val"].add(chunk[k:])
            else:
                (writers["train"] if done < cut else writers["val"]).add(chunk)
            done += chunk.size
            bar.update(chunk.size)
    writers["train"].documents = writers["val"].documents = None


def prepare(out_dir, *args, **kwargs) -> dict:
    """`_prepare` (below), and when it fails or is interrupted, the folders it created (`out_dir` and any
    missing parents) are removed again if they are empty: a failed run leaves nothing behind."""
    out = Path(out_dir)
    created = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    try:
        return _prepare(out_dir, *args, **kwargs)
    except BaseException:
        for d in created:
            try:
                d.rmdir()
            except OSError:  # not empty (or already gone): it holds something this run did not create
                break
        raise


def _prepare(out_dir, sources=None, tokenizer: str = "train:4096", text_field: str = "text",
            val_fraction: float = 0.01, max_tokens: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            hf: str | None = None, hf_config: str | None = None, hf_split: str = "train",
            raw_uint16: bool = False, workers: int | None = None, progress: bool = True,
            max_files: int | None = None, overwrite: bool = False) -> dict:
    """Tokenize the sources into `out_dir` and return the manifest (also written as manifest.json).
    sources=None (and no hf) uses the embedded default corpus: this interpreter's stdlib .py files."""
    from tqdm import tqdm

    out = Path(out_dir)
    sources = [str(s) for s in sources] if sources else []
    if not 0 < val_fraction < 1:
        raise FurnaceError(f"--val-fraction {val_fraction}: expected a number between 0 and 1 (exclusive); a "
                           f"validation split always exists")
    if shard_tokens < 1:
        raise FurnaceError(f"--shard-tokens {shard_tokens}: expected a positive number of tokens")
    if max_tokens is not None and max_tokens < 2:
        raise FurnaceError(f"--max-tokens {max_tokens}: expected at least 2 (one train and one val token)")
    if hf and sources:
        raise FurnaceError("--hf and --source cannot be combined: prepare one of them per data folder")
    if raw_uint16 and (hf or not sources):
        raise FurnaceError("--raw-uint16 converts headerless nanoGPT .bin files: pass them with --source")
    if raw_uint16 and tokenizer.startswith("train:"):
        raise FurnaceError(f"--raw-uint16 with --tokenizer {tokenizer}: the file already holds token ids, so the "
                           f"tokenizer cannot be trained; pass --tokenizer gpt2 or the tokenizer.json they came from")
    if out.exists() and not out.is_dir():
        raise FurnaceError(f"--out {out}: exists and is not a folder")
    if (out / MANIFEST_FILE).exists() and not overwrite:
        raise FurnaceError(f"--out {out}: already holds prepared data ({MANIFEST_FILE}); pass --overwrite to "
                           f"replace it or choose another folder")
    workers = workers or os.cpu_count() or 1

    def docs(stats=None):
        return iter_documents(sources, text_field, hf, hf_config, hf_split, stats or SourceStats(), max_files)

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tok = resolve_tokenizer(tokenizer, docs, _describe(sources, hf))
    dtype = dtype_for_vocab(tok.vocab_size)
    staging = out / f".staging-{os.getpid()}"
    staging.mkdir()
    writers = {s: SplitWriter(staging, s, dtype, shard_tokens, tok.sha256) for s in ("train", "val")}
    stats = SourceStats()
    t0 = time.time()
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="prepare", mininterval=1.0,
               disable=not (progress and sys.stderr.isatty()))  # a bar on a terminal; never \r lines in a log file
    try:
        if raw_uint16:
            _write_raw(sources, writers, tok.eos_id, tok.vocab_size, val_fraction, max_tokens, bar)
            capped = max_tokens is not None
        else:
            encoded = encode_stream(tok, docs(stats), workers)
            try:
                capped = _write_docs(encoded, writers, tok.eos_id, val_fraction, max_tokens, bar)
            finally:
                encoded.close()  # stops the worker pool when max_tokens ended the run early
        shards = {s: w.finish() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        bar.close()
    seconds = time.time() - t0
    if not raw_uint16 and stats.documents == 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise FurnaceError(f"{_describe(sources, hf)}: no documents with text found (empty source"
                           f"{'; ' + str(stats.unreadable) + ' unreadable files skipped' if stats.unreadable else ''})")
    counts = {s: sum(x["tokens"] for x in v) for s, v in shards.items()}
    if counts["train"] == 0 or counts["val"] == 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise FurnaceError(f"{_describe(sources, hf)}: too little data for a train and a val split "
                           f"({counts['train']} train / {counts['val']} val tokens from {stats.documents} documents); "
                           f"give at least two documents, or a larger --max-tokens")
    if stats.replaced or stats.unreadable:
        log.warning(f"prepare: {stats.replaced} non-UTF-8 files/lines decoded with replacement characters, "
                    f"{stats.unreadable} unreadable files skipped (e.g. {'; '.join(stats.examples[:3])})")
    if stats.empty:
        log.info(f"prepare: {stats.empty} empty documents skipped")

    manifest = {
        "format": MANIFEST_FORMAT, "version": 1,
        "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
        "special_ids": tok.special_ids, "tokenizer": {"spec": tokenizer, "file": TOKENIZER_FILE},
        "dtype": dtype, "shards": shards, "tokens": counts,
        "documents": {s: w.documents for s, w in writers.items()},
        "sources": describe_sources(sources, hf, hf_config, hf_split, max_files),
        "text_field": text_field, "val_fraction": val_fraction, "max_tokens": max_tokens, "capped": capped,
        "raw_uint16": raw_uint16, "source_stats": None if raw_uint16 else stats.as_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds, 2),
    }
    _publish(out, staging, tok, manifest)
    n = counts["train"] + counts["val"]
    log.info(f"prepare: {n:,} tokens ({counts['train']:,} train / {counts['val']:,} val) in "
             f"{sum(map(len, shards.values()))} shards, {n / max(seconds, 1e-9):,.0f} tok/s -> {out}")
    return manifest


def _describe(sources, hf) -> str:
    return f"--hf {hf}" if hf else (f"--source {', '.join(sources)}" if sources else "default corpus")


def _publish(out: Path, staging: Path, tok: Tokenizer, manifest: dict) -> None:
    """Move the finished shards into place, write tokenizer.json, then manifest.json last."""
    old = out / MANIFEST_FILE
    old.unlink(missing_ok=True)  # from here on the folder does not look complete until the end
    keep = {x["file"] for v in manifest["shards"].values() for x in v}
    for f in list(out.glob("train_*.bin")) + list(out.glob("val_*.bin")):
        if f.name not in keep:
            f.unlink()
    for name in keep:
        os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)
    tok.save(out)
    atomic_write_json(out / MANIFEST_FILE, manifest)
