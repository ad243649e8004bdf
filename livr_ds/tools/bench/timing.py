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


def peak_memory_growth(fn) -> int:
    """Bytes the call needed above what the process held before it: the CUDA allocator's peak on
    a GPU; on CPU the resident set sampled every millisecond by a thread (large tensors are mmap'd
    and unmapped on free, so the RSS falls back after the call and the peak is the call's own)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    import os
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    before, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss()) - before
