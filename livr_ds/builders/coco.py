"""Jigsaw and localization from COCO 2017 (official layout: ``ROOT/annotations/instances_<split>.json``
and ``ROOT/<split>/<file_name>``, e.g. ``train2017``; see cocodataset.org "Data format").

Jigsaw (paper, Sec. A): a 400 x h crop (h in 170..230) with its bottom-right quadrant (200 x h//2)
blacked out; options = the true patch and a same-size patch from elsewhere in the same image
(IoU with the true patch <= 0.25), order A/B random and balanced.

Localization: instances (not crowd) covering 15-50% of the image (segmentation area / image area)
with mask fill >= 60% (segmentation area / bbox area); a distractor box made by jittering the
true box's corners with IoU in [0.2, 0.5]; both boxes drawn and labelled A/B (balanced).

Train/val images are disjoint: COCO images are split by a hash of (seed, image id).
"""

from __future__ import annotations

import json
import os

from PIL import Image

from ..data.schema import DataError, letter
from .build import build
from .geometry import iou
from .image_format import fit
from .markers import draw_boxes
from .prompts import with_choices
from .source import need_dir, need_file, open_image
from .splits import balanced, split_by_key, split_fractions
from .units import Pools, Unusable

JIGSAW_W, JIGSAW_H = 400, (170, 230)
LOC_AREA, LOC_FILL, LOC_IOU = (0.15, 0.50), 0.60, (0.2, 0.5)

JIGSAW_Q = ("Given the first image with the lower right corner missing, can you tell which one of the second image "
            "or the third image is the missing part? Imagine which image would be more appropriate to place in the "
            "missing spot. You can also carefully observe and compare the edges of the images.")
JIGSAW_CHOICES = ["the second image", "the third image"]
LOC_Q = ("A bounding box is an annotated rectangle surrounding an object. The edges of bounding boxes should touch "
         "the outermost pixels of the object that is being labeled. Given the two bounding boxes on the image, "
         "labeled by A and B, which bounding box more accurately localizes and encloses the {name}?")
LOC_CHOICES = ["Box A", "Box B"]


