"""Art style from ArtBench-10 (Liao et al. 2022), image-folder layout.

Layout (the official "ImageFolder" release, ``artbench-10-imagefolder-split``): ``ROOT/train/<style>/*.jpg``
and ``ROOT/test/<style>/*.jpg`` with the ten styles (art_nouveau, baroque, expressionism,
impressionism, post_impressionism, realism, renaissance, romanticism, surrealism, ukiyo_e). A root
holding the style folders directly is accepted too. Only ``train/`` is used.

Recipe: images are split by a hash of (seed, path) between train and val; a sample = a reference
image, another image of the same style and one of a different style (both drawn from the same
split; neither a test near-duplicate when de-duplicating), order balanced A/B.
"""

from __future__ import annotations

import os

from ..data.schema import DataError, letter
from .build import build
from .image_format import fit
from .prompts import with_choices
from .source import need_dir, open_image
from .splits import balanced, split_by_key, split_fractions
from .units import CorruptImage, Pools, Unusable

QUESTION = ("Some most common art painting styles include Realism, Impressionism, Expressionism, Pop Art, and "
            "Cubism. Given the following images of art paintings, use the first image as the reference image, and "
            "determine which one of the second or the third image shares the same style as the reference image?")
CHOICES = ["the second image", "the third image"]
EXTS = (".jpg", ".jpeg", ".png")


def build_art_style(out: str, *, source: str, seed: int, sizes: dict, deduper=None, shard_size: int = 256,
                    progress: bool = False, **_) -> dict:
    task = "art_style"
    need_dir(source, "the ArtBench-10 image-folder root (train/<style>/*.jpg)")
    root = os.path.join(source, "train") if os.path.isdir(os.path.join(source, "train")) else source
    styles = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files = {s: sorted(f"{s}/{f}" for f in os.listdir(os.path.join(root, s)) if f.lower().endswith(EXTS))
             for s in styles}
    styles = [s for s in styles if files[s]]
    if len(styles) < 2:
        raise DataError(f"{root}: need at least 2 style folders with images (expected {root}/<style>/*.jpg)")
    assign = split_by_key([f for s in styles for f in files[s]], split_fractions(sizes), seed)
    units = {sp: list(keys) for sp, keys in assign.items()}
    by_style = {sp: {s: [f for f in keys if f.split("/")[0] == s] for s in styles} for sp, keys in assign.items()}
    split_of = {f: sp for sp, keys in assign.items() for f in keys}
    dup_cache: dict[str, bool] = {}
    extra = {"candidates_removed_as_duplicates": 0}

    def ok(f):
        if deduper is None:
            return True
        if f not in dup_cache:
            try:
                dup_cache[f] = not deduper.is_duplicate([open_image(os.path.join(root, f))])[0]
            except CorruptImage:
                dup_cache[f] = False
            extra["candidates_removed_as_duplicates"] += not dup_cache[f]
        return dup_cache[f]

    def pick(rng, pool, exclude):
        for i in rng.permutation(len(pool))[:50]:
            f = pool[int(i)]
            if f != exclude and ok(f):
                return f
        raise Unusable("no candidate")

    def make(u, rng, label):
        sp = split_of[u]
        style = u.split("/")[0]
        pos = pick(rng, by_style[sp][style], u)
        others = [s for s in styles if s != style and by_style[sp][s]]
        if not others:
            raise Unusable("no other style in this split")
        neg = pick(rng, by_style[sp][others[int(rng.integers(len(others)))]], u)
        ims = [fit(open_image(os.path.join(root, f)))[0] for f in (u, pos, neg)]
        cands = [ims[1], ims[2]] if label == 0 else [ims[2], ims[1]]
        return {"images": [ims[0], *cands], "question": with_choices(QUESTION, CHOICES), "choices": CHOICES,
                "answer": letter(label), "meta": {"reference": u, "same_style": pos, "other_style": neg,
                                                  "style": style, "other": neg.split("/")[0]}}

    pools = Pools(units=units, images=lambda u: [open_image(os.path.join(root, u))], unit_id=lambda u: u,
                  unit_images=lambda u: [u], annotations=[], sources={"artbench": root},
                  notes={"styles": styles, "images_per_split": {sp: len(k) for sp, k in assign.items()}, "dedup": extra})
    recipe = {"reference": "one image", "candidates": "same style + other style, same split",
              "split": "by image", "answers": "A/B balanced"}
    return build(task, out, seed=seed, sizes=sizes, pools=pools, make=make, labels_fn=balanced(2), recipe=recipe,
                 deduper=deduper, shard_size=shard_size, progress=progress)
