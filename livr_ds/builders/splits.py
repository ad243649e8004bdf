"""Which source keys go to which split, how large the splits are, and how answer labels are spread
over a split's samples."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .seeding import key_hash


def split_by_key(keys: list[str], fractions: dict[str, float], seed: int) -> dict[str, list[str]]:
    """Assign each key to a split; exact sizes (largest remainder), at least one key per split with
    a positive fraction when there are enough keys. Order inside each split is sorted."""
    keys = sorted(set(keys))
    ranked = sorted(keys, key=lambda k: key_hash(f"{seed}:split:{k}"))
    tot = sum(fractions.values())
    names = [s for s, f in fractions.items() if f > 0]
    sizes = {s: int(len(keys) * fractions[s] / tot) for s in names}
    for s in names:
        if sizes[s] == 0 and len(keys) >= len(names):
            sizes[s] = 1
    while sum(sizes.values()) > len(keys):
        big = max(sizes, key=sizes.get)
        sizes[big] -= 1
    rest = len(keys) - sum(sizes.values())
    for s in sorted(names, key=lambda s: -fractions[s])[:rest] if rest > 0 else []:
        sizes[s] += 1
    out, i = {}, 0
    for s in names:
        out[s] = sorted(ranked[i:i + sizes[s]])
        i += sizes[s]
    return out


def split_fractions(sizes: dict[str, int]) -> dict[str, float]:
    """Pool split proportional to the requested sizes (only splits with n > 0)."""
    return {s: float(n) for s, n in sizes.items() if n > 0}


def balanced_labels(rng, n: int, k: int) -> list[int]:
    """n labels in 0..k-1, as equal as possible (counts differ by at most 1), in random order."""
    return [int(x) for x in rng.permutation(np.arange(n) % k)]


def balanced(k: int) -> Callable[[np.random.Generator, int], list[int]]:
    return lambda rng, n: balanced_labels(rng, n, k)
