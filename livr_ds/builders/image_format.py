"""The images every built sample carries: at most MAX_SIDE on the long side, stored as JPEG at
JPEG_QUALITY. Both go into the manifest, so a change here is a change of the data."""

from __future__ import annotations

import io

from PIL import Image

JPEG_QUALITY = 92
MAX_SIDE = 768  # images are resized to at most this long side before markers are drawn


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
