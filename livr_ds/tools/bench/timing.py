"""Timing that survives a noisy machine: medians after a warm-up, interleaved repeats."""

from __future__ import annotations

import statistics
import time

import torch


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median time of each fn, calls interleaved so drift in machine load hits all alike; the
    order reverses every round, so whatever a call inherits from the one before (caches, another
    model's weights) is shared out evenly too."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(repeats):
        for k in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def synced(fn):
    """fn, then wait for the GPU (if any), so wall-clock timing sees the kernels' time."""
    def run():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out
    return run
