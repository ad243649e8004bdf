"""Relative reflectance from the Multi-Illumination Dataset (MID, Murmann et al. 2019).

Layout (the official download, e.g. ``multi_illumination_train_mip2_jpg``): one folder per scene
holding its 25 flash directions ``dir_<k>_mip<m>.jpg`` (k = 0..24). MID ships no albedo; the
recipe needs one per scene, found as (first match):

    <scene>/albedo.png | .jpg | .tif (8- or 16-bit, next to the photos), or
    SOURCE_2/<scene>.png | SOURCE_2/<scene>/albedo.png     (``--source-2 DIR``)

An 8-bit albedo is taken as sRGB-encoded and linearised before computing relative luminance
Y = 0.2126 R + 0.7152 G + 0.0722 B (``albedo_linear=True`` skips the linearisation). The albedo may
have another resolution than the photo: points map proportionally.

Recipe: one photo (a random flash direction) of a scene, two points A and B, each on a locally
uniform albedo patch (5x5 window, std <= 10% of its mean, Y >= 0.02); relative difference
d = |Ya - Yb| / max(Ya, Yb). "(C) About the same" iff d <= 0.10: exactly round(n/4) samples; the
rest are "(A) A is darker" / "(B) B is darker", balanced. Scenes are split between train and val.
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..data.images import open_image as decode_source
from ..data.schema import DataError, letter
from .build import build
from .image_format import fit
from .markers import draw_points
from .prompts import with_choices
from .source import need_dir, open_image
from .splits import split_by_key, split_fractions
from .units import CorruptImage, Pools, Unusable

SAME_MAX = 0.10
SAME_SHARE = 0.25
QUESTION = ("Two points are circled on the image, labeled by A and B beside each circle. "
            "Which point has darker surface color, or the colors is about the same?")
CHOICES = ["A is darker", "B is darker", "About the same"]
PHOTO_RE = re.compile(r"^dir_(\d+)_mip(\d+)\.(jpg|jpeg|png)$", re.I)


def labels_reflectance(rng, n: int) -> list[int]:
    n_same = int(round(n * SAME_SHARE))
    rest = n - n_same
    labs = [2] * n_same + [0] * (rest - rest // 2) + [1] * (rest // 2)
    return [int(x) for x in rng.permutation(labs)]


def _albedo_path(scene_dir: str, scene: str, source_2: str | None) -> str | None:
    cands = [os.path.join(scene_dir, f"albedo.{e}") for e in ("png", "jpg", "tif", "tiff")]
    if source_2:
        cands += [os.path.join(source_2, f"{scene}.{e}") for e in ("png", "jpg", "tif", "tiff")]
        cands += [os.path.join(source_2, scene, f"albedo.{e}") for e in ("png", "jpg", "tif", "tiff")]
    return next((c for c in cands if os.path.isfile(c)), None)


def luminance(albedo: np.ndarray, linear: bool) -> np.ndarray:
    a = albedo.astype(np.float64)
    a = a / (65535.0 if albedo.dtype == np.uint16 else 255.0)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    a = a[..., :3]
    if not linear:
        a = np.where(a <= 0.04045, a / 12.92, ((a + 0.055) / 1.055) ** 2.4)
    return a @ np.array([0.2126, 0.7152, 0.0722])


def load_albedo(path: str, linear: bool) -> np.ndarray:
    try:
        im = decode_source(path, path, rgb=False)  # 16-bit albedo PNGs keep their depth
        arr = np.asarray(im)
        if arr.dtype not in (np.uint8, np.uint16):
            arr = np.asarray(im.convert("RGB"))
    except DataError as exc:
        raise CorruptImage(str(exc)) from None
    return luminance(arr, linear)


def _patch(Y: np.ndarray, x: float, y: float) -> tuple[float, float]:
    r = 2
    xi, yi = int(round(x)), int(round(y))
    w = Y[max(0, yi - r): yi + r + 1, max(0, xi - r): xi + r + 1]
    return float(w.mean()), float(w.std())


def build_reflectance(out: str, *, source: str, source_2: str | None, seed: int, sizes: dict, deduper=None,
                      albedo_linear: bool = False, shard_size: int = 256, progress: bool = False, **_) -> dict:
    task = "relative_reflectance"
    need_dir(source, "the MID root with one folder per scene holding dir_<k>_mip<m>.jpg")
    scenes, photos, albedos = [], {}, {}
    for d in sorted(os.listdir(source)):
        sd = os.path.join(source, d)
        if not os.path.isdir(sd):
            continue
        ph = sorted(p for p in os.listdir(sd) if PHOTO_RE.match(p))
        if not ph:
            continue
        alb = _albedo_path(sd, d, source_2)
        if alb is None:
            raise DataError(f"{sd}: no albedo for scene {d!r} (expected {sd}/albedo.png"
                            + (f" or {source_2}/{d}.png" if source_2 else " or --source-2 DIR with <scene>.png") + ")")
        scenes.append(d)
        photos[d] = ph
        albedos[d] = alb
    if not scenes:
        raise DataError(f"{source}: no MID scene folders (expected <scene>/dir_<k>_mip2.jpg)")
    assign = split_by_key(scenes, split_fractions(sizes), seed)
    units = {s: [{"scene": sc, "photo": p} for sc in keys for p in photos[sc]] for s, keys in assign.items()}
    cache: dict[str, np.ndarray] = {}

    def Y_of(scene):
        if scene not in cache:
            if len(cache) > 8:
                cache.clear()
            cache[scene] = load_albedo(albedos[scene], albedo_linear)
        return cache[scene]

    def ok_point(Y, x, y):
        m, sd = _patch(Y, x, y)
        return m >= 0.02 and sd <= 0.1 * m, m

    def make(u, rng, label):
        im = open_image(os.path.join(source, u["scene"], u["photo"]))
        Y = Y_of(u["scene"])
        sx, sy = Y.shape[1] / im.width, Y.shape[0] / im.height
        im, s = fit(im)
        W, H = im.size
        margin, min_dist = 0.06 * max(W, H), 0.12 * max(W, H)
        for _ in range(300):
            pa = (float(rng.uniform(margin, W - margin)), float(rng.uniform(margin, H - margin)))
            pb = (float(rng.uniform(margin, W - margin)), float(rng.uniform(margin, H - margin)))
            if np.hypot(pa[0] - pb[0], pa[1] - pb[1]) < min_dist:
                continue
            oka, ya = ok_point(Y, pa[0] / s * sx, pa[1] / s * sy)
            okb, yb = ok_point(Y, pb[0] / s * sx, pb[1] / s * sy)
            if not (oka and okb):
                continue
            d = abs(ya - yb) / max(ya, yb)
            got = 2 if d <= SAME_MAX else (0 if ya < yb else 1)
            if got == label:
                break
        else:
            raise Unusable("no point pair of the wanted class")
        drawn = draw_points(im, [pa, pb], ["A", "B"])
        return {"images": [drawn], "question": with_choices(QUESTION, CHOICES), "choices": CHOICES,
                "answer": letter(label),
                "meta": {"scene": u["scene"], "photo": u["photo"], "points": [list(map(lambda v: round(v, 1), pa)),
                                                                             list(map(lambda v: round(v, 1), pb))],
                         "Y": [round(ya, 5), round(yb, 5)], "rel_diff": round(d, 5)}}

    pools = Pools(units=units, images=lambda u: [open_image(os.path.join(source, u["scene"], u["photo"]))],
                  unit_id=lambda u: f"{u['scene']}/{u['photo']}", unit_images=lambda u: [u["scene"]],
                  reuse=20, annotations=sorted(albedos.values()), sources={"mid": source, "albedo": source_2 or source},
                  notes={"scenes_per_split": {s: len(k) for s, k in assign.items()}})
    recipe = {"same_if_rel_lum_diff_le": SAME_MAX, "same_share": SAME_SHARE,
              "luminance": "Y = 0.2126 R + 0.7152 G + 0.0722 B on " + ("linear" if albedo_linear else "linearised sRGB")
              + " albedo, 5x5 mean", "point_filter": "Y >= 0.02, 5x5 std <= 10% of mean",
              "answers": "C exactly round(n/4), A/B balanced", "max_samples_per_photo": 20}
    return build(task, out, seed=seed, sizes=sizes, pools=pools, make=make, labels_fn=labels_reflectance,
                 recipe=recipe, deduper=deduper, shard_size=shard_size, progress=progress)
