"""Small BLINK-style multiple-choice tasks built from scikit-image's bundled photographs.

    make_demo(out_dir, seed=0, n_train=200, n_val=50, n_test=50, image_size=112, tasks=None)

writes ``out_dir/<task>/{train,val,test}-*.tar`` with a ``manifest.json`` per task folder, and a
top-level ``out_dir/manifest.json`` whose shard names are ``<task>/<shard>.tar``: so
``ShardSource(out_dir/"counting")`` reads one task and ``ShardSource(out_dir)`` all of them mixed.

Tasks (every sample is a pure function of (seed, task, split, index); answers are exactly
balanced per split):

- ``jigsaw``: 3 images. A photo crop with its bottom-right quarter blacked out, then two
  candidate patches: the missing quarter and a same-size patch from elsewhere in the same photo.
- ``counting``: 1 image, open-ended. 1..6 discs or squares of one colour pasted on a photo, plus
  up to 2 distractors of another colour; answer "1".."6", no choices.
- ``localization``: 1 image. One object pasted on a photo, two boxes labelled A and B; one
  encloses the object, the other is shifted away (IoU <= 0.3 with it).
- ``visual_similarity``: 3 images. A reference crop, a transformed copy of it (flip, crop,
  colour jitter) and the same transform applied to a crop of a different photo.

Only photos that ship inside scikit-image are used (no downloads). Same seed -> byte-identical
shards (fixed JPEG settings and tar metadata).
"""

from __future__ import annotations

import io
import logging
import os
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from .schema import DataError, letter
from .manifest import FORMAT, write_manifest
from .writer import write_shards

log = logging.getLogger(__name__)

TASKS = ("jigsaw", "counting", "localization", "visual_similarity")
SPLITS = ("train", "val", "test")
# Bundled with scikit-image (skimage/data/*.png|jpg); the pooch-downloaded ones are left out.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle", "camera", "coins", "clock", "moon", "brick", "grass", "gravel")
COLOURS = {"red": (230, 25, 25), "green": (20, 200, 40), "blue": (30, 60, 235), "yellow": (250, 220, 0),
           "magenta": (220, 0, 220), "cyan": (0, 220, 230)}
JPEG_QUALITY = 90


@lru_cache(maxsize=1)
def photos() -> tuple[tuple[str, Image.Image], ...]:
    """The bundled photos as RGB images, shorter side 256 px."""
    import skimage.data

    out = []
    for name in PHOTOS:
        try:
            arr = getattr(skimage.data, name)()
        except Exception as exc:  # a missing optional file must not break the demo
            log.warning("skimage.data.%s unavailable (%s); skipped", name, exc)
            continue
        if isinstance(arr, tuple):  # stereo_motorcycle -> (left, right, disparity)
            arr = arr[0]
        arr = np.asarray(arr)
        if arr.dtype != np.uint8:
            continue
        im = Image.fromarray(arr).convert("RGB")
        scale = 256 / min(im.size)
        im = im.resize((max(256, round(im.width * scale)), max(256, round(im.height * scale))), Image.BICUBIC)
        out.append((name, im))
    if len(out) < 2:
        raise DataError("scikit-image ships fewer than 2 usable photos; cannot build the demo")
    return tuple(out)


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    return buf.getvalue()


def _crop_box(rng, im: Image.Image, frac=(0.45, 1.0)) -> tuple[int, int, int]:
    side = int(rng.integers(int(frac[0] * min(im.size)), int(frac[1] * min(im.size)) + 1))
    return int(rng.integers(0, im.width - side + 1)), int(rng.integers(0, im.height - side + 1)), side


def _crop(rng, im: Image.Image, size: int) -> Image.Image:
    x, y, side = _crop_box(rng, im)
    out = im.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def _photo(rng, exclude: int | None = None) -> tuple[int, Image.Image]:
    ph = photos()
    while True:
        i = int(rng.integers(len(ph)))
        if i != exclude:
            return i, ph[i][1]


def _two(first: str, second: str) -> str:
    return f"(A) {first}\n(B) {second}"


