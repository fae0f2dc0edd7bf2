"""Continuous batching for the server: many requests share one batched decode step.

`Engine` owns the model and a KV cache of `max_slots` rows, and runs one worker thread:

    loop: drop cancelled requests -> admit waiting requests into free rows (prefill each alone, first token)
          -> one decode step for every active row at once (each row at its own position) -> sample per row

A new request joins between two steps; a finished or cancelled one leaves before the next step and its row is
reused at once. Active requests always fill rows 0..n-1 (a leaving row is replaced by the last one, whose
keys/values are copied over), so the step's batch is a plain view of the cache's first n rows.

Each request keeps its own sampling parameters, seed (its own torch.Generator) and stop ids, so its tokens do
not depend on what else is in the batch (up to float rounding of the batched matmuls: tests/test_serve.py
checks greedy answers against infer.generate). Tokens go out through the request's `emit` callback, called on
the worker thread: ("token", id) per token, then ("done", "stop" | "length"), or ("error", message).
"""
from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from infer.decode import eager_last_logits
from infer.sampling import SamplingParams, next_token
from model.gpt import GPT

log = logging.getLogger("furnace")


class QueueFull(Exception):
    """More requests are waiting than --max-queue allows."""


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_new_tokens: int
    emit: Callable[[tuple], None]
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset = frozenset()
    seed: int | None = None
    cancelled: bool = False


@dataclass(eq=False)
class _Slot:
    req: Request
    pos: int                      # positions filled in this row's cache
    last: int                     # last token chosen (fed by the next step)
    n_out: int
    gen: torch.Generator | None
    seen: torch.Tensor | None     # token ids for the repetition penalty


class Engine:
    def __init__(self, model: GPT, max_slots: int = 8, max_queue: int = 64):
        self.model, self.max_slots, self.max_queue = model, max_slots, max_queue
        self.T = model.config.max_seq_len
        self.cache = model.new_cache(max_slots, self.T)
        self.device = model.embed.weight.device
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: list[_Slot] = []
        self.steps = 0                # batched decode steps run (bench/serve_bench.py reports the mean batch)
        self.stepped_rows = 0         # rows summed over those steps
        self.tokens = 0               # tokens chosen, all requests
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="furnace-engine", daemon=True)
        self._thread.start()

    # ---- called from the server's threads -------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue a request; raises QueueFull when `max_queue` requests already wait for a row."""
        if not req.prompt:
            raise ValueError("empty prompt")
        with self._cv:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.append(req)
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        """The client went away or has all it needs: free the request's row before the next step."""
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def stats(self) -> dict:
        with self._cv:
            return {"active": len(self.active), "waiting": len(self.waiting), "slots": self.max_slots}

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # ---- the worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self.waiting and not self.active:
                        self._cv.wait()
                    if self._stop:
                        break
                    self._remove([i for i, s in enumerate(self.active) if s.req.cancelled])
                    admit = []
                    while self.waiting and len(self.active) + len(admit) < self.max_slots:
                        r = self.waiting.popleft()
                        if not r.cancelled:
                            admit.append(r)
                try:
                    for r in admit:
                        self._prefill(r)
                    if self.active:
                        self._step()
                except Exception as e:  # a bug: every request in flight gets the error, the server stays up
                    log.exception("engine step failed")
                    with self._cv:
                        failed = {id(r): r for r in admit} | {id(s.req): s.req for s in self.active}
                        self.active.clear()
                    for r in failed.values():
                        r.emit(("error", f"{type(e).__name__}: {e}"))
        for s in self.active:
            s.req.emit(("error", "server shutting down"))

    def _prefill(self, r: Request) -> None:
        row = len(self.active)
        ids = r.prompt[-(self.T - 1):]        # the server refuses longer prompts unless truncation was asked for
        x = torch.tensor([ids], dtype=torch.long, device=self.device)          # (1, T)
        logits = eager_last_logits(self.model, x, self.cache.rows(row, row + 1))
        gen = torch.Generator(device="cpu").manual_seed(r.seed) if r.seed is not None else None
        penalise = r.params.repetition_penalty != 1.0
        seen = torch.tensor(ids, dtype=torch.long) if penalise else None
        s = _Slot(r, len(ids), -1, 0, gen, seen)
        s.req.max_new_tokens = min(r.max_new_tokens, self.T - len(ids))
        with self._cv:
            self.active.append(s)
        if self._choose(s, logits.cpu()):
            with self._cv:
                self._remove([row])

    def _step(self) -> None:
        n = len(self.active)
        x = torch.tensor([[s.last] for s in self.active], dtype=torch.long, device=self.device)   # (n, 1)
        pos = torch.tensor([s.pos for s in self.active], dtype=torch.long)                       # (n,)
        h = self.model.hidden_states(x, self.cache, row_pos=pos)                                # (n, 1, d)
        logits = self.model.lm_head(h[:, -1]).float().cpu()                                     # (n, V)
        self.steps += 1
        self.stepped_rows += n
        done = []
        for i, s in enumerate(self.active):
            s.pos += 1
            if self._choose(s, logits[i]):
                done.append(i)
        with self._cv:
            self._remove(done)

    def _choose(self, s: _Slot, logits: torch.Tensor) -> bool:
        """Sample the slot's next token and emit it; True when the request is finished."""
        r = s.req
        if r.cancelled:
            return True
        tok = next_token(logits, r.params, s.seen, s.gen)
        s.last, s.n_out = tok, s.n_out + 1
        self.tokens += 1
        if s.seen is not None:
            s.seen = torch.cat([s.seen, torch.tensor([tok])])
        r.emit(("token", tok))
        if tok in r.stop_ids:
            r.emit(("done", "stop"))
            return True
        if s.n_out >= r.max_new_tokens:
            r.emit(("done", "length"))
            return True
        return False

    def _remove(self, rows: list[int]) -> None:
        """Free rows (caller holds the lock): the last active row moves into each freed one."""
        for i in sorted(rows, reverse=True):
            last = len(self.active) - 1
            if i != last:
                moved = self.active[last]
                self.cache.copy_row(last, i, moved.pos)
                self.active[i] = moved
            self.active.pop()
