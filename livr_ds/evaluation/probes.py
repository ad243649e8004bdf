"""Attention probes (`launch/eval.py --probe attention`): what the answer reads from the latents,
and where the latents look in the image.

1. Answer -> latent attention (the paper's 0.076 for LIVR vs 0.028 for latents-only): for every
   layer, head and answer token (the teacher-forced gold answer, ANSWER segment, <eos> included),
   the attention weight the answer token puts on the K latent tokens, summed over the latents;
   then averaged over layers, heads, answer positions and samples. The sum over latents (the
   attention *mass*) is the reading that fits the paper's number: averaged per latent key it
   could not exceed 1/16 = 0.0625 with K = 16. The per-latent mean (mass / K) is reported too.
2. Latent -> image heat maps (the paper's Figure 3): the attention of the latent tokens to the
   image tokens, averaged over layers, heads and latents, laid out on each image's token grid and
   drawn over the image.

Attention weights come from the eager kernel (sdpa and flex never materialise them), called with
the same mask and position ids as generation, under the evaluation mode's mask policy.
"""

from __future__ import annotations

import math
import os

import torch

from .. import segments


def attention_weights(model, batch: dict, policy: str) -> list[torch.Tensor]:
    """Per layer, the (B, heads, L, L) attention probabilities of the language model under `policy`.

    Kept as the model's per-layer tensors (no stacked float32 copy): on a real backbone they are
    layers x heads x L^2 values per sample, so probe with a small --batch-size there."""
    impl = getattr(model.hf_model.config, "_attn_implementation", None)
    if model.backend != "eager" or impl != "eager":
        raise ValueError(f"attention probes need the eager attention kernel (model loaded with {model.backend!r}); "
                         "load with attn_backend='eager' (launch/eval.py --probe attention does)")
    with torch.no_grad():
        out = model.backbone_outputs(batch, policy, output_attentions=True)
    if not out.attentions or out.attentions[0] is None:
        raise RuntimeError("the model returned no attention weights (is the eager kernel in use?)")
    return list(out.attentions)


def answer_to_latent(attn: list[torch.Tensor], segment_ids: torch.Tensor) -> list[dict]:
    """Per sample: {"sum": Σ over layers, heads, answer queries of the attention mass on the latent
    keys, "count": layers * heads * answer queries, "answer_to_latent": sum / count or None when the
    input has no latents}."""
    layers, (B, heads) = len(attn), attn[0].shape[:2]
    out = []
    for b in range(B):
        q = segments_mask(segment_ids[b], segments.ANSWER)
        k = segments_mask(segment_ids[b], segments.LATENT)
        n_q = int(q.sum())
        count = layers * heads * n_q
        if not k.any() or n_q == 0:
            out.append({"sum": 0.0, "count": 0, "answer_to_latent": None})
            continue
        # per layer: (heads, answer queries, latent keys) -> mass on the latents, summed
        total = sum(float(a[b][:, q][:, :, k].double().sum()) for a in attn)
        out.append({"sum": total, "count": count, "answer_to_latent": total / count})
    return out


def segments_mask(seg_row: torch.Tensor, segment: int) -> torch.Tensor:
    return seg_row == segment


def latent_to_image_maps(attn: list[torch.Tensor], batch: dict, merge_size: int) -> list[list[torch.Tensor]]:
    """Per sample, one 2D map per image: latent -> image-token attention averaged over layers,
    heads and latent queries, on the image's token grid (rows x cols)."""
    seg = batch["segment_ids"]
    counts = batch.get("image_counts")
    grids = batch.get("image_grid_thw")
    cursor = 0
    maps = []
    for b in range(seg.shape[0]):
        lat = seg[b] == segments.LATENT
        img = seg[b] == segments.IMAGE
        n_img = int(counts[b].sum()) if counts is not None else 1
        sample_grids = grids[cursor:cursor + n_img] if grids is not None else None
        cursor += n_img
        if not lat.any() or not img.any():
            maps.append([])
            continue
        # mean over layers, heads and latent queries -> one weight per image token
        weights = sum(a[b][:, lat][:, :, img].double().mean(dim=(0, 1)) for a in attn).float() / len(attn)
        maps.append(_split_images(weights, n_img, sample_grids, merge_size))
    return maps