# ---- tasks ----------------------------------------------------------------------------------
def jigsaw(rng, size: int, answer: int) -> dict:
    pi, photo = _photo(rng)
    x, y, side = _crop_box(rng, photo, (0.5, 0.9))
    base = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
    h = size // 2
    true_patch = base.crop((h, h, size, size))
    masked = base.copy()
    masked.paste((0, 0, 0), (h, h, size, size))
    for _ in range(50):  # distractor: same-scale quarter from elsewhere in the photo
        dx, dy = int(rng.integers(0, photo.width - side + 1)), int(rng.integers(0, photo.height - side + 1))
        if abs(dx - x) + abs(dy - y) > side // 2:
            break
    other = photo.crop((dx, dy, dx + side, dy + side)).resize((size, size), Image.BICUBIC).crop((h, h, size, size))
    cands = [true_patch, other] if answer == 0 else [other, true_patch]
    q = ("The first image has its bottom-right quarter blacked out. Which of the second image or the third "
         "image is the missing part? Compare the edges and content around the missing spot.\n"
         "Select from the following choices.\n" + _two("the second image", "the third image"))
    return {"images": [masked, *cands], "question": q, "choices": ["the second image", "the third image"],
            "answer": letter(answer), "meta": {"photo": photos()[pi][0]}}


def _place(rng, size: int, r: int, taken: list[tuple[int, int, int]], tries: int = 200):
    for _ in range(tries):
        cx, cy = int(rng.integers(r + 1, size - r - 1)), int(rng.integers(r + 1, size - r - 1))
        if all((cx - ox) ** 2 + (cy - oy) ** 2 > (r + orr + 2) ** 2 for ox, oy, orr in taken):
            return cx, cy
    return None


def _shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, colour) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour, outline=(0, 0, 0), width=1)
    else:
        draw.rectangle(box, fill=colour, outline=(0, 0, 0), width=1)


