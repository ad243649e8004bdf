"""What every paper-data builder shares: seeding, BLINK prompts, drawing, the sampling loop and the
provenance manifest.

A builder (one module per source family) turns its source into ``Pools``: for each split a
deterministic list of *units* (an image, an image pair, a sequence pair, a PixMo row, ...),
optionally grouped by label when the label is a property of the unit (counting). ``build()`` then
draws samples from the pools: units are visited in a seeded order, each unit may be de-duplicated
against the test set, made into a sample (``make(unit, rng, label)``), skipped when its images are
corrupt or it cannot give a valid sample, and the samples are written with the shared
``write_shards``. Every random choice comes from ``rng_for(seed, task, split, position)``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.schema import DataError, letter
from ..data.images import open_image as _decode
from ..data.manifest import FORMAT, read_manifest, sha256_file, write_manifest
from ..data.writer import write_shards

log = logging.getLogger(__name__)

JPEG_QUALITY = 92
MAX_SIDE = 768  # images are resized to at most this long side before markers are drawn


class CorruptImage(Exception):
    """A source image could not be decoded: the unit is skipped and counted."""


class Unusable(Exception):
    """This unit cannot give a sample under the recipe (e.g. no point pair fits): skipped, counted."""


# ---- seeding --------------------------------------------------------------------------------
def _h(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")


def rng_for(seed: int, *parts: Any) -> np.random.Generator:
    """A Generator that is a pure function of (seed, parts...), e.g. (seed, task, split, i)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *(_h(str(p)) & 0xFFFFFFFF for p in parts)])


def hash_rank(seed: int, key: str) -> float:
    """A number in [0, 1) that is a pure function of (seed, key): used to split sources by id."""
    return _h(f"{seed}:{key}") / 2.0 ** 64


def split_by_key(keys: list[str], fractions: dict[str, float], seed: int) -> dict[str, list[str]]:
    """Assign each key to a split; exact sizes (largest remainder), at least one key per split with
    a positive fraction when there are enough keys. Order inside each split is sorted."""
    keys = sorted(set(keys))
    ranked = sorted(keys, key=lambda k: _h(f"{seed}:split:{k}"))
    tot = sum(fractions.values())
    names = [s for s, f in fractions.items() if f > 0]
    sizes = {s: int(len(keys) * fractions[s] / tot) for s in names}
    for s in names:
        if sizes[s] == 0 and len(keys) >= len(names):
            sizes[s] = 1
    while sum(sizes.values()) > len(keys):
        big = max(sizes, key=sizes.get)
        sizes[big] -= 1
    rest = len(keys) - sum(sizes.values())
    for s in sorted(names, key=lambda s: -fractions[s])[:rest] if rest > 0 else []:
        sizes[s] += 1
    out, i = {}, 0
    for s in names:
        out[s] = sorted(ranked[i:i + sizes[s]])
        i += sizes[s]
    return out


# ---- images ---------------------------------------------------------------------------------
def open_image(path: str) -> Image.Image:
    """Decode a source image fully (RGB); CorruptImage if it cannot be read."""
    if not os.path.isfile(path):
        raise CorruptImage(f"{path}: image file missing")
    try:
        return _decode(path, path)  # named formats only: an EPS named .jpg never reaches Ghostscript
    except DataError as exc:
        raise CorruptImage(str(exc)) from None


def open_image_bytes(data: bytes, where: str) -> Image.Image:
    try:
        return _decode(data, where)
    except DataError as exc:
        raise CorruptImage(str(exc)) from None


def fit(im: Image.Image, max_side: int = MAX_SIDE) -> tuple[Image.Image, float]:
    """Resize so the long side is at most max_side; returns (image, scale)."""
    s = min(1.0, max_side / max(im.size))
    if s >= 1.0:
        return im, 1.0
    return im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC), s


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    return buf.getvalue()


# ---- drawing --------------------------------------------------------------------------------
@lru_cache(maxsize=32)
def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # FreeType build: a scalable font
    except Exception:  # pragma: no cover - PIL without FreeType
        return ImageFont.load_default()


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


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


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
            cost = sum(_overlap(cand, o) for o in circles + placed)
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


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / ua if ua > 0 else 0.0


