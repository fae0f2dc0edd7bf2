"""Packed SFT batches: whole examples laid end to end in fixed-length rows, with document masking.

An example's targets are its labels shifted left by one and its last position predicts nothing (-100), so no
label reaches into the next example; `doc_ids` (B, T) numbers the examples of a row (padding gets its own id)
and attention never crosses an example (model/attention.py). Rows are planned per epoch, greedily, in the
order of sft/sampler.py, which deals them to ranks and carries the resume position. Why no position reset
and how the loss is normalised: sft/README.md ("Packing").
"""
from __future__ import annotations

import numpy as np
import torch

from sft.examples import IGNORE
from sft.sampler import EpochSampler, SamplerLoader


def plan_rows(lengths: list[int], seq_len: int, order) -> list[list[int]]:
    """Greedy packing of examples (taken in `order`) into rows of at most seq_len tokens."""
    rows: list[list[int]] = [[]]
    used = 0
    for i in order:
        if used + lengths[i] > seq_len and rows[-1]:  # (build_sft_example keeps every example <= seq_len)
            rows.append([])
            used = 0
        rows[-1].append(int(i))
        used += lengths[i]
    return rows


def pack_row(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int):
    """[(input_ids, labels), ...] -> x, y, doc_ids: int64 arrays of length seq_len."""
    x = np.full(seq_len, pad_id, dtype=np.int64)
    y = np.full(seq_len, IGNORE, dtype=np.int64)
    doc = np.full(seq_len, len(examples), dtype=np.int64)  # padding: a document of its own
    p = 0
    for d, (ids, labels) in enumerate(examples):
        n = len(ids)
        x[p:p + n] = ids
        y[p:p + n - 1] = labels[1:]  # targets stay inside the example; its last position predicts nothing
        doc[p:p + n] = d
        p += n
    return x, y, doc


def padded_rows(examples: list[tuple[list[int], list[int]]], pad_id: int, max_len: int | None = None,
                multiple: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """One example per row -> x, y (N, L) int64; L = the longest example rounded up to `multiple` (fewer
    distinct shapes), at most max_len."""
    L = multiple * -(-max(len(ids) for ids, _ in examples) // multiple)
    rows = [pack_row([e], min(L, max_len or L), pad_id) for e in examples]
    return tuple(torch.from_numpy(np.stack([r[k] for r in rows])) for k in (0, 1))


class PackedSFTLoader(SamplerLoader):
    """next_batch() -> (x, y, doc_ids), each (batch_size, seq_len) int64 on `device`.
    shuffle=False gives a fixed order (validation); reset() starts it again."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], batch_size: int, seq_len: int, pad_id: int,
                 seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        self.examples, self.B, self.T, self.pad_id = examples, batch_size, seq_len, pad_id
        self.device = torch.device(device)
        self.lengths = [len(ids) for ids, _ in examples]
        self.sampler = EpochSampler(len(examples), seed, shuffle, rank, world_size,
                                    group=lambda order: plan_rows(self.lengths, self.T, order))

    def rows_for_epoch(self, epoch: int) -> list[list[int]]:
        return self.sampler.units(epoch)

    def stats(self) -> dict:
        """Rows per epoch and how full they are (fraction of positions holding example tokens)."""
        rows = self.rows_for_epoch(0)
        filled = sum(self.lengths[i] for r in rows for i in r)
        trained = sum(sum(t != IGNORE for t in self.examples[i][1][1:]) for r in rows for i in r)
        return {"rows": len(rows), "fill": filled / (len(rows) * self.T), "trained_per_row": trained / len(rows)}

    def next_batch(self):
        rows = [pack_row([self.examples[i] for i in r], self.T, self.pad_id) for r in self.sampler.take(self.B)]
        nb = self.device.type == "cuda"
        return tuple(torch.from_numpy(np.stack(a)).to(self.device, non_blocking=nb) for a in zip(*rows))
