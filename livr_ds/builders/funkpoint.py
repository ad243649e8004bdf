"""Functional correspondence from FunKPoint (Lai, Purushwalkam, Gupta, ICCV 2021).

FunKPoint's release layout is not documented anywhere we could read (no loader or README in reach),
so this builder accepts one explicit, simple layout that any copy converts to in a few lines:

    FUNKPOINT/annotations.json   (or annotations.jsonl, one object per line)
        [{"image": "images/Mash_Pound/hammer_003.jpg",   # path relative to FUNKPOINT/
          "action": "Mash_Pound",                        # the action label
          "keypoints": [[x, y], [x, y], [x, y], [x, y], [x, y]],   # the 5 functional keypoints,
                                                          # in the action's canonical order (pixels)
          "object": "hammer"},                           # optional: pairs then use different objects
         ...]

Why this layout: it holds exactly what the paper's recipe needs (image, action, five ordered
keypoints), keypoint k of one image corresponds to keypoint k of another image with the same
action (FunKPoint's definition), and it is a flat JSON that loses nothing from the original.

Recipe (paper: "same-action pairs, REF + 4 of the 5 keypoints"): images are split by a hash of
(seed, image) into train / val / test (1000 / 144 / 146 by default); pairs of different images
(different objects when given) with the same action within a split; REF = keypoint k on image 1;
candidates = keypoint k on image 2 plus 3 of its other 4 keypoints, the true one balanced over
A-D; a pair whose candidates are closer than 3% of the long side is skipped. Up to 2 samples/pair.
"""

from __future__ import annotations

import json
import math
import os

from ..data.schema import DataError
from .build import build
from .image_format import fit
from .source import need_dir, open_image
from .splits import balanced, split_by_key, split_fractions
from .units import Pools, Unusable
from .correspond import ref_and_candidates

QUESTION = ("Humans can find corresponding points for the same action between different objects. For instance, if "
            'a person uses a pot versus a hammer to "Mash Pound", then the handle of the pot will be the '
            "corresponding point to the handle of the hammer because they serve the same function for the action "
            "-- to hold; and the bottom of the pot will be the corresponding point to the face of the hammer "
            "because they both mash the other object. Given the following two images, a reference point is "
            "annotated on the first image, labeled with REF. You are given multiple red-circled points on the "
            'second image, choices of "A, B, C, D" are drawn beside each circle. Which point on the second image '
            'corresponds to the reference point in the first image, for the action "{action}"?')


def read_annotations(root: str) -> tuple[list[dict], str]:
    need_dir(root, "the FunKPoint root holding annotations.json")
    p = os.path.join(root, "annotations.json")
    pl = os.path.join(root, "annotations.jsonl")
    if os.path.isfile(p):
        with open(p) as f:
            try:
                recs = json.load(f)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}: not valid JSON ({exc})") from None
        path = p
    elif os.path.isfile(pl):
        with open(pl) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        path = pl
    else:
        raise DataError(f"{root}: missing annotations.json (the FunKPoint layout this builder accepts: "
                        "docs/builders.md)")
    if not isinstance(recs, list):
        raise DataError(f"{path}: expected a list of {{image, action, keypoints}} objects")
    for i, r in enumerate(recs):
        for k in ("image", "action", "keypoints"):
            if not isinstance(r, dict) or k not in r:
                raise DataError(f"{path}: entry {i} has no key {k!r}")
        if len(r["keypoints"]) != 5:
            raise DataError(f"{path}: entry {i} ({r['image']}) has {len(r['keypoints'])} keypoints, expected 5")
    return recs, path


def build_functional_correspondence(out: str, *, source: str, seed: int, sizes: dict, deduper=None,
                                    shard_size: int = 256, progress: bool = False, **_) -> dict:
    task = "functional_correspondence"
    recs, ann_path = read_annotations(source)
    by_img = {r["image"]: r for r in recs}
    assign = split_by_key(list(by_img), split_fractions(sizes), seed)
    units = {}
    for sp, imgs in assign.items():
        by_action: dict[str, list[dict]] = {}
        for im in imgs:
            by_action.setdefault(by_img[im]["action"], []).append(by_img[im])
        units[sp] = [(a, b) for act in sorted(by_action) for a in by_action[act] for b in by_action[act]
                     if a["image"] != b["image"] and (a.get("object") is None or a.get("object") != b.get("object"))]

    def load(r):
        return open_image(os.path.join(source, r["image"]))

    def make(u, rng, label):
        r1, r2 = u
        a, sa = fit(load(r1))
        b, sb = fit(load(r2))
        k1 = [(x * sa, y * sa) for x, y in r1["keypoints"]]
        k2 = [(x * sb, y * sb) for x, y in r2["keypoints"]]
        k = int(rng.integers(5))
        rest = [int(i) for i in rng.permutation([i for i in range(5) if i != k])[:3]]
        pts = [k2[k]] + [k2[i] for i in rest]
        if min(math.dist(p, q) for i, p in enumerate(pts) for q in pts[i + 1:]) < 0.03 * max(b.size):
            raise Unusable("candidate keypoints too close")
        s = ref_and_candidates(a, k1[k], b, k2[k], [k2[i] for i in rest], label,
                               QUESTION.format(action=r1["action"].replace("_", " ")),
                               {"action": r1["action"], "images": [r1["image"], r2["image"]], "keypoint": k,
                                "distractor_keypoints": rest})
        return s

    pools = Pools(units=units, images=lambda u: [load(u[0]), load(u[1])],
                  unit_id=lambda u: f"{u[0]['image']}|{u[1]['image']}", unit_images=lambda u: [u[0]["image"], u[1]["image"]],
                  reuse=2, annotations=[ann_path], sources={"funkpoint": source},
                  notes={"images_per_split": {sp: len(k) for sp, k in assign.items()},
                         "layout": "annotations.json as defined in livr_ds/builders/funkpoint.py"})
    recipe = {"pairs": "same action, different images (different objects if given)", "candidates": "4 of the 5 keypoints",
              "min_candidate_dist": "3% of the long side", "split": "by image", "max_samples_per_pair": 2,
              "answers": "A-D balanced"}
    return build(task, out, seed=seed, sizes=sizes, pools=pools, make=make, labels_fn=balanced(4), recipe=recipe,
                 deduper=deduper, shard_size=shard_size, progress=progress)
