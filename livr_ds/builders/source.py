"""Reading a source dataset. A missing directory or file is a DataError (the layout is wrong, the
build stops); an image that does not decode is CorruptImage (that unit is skipped and counted)."""

from __future__ import annotations

import os

from PIL import Image

from ..data.images import open_image as _decode
from ..data.schema import DataError
from .units import CorruptImage


def need_dir(path: str, what: str) -> str:
    if not path:
        raise DataError(f"{what}: no directory given")
    if not os.path.isdir(path):
        raise DataError(f"{path}: directory not found (expected {what})")
    return path


def need_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (expected {what})")
    return path


def open_image(path: str) -> Image.Image:
    """Decode a source image fully (RGB); CorruptImage if it cannot be read."""
    if not os.path.isfile(path):
        raise CorruptImage(f"{path}: image file missing")
    try:
        return _decode(path, path)  # named formats only: an EPS named .jpg never reaches Ghostscript
    except DataError as exc:
        raise CorruptImage(str(exc)) from None


def open_image_bytes(data: bytes, where: str) -> Image.Image:
    try:
        return _decode(data, where)
    except DataError as exc:
        raise CorruptImage(str(exc)) from None
