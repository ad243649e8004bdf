"""What one sample is, on disk and in memory.

A sample in a shard (a plain, uncompressed tar written by `writer.py`) is a group of members that
share a key, in webdataset's convention ``<key>.<ext>``:

    <key>.json    {"task": str, "question": str, "choices": [str, ...], "answer": str, "meta": {...}}
    <key>.0.jpg   first image (``.jpg``/``.jpeg``/``.png``), then <key>.1.png, <key>.2.jpg, ...

- ``choices`` is empty for open-ended tasks (counting); then ``answer`` is free text (e.g. "3").
- For multiple choice, ``answer`` is a letter: choice i <-> ``chr(65 + i)``. "(A)" and "a" are
  accepted and normalised to "A".
- Images are numbered 0..N-1 in order of appearance in the question; at least one is required.
- Keys contain no dots (webdataset splits member names at the first dot of the basename).

Images are decoded in images.py. Nothing else is ever decoded: other members (``.pyd``, ``.pickle``, ``.pth``, ...) are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png")
IMAGE_MEMBER_RE = re.compile(r"^(\d+)\.(jpg|jpeg|png)$")  # the ext part of "<key>.<ext>"
DECLARED_MEMBER_RE = re.compile(r"^(json|\d+\.(?:jpg|jpeg|png))$")
MAX_IMAGES = 32  # per sample; BLINK uses at most 4. A cap keeps one sample from holding a whole shard of images


class DataError(ValueError):
    """Bad data. The message starts with ``<shard or file>:<key>:`` where both are known."""


@dataclass
class Sample:
    key: str
    task: str
    question: str
    choices: list[str]
    answer: str
    images: list[Image.Image]
    meta: dict[str, Any] = field(default_factory=dict)
    shard: str = ""  # where it was read from (for messages); "" when built in memory

    @property
    def is_pad(self) -> bool:
        """True for samples the loader repeated to equalise ranks (or put in place of a bad one)."""
        return bool(self.meta.get("_pad", False))


def letter(i: int) -> str:
    return chr(65 + i)


def normalize_answer(answer: Any, choices: list[str], where: str) -> str:
    """"(A)", "A", "a" -> "A" for multiple choice (must name one of the choices); stripped text
    for open-ended questions (integers are accepted and written as strings)."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int)):
        raise DataError(f"{where}: 'answer' must be a string, got {type(answer).__name__}")
    text = str(answer).strip()
    if not choices:
        if not text:
            raise DataError(f"{where}: 'answer' is empty")
        return text
    m = re.fullmatch(r"\(?\s*([A-Za-z])\s*\)?", text)
    if not m:
        raise DataError(f"{where}: answer {text!r} is not a choice letter like 'A' or '(A)'")
    up = m.group(1).upper()
    valid = [letter(i) for i in range(len(choices))]
    if up not in valid:
        raise DataError(f"{where}: answer {text!r} is not among the {len(choices)} choices {valid}")
    return up


def validate_record(record: Any, where: str, n_images: int | None = None) -> dict:
    """Check one sample's JSON record and return a normalised copy.

    ``where`` is "<shard>:<key>" (or "<file>:<line>") and starts every error message.
    ``n_images`` is the number of images attached to the sample, if known: 0 is an error.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: the json member must be an object, got {type(record).__name__}")
    for name in ("task", "question", "answer"):
        if name not in record:
            raise DataError(f"{where}: missing field {name!r}")
    for name in ("task", "question"):
        if not isinstance(record[name], str) or not record[name].strip():
            raise DataError(f"{where}: field {name!r} must be a non-empty string")
    choices = record.get("choices", [])
    if choices is None:
        choices = []
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: field 'choices' must be a list of strings")
    if len(choices) > 26:
        raise DataError(f"{where}: {len(choices)} choices; at most 26 (A-Z)")
    meta = record.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise DataError(f"{where}: field 'meta' must be an object")
    if n_images is not None and n_images < 1:
        raise DataError(f"{where}: no images (need at least one 0.jpg / 0.png member)")
    if n_images is not None and n_images > MAX_IMAGES:
        raise DataError(f"{where}: {n_images} images; at most {MAX_IMAGES} per sample")
    return {
        "task": record["task"].strip(),
        "question": record["question"],
        "choices": list(choices),
        "answer": normalize_answer(record["answer"], choices, where),
        "meta": dict(meta),
    }


def sanitize_key(key: str) -> str:
    """Make a key safe for webdataset: no dots, no spaces, only [A-Za-z0-9_-/]."""
    out = re.sub(r"[^A-Za-z0-9_\-/]+", "_", str(key)).strip("/")
    out = re.sub(r"/+", "/", out)
    if not out:
        raise DataError(f"key {key!r} is empty after sanitising")
    return out
