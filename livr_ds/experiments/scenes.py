"""Synthetic scenes for the LIVR vs Direct SFT experiment: coloured squares on a 3 x 3 grid of
cells (at most one per cell), on a noisy grey background (112 x 112 pixels: 16 image tokens on
Qwen2.5-VL, so cells and tokens do not line up). Six colours, red and orange close.

Two tasks on the same kind of scene:

- `scene_attributes` (pre-training, broad): one look at one place. "What colour is the square in
  the top left?" (6 colours; the cell asked is occupied) or "Is there a square in the centre?"
  (yes / no). Teaches the vision tower and the LM what is where.
- `count_colour` (fine-tuning, needs every cell): "How many red squares are in the image?" with
  options 0, 1, 2, 3 (chance 25 %, answers exactly balanced per split), orange squares among the
  distractors. No single cell decides the answer, the model must combine nine looks; counting is
  the BLINK task where the one independent reproduction of LIVR found no gain over Direct SFT.
  Never seen in pre-training. (A first version on a 2 x 2 grid with four well-separated colours
  was solved to 100 % by Direct SFT and LIVR alike on seed 0, a ceiling that cannot tell methods
  apart; this harder version was chosen after seeing that result.)

Every sample is a pure function of (seed, split, index).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..data.writer import write_shards

COLOURS = {"red": (220, 40, 40), "orange": (235, 130, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
           "yellow": (230, 210, 30), "purple": (150, 60, 190)}
GRID = 3
CELLS = ("top left", "top middle", "top right", "middle left", "centre", "middle right", "bottom left",
         "bottom middle", "bottom right")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
PRETRAIN_TASK, COUNT_TASK = "scene_attributes", "count_colour"
TARGET = "red"
COUNTS = ("0", "1", "2", "3")


def render(rng: np.random.Generator, cells: list[str | None], size: int = 112) -> bytes:
    """JPEG bytes of a scene: cells[q] is the colour name of the square in cell q (row-major), or None."""
    grey = int(rng.integers(70, 190))
    img = np.clip(grey + rng.normal(0, 8, size=(size, size, 3)), 0, 255)
    cell = size // GRID
    for q, colour in enumerate(cells):
        if colour is None:
            continue
        side = int(rng.integers(int(0.4 * cell), int(0.75 * cell) + 1))
        x0, y0 = (q % GRID) * cell, (q // GRID) * cell
        x, y = (int(v) for v in rng.integers(0, cell - side + 1, size=2))
        rgb = np.array(COLOURS[colour], dtype=np.float64) + rng.normal(0, 10, size=3)
        img[y0 + y:y0 + y + side, x0 + x:x0 + x + side] = np.clip(rgb, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8), "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _split_id(split: str) -> int:
    return SPLIT_IDS.get(split, 100 + sum(map(ord, split)))


def count_scene(rng: np.random.Generator, count: int) -> list[str | None]:
    """GRID x GRID cells with exactly `count` red squares; the others empty or another colour
    (orange, the closest, twice as likely as each of the rest)."""
    n = GRID * GRID
    cells: list[str | None] = [None] * n
    order = rng.permutation(n)
    for q in order[:count]:
        cells[q] = TARGET
    others = ["orange"] + [c for c in COLOURS if c != TARGET]
    for q in order[count:]:
        cells[q] = None if rng.random() < 0.45 else others[int(rng.integers(len(others)))]
    return cells


def count_samples(split: str, n: int, seed: int = 0, size: int = 112):
    """n `count_colour` samples, answers exactly balanced over 0..3."""
    sid = _split_id(split)
    labels = np.random.default_rng([seed, sid, 7919]).permutation(np.arange(n) % len(COUNTS))
    for i in range(n):
        rng = np.random.default_rng([seed, sid, i, 1])
        count = int(labels[i])
        cells = count_scene(rng, count)
        yield {"key": f"{COUNT_TASK}-{split}-{i:06d}", "task": COUNT_TASK, "images": [render(rng, cells, size)],
               "question": f"How many {TARGET} squares are in the image?", "choices": list(COUNTS),
               "answer": chr(65 + count), "meta": {"cells": cells}}


def attribute_samples(split: str, n: int, seed: int = 0, size: int = 112):
    """n `scene_attributes` samples: half "what colour is the square in cell Q" (balanced colours),
    half "is there a square in cell Q" (balanced yes / no)."""
    sid = _split_id(split)
    names = list(COLOURS)
    for i in range(n):
        rng = np.random.default_rng([seed, sid, i, 2])
        cells = [names[int(rng.integers(len(names)))] if rng.random() < 0.55 else None for _ in CELLS]
        q = int(rng.integers(len(CELLS)))
        if i % 2 == 0:
            colour = names[(i // 2) % len(names)]
            cells[q] = colour
            sample = {"question": f"What colour is the square in the {CELLS[q]}?", "choices": names,
                      "answer": chr(65 + names.index(colour))}
        else:
            present = (i // 2) % 2 == 0
            cells[q] = (cells[q] or names[int(rng.integers(len(names)))]) if present else None
            sample = {"question": f"Is there a square in the {CELLS[q]}?", "choices": ["yes", "no"],
                      "answer": "A" if present else "B"}
        yield {"key": f"{PRETRAIN_TASK}-{split}-{i:06d}", "task": PRETRAIN_TASK, "images": [render(rng, cells, size)],
               **sample, "meta": {"cells": cells, "quadrant": q}}


def write(out_dir: str, make, sizes: dict[str, int], seed: int = 0, shard_size: int = 1024) -> dict:
    """Write each split of `make(split, n, seed)` into out_dir (one manifest.json)."""
    for split, n in sizes.items():
        if n > 0:
            write_shards(make(split, n, seed), out_dir, split, shard_size, progress=False, total=n)
    return sizes
