"""One epoch sampler for list-based datasets (SFT's packed rows, DPO's pairs, GRPO's prompts).

Epoch e visits the items in a seeded random order (seed + e; the list order when shuffle=False); `group` may
turn that order into units (SFT: packed rows of several examples), by default one item each. Units are dealt
to ranks round-robin (a rank left without one reuses the first). The state is (epoch, position): the order
is recomputed from the seed, so a resumed run continues exactly.
"""
from __future__ import annotations

import numpy as np


class EpochSampler:
    def __init__(self, n_items: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 group=None):
        if n_items < 1:
            raise ValueError("EpochSampler needs at least one item")
        self.n, self.seed, self.shuffle, self.rank, self.world = n_items, seed, shuffle, rank, world_size
        self.group = group or (lambda order: [int(i) for i in order])
        self.epoch, self.pos = 0, 0
        self._cached: tuple[int, list] = (-1, [])

    def units(self, epoch: int) -> list:
        """This rank's units of epoch `epoch`, in order."""
        if self._cached[0] != epoch:
            order = np.random.default_rng(self.seed + epoch).permutation(self.n) if self.shuffle else np.arange(self.n)
            units = self.group(order)
            self._cached = (epoch, units[self.rank::self.world] or units[:1])
        return self._cached[1]

    def take(self, k: int) -> list:
        """The next `k` units, crossing into the next epoch when this one is used up."""
        out = []
        for _ in range(k):
            if self.pos >= len(self.units(self.epoch)):
                self.epoch, self.pos = self.epoch + 1, 0
            out.append(self.units(self.epoch)[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n_items": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


class SamplerLoader:
    """What the list-based loaders (SFT's packed rows, DPO's pairs) share: `self.sampler` (an EpochSampler)
    holds the position that checkpoints save, `self.B` units make a batch."""
    sampler: EpochSampler
    B: int

    def batches_per_epoch(self) -> int:
        return max(1, -(-len(self.sampler.units(0)) // self.B))

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def reset(self) -> None:
        self.sampler.epoch, self.sampler.pos = 0, 0
