"""Mask construction: the dense bool mask vs the flex BlockMask."""

from __future__ import annotations

import torch

from .timing import median_seconds, synced


def bench_mask(lengths=(1024, 4096, 16384), repeats=3):
    """Dense bool mask vs flex BlockMask for one row, on the GPU when there is one."""
    from ... import segments

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for L in lengths:
        seg = torch.full((1, L), segments.PROMPT, device=device)
        seg[0, 16:16 + L // 2] = segments.IMAGE
        seg[0, -64:-16] = segments.LATENT
        seg[0, -16:] = segments.ANSWER
        doc = torch.zeros_like(seg)
        dense = synced(lambda seg=seg, doc=doc: segments.dense_mask(seg, doc, "bottleneck"))
        flex = synced(lambda seg=seg, doc=doc: segments.block_mask(seg, doc, "bottleneck"))
        row = {"L": L, "device": device, "dense_s": median_seconds(dense, repeats),
               "dense_bytes": dense().element_size() * L * L, "additive_fp32_bytes": 4 * L * L}
        try:
            bm = flex()
            row["flex_s"] = median_seconds(flex, repeats)
            row["flex_bytes"] = sum(t.numel() * t.element_size() for t in bm.as_tuple() if torch.is_tensor(t))
        except (RuntimeError, MemoryError) as e:  # uncompiled create_block_mask materialises L x L
            row["flex_error"] = str(e)[:200]
        rows.append(row)
    return rows
