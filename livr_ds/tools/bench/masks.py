"""Mask construction: the dense bool mask vs the flex BlockMask, uncompiled and compiled."""

from __future__ import annotations

import time

import torch

from .timing import median_seconds, peak_memory_growth, synced


def bench_mask(lengths=(1024, 4096, 16384), repeats=3):
    """Dense bool mask vs flex BlockMask (the uncompiled reference and the compiled builder that
    training uses) for one bottleneck row, on the GPU when there is one: seconds (median after a
    warm-up) and the memory each build needs above what the process held before it."""
    from ... import segments

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def layout(L):
        seg = torch.full((1, L), segments.PROMPT, device=device)
        seg[0, 16:16 + L // 2] = segments.IMAGE
        seg[0, -64:-16] = segments.LATENT
        seg[0, -16:] = segments.ANSWER
        return seg, torch.zeros_like(seg)

    # Compile before timing anything: a static first shape, then the symbolic one training reaches
    # from its second batch length on (segments.block_mask).
    t = time.perf_counter()
    for L in (256, 384):
        segments.block_mask(*layout(L), "bottleneck")
    compile_s = time.perf_counter() - t
    rows = []
    for L in lengths:
        seg, doc = layout(L)
        builds = {"dense": synced(lambda: segments.dense_mask(seg, doc, "bottleneck")),
                  "flex_uncompiled": synced(lambda: segments.block_mask(seg, doc, "bottleneck", compiled=False)),
                  "flex_compiled": synced(lambda: segments.block_mask(seg, doc, "bottleneck"))}
        row = {"L": L, "device": device, "dense_bytes": builds["dense"]().element_size() * L * L,
               "additive_fp32_bytes": 4 * L * L}
        for name, build in builds.items():
            try:
                row[f"{name}_s"] = median_seconds(build, repeats)
                row[f"{name}_peak_bytes"] = peak_memory_growth(build)
            except (RuntimeError, MemoryError) as e:  # the uncompiled builder materialises L x L
                row[f"{name}_error"] = str(e)[:200]
        bm = builds["flex_compiled"]()
        row["blockmask_bytes"] = sum(t.numel() * t.element_size() for t in bm.as_tuple() if torch.is_tensor(t))
        row["compile_s"] = compile_s if L == lengths[0] else 0.0
        rows.append(row)
    return rows
