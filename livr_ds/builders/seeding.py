"""Every random choice of a build is a pure function of the seed and where it is made, so that the
same seed gives byte-identical shards whatever order or subset of work runs."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def key_hash(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")


def rng_for(seed: int, *parts: Any) -> np.random.Generator:
    """A Generator that is a pure function of (seed, parts...), e.g. (seed, task, split, i)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *(key_hash(str(p)) & 0xFFFFFFFF for p in parts)])


def hash_rank(seed: int, key: str) -> float:
    """A number in [0, 1) that is a pure function of (seed, key): used to split sources by id."""
    return key_hash(f"{seed}:{key}") / 2.0 ** 64
