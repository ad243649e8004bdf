"""Where shards come from: a manifest directory, a manifest file, or a brace/glob pattern.

``ShardSource(path, weight=1.0, split="train").resolve()`` -> the shard list with sample counts
(from manifest.json, else from the shards' indexes, built if needed by one scan of the tar
headers, logged and cached). See loader.py for how the
loader uses them.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os

import webdataset as wds

from .index import get_index, load_indexes
from .manifest import MANIFEST
from .schema import DataError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    url: str
    count: int
    name: str  # stable name used in the fingerprint (relative to its manifest, or basename)
    sha256: str = ""  # from the manifest, if it has one (also part of the fingerprint)


@dataclasses.dataclass
class ShardSource:
    """A set of shards: a directory (+ split), a manifest.json, or a brace/glob pattern."""

    path: str
    weight: float = 1.0
    split: str = "train"

    def resolve(self, cache_dir: str | None = None, store_beside: bool = True) -> list[ShardInfo]:
        """The shards and their sample counts (from the manifest, else from the shards' indexes,
        built if missing: stored beside the shards unless ``store_beside`` is False)."""
        path = os.fspath(self.path)
        if not (isinstance(self.weight, (int, float)) and self.weight > 0 and math.isfinite(self.weight)):
            raise DataError(f"{path}: weight must be a positive number, got {self.weight!r}")
        if os.path.isdir(path) or os.path.basename(path) == MANIFEST:
            return _from_manifest_dir(path if os.path.isdir(path) else os.path.dirname(path) or ".", self.split,
                                      cache_dir, store_beside)
        return _from_pattern(path, cache_dir, store_beside)


def _from_manifest_dir(d: str, split: str, cache_dir: str | None = None,
                       store_beside: bool = True) -> list[ShardInfo]:
    mpath = os.path.join(d, MANIFEST)
    if not os.path.isfile(mpath):
        pattern = os.path.join(d, f"{split}-*.tar")
        if not glob.glob(pattern):
            raise DataError(f"{d}: no {MANIFEST} and no shards matching {split}-*.tar")
        return _from_pattern(pattern, cache_dir, store_beside)
    with open(mpath) as f:
        try:
            m = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataError(f"{mpath}: not valid JSON ({exc})") from None
    splits = m.get("splits", {}) if isinstance(m, dict) else {}
    if split not in splits:
        raise DataError(f"{mpath}: no split {split!r} (has {sorted(splits)})")
    shards = []
    for s in splits[split].get("shards", []):
        url = os.path.join(d, s["name"])
        if not os.path.isfile(url):
            raise DataError(f"{url}: listed in {mpath} but missing")
        shards.append(ShardInfo(url, int(s["count"]), s["name"], str(s.get("sha256", ""))))
    return shards


def _from_pattern(pattern: str, cache_dir: str | None = None, store_beside: bool = True) -> list[ShardInfo]:
    urls = []
    for u in wds.shardlists.expand_urls(pattern):
        urls += sorted(glob.glob(u)) if any(c in u for c in "*?[") else [u]
    found = [u for u in urls if os.path.isfile(u)]
    if not found:
        raise DataError(f"no shards match {pattern!r}")
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise DataError(f"{pattern!r}: {len(missing)} of {len(urls)} shards missing, e.g. {missing[0]}")
    counts: dict[str, int] = {}
    for d in sorted({os.path.dirname(u) for u in found}):  # a manifest next to the shards saves the scan
        mpath = os.path.join(d, MANIFEST)
        if os.path.isfile(mpath):
            try:
                with open(mpath) as f:
                    for sp in json.load(f).get("splits", {}).values():
                        for s in sp.get("shards", []):
                            counts[os.path.normpath(os.path.join(d, s["name"]))] = int(s["count"])
            except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
                pass
    todo = [u for u in found if os.path.normpath(u) not in counts]
    if todo:  # counts from the shards' indexes (stored, or built by one pass over the tar headers)
        for u, idx in zip(todo, load_indexes([(u, "") for u in todo], cache_dir, store_beside=store_beside,
                                             what=f"shard(s) matching {pattern!r} (no manifest entry)")):
            if isinstance(idx, DataError):
                raise idx
            counts[os.path.normpath(u)] = len(idx)
    return [ShardInfo(u, counts[os.path.normpath(u)], os.path.basename(u)) for u in found]


def count_samples(url: str, cache_dir: str | None = None) -> int:
    """Number of samples (distinct keys with a declared member) in a shard. Reads no member data:
    the count comes from the shard's index, built if needed by one pass over the tar headers
    (and cached, so the loader's reads reuse it)."""
    try:
        return len(get_index(url, cache_dir=cache_dir))
    except OSError as exc:
        raise DataError(f"{url}:<start>: cannot read tar ({exc})") from None
