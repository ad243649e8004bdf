"""How well de-duplication separates altered copies from different images, on real photographs.

    python launch/dedup_sweep.py

Test set: every photograph that ships with scikit-image (each its own test sample). Positives: five
altered copies of each (re-encoded + resized + blurred, twice as hard, brighter, a 95% centre crop,
upscaled); all should be removed. Negatives: each photograph, its halves and its mirror image
against a test set WITHOUT that photograph; none should be removed. Prints each miss and false
positive, then the totals. (skimage's `cat` and `chelsea` are the same picture: a match between
them is a true duplicate and is reported as such.)
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from livr_ds.builders.dedup import Deduper  # noqa: E402

NAMES = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry", "colorwheel",
         "retina", "logo", "camera", "page", "text", "grass", "gravel", "brick", "coins", "moon", "clock", "horse",
         "microaneurysms", "shepp_logan_phantom")
SAME_PICTURE = {frozenset(("cat", "chelsea"))}


def photographs() -> dict[str, Image.Image]:
    from skimage import data

    out = {}
    for name in NAMES:
        a = np.asarray(getattr(data, name)())
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        if a.dtype != np.uint8:
            a = (255 * (a - a.min()) / (np.ptp(a) + 1e-9)).astype(np.uint8)
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        out[name] = Image.fromarray(a[..., :3]).convert("RGB")
    return out


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def altered(im: Image.Image):
    w, h = im.size
    yield "q70 0.8x blur1", jpeg(im.resize((int(w * .8), int(h * .8)), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1)), 70)
    yield "q40 0.5x blur1.5", jpeg(im.resize((int(w * .5), int(h * .5)), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1.5)), 40)
    yield "brightness 1.2", jpeg(ImageEnhance.Brightness(im).enhance(1.2), 85)
    yield "95% crop", jpeg(im.crop((int(w * .025), int(h * .025), int(w * .975), int(h * .975))), 85)
    yield "1.5x upscale", jpeg(im.resize((int(w * 1.5), int(h * 1.5)), Image.BICUBIC), 85)


def different(im: Image.Image):
    w, h = im.size
    yield "itself", im
    yield "left half", im.crop((0, 0, w // 2, h))
    yield "right half", im.crop((w // 2, 0, w, h))
    yield "mirror", im.transpose(Image.FLIP_LEFT_RIGHT)


def main() -> int:
    photos = photographs()
    names = list(photos)
    dedup = Deduper([[photos[n]] for n in names])
    missed = total = 0
    for name in names:
        for how, im in altered(photos[name]):
            total += 1
            if not dedup.is_duplicate([im])[0]:
                missed += 1
                print(f"missed: {name}, {how}")
    print(f"altered copies removed: {total - missed} of {total}")
    false = same = total = 0
    for name in names:
        others = [n for n in names if n != name]
        against = Deduper([[photos[n]] for n in others])
        for how, im in different(photos[name]):
            total += 1
            dup, info = against.is_duplicate([im])
            if dup:
                match = others[int(info.split()[2])]
                if frozenset((name, match)) in SAME_PICTURE:
                    same += 1
                else:
                    false += 1
                    print(f"false positive: {name}, {how} matched {match} ({info})")
    print(f"different images removed: {false} of {total - same} (plus {same} true matches of the same picture)")
    print(dedup.describe()["confirm"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
