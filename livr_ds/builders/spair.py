"""Semantic correspondence from SPair-71k (Min et al. 2019).

Layout (the official archive, cvlab.postech.ac.kr/research/SPair-71k, as read by its devkit):

    SPair-71k/JPEGImages/<category>/<image>.jpg
    SPair-71k/PairAnnotation/{trn,val,test}/<pair>.json
        {"src_imname", "trg_imname", "category", "src_kps": [[x, y], ...], "trg_kps": [[x, y], ...], ...}
        (keypoint k of src corresponds to keypoint k of trg)

Recipe: official splits (trn -> train, val -> val, test -> test); a pair needs >= 4 keypoints.
REF = a random source keypoint; candidates = its target keypoint + 3 other target keypoints that
are >= 5% of the long side away from it and from each other; the true one balanced over A-D. A
pair gives up to 3 samples. Val/test pairs sharing an image with a train pair are dropped (counted
in the manifest) so that no image is in two splits.
"""

from __future__ import annotations

import glob
import json
import math
import os

from ..data.schema import DataError
from .build import build
from .image_format import fit
from .source import need_dir, open_image
from .splits import balanced
from .units import Pools, Unusable
from .correspond import ref_and_candidates

QUESTION = ("Humans can find corresponding points for different objects in the same category. For instance, if "
            "there are images of two different cats, then the left ear tip of one cat corresponds to the left ear "
            "tip of the other cat, and the right front paw of one cat corresponds to the right front paw of the "
            "other cat. Given the following two images, a reference point is annotated on the first image, "
            'labeled with REF. You are given multiple red-circled points on the second image, choices of "A, B, '
            'C, D" are drawn beside each circle. Which point on the second image corresponds to the reference '
            "point in the first image?")
SPLITS = {"train": "trn", "val": "val", "test": "test"}


def build_semantic_correspondence(out: str, *, source: str, seed: int, sizes: dict, deduper=None,
                                  shard_size: int = 256, progress: bool = False, **_) -> dict:
    task = "semantic_correspondence"
    need_dir(source, "the SPair-71k root holding JPEGImages/ and PairAnnotation/")
    need_dir(os.path.join(source, "JPEGImages"), "SPair-71k/JPEGImages/<category>/")
    units, files, dropped, few = {}, [], {}, 0
    used: set[str] = set()
    for split in ("train", "val", "test"):
        if sizes.get(split, 0) <= 0:
            continue
        d = need_dir(os.path.join(source, "PairAnnotation", SPLITS[split]),
                     f"SPair-71k/PairAnnotation/{SPLITS[split]}/*.json")
        lst, drop = [], 0
        for p in sorted(glob.glob(os.path.join(d, "*.json"))):
            with open(p) as f:
                try:
                    a = json.load(f)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{p}: not valid JSON ({exc})") from None
            for k in ("src_imname", "trg_imname", "category", "src_kps", "trg_kps"):
                if k not in a:
                    raise DataError(f"{p}: missing key {k!r} (SPair-71k pair annotation)")
            files.append(p)
            if min(len(a["src_kps"]), len(a["trg_kps"])) < 4:
                few += 1
                continue
            ims = {f"{a['category']}/{a['src_imname']}", f"{a['category']}/{a['trg_imname']}"}
            if split != "train" and ims & used:
                drop += 1
                continue
            lst.append({"file": os.path.basename(p), **{k: a[k] for k in ("src_imname", "trg_imname", "category",
                                                                         "src_kps", "trg_kps")}})
        if split == "train":
            used = {f"{u['category']}/{u[k]}" for u in lst for k in ("src_imname", "trg_imname")}
        units[split] = lst
        dropped[split] = drop

    def path(u, which):
        return os.path.join(source, "JPEGImages", u["category"], u[which])

    def make(u, rng, label):
        a, sa = fit(open_image(path(u, "src_imname")))
        b, sb = fit(open_image(path(u, "trg_imname")))
        src = [(x * sa, y * sa) for x, y in u["src_kps"]]
        trg = [(x * sb, y * sb) for x, y in u["trg_kps"]]
        k = int(rng.integers(len(src)))
        min_d = 0.05 * max(b.size)
        others: list[tuple[float, float]] = []
        for o in rng.permutation(len(trg)):
            if o != k and all(math.dist(trg[o], q) >= min_d for q in [trg[k], *others]):
                others.append(trg[o])
            if len(others) == 3:
                break
        else:
            raise Unusable("fewer than 3 distinct distractor keypoints")
        return ref_and_candidates(a, src[k], b, trg[k], others, label, QUESTION,
                                  {"pair": u["file"], "category": u["category"], "keypoint": k,
                                   "images": [u["src_imname"], u["trg_imname"]]})

    pools = Pools(units=units, images=lambda u: [open_image(path(u, "src_imname")), open_image(path(u, "trg_imname"))],
                  unit_id=lambda u: u["file"],
                  unit_images=lambda u: [f"{u['category']}/{u['src_imname']}", f"{u['category']}/{u['trg_imname']}"],
                  reuse=3, annotations=files, sources={"spair": source},
                  notes={"pairs_with_fewer_than_4_keypoints": few, "pairs_dropped_for_sharing_train_images": dropped})
    recipe = {"splits": "official trn/val/test", "min_keypoints": 4, "distractors": "other target keypoints, "
              ">= 5% of the long side apart", "max_samples_per_pair": 3, "answers": "A-D balanced"}
    return build(task, out, seed=seed, sizes=sizes, pools=pools, make=make, labels_fn=balanced(4), recipe=recipe,
                 deduper=deduper, shard_size=shard_size, progress=progress)