# ---- prompts (BLINK wording) ----------------------------------------------------------------
def with_choices(question: str, choices: list[str]) -> str:
    """BLINK's prompt: question, 'Select from the following choices.', then '(A) ...' lines."""
    return question + "\nSelect from the following choices.\n" + "\n".join(
        f"({letter(i)}) {c}" for i, c in enumerate(choices))


def balanced_labels(rng, n: int, k: int) -> list[int]:
    """n labels in 0..k-1, as equal as possible (counts differ by at most 1), in random order."""
    return [int(x) for x in rng.permutation(np.arange(n) % k)]


def balanced(k: int) -> Callable[[np.random.Generator, int], list[int]]:
    return lambda rng, n: balanced_labels(rng, n, k)


def split_fractions(sizes: dict[str, int]) -> dict[str, float]:
    """Pool split proportional to the requested sizes (only splits with n > 0)."""
    return {s: float(n) for s, n in sizes.items() if n > 0}


# ---- files / provenance ---------------------------------------------------------------------


def annotation_checksums(paths: list[str], max_listed: int = 64) -> dict:
    """{abs path: sha256}; beyond max_listed files (SPair has 70k pair files) one combined
    checksum: sha256 over the sorted "path sha256" lines, plus the file count."""
    sums = {os.path.abspath(p): sha256_file(p) for p in sorted(set(paths))}
    if len(sums) <= max_listed:
        return sums
    h = hashlib.sha256("".join(f"{p} {d}\n" for p, d in sums.items()).encode()).hexdigest()
    return {"combined": {"files": len(sums), "common_dir": os.path.commonpath(list(sums)), "sha256_of_list": h}}


def need_dir(path: str, what: str) -> str:
    if not path:
        raise DataError(f"{what}: no directory given")
    if not os.path.isdir(path):
        raise DataError(f"{path}: directory not found (expected {what})")
    return path


def need_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (expected {what})")
    return path


# ---- the sampling loop ----------------------------------------------------------------------
@dataclass
class Pools:
    """Units per split. ``units[split]`` is a list, or a dict label -> list when the label is a
    property of the unit (counting). ``images(unit)`` returns the unit's source images for
    de-duplication (a list; two or more = a pair/triplet, de-duplicated pair-aware).
    ``reuse``: how many samples one unit may give per split (e.g. a HPatches pair with different
    points). ``annotations``: annotation files (checksummed in the manifest)."""
    units: dict[str, Any]
    images: Callable[[Any], list[Image.Image]]
    unit_id: Callable[[Any], str]
    unit_images: Callable[[Any], list[str]]  # source image ids of a unit (train/val overlap check)
    reuse: int = 1
    annotations: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stats:
    corrupt: int = 0
    unusable: int = 0
    duplicates: int = 0
    removed: list[str] = field(default_factory=list)
    corrupt_units: list[str] = field(default_factory=list)


def _pool_size(units) -> int:
    return sum(len(v) for v in units.values()) if isinstance(units, dict) else len(units)


def _check_capacity(task: str, split: str, n: int, units, reuse: int, labels: list | None) -> None:
    if isinstance(units, dict):
        need: dict = {}
        for lab in labels or []:
            need[lab] = need.get(lab, 0) + 1
        short = {lab: (len(units.get(lab, [])) * reuse, c) for lab, c in need.items()
                 if len(units.get(lab, [])) * reuse < c}
        if short:
            k = len(need)
            can = k * min(len(units.get(lab, [])) * reuse for lab in need)
            raise DataError(f"{task}: {split} needs {n} samples balanced over {k} labels but the source has "
                            f"too few for labels {sorted(short)} (have, need: {short}); it can give at most "
                            f"{can} balanced {split} samples (use --n-{split} {can})")
    else:
        can = len(units) * reuse
        if can < n:
            raise DataError(f"{task}: {split} asks for {n} samples but the source can give at most {can} "
                            f"({len(units)} usable units x {reuse}); use --n-{split} {can} or less")


