"""The epoch plan: which sample sits at each position of an epoch, and which rank gets which.

A pure function of (seed, epoch, shuffle settings, sources); see loader.py's docstring.
"""

from __future__ import annotations

import bisect
import dataclasses
import math

import numpy as np


class EpochPlan:
    """The epoch's sample order. ``locate(p)`` -> (shard id, index in shard) of position p."""

    def __init__(self, sources: list[tuple[list[int], list[int], float]], seed: int, epoch: int,
                 shuffle: bool, shuffle_block: int):
        """sources: per source (shard ids, shard counts, weight)."""
        visits: list[tuple[int, np.ndarray]] = []
        for si, (ids, counts, weight) in enumerate(sources):
            full, frac = int(math.floor(weight)), weight - math.floor(weight)
            for _ in range(full):
                visits += [(sid, np.arange(c, dtype=np.int64)) for sid, c in zip(ids, counts) if c > 0]
            total = sum(counts)
            k = int(round(frac * total))
            if k > 0:
                pick = np.sort(np.random.default_rng([seed, epoch, 1, si]).choice(total, size=k, replace=False))
                bounds = np.cumsum([0, *counts])
                cut = np.searchsorted(pick, bounds)  # shard j's picks: pick[cut[j]:cut[j+1]] (O(k + shards))
                for j, sid in enumerate(ids):
                    if cut[j + 1] > cut[j]:
                        visits.append((sid, (pick[cut[j]:cut[j + 1]] - bounds[j]).astype(np.int64)))
        if shuffle:
            order = np.random.default_rng([seed, epoch, 0]).permutation(len(visits))
            visits = [visits[i] for i in order]
        self.visits = visits
        self.offsets = np.cumsum([0] + [len(v[1]) for v in visits]).astype(np.int64)
        self.n = int(self.offsets[-1])
        perm = np.arange(self.n, dtype=np.int64)
        if shuffle and self.n:
            rng = np.random.default_rng([seed, epoch, 2])
            for start in range(0, self.n, shuffle_block):
                end = min(start + shuffle_block, self.n)
                perm[start:end] = start + rng.permutation(end - start)
        self.perm = perm  # position p -> stream position perm[p]

    @staticmethod
    def length(sources: list[tuple[list[int], list[int], float]]) -> int:
        """Samples per epoch (the same every epoch), without building a plan."""
        n = 0
        for _, counts, weight in sources:
            full, frac = int(math.floor(weight)), weight - math.floor(weight)
            n += full * sum(counts) + int(round(frac * sum(counts)))
        return n

    def stream_locate(self, q: int) -> tuple[int, int]:
        v = bisect.bisect_right(self.offsets, q) - 1
        return v, int(self.visits[v][1][q - self.offsets[v]])

    def locate(self, p: int) -> tuple[int, int]:
        v, idx = self.stream_locate(int(self.perm[p]))
        return self.visits[v][0], idx


@dataclasses.dataclass(frozen=True)
class Layout:
    """How N epoch positions become equal per-rank batches."""

    n: int
    world_size: int
    batch_size: int
    drop_last: bool

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    @property
    def num_batches(self) -> int:
        g = self.global_batch
        return self.n // g if self.drop_last else -(-self.n // g)

    @property
    def num_padded(self) -> int:  # all ranks
        return 0 if self.drop_last else self.num_batches * self.global_batch - self.n

    @property
    def num_dropped(self) -> int:
        return self.n - self.num_batches * self.global_batch if self.drop_last else 0

    def positions(self, rank: int, b: int) -> list[tuple[int, bool]]:
        """(epoch position, is_pad) of rank's batch b; pad positions wrap to the epoch start."""
        start = (b * self.world_size + rank) * self.batch_size
        return [(p if p < self.n else (p - self.n) % self.n, p >= self.n)
                for p in range(start, start + self.batch_size)]

    def rank_padded(self, rank: int) -> int:
        if not self.num_padded:
            return 0
        first = max(0, (self.n // self.batch_size - rank) // self.world_size - 1)  # earlier batches: no pad
        return sum(pad for b in range(first, self.num_batches) for _, pad in self.positions(rank, b))


