"""A synthetic content-level visual task for the bottleneck proof: "which colour is the square".

One image per sample: a grey background with pixel noise and one filled square of a random size
at a random place, in one of four colours (slightly jittered); the four options are always the
colour names in the same order, so the answer letter names the colour and the question carries no
information about it (chance = 25 %, answers exactly balanced per split). The colour is a
content-level property: nothing about the square's position is asked (a position task was
memorised under the bottleneck instead of generalising, in an earlier tiny-model reproduction).

Every sample is a pure function of (seed, split, index), so the data is reproducible and as much
fresh data as a run needs is cheap to make.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..data.writer import write_shards

TASK = "colour_square"
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 30)}
QUESTION = "Which colour is the square in the image?"
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def colour_square(rng: np.random.Generator, size: int, answer: int) -> dict:
    """One sample dict (PIL-free: the image is JPEG bytes) whose square has colour `answer`."""
    names = list(COLOURS)
    grey = int(rng.integers(70, 190))
    img = np.clip(grey + rng.normal(0, 8, size=(size, size, 3)), 0, 255)
    side = int(rng.integers(int(0.5 * size), int(0.8 * size) + 1))
    x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    colour = np.array(COLOURS[names[answer]], dtype=np.float64) + rng.normal(0, 10, size=3)
    img[y:y + side, x:x + side] = np.clip(colour, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8), "RGB").save(buf, format="JPEG", quality=90)
    return {"images": [buf.getvalue()], "question": QUESTION, "choices": names,
            "answer": chr(65 + answer), "meta": {"colour": names[answer], "box": [x, y, side]}}


def samples(split: str, n: int, seed: int = 0, size: int = 112):
    """n samples of one split, answers exactly balanced (a seeded permutation of 0..3 repeated)."""
    sid = SPLIT_IDS.get(split, 100 + sum(map(ord, split)))
    labels = np.random.default_rng([seed, sid, 4049]).permutation(np.arange(n) % len(COLOURS))
    for i in range(n):
        rng = np.random.default_rng([seed, sid, i])
        yield {"key": f"{TASK}-{split}-{i:06d}", "task": TASK, **colour_square(rng, size, int(labels[i]))}


def write_task(out_dir: str, n_train: int, n_val: int, n_test: int, seed: int = 0, size: int = 112,
               shard_size: int = 1024) -> dict:
    """Write train/val/test shards of the task into out_dir (one manifest.json); returns the sizes."""
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in sizes.items():
        if n > 0:
            write_shards(samples(split, n, seed, size), out_dir, split, shard_size, progress=False, total=n)
    return sizes