def sample_stream(task: str, split: str, n: int, seed: int, pools: Pools, make: Callable, labels: list | None,
                  deduper, stats: Stats):
    """Yield n sample dicts for one split (see module docstring)."""
    units = pools.units[split]
    _check_capacity(task, split, n, units, pools.reuse, labels)
    keyed = units if isinstance(units, dict) else {None: units}
    orders = {lab: [u for u in rng_for(seed, task, split, "order", lab).permutation(len(lst))]
              for lab, lst in keyed.items()}
    pos = {lab: 0 for lab in keyed}
    bad: set[str] = set()
    dup_cache: dict[str, bool] = {}
    visits = 0
    written = 0
    while written < n:
        label = labels[written] if labels is not None else None
        lab = label if isinstance(units, dict) else None
        lst, order = keyed.get(lab, []), orders.get(lab, [])
        if pos[lab] >= len(order) * pools.reuse:
            raise DataError(
                f"{task}: the source ran out after {written} of {n} {split} samples "
                f"({stats.corrupt} corrupt images, {stats.duplicates} test duplicates, {stats.unusable} "
                f"units unusable under the recipe were skipped); it can give {written} "
                f"{split} samples{'' if lab is None else f' with label {lab!r} at this point'}")
        unit = lst[order[pos[lab] % len(order)]]
        pos[lab] += 1
        visits += 1
        uid = pools.unit_id(unit)
        if uid in bad:
            continue
        try:
            if deduper is not None:
                if uid not in dup_cache:
                    dup, info = deduper.is_duplicate(pools.images(unit))
                    dup_cache[uid] = dup
                    if dup:
                        stats.duplicates += 1
                        stats.removed.append(f"{split}:{uid} ~ {info}")
                if dup_cache[uid]:
                    continue
            rng = rng_for(seed, task, split, visits)
            s = make(unit, rng, label)
        except CorruptImage as exc:
            bad.add(uid)
            stats.corrupt += 1
            stats.corrupt_units.append(str(exc))
            log.warning("%s: skipped a corrupt image: %s", task, exc)
            continue
        except Unusable:
            stats.unusable += 1
            continue
        s.setdefault("meta", {})["source_unit"] = uid
        yield {"key": f"{task}-{split}-{written:06d}", "task": task,
               **{k: v for k, v in s.items() if k != "images"},
               "images": [jpeg(im) for im in s["images"]]}
        written += 1


def check_disjoint(task: str, pools: Pools, splits: list[str]) -> None:
    """No source image may be in two splits."""
    seen: dict[str, str] = {}
    for split in splits:
        units = pools.units.get(split, [])
        flat = [u for v in units.values() for u in v] if isinstance(units, dict) else units
        for u in flat:
            for img in pools.unit_images(u):
                other = seen.setdefault(img, split)
                if other != split:
                    raise DataError(f"{task}: source image {img!r} is in both {other} and {split} "
                                    "(internal split error)")


def build(task: str, out_dir: str, *, seed: int, sizes: dict[str, int], pools: Pools, make: Callable,
          labels_fn: Callable[[np.random.Generator, int], list] | None, recipe: dict, deduper=None,
          shard_size: int = 256, progress: bool = False) -> dict:
    """Write every split in ``sizes`` (n > 0) to out_dir and the manifest with provenance."""
    splits = [s for s, n in sizes.items() if n > 0]
    for s in splits:
        if s not in pools.units:
            raise DataError(f"{task}: the source has no {s} split")
    check_disjoint(task, pools, splits)
    per_split = {}
    for split in splits:
        n = sizes[split]
        labels = labels_fn(rng_for(seed, task, split, "labels"), n) if labels_fn else None
        stats = Stats()
        entry = write_shards(sample_stream(task, split, n, seed, pools, make, labels, deduper, stats),
                             out_dir, split, shard_size, progress=progress, total=n)
        per_split[split] = {"samples": entry["total"], "skipped_corrupt": stats.corrupt,
                            "corrupt": stats.corrupt_units[:100], "skipped_unusable": stats.unusable,
                            "dedup_removed": stats.duplicates, "dedup_removed_units": stats.removed[:1000],
                            "pool_units": _pool_size(pools.units[split])}
    m = read_manifest(out_dir)
    m["format"] = FORMAT
    for stale in [s for s in m["splits"] if s not in splits]:
        del m["splits"][stale]
    m["build"] = {
        "task": task, "seed": seed, "sizes": {s: sizes[s] for s in splits}, "recipe": recipe,
        "sources": {k: os.path.abspath(v) for k, v in pools.sources.items()},
        "annotation_files": annotation_checksums(pools.annotations),
        "splits": per_split, "notes": pools.notes,
        "dedup": deduper.describe() if deduper is not None else None,
        "jpeg_quality": JPEG_QUALITY, "max_side": MAX_SIDE,
    }
    write_manifest(out_dir, m)
    return m
