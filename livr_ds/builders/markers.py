"""BLINK's visual prompts drawn on the images: red-circled points and coloured boxes, each with a
letter label placed where it covers no marker and no other label."""

from __future__ import annotations

from PIL import Image, ImageDraw

from ..data.images import font
from .geometry import overlap_area


def marker_sizes(im: Image.Image) -> tuple[int, int, int]:
    """(circle radius, line width, font size) scaled to the image so that markers stay legible
    after the processor resizes a <= MAX_SIDE image (font >= 14 px at 448 px long side)."""
    long = max(im.size)
    return max(6, round(0.014 * long)), max(2, round(0.004 * long)), max(14, round(0.035 * long))


def _label_size(draw: ImageDraw.ImageDraw, text: str, size: int) -> tuple[int, int, int, int]:
    l, t, r, b = draw.textbbox((0, 0), text, font=font(size))
    return r - l + 6, b - t + 6, l, t


def _put_label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int) -> None:
    w, h, l, t = _label_size(draw, text, size)
    x, y = xy
    draw.rectangle((x, y, x + w, y + h), fill=(255, 255, 255), outline=(0, 0, 0))
    draw.text((x + 3 - l, y + 3 - t), text, fill=(0, 0, 0), font=font(size))


def place_labels(draw, points, labels, r: int, fs: int, im_size) -> list[tuple[float, float, float, float]]:
    """A box beside each circle (right, left, above, below, then the diagonals): the first spot that stays
    in the image and covers no circle and no earlier label, else the least-overlapping one."""
    W, H = im_size
    circles = [(x - r - 1, y - r - 1, x + r + 1, y + r + 1) for x, y in points]
    placed: list[tuple[float, float, float, float]] = []
    for (x, y), lab in zip(points, labels):
        w, h, _, _ = _label_size(draw, lab, fs)
        g = r + 2
        spots = [(x + g, y - h), (x - g - w, y - h), (x - w / 2, y - g - h), (x - w / 2, y + g),
                 (x + g, y), (x - g - w, y), (x + g, y - g - h), (x - g - w, y + g)]
        best, best_cost = None, None
        for sx, sy in spots:
            sx, sy = min(max(0, sx), W - w), min(max(0, sy), H - h)
            cand = (sx, sy, sx + w, sy + h)
            cost = sum(overlap_area(cand, o) for o in circles + placed)
            if best_cost is None or cost < best_cost:
                best, best_cost = cand, cost
            if cost == 0:
                break
        placed.append(best)
    return placed


def draw_points(im: Image.Image, points: list[tuple[float, float]], labels: list[str],
                colour=(255, 0, 0)) -> Image.Image:
    """Red circles with a label box beside each (BLINK's "red-circled points ... drawn beside")."""
    im = im.copy()
    d = ImageDraw.Draw(im)
    r, w, fs = marker_sizes(im)
    for x, y in points:
        d.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=w)
        d.ellipse((x - 1, y - 1, x + 1, y + 1), fill=colour)
    for box, lab in zip(place_labels(d, points, labels, r, fs, im.size), labels):
        _put_label(d, box[:2], lab, fs)
    return im


def draw_boxes(im: Image.Image, boxes: list[tuple[float, float, float, float]], labels: list[str],
               colours=((255, 0, 0), (0, 90, 255))) -> Image.Image:
    im = im.copy()
    d = ImageDraw.Draw(im)
    _, w, fs = marker_sizes(im)
    for i, (box, lab) in enumerate(zip(boxes, labels)):
        d.rectangle(tuple(box), outline=colours[i % len(colours)], width=w)
        lw, lh, _, _ = _label_size(d, lab, fs)
        _put_label(d, (min(max(0, box[0] + w), im.width - lw), min(max(0, box[1] + w), im.height - lh)), lab, fs)
    return im
