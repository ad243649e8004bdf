"""Boxes and points in image coordinates: box overlap for choosing patches and placing labels,
and random points kept apart so that candidate markers never touch."""

from __future__ import annotations

import math

from .units import Unusable


def overlap_area(a, b) -> float:
    """Area of the intersection of two (x1, y1, x2, y2) boxes; 0 when they do not meet."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def iou(a, b) -> float:
    inter = overlap_area(a, b)
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / ua if ua > 0 else 0.0


def far_points(rng, w: float, h: float, n: int, avoid: list[tuple[float, float]], min_dist: float,
               margin: float, tries: int = 400) -> list[tuple[float, float]]:
    """n random points in the image, >= min_dist from each other and from `avoid`."""
    pts: list[tuple[float, float]] = []
    for _ in range(tries):
        if len(pts) == n:
            break
        p = (float(rng.uniform(margin, w - margin)), float(rng.uniform(margin, h - margin)))
        if all(math.dist(p, q) >= min_dist for q in [*avoid, *pts]):
            pts.append(p)
    if len(pts) < n:
        raise Unusable(f"cannot place {n} points {min_dist:.0f} px apart")
    return pts