def _split_images(weights: torch.Tensor, n_img: int, grids, merge_size: int) -> list[torch.Tensor]:
    out, start = [], 0
    for i in range(n_img):
        if grids is not None:
            t, h, w = (int(v) for v in grids[i])
            rows, cols = h // merge_size, w // merge_size
            n = t * rows * cols
            grid = weights[start:start + n].reshape(t, rows, cols).mean(0)
        else:  # no grid (LLaVA-style): equal shares, square if possible
            n = weights.numel() // max(n_img, 1)
            side = math.isqrt(n)
            chunk = weights[start:start + n]
            grid = chunk[: side * side].reshape(side, side) if side * side == n else chunk.reshape(1, n)
        out.append(grid)
        start += n
    return out


def attention_probe(model, batch: dict, policy: str, want_maps: bool = False):
    """Per-sample answer->latent values, and (optionally) latent->image maps."""
    attn = attention_weights(model, batch, policy)
    per_sample = answer_to_latent(attn, batch["segment_ids"])
    maps = None
    if want_maps:
        vision_cfg = getattr(model.hf_model.config, "vision_config", None)
        merge = getattr(vision_cfg, "spatial_merge_size", 1) or 1
        maps = latent_to_image_maps(attn, batch, merge)
    return per_sample, maps


class AttentionAccumulator:
    """Sums per rank; merged across ranks into the dataset-wide mean (exactly-once samples)."""

    def __init__(self):
        self.sum, self.count, self.samples = 0.0, 0, 0
        self.per_task: dict[str, list[float]] = {}  # task -> [sum, count, samples]

    def add(self, per_sample: list[dict], tasks: list[str]) -> None:
        for v, task in zip(per_sample, tasks):
            if v["count"] == 0:
                continue
            self.sum += v["sum"]
            self.count += v["count"]
            self.samples += 1
            t = self.per_task.setdefault(task, [0.0, 0, 0])
            t[0] += v["sum"]
            t[1] += v["count"]
            t[2] += 1

    def state(self) -> dict:
        return {"sum": self.sum, "count": self.count, "samples": self.samples, "per_task": self.per_task}

    @classmethod
    def merge(cls, states: list[dict | None]) -> AttentionAccumulator:
        acc = cls()
        for s in states:
            if not s:
                continue
            acc.sum += s["sum"]
            acc.count += s["count"]
            acc.samples += s["samples"]
            for task, (a, c, n) in s["per_task"].items():
                t = acc.per_task.setdefault(task, [0.0, 0, 0])
                t[0] += a
                t[1] += c
                t[2] += n
        return acc

    def summary(self, num_latents: int) -> dict:
        mean = self.sum / self.count if self.count else None
        per_key = (mean / num_latents) if mean is not None and num_latents else None
        return {
            "answer_to_latent": mean,
            "answer_to_latent_per_latent": per_key,
            "per_task": {t: {"answer_to_latent": a / c if c else None, "samples": n}
                         for t, (a, c, n) in sorted(self.per_task.items())},
            "samples": self.samples,
            "num_latents": num_latents,
            "definition": "attention mass from answer tokens (teacher-forced gold answer incl. <eos>) to the K "
                          "latent tokens, summed over latents, averaged over layers, heads, answer positions and "
                          "samples; _per_latent = that / K",
        }


def draw_latent_heatmaps(sample, maps: list[torch.Tensor], path: str, title: str = "") -> str | None:
    """One row per image: the image, then the latent->image attention drawn over it. Returns path."""
    if not maps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(maps)
    fig, axes = plt.subplots(n, 2, figsize=(6, 3 * n), squeeze=False)
    for i, (image, grid) in enumerate(zip(sample.images, maps)):
        w, h = image.size
        arr = grid.detach().cpu().numpy().astype(np.float64)
        axes[i][0].imshow(image)
        axes[i][0].set_title(f"image {i}", fontsize=8)
        axes[i][1].imshow(image)
        shown = axes[i][1].imshow(arr, cmap="jet", alpha=0.5, extent=(0, w, h, 0), interpolation="bilinear")
        axes[i][1].set_title(f"latent->image attention (max {arr.max():.3f})", fontsize=8)
        fig.colorbar(shown, ax=axes[i][1], fraction=0.046, pad=0.04)
        for ax in axes[i]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
