"""What a builder hands to ``build()``: its source as ``Pools`` of units, and the two ways a unit is
skipped (``CorruptImage``, ``Unusable``) rather than failing the whole build.

A unit is whatever one sample is made from (an image, an image pair, a sequence pair, a PixMo row,
...); each split gets a deterministic list of them, grouped by label when the label is a property
of the unit (counting).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image


class CorruptImage(Exception):
    """A source image could not be decoded: the unit is skipped and counted."""


class Unusable(Exception):
    """This unit cannot give a sample under the recipe (e.g. no point pair fits): skipped, counted."""


@dataclass
class Pools:
    """Units per split. ``units[split]`` is a list, or a dict label -> list when the label is a
    property of the unit (counting). ``images(unit)`` returns the unit's source images for
    de-duplication (a list; two or more = a pair/triplet, de-duplicated pair-aware).
    ``reuse``: how many samples one unit may give per split (e.g. a HPatches pair with different
    points). ``annotations``: annotation files (checksummed in the manifest)."""
    units: dict[str, Any]
    images: Callable[[Any], list[Image.Image]]
    unit_id: Callable[[Any], str]
    unit_images: Callable[[Any], list[str]]  # source image ids of a unit (train/val overlap check)
    reuse: int = 1
    annotations: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
