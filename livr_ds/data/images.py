"""Every image livr-ds decodes or encodes goes through here.

Three rules, one place:
- **Named formats.** ``Image.open`` without ``formats=`` tries every PIL plugin, and some hand
  the file to an external program (an EPS file named ``.jpg`` runs Ghostscript). Shard members
  open with the parser their extension names (JPEG or PNG, ``SHARD_FORMATS``); source images of
  conversions and builders with ``SOURCE_FORMATS``, none of which runs a program.
- **A pixel limit before decoding.** ``Image.open`` reads only the header, so the size is known
  before any pixel is decoded; an image above ``max_pixels()`` (``$LIVR_DS_MAX_IMAGE_PIXELS``,
  default 2**26 = 67 MPx, far above the 12.8 MPx a Qwen-VL processor keeps) is refused there, not
  after PIL has allocated it. PIL's own bomb check (89 MPx warning, 179 MPx error) stays on below it.
- **A full decode.** ``load()`` runs inside the try, so truncated files fail here, as DataError
  naming where the image came from, and never later in a collator.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

from PIL import Image

from .schema import DataError

SHARD_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}  # member extension -> the one parser allowed
SOURCE_FORMATS = ("JPEG", "PNG", "PPM", "WEBP", "BMP", "GIF", "TIFF")  # none of these plugins runs a program
DEFAULT_MAX_PIXELS = 2 ** 26


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
    try:
        with Image.open(src if isinstance(src, str) else io.BytesIO(src), formats=list(formats)) as im:
            w, h = im.size
            if w * h > limit:
                raise DataError(f"{where}: image is {w} x {h} = {w * h} pixels, above the limit of {limit} "
                                "(refused before decoding; set $LIVR_DS_MAX_IMAGE_PIXELS to allow larger images)")
            im.load()
            return (im.convert("RGB") if rgb else im.copy()), im.format
    except DataError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, UnidentifiedImageError, ...
        raise DataError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from None


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
