"""TokenLoader: (x, y) int64 batches of shape (B, T) from token shards, resumable and rank-aware.

Windows. Each shard is cut into windows of T + 1 tokens with stride T (x = window[:-1],
y = window[1:]); windows never cross a shard boundary. A source with N windows gives each rank
N // world_size of them per epoch: rank r takes positions r, r + world_size, ... of the epoch's
order, so ranks never read the same window in an epoch.
  - mode="random": the order is a permutation seeded by (seed, source, epoch), the same on every
    rank; from the second epoch on, window boundaries also move by a seeded offset in [0, T).
  - mode="sequential": the windows in file order (validation: `reset()` then `batches_per_epoch`).
Mixing. Each row of a batch picks its source with probabilities proportional to the weights,
drawn from a generator seeded by (seed, batch index) - also the same on every rank, so one
state dict describes every rank.
Resume. The state is the batch index plus, per source, (epoch, position): a few integers.
Reading uses os.pread on file descriptors kept open (no memory map grows over a long run). On
CUDA batches are assembled in pinned memory by a background thread and copied non-blocking.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.build import MANIFEST_FILE, read_manifest
from data.shards import HEADER_BYTES, read_header, shard_tokenizer_sha256
from data.tokenizer import TOKENIZER_FILE, load_tokenizer
from kernels.common import FurnaceError

log = logging.getLogger("furnace")
STATE_VERSION = 1


def parse_data_arg(arg: str) -> list[tuple[str, float]]:
    """'a:0.7,b:0.3' -> [('a', 0.7), ('b', 0.3)]; a folder without ':weight' gets weight 1."""
    out = []
    for part in (p.strip() for p in str(arg).split(",")):
        if not part:
            continue
        path, weight = part, 1.0
        head, sep, tail = part.rpartition(":")
        if sep and head:
            try:
                path, weight = head, float(tail)
            except ValueError:
                path, weight = part, 1.0
        if not weight > 0 or weight == float("inf"):
            raise FurnaceError(f"--data {arg}: weight {tail} of {path} must be a positive number")
        out.append((path, weight))
    if not out:
        raise FurnaceError(f"--data {arg!r}: expected FOLDER or FOLDER:WEIGHT,FOLDER:WEIGHT")
    return out


def check_tokenizer_match(data_sha: str | None, other_sha: str | None, data_desc: str, other_desc: str) -> None:
    """Refuse data tokenized with a different tokenizer than the model/checkpoint expects."""
    if data_sha is None or other_sha is None:
        unknown = data_desc if data_sha is None else other_desc
        log.warning(f"tokenizer check skipped: {unknown} records no tokenizer hash")
        return
    if data_sha != other_sha:
        raise FurnaceError(f"tokenizer mismatch: {data_desc} was tokenized with tokenizer {data_sha[:12]}, but "
                           f"{other_desc} uses tokenizer {other_sha[:12]}; prepare the data with that tokenizer "
                           f"(data/prepare.py --tokenizer PATH/tokenizer.json) or train from scratch on this data")


SAMPLE_TOKENS = 1 << 16  # tokens read from the start of each shard when it is opened


def check_shard(p: Path, count: int, dt: np.dtype, manifest: dict) -> None:
    """The open-time checks past header and size: [tokenizer check] (the hash in the shard's header against
    the folder's tokenizer), [width check] (header dtype against the manifest's; a uint32 payload under a
    uint16 header shows as every second token being 0) and [ids check] on the first SAMPLE_TOKENS tokens."""
    folder_sha = manifest.get("tokenizer_sha256")
    sha = shard_tokenizer_sha256(p)
    if sha is not None and sha != folder_sha:
        raise FurnaceError(f"shard {p} [tokenizer check]: made with tokenizer {sha[:12]}, but its folder's tokenizer is "
                           f"{str(folder_sha)[:12]}; it belongs to another data folder: remove it or prepare the "
                           f"data again")
    want = manifest.get("dtype")
    if want and want != dt.name:
        raise FurnaceError(f"shard {p} [width check]: header says {dt.name} tokens, {MANIFEST_FILE} says {want}; "
                           f"the shard was written by another run: prepare the data again")
    n = min(count, SAMPLE_TOKENS)
    if n == 0:
        return
    sample = np.fromfile(p, dtype=dt.newbyteorder("<"), count=n, offset=HEADER_BYTES)
    if dt.itemsize == 2 and n >= 256 and not sample[1::2].any():
        raise FurnaceError(f"shard {p} [width check]: every second uint16 token of the first {n} is 0, the mark of "
                           f"uint32 tokens under a uint16 header; the shard is damaged: prepare the data again")
    vocab = manifest.get("vocab_size")
    if vocab and int(sample.max()) >= vocab:
        at = int(np.argmax(sample >= vocab))
        raise FurnaceError(f"shard {p} [ids check]: token id {int(sample[at])} at token offset {at} (byte "
                           f"{HEADER_BYTES + at * dt.itemsize}) is outside the tokenizer's vocabulary of {vocab}; "
                           f"the shard is damaged or from another tokenizer")


def folder_manifest(data_dir: Path) -> dict:
    """Our manifest, or one synthesized for an llm.c / modded-nanogpt folder of *train_*.bin / *val_*.bin
    shards (its tokenizer is whatever tokenizer.json sits beside them, or unknown)."""
    if not data_dir.is_dir():
        raise FurnaceError(f"data folder {data_dir}: no such folder (make one with data/prepare.py)")
    if (data_dir / MANIFEST_FILE).is_file():
        return read_manifest(data_dir)
    shards = {s: [{"file": f.name, "tokens": None} for f in sorted(data_dir.glob(f"*{s}_*.bin"))
                  if not f.name.startswith(".")] for s in ("train", "val")}
    if not shards["train"] and not shards["val"]:
        staging = " (an interrupted prepare left a .staging folder: run it again)" if any(data_dir.glob(".staging-*")) else ""
        raise FurnaceError(f"data folder {data_dir}: no {MANIFEST_FILE} and no *train_*.bin / *val_*.bin shards"
                           f"{staging}; make one with data/prepare.py")
    tok = load_tokenizer(data_dir) if (data_dir / TOKENIZER_FILE).is_file() else None
    log.info(f"data folder {data_dir}: no {MANIFEST_FILE}, reading its .bin shards as llm.c-format shards"
             f"{'' if tok else ' (tokenizer unknown: no tokenizer.json beside them)'}")
    return {"format": "llm.c", "shards": shards, "tokenizer_sha256": tok.sha256 if tok else None,
            "vocab_size": tok.vocab_size if tok else None, "eos_id": tok.token_id("<|endoftext|>") if tok else None,
            "special_ids": tok.special_ids if tok else {}}


@dataclass(eq=False)
class _Source:
    """One data folder's split: shard files, window bookkeeping, and the read cursor."""
    index: int
    dir: Path
    weight: float
    manifest: dict
    paths: list[Path]
    counts: np.ndarray            # tokens per shard
    itemsize: int
    dtype: np.dtype
    epoch: int = 0
    pos: int = 0
    fds: list = field(default_factory=list)
    _epoch_cache: tuple | None = None   # (epoch, offset, cum windows, order)

    def open(self):
        if not self.fds:
            self.fds = [os.open(p, os.O_RDONLY) for p in self.paths]

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class TokenLoader:
    def __init__(self, sources, batch_size: int, seq_len: int, split: str = "train", seed: int = 0,
                 rank: int = 0, world_size: int = 1, mode: str = "random", device="cpu", prefetch: int = 4):
        if isinstance(sources, (str, os.PathLike)):
            sources = parse_data_arg(str(sources))
        if mode not in ("random", "sequential"):
            raise FurnaceError(f"loader mode {mode!r}: expected 'random' or 'sequential'")
        if split not in ("train", "val"):
            raise FurnaceError(f"split {split!r}: expected 'train' or 'val'")
        if batch_size < 1 or seq_len < 1:
            raise FurnaceError(f"batch size {batch_size} and seq_len {seq_len} must be positive")
        if not 0 <= rank < world_size:
            raise FurnaceError(f"rank {rank} must be in 0..{world_size - 1} (world size {world_size})")
        self.B, self.T, self.split, self.seed = batch_size, seq_len, split, seed
        self.rank, self.world_size, self.mode = rank, world_size, mode
        self.device = torch.device(device)
        self.sources = [self._open_source(i, Path(d), float(w)) for i, (d, w) in enumerate(sources)]
        w = np.array([s.weight for s in self.sources])
        self.probs = w / w.sum()
        self._check_one_tokenizer()
        for s in self.sources:  # validates seq_len / world_size against every source now, not mid-run
            self._epoch_plan(s, 0)
        self.step = 0
        self._cuda = self.device.type == "cuda"
        self._prefetch = prefetch
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._state_after = self._snapshot()

    # ---- set-up -------------------------------------------------------------------------------
    def _open_source(self, index: int, d: Path, weight: float) -> _Source:
        if not weight > 0:
            raise FurnaceError(f"data folder {d}: weight {weight} must be positive")
        m = folder_manifest(d)
        entries = m["shards"].get(self.split) or []
        if not entries:
            raise FurnaceError(f"data folder {d}: no {self.split} shards (expected {self.split}_000000.bin ...)")
        paths, counts, dts = [], [], set()
        for e in entries:
            p = d / e["file"]
            if not p.is_file():
                raise FurnaceError(f"data folder {d}: {MANIFEST_FILE} lists {e['file']} but the file is missing; "
                                   f"prepare the data again")
            n, dt = read_header(p)  # [header check], [size check]
            if e["tokens"] is not None and n != e["tokens"]:
                raise FurnaceError(f"shard {p} [manifest check]: holds {n} tokens but {MANIFEST_FILE} says "
                                   f"{e['tokens']}; the folder is damaged or mixed from two runs: prepare it again")
            check_shard(p, n, dt, m)
            paths.append(p)
            counts.append(n)
            dts.add(dt)
        if len(dts) != 1:
            raise FurnaceError(f"data folder {d}: {self.split} shards mix token types {sorted(x.name for x in dts)}")
        dt = dts.pop()
        return _Source(index, d, weight, m, paths, np.array(counts, dtype=np.int64), dt.itemsize, dt.newbyteorder("<"))

    def _check_one_tokenizer(self) -> None:
        first = self.sources[0]
        for s in self.sources[1:]:
            a, b = first.manifest.get("tokenizer_sha256"), s.manifest.get("tokenizer_sha256")
            if a != b:
                raise FurnaceError(f"data folders {first.dir} and {s.dir} were made with different tokenizers "
                                   f"({str(a)[:12]} vs {str(b)[:12]}); mixed folders must share one tokenizer")

    def _epoch_plan(self, s: _Source, epoch: int):
        """(offset, cumulative window counts per shard, order over windows or None) for one epoch."""
        if s._epoch_cache is not None and s._epoch_cache[0] == epoch:
            return s._epoch_cache[1:]
        T = self.T
        offset = 0
        if self.mode == "random" and epoch > 0:
            offset = int(np.random.default_rng([self.seed, epoch, 7]).integers(0, T))
        wins = np.maximum(0, (s.counts - offset - 1) // T)
        if offset and wins.sum() == 0:
            offset, wins = 0, np.maximum(0, (s.counts - 1) // T)
        n = int(wins.sum())
        if n == 0:
            raise FurnaceError(f"data folder {s.dir} split {self.split}: seq_len + 1 = {T + 1} tokens are needed per "
                               f"window, but its largest {self.split} shard holds {int(s.counts.max())} tokens "
                               f"({int(s.counts.sum())} in all); use a smaller --seq-len or more data")
        if n // self.world_size == 0:
            raise FurnaceError(f"data folder {s.dir} split {self.split}: {n} windows of {T + 1} tokens cannot give "
                               f"each of {self.world_size} ranks one; use a smaller --seq-len or more data")
        order = None
        if self.mode == "random":
            dtype = np.uint32 if n < 2**32 else np.int64
            order = np.random.default_rng([self.seed, s.index, epoch]).permutation(n).astype(dtype)
        s._epoch_cache = (epoch, offset, np.cumsum(wins), order)
        return s._epoch_cache[1:]

    # ---- sizes --------------------------------------------------------------------------------
    def windows_per_rank(self, i: int = 0) -> int:
        _, cum, _ = self._epoch_plan(self.sources[i], self.sources[i].epoch)
        return int(cum[-1]) // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Full batches in one pass over the first source's split for this rank (at least 1; a
        split with fewer windows than the batch size wraps around within that one batch)."""
        return max(1, self.windows_per_rank(0) // self.B)

    # ---- batch production (single-threaded, deterministic) -------------------------------------
    def _rows_sources(self) -> np.ndarray:
        if len(self.sources) == 1:
            return np.zeros(self.B, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.step, 3])
        return rng.choice(len(self.sources), size=self.B, p=self.probs)

    def _next_window(self, s: _Source) -> tuple[int, int]:
        """(shard index, first token) of this source's next window for this rank; advances its cursor."""
        offset, cum, order = self._epoch_plan(s, s.epoch)
        per_rank = int(cum[-1]) // self.world_size
        if s.pos >= per_rank:
            s.epoch, s.pos = s.epoch + 1, 0
            offset, cum, order = self._epoch_plan(s, s.epoch)
        g = s.pos * self.world_size + self.rank
        if order is not None:
            g = int(order[g])
        s.pos += 1
        shard = int(np.searchsorted(cum, g, side="right"))
        local = g - (int(cum[shard - 1]) if shard else 0)
        return shard, offset + local * self.T

    def _produce(self, out: np.ndarray) -> None:
        """Fill `out` (B, T + 1) with the next windows and advance the state by one batch."""
        n = self.T + 1
        where = []  # (source, shard, first token) per row, for the ids check's message
        for row, si in enumerate(self._rows_sources()):
            s = self.sources[si]
            s.open()
            shard, start = self._next_window(s)
            nbytes = n * s.itemsize
            raw = os.pread(s.fds[shard], nbytes, HEADER_BYTES + start * s.itemsize)
            if len(raw) != nbytes:
                raise FurnaceError(f"shard {s.paths[shard]}: short read at token {start} (file changed or truncated "
                                   f"while training?)")
            out[row] = np.frombuffer(raw, dtype=s.dtype)
            where.append((s, shard, start))
        vocab = self.sources[0].manifest.get("vocab_size")  # one tokenizer for all sources (checked at open)
        if vocab and int(out.max()) >= vocab:  # [ids check], every batch: one max over it
            row = int(np.argmax((out >= vocab).any(axis=1)))
            s, shard, start = where[row]
            at = start + int(np.argmax(out[row] >= vocab))
            raise FurnaceError(f"shard {s.paths[shard]} [ids check]: token id {int(out[row, at - start])} at token "
                               f"offset {at} (byte {HEADER_BYTES + at * s.itemsize}) is outside the tokenizer's "
                               f"vocabulary of {vocab}; the shard is damaged or from another tokenizer")
        self.step += 1

    def _new_buffer(self) -> torch.Tensor:
        return torch.empty((self.B, self.T + 1), dtype=torch.int32, pin_memory=self._cuda)  # (B, T+1)

    # ---- background prefetch (CUDA only) --------------------------------------------------------
    def _worker(self, cuda_index: int):
        try:
            # Pinning from a thread that never chose a device would create a CUDA context on GPU 0 (each DDP
            # rank would then hold memory there); bind this thread to the loader's device, as torch's own
            # DataLoader pin-memory thread does.
            torch.cuda.set_device(cuda_index)
            while not self._stop.is_set():
                buf = self._new_buffer()
                self._produce(buf.numpy())
                item = (buf, self._snapshot())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, which re-raises it in the main thread
            while not self._stop.is_set():  # never block forever on a full queue nobody drains any more
                try:
                    self._queue.put((e, None), timeout=0.1)
                    break
                except queue.Full:
                    continue

    def _stop_thread(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None
            self._stop.clear()

    def _next_cpu(self) -> tuple[torch.Tensor, dict]:
        if not self._cuda:
            buf = self._new_buffer()
            self._produce(buf.numpy())
            return buf, self._snapshot()
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self._prefetch)
            idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._thread = threading.Thread(target=self._worker, args=(idx,), name="furnace-loader", daemon=True)
            self._thread.start()
        buf, state = self._queue.get()
        if isinstance(buf, BaseException):
            self._thread.join()
            self._thread = None
            raise buf
        return buf, state

    # ---- public API ---------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 (B, T) on the loader's device; y is x shifted left by one token."""
        buf, self._state_after = self._next_cpu()
        buf = buf.to(self.device, non_blocking=self._cuda)   # (B, T+1) int32
        x = buf[:, :-1].long()                               # (B, T)
        y = buf[:, 1:].long()                                # (B, T)
        return x, y

    def __iter__(self):
        while True:
            yield self.next_batch()

    def _snapshot(self) -> dict:
        return {"version": STATE_VERSION, "mode": self.mode, "split": self.split, "seed": self.seed,
                "seq_len": self.T, "batch_size": self.B, "world_size": self.world_size, "step": self.step,
                "sources": [{"dir": str(s.dir), "weight": s.weight, "epoch": s.epoch, "pos": s.pos}
                            for s in self.sources]}

    def state_dict(self) -> dict:
        """Position after the last batch returned by next_batch (prefetched batches do not count).
        Identical on every rank; small and JSON-serializable."""
        return {**self._state_after, "sources": [dict(x) for x in self._state_after["sources"]]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise FurnaceError(f"loader state: expected a TokenLoader state_dict of version {STATE_VERSION}")
        for key, mine in (("mode", self.mode), ("seed", self.seed), ("seq_len", self.T),
                          ("world_size", self.world_size), ("split", self.split)):
            if state.get(key) != mine:
                raise FurnaceError(f"loader state: saved with {key}={state.get(key)!r} but this loader has "
                                   f"{key}={mine!r}; resume with the same setting (or start a fresh run)")
        if len(state["sources"]) != len(self.sources):
            raise FurnaceError(f"loader state: saved with {len(state['sources'])} data folders "
                               f"({[x['dir'] for x in state['sources']]}), this loader has {len(self.sources)}")
        self._stop_thread()
        self.step = int(state["step"])
        for s, saved in zip(self.sources, state["sources"]):
            s.epoch, s.pos = int(saved["epoch"]), int(saved["pos"])
        self._state_after = self._snapshot()

    def reset(self) -> None:
        """Back to the very first batch (for sequential validation passes)."""
        self._stop_thread()
        self.step = 0
        for s in self.sources:
            s.epoch, s.pos = 0, 0
        self._state_after = self._snapshot()

    def close(self) -> None:
        self._stop_thread()
        for s in self.sources:
            s.close()

    def __del__(self):
        try:
            self.close()
        except (OSError, AttributeError, TypeError):  # interpreter shutdown: fds/threads already gone
            pass

    # ---- tokenizer identity -------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        return self.sources[0].manifest

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.manifest.get("tokenizer_sha256")

    @property
    def vocab_size(self) -> int | None:
        return self.manifest.get("vocab_size")