def load_coco(root: str, split: str) -> tuple[dict, str, str]:
    need_dir(root, "the COCO root holding annotations/ and the image folders")
    ann_path = need_file(os.path.join(root, "annotations", f"instances_{split}.json"),
                         f"COCO instances annotations for {split} (ROOT/annotations/instances_{split}.json)")
    img_dir = need_dir(os.path.join(root, split), f"the COCO image folder ROOT/{split}/")
    with open(ann_path) as f:
        try:
            coco = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataError(f"{ann_path}: not valid JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco, dict) or key not in coco:
            raise DataError(f"{ann_path}: missing key {key!r} (expected COCO instances format)")
    for key in ("id", "file_name", "width", "height"):
        if coco["images"] and key not in coco["images"][0]:
            raise DataError(f"{ann_path}: images[0] has no key {key!r}")
    return coco, ann_path, img_dir


def _pools(root: str, coco_split: str, seed: int, sizes: dict, units_of) -> Pools:
    coco, ann_path, img_dir = load_coco(root, coco_split)
    images = {im["id"]: im for im in coco["images"]}
    assign = split_by_key([str(i) for i in images], split_fractions(sizes), seed)
    units = {s: units_of(coco, images, {int(k) for k in keys}) for s, keys in assign.items()}

    def path(im):
        return os.path.join(img_dir, im["file_name"])

    return Pools(
        units=units,
        images=lambda u: [open_image(path(u["image"]))],
        unit_id=lambda u: f"{u['image']['id']}" + (f":{u['ann']['id']}" if "ann" in u else ""),
        unit_images=lambda u: [u["image"]["file_name"]],
        annotations=[ann_path], sources={"coco_root": root, "images": img_dir},
        notes={"coco_split": coco_split, "images_per_split": {s: len(k) for s, k in assign.items()}},
    ), path


# ---- jigsaw ---------------------------------------------------------------------------------
def build_jigsaw(out: str, *, source: str, seed: int, sizes: dict, deduper=None, coco_split: str = "train2017",
                 shard_size: int = 256, progress: bool = False, **_) -> dict:
    task = "jigsaw"
    pools, path = _pools(source, coco_split, seed, sizes,
                         lambda coco, images, ids: [{"image": images[i]} for i in sorted(ids)])

    def make(u, rng, label):
        im = open_image(path(u["image"]))
        h = int(rng.integers(JIGSAW_H[0], JIGSAW_H[1] + 1))
        s = max(JIGSAW_W / im.width, h / im.height, 1.0)
        if s > 1.0:
            im = im.resize((max(JIGSAW_W, round(im.width * s)), max(h, round(im.height * s))), Image.BICUBIC)
        x0, y0 = int(rng.integers(0, im.width - JIGSAW_W + 1)), int(rng.integers(0, im.height - h + 1))
        qw, qh = JIGSAW_W // 2, h // 2
        canvas = im.crop((x0, y0, x0 + JIGSAW_W, y0 + h))
        tb = (x0 + JIGSAW_W - qw, y0 + h - qh, x0 + JIGSAW_W, y0 + h)
        true_patch = im.crop(tb)
        canvas.paste((0, 0, 0), (JIGSAW_W - qw, h - qh, JIGSAW_W, h))
        for _ in range(200):
            dx, dy = int(rng.integers(0, im.width - qw + 1)), int(rng.integers(0, im.height - qh + 1))
            db = (dx, dy, dx + qw, dy + qh)
            if iou(db, tb) <= 0.25:
                break
        else:
            raise Unusable("no distractor patch")
        other = im.crop(db)
        cands = [true_patch, other] if label == 0 else [other, true_patch]
        return {"images": [canvas, *cands], "question": with_choices(JIGSAW_Q, JIGSAW_CHOICES),
                "choices": JIGSAW_CHOICES, "answer": letter(label),
                "meta": {"image_id": u["image"]["id"], "file": u["image"]["file_name"], "crop": [x0, y0, JIGSAW_W, h],
                         "true_patch": list(tb), "distractor_patch": list(db), "scale": s}}

    recipe = {"canvas_w": JIGSAW_W, "canvas_h": list(JIGSAW_H), "blackout": "bottom-right quadrant (200 x h//2)",
              "distractor": "same-size patch of the same image, IoU with the true patch <= 0.25",
              "answers": "A/B balanced", "coco_split": coco_split}
    return build(task, out, seed=seed, sizes=sizes, pools=pools, make=make, labels_fn=balanced(2), recipe=recipe,
                 deduper=deduper, shard_size=shard_size, progress=progress)


# ---- localization ---------------------------------------------------------------------------
def localization_units(coco, images, ids) -> list[dict]:
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    out = []
    for a in sorted(coco["annotations"], key=lambda a: a["id"]):
        if a.get("iscrowd", 0) or a["image_id"] not in ids:
            continue
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        if w <= 1 or h <= 1:
            continue
        cover, fill = a["area"] / float(im["width"] * im["height"]), a["area"] / float(w * h)
        if LOC_AREA[0] <= cover <= LOC_AREA[1] and fill >= LOC_FILL:
            out.append({"image": im, "ann": a, "name": cats.get(a["category_id"], "object"),
                        "cover": cover, "fill": fill})
    return out


def jitter_box(rng, box, W: float, H: float, bounds=LOC_IOU, tries: int = 400):
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    for _ in range(tries):
        a = float(rng.uniform(0.15, 0.9))
        d = rng.uniform(-a, a, size=4) * [w, h, w, h]
        c = (max(0.0, x1 + d[0]), max(0.0, y1 + d[1]), min(W, x2 + d[2]), min(H, y2 + d[3]))
        if c[2] - c[0] < 0.1 * w or c[3] - c[1] < 0.1 * h:
            continue
        v = iou(c, box)
        if bounds[0] <= v <= bounds[1]:
            return c, v
    raise Unusable("no jittered box with IoU in bounds")


def build_localization(out: str, *, source: str, seed: int, sizes: dict, deduper=None,
                       coco_split: str = "train2017", shard_size: int = 256, progress: bool = False, **_) -> dict:
    task = "localization"
    pools, path = _pools(source, coco_split, seed, sizes, localization_units)

    def make(u, rng, label):
        im = open_image(path(u["image"]))
        if im.size != (u["image"]["width"], u["image"]["height"]):
            raise Unusable("image size differs from the annotation")
        x, y, w, h = u["ann"]["bbox"]
        box = (float(x), float(y), float(x + w), float(y + h))
        dist, v = jitter_box(rng, box, im.width, im.height)
        im, s = fit(im)
        box, dist = tuple(c * s for c in box), tuple(c * s for c in dist)
        boxes = [box, dist] if label == 0 else [dist, box]
        drawn = draw_boxes(im, boxes, ["A", "B"])
        return {"images": [drawn], "question": with_choices(LOC_Q.format(name=u["name"]), LOC_CHOICES),
                "choices": LOC_CHOICES, "answer": letter(label),
                "meta": {"image_id": u["image"]["id"], "ann_id": u["ann"]["id"], "category": u["name"],
                         "boxes": [[round(c, 2) for c in b] for b in boxes], "iou": round(iou(box, dist), 4),
                         "area_fraction": round(u["cover"], 4), "mask_fill": round(u["fill"], 4)}}

    recipe = {"area_fraction": list(LOC_AREA), "min_mask_fill": LOC_FILL, "distractor_iou": list(LOC_IOU),
              "distractor": "true box corners jittered by U(-a, a) x box size, a ~ U(0.15, 0.9), clipped",
              "answers": "A/B balanced", "coco_split": coco_split, "iscrowd": "excluded"}
    return build(task, out, seed=seed, sizes=sizes, pools=pools, make=make, labels_fn=balanced(2), recipe=recipe,
                 deduper=deduper, shard_size=shard_size, progress=progress)