def counting(rng, size: int, count: int) -> dict:
    pi, photo = _photo(rng)
    im = _crop(rng, photo, size)
    names = sorted(COLOURS)
    colour = names[int(rng.integers(len(names)))]
    other = names[(names.index(colour) + 1 + int(rng.integers(len(names) - 1))) % len(names)]
    shape = "circle" if rng.random() < 0.5 else "square"
    r = max(3, size // 16)
    draw = ImageDraw.Draw(im)
    taken: list[tuple[int, int, int]] = []
    n_distract = int(rng.integers(0, 3))
    for i in range(count + n_distract):
        pos = _place(rng, size, r, taken)
        if pos is None:
            if i < count:
                raise DataError(f"counting: cannot place {count} objects in {size} px; use a larger image_size")
            break
        taken.append((*pos, r))
        _shape(draw, shape, *pos, r, COLOURS[colour] if i < count else COLOURS[other])
    plural = "circles" if shape == "circle" else "squares"
    q = f"How many {colour} {plural} are in the image?"
    return {"images": [im], "question": q, "choices": [], "answer": str(count),
            "meta": {"photo": photos()[pi][0], "colour": colour, "shape": shape, "distractors": n_distract}}


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda t: (t[2] - t[0]) * (t[3] - t[1])  # noqa: E731
    return inter / float(area(a) + area(b) - inter)


def _label(draw: ImageDraw.ImageDraw, box, text: str, font) -> None:
    x, y = box[0], max(0, box[1] - 11)
    draw.rectangle((x, y, x + 9, y + 10), fill=(255, 255, 255))
    draw.text((x + 2, y), text, fill=(0, 0, 0), font=font)


def localization(rng, size: int, answer: int) -> dict:
    pi, photo = _photo(rng)
    im = _crop(rng, photo, size)
    names = sorted(COLOURS)
    colour = names[int(rng.integers(len(names)))]
    r = max(4, size // 12)
    cx, cy = int(rng.integers(r + 14, size - r - 4)), int(rng.integers(r + 14, size - r - 4))
    draw = ImageDraw.Draw(im)
    _shape(draw, "circle", cx, cy, r, COLOURS[colour])
    m = [int(v) for v in rng.integers(2, 5, size=4)]
    true_box = (cx - r - m[0], cy - r - m[1], cx + r + m[2], cy + r + m[3])
    w, h = true_box[2] - true_box[0], true_box[3] - true_box[1]
    other_box = None
    for _ in range(500):
        ox, oy = int(rng.integers(0, size - w)), int(rng.integers(12, size - h))
        cand = (ox, oy, ox + w, oy + h)
        if _iou(cand, true_box) <= 0.3 and not (cand[0] <= cx <= cand[2] and cand[1] <= cy <= cand[3]):
            other_box = cand
            break
    if other_box is None:
        raise DataError(f"localization: no distractor box fits in {size} px; use a larger image_size")
    boxes = [true_box, other_box] if answer == 0 else [other_box, true_box]
    font = ImageFont.load_default()
    for box, name, col in zip(boxes, "AB", [(255, 255, 255), (255, 255, 255)]):
        draw.rectangle(box, outline=col, width=2)
        _label(draw, box, name, font)
    q = (f"A bounding box is a rectangle drawn around an object. Which bounding box encloses the {colour} "
         "circle?\nSelect from the following choices.\n" + _two("Box A", "Box B"))
    return {"images": [im], "question": q, "choices": ["Box A", "Box B"], "answer": letter(answer),
            "meta": {"photo": photos()[pi][0], "colour": colour, "boxes": [list(b) for b in boxes],
                     "object": [cx, cy, r]}}


def _transform(rng, im: Image.Image, kind: str, params) -> Image.Image:
    size = im.width
    if kind == "flip":
        return im.transpose(Image.FLIP_LEFT_RIGHT)
    if kind == "crop":
        f, fx, fy = params
        side = int(size * f)
        x, y = int(fx * (size - side)), int(fy * (size - side))
        return im.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
    b, s = params
    return ImageEnhance.Color(ImageEnhance.Brightness(im).enhance(b)).enhance(s)


def visual_similarity(rng, size: int, answer: int) -> dict:
    pi, photo = _photo(rng)
    qi, other_photo = _photo(rng, exclude=pi)
    ref = _crop(rng, photo, size)
    kind = ("flip", "crop", "jitter")[int(rng.integers(3))]
    params = (float(rng.uniform(0.75, 0.92)), float(rng.random()), float(rng.random())) if kind == "crop" else \
        (float(rng.uniform(0.7, 1.3)), float(rng.uniform(0.5, 1.5)))
    copy = _transform(rng, ref, kind, params)
    other = _transform(rng, _crop(rng, other_photo, size), kind, params)
    cands = [copy, other] if answer == 0 else [other, copy]
    q = ("Take the first image as the reference. Which of the second image or the third image is most similar "
         "to it?\nSelect from the following choices.\n" + _two("the second image", "the third image"))
    return {"images": [ref, *cands], "question": q, "choices": ["the second image", "the third image"],
            "answer": letter(answer), "meta": {"photo": photos()[pi][0], "other_photo": photos()[qi][0],
                                               "transform": kind}}


_MAKERS = {"jigsaw": (jigsaw, 2), "counting": (counting, 6), "localization": (localization, 2),
           "visual_similarity": (visual_similarity, 2)}


def task_samples(task: str, split: str, n: int, seed: int = 0, image_size: int = 112):
    """Yield n sample dicts (images as JPEG bytes) of one task/split; a pure function of the args."""
    if task not in _MAKERS:
        raise DataError(f"unknown demo task {task!r}; choose from {list(TASKS)}")
    if image_size < 48:
        raise DataError(f"image_size {image_size} is too small for the demo tasks (>= 48)")
    make, k = _MAKERS[task]
    ti, si = TASKS.index(task), SPLITS.index(split) if split in SPLITS else 100 + sum(map(ord, split))
    labels = np.random.default_rng([seed, ti, si, 7919]).permutation(np.arange(n) % k)  # exactly balanced
    for i in range(n):
        rng = np.random.default_rng([seed, ti, si, i])
        lab = int(labels[i])
        s = make(rng, image_size, lab + 1 if task == "counting" else lab)
        yield {"key": f"{task}-{split}-{i:06d}", "task": task, **s, "images": [_jpeg(im) for im in s["images"]]}


def make_demo(out_dir: str, seed: int = 0, n_train: int = 200, n_val: int = 50, n_test: int = 50,
              image_size: int = 112, tasks: list[str] | tuple[str, ...] | None = None, shard_size: int = 256,
              progress: bool = False) -> dict:
    """Write the demo tasks (default: all four) and return the top-level manifest."""
    tasks = list(tasks or TASKS)
    unknown = [t for t in tasks if t not in _MAKERS]
    if unknown:
        raise DataError(f"unknown demo task(s) {unknown}; choose from {list(TASKS)}")
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    top = {"format": FORMAT, "splits": {}, "demo": {"seed": seed, "image_size": image_size, "tasks": tasks}}
    for task in tasks:
        tdir = os.path.join(out_dir, task)
        for split, n in sizes.items():
            if n <= 0:
                continue
            entry = write_shards(task_samples(task, split, n, seed, image_size), tdir, split, shard_size,
                                 progress=progress, total=n)
            agg = top["splits"].setdefault(split, {"shards": [], "tasks": {}, "total": 0})
            agg["shards"] += [{**s, "name": f"{task}/{s['name']}"} for s in entry["shards"]]
            agg["tasks"][task] = entry["total"]
            agg["total"] += entry["total"]
    write_manifest(out_dir, top)
    log.info("demo data for %s in %s (seed %d, %d px)", ", ".join(tasks), out_dir, seed, image_size)
    return top
