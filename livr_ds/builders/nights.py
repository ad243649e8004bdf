"""Visual similarity from NIGHTS (DreamSim, Fu et al. 2023).

Layout (the DreamSim repository's README, "nights/"): ``nights/data.csv`` plus the images under
``nights/ref/`` and ``nights/distort/``. data.csv has one row per triplet with (at least) the
columns ``ref_path``, ``left_path``, ``right_path`` (relative to nights/), ``left_vote``,
``right_vote`` (human votes for which distortion is closer to the reference) and ``split``
(train / val / test). The real file also has ``id``, ``votes`` (how many of the raters agreed)
and ``is_imagenet``: DreamSim's own loader (dataset/dataset.py, TwoAFCDataset) keeps only rows
with ``votes >= 6``, and so does this builder when the column is there (dropped rows counted).

Recipe: official splits (train -> train, val -> val, test -> test); answer = the candidate with
more human votes (ties skipped, counted); the preferred image is placed second or third at random,
balanced A/B. Val/test triplets sharing an image with a train triplet are dropped (counted).
"""

from __future__ import annotations

import csv
import os

from ..data.schema import DataError, letter
from .build import build
from .image_format import fit
from .prompts import with_choices
from .source import need_dir, need_file, open_image
from .splits import balanced
from .units import Pools

QUESTION = ("Given three similar but different images, take the first image as reference. Can you tell which one "
            "of the latter two images is most similar to the first one?")
CHOICES = ["the second image", "the third image"]
MIN_AGREEING_VOTES = 6  # DreamSim's filter for NIGHTS triplets
COLUMNS = ("ref_path", "left_path", "right_path", "left_vote", "right_vote", "split")


def build_visual_similarity(out: str, *, source: str, seed: int, sizes: dict, deduper=None, shard_size: int = 256,
                            progress: bool = False, **_) -> dict:
    task = "visual_similarity"
    need_dir(source, "the NIGHTS folder holding data.csv, ref/ and distort/")
    csv_path = need_file(os.path.join(source, "data.csv"), "NIGHTS data.csv")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {missing} (NIGHTS data.csv has {list(COLUMNS)})")
        rows = list(reader)
    units: dict[str, list[dict]] = {s: [] for s in sizes if sizes[s] > 0}
    ties, low_agreement, dropped = 0, 0, {s: 0 for s in units}
    train_imgs: set[str] = set()
    for sp in ("train", "val", "test"):
        for i, r in enumerate(rows):
            if r["split"] != sp:
                continue
            try:
                lv, rv = float(r["left_vote"]), float(r["right_vote"])
            except ValueError:
                raise DataError(f"{csv_path}: row {i + 2}: votes {r['left_vote']!r}/{r['right_vote']!r} are not "
                                "numbers") from None
            if lv == rv:
                ties += 1
                continue
            if r.get("votes") not in (None, "") and float(r["votes"]) < MIN_AGREEING_VOTES:
                low_agreement += 1
                continue
            imgs = [r["ref_path"], r["left_path"], r["right_path"]]
            if sp == "train":
                train_imgs.update(imgs)
            elif set(imgs) & train_imgs:
                if sp in dropped:
                    dropped[sp] += 1
                continue
            if sp in units:
                units[sp].append({"row": i, "id": r.get("id") or str(i), "imgs": imgs, "left_wins": lv > rv,
                                  "votes": [lv, rv]})

    def load(p):
        return open_image(os.path.join(source, p))

    def make(u, rng, label):
        ref, left, right = (fit(load(p))[0] for p in u["imgs"])
        best, other = (left, right) if u["left_wins"] else (right, left)
        cands = [best, other] if label == 0 else [other, best]
        return {"images": [ref, *cands], "question": with_choices(QUESTION, CHOICES), "choices": CHOICES,
                "answer": letter(label), "meta": {"row": u["row"], "id": u["id"], "images": u["imgs"],
                                                  "votes": u["votes"]}}

    pools = Pools(units=units, images=lambda u: [load(p) for p in u["imgs"]], unit_id=lambda u: f"row{u['row']}",
                  unit_images=lambda u: u["imgs"], annotations=[csv_path], sources={"nights": source},
                  notes={"tied_votes_skipped": ties, "low_agreement_skipped": low_agreement,
                         "dropped_for_sharing_train_images": dropped})
    recipe = {"splits": "official (data.csv split column)", "answer": "the candidate with more human votes",
              "answers": "A/B balanced"}
    return build(task, out, seed=seed, sizes=sizes, pools=pools, make=make, labels_fn=balanced(2), recipe=recipe,
                 deduper=deduper, shard_size=shard_size, progress=progress)
