"""Shared REF + four-candidate drawing for the correspondence tasks (visual, semantic, functional)."""

from __future__ import annotations

from PIL import Image

from ..data.schema import letter
from .markers import draw_points
from .prompts import with_choices

CHOICES = ["Point A", "Point B", "Point C", "Point D"]


def ref_and_candidates(im1: Image.Image, ref: tuple[float, float], im2: Image.Image, true_pt: tuple[float, float],
                       others: list[tuple[float, float]], label: int, question: str, meta: dict) -> dict:
    """REF drawn on im1; the true point at position `label` among A-D on im2, the others in order."""
    cands = list(others)
    cands.insert(label, true_pt)
    a = draw_points(im1, [ref], ["REF"])
    b = draw_points(im2, cands, ["A", "B", "C", "D"])
    return {"images": [a, b], "question": with_choices(question, CHOICES), "choices": CHOICES,
            "answer": letter(label),
            "meta": {**meta, "ref": [round(v, 1) for v in ref],
                     "candidates": [[round(v, 1) for v in c] for c in cands]}}
