"""Every image livr-ds decodes or encodes goes through here.

Three rules, one place:
- **Named formats.** ``Image.open`` without ``formats=`` tries every PIL plugin, and some hand
  the file to an external program (an EPS file named ``.jpg`` runs Ghostscript). Shard members
  open with the parser their extension names (JPEG or PNG, ``SHARD_FORMATS``); source images of
  conversions and builders with ``SOURCE_FORMATS``, none of which runs a program.
- **One pixel limit, before decoding.** ``Image.open`` reads only the header, so the size is known
  before any pixel is decoded. ``max_pixels()`` (``$LIVR_DS_MAX_IMAGE_PIXELS``, default 2**26 =
  67 MPx) bounds what is decoded: a JPEG above it is decoded downscaled by libjpeg (draft mode:
  1/2, 1/4 or 1/8, the least reduction that fits), any other format above it is refused, never
  after PIL has allocated it. PIL's own bomb check is set to the same limit (times 64 for a JPEG,
  the most draft mode divides by) so that there is one limit, not two that disagree.
  Images under the limit decode in full, so the pixels equal what any other tool decodes (an
  export served elsewhere sees the same image). The default is at least 4 x the most any
  supported processor keeps (Qwen-VL 12.8 MPx, LLaVA-OneVision's largest grid 2304 x 2304 =
  5.3 MPx), so a downscaled JPEG still holds every pixel the processor will use.
- **A full decode.** ``load()`` runs inside the try, so truncated files fail here, as DataError
  naming where the image came from, and never later in a collator.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from functools import lru_cache
from typing import Any

from PIL import Image, ImageFont

from .schema import DataError

SHARD_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}  # member extension -> the one parser allowed
SOURCE_FORMATS = ("JPEG", "PNG", "PPM", "WEBP", "BMP", "GIF", "TIFF")  # none of these plugins runs a program
# PIL's warning fires below its error for images this module then decodes downscaled or refuses
# with its own message: it says nothing the limit does not.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

DEFAULT_MAX_PIXELS = 2 ** 26
JPEG_MAX_REDUCTION = 8  # libjpeg's DCT scaling decodes at 1/1, 1/2, 1/4 or 1/8 per side


def max_pixels() -> int:
    raw = os.environ.get("LIVR_DS_MAX_IMAGE_PIXELS", "")
    try:
        return int(raw) if raw else DEFAULT_MAX_PIXELS
    except ValueError:
        raise DataError(f"$LIVR_DS_MAX_IMAGE_PIXELS={raw!r}: not an integer") from None


def open_image(src: str | bytes, where: str, formats=SOURCE_FORMATS, rgb: bool = True) -> Image.Image:
    """Decode a file path or encoded bytes fully (RGB unless ``rgb=False``). DataError naming
    ``where`` when the format is not allowed, the image is too large, or the data is damaged."""
    return _open(src, where, formats, rgb)[0]


def _open(src: str | bytes, where: str, formats, rgb: bool) -> tuple[Image.Image, str]:
    limit = max_pixels()
    header_limit = limit * JPEG_MAX_REDUCTION ** 2 if "JPEG" in formats else limit
    # PIL warns above MAX_IMAGE_PIXELS and raises above twice it; ours is the limit that counts.
    Image.MAX_IMAGE_PIXELS = header_limit
    try:
        with Image.open(src if isinstance(src, str) else io.BytesIO(src), formats=list(formats)) as im:
            w, h = im.size
            if w * h > limit and im.format == "JPEG":
                _draft_within(im, limit)
            if im.size[0] * im.size[1] > limit:
                raise DataError(f"{where}: image is {w} x {h} = {w * h} pixels, above the limit of {limit} "
                                "(refused before decoding; set $LIVR_DS_MAX_IMAGE_PIXELS to allow larger images)")
            im.load()
            return (im.convert("RGB") if rgb else im.copy()), im.format
    except DataError:
        raise
    except Image.DecompressionBombError:
        jpeg_note = f"; a JPEG up to {header_limit} is decoded downscaled" if header_limit > limit else ""
        raise DataError(f"{where}: image is far above the limit of {limit} pixels{jpeg_note} (refused before "
                        "decoding; set $LIVR_DS_MAX_IMAGE_PIXELS to allow larger images)") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, UnidentifiedImageError, ...
        raise DataError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from None


def _draft_within(im: Image.Image, limit: int) -> None:
    """Ask libjpeg for the least reduction (2, 4 or 8 per side) that brings the image under
    ``limit`` pixels; ``im.size`` becomes the decoded size. Nothing happens if even 1/8 is above."""
    w, h = im.size
    for reduction in (2, 4, JPEG_MAX_REDUCTION):
        if math.ceil(w / reduction) * math.ceil(h / reduction) <= limit:
            # draft() takes the largest reduction r with w // r and h // r at least the size asked
            im.draft("RGB", (max(1, w // reduction), max(1, h // reduction)))
            return


def decode_image(data: bytes, ext: str, where: str) -> Image.Image:
    """One shard image member -> RGB, with the parser its extension names and no other."""
    fmt = SHARD_FORMATS.get(ext.lower())
    if fmt is None:
        raise DataError(f"{where}: undeclared image extension {ext!r}")
    return open_image(data, where, formats=(fmt,))


def encode_image(image: Any, where: str) -> tuple[bytes, str, Image.Image]:
    """A sample's image -> (bytes to store, member extension, decoded RGB image). JPEG and PNG
    bytes are stored unchanged; other source formats and PIL images are stored as PNG."""
    if isinstance(image, Image.Image):
        rgb = image.convert("RGB")
        return _png(rgb), "png", rgb
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        rgb, fmt = _open(data, where, SOURCE_FORMATS, True)
        if fmt == "JPEG":
            return data, "jpg", rgb
        if fmt == "PNG":
            return data, "png", rgb
        return _png(rgb), "png", rgb
    raise DataError(f"{where}: an image must be bytes or a PIL image, got {type(image).__name__}")


def _png(rgb: Image.Image) -> bytes:
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()


def pixel_hash(img: Image.Image) -> str:
    """sha256 of the decoded RGB pixels (and size): lossless re-encodes hash the same."""
    rgb = img.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


@lru_cache(maxsize=32)
def font(size: int) -> ImageFont.ImageFont:
    """The font labels are drawn in (builders' markers, `livr-ds shards show`), `size` pixels high."""
    try:
        return ImageFont.load_default(size=size)  # FreeType build: a scalable font
    except Exception:  # pragma: no cover - PIL without FreeType
        return ImageFont.load_default()
