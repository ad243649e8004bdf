"""Where shards come from: a manifest directory, a manifest file, or a brace/glob pattern.

``ShardSource(path, weight=1.0, split="train").resolve()`` -> the shard list with sample counts
(from manifest.json, else from one scan of the tar headers, logged). See reader.py for how the
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

from .schema import DECLARED_MEMBER_RE, DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


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

    def resolve(self) -> list[ShardInfo]:
        path = os.fspath(self.path)
        if not (isinstance(self.weight, (int, float)) and self.weight > 0 and math.isfinite(self.weight)):
            raise DataError(f"{path}: weight must be a positive number, got {self.weight!r}")
        if os.path.isdir(path) or os.path.basename(path) == MANIFEST:
            return _from_manifest_dir(path if os.path.isdir(path) else os.path.dirname(path) or ".", self.split)
        return _from_pattern(path)


def _from_manifest_dir(d: str, split: str) -> list[ShardInfo]:
    mpath = os.path.join(d, MANIFEST)
    if not os.path.isfile(mpath):
        pattern = os.path.join(d, f"{split}-*.tar")
        if not glob.glob(pattern):
            raise DataError(f"{d}: no {MANIFEST} and no shards matching {split}-*.tar")
        return _from_pattern(pattern)
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


def _from_pattern(pattern: str) -> list[ShardInfo]:
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
    if todo:
        log.info("counting samples in %d shard(s) matching %r (no manifest entry; reading tar headers once)",
                 len(todo), pattern)
    out = []
    for u in found:
        n = counts.get(os.path.normpath(u))
        out.append(ShardInfo(u, n if n is not None else count_samples(u), os.path.basename(u)))
    return out


def count_samples(url: str) -> int:
    """Number of samples (distinct keys with a declared member) in a shard; reads no data."""
    state = {"prefix": None, "n": 0}

    def select(fname: str) -> bool:
        prefix, ext = wds.tariterators.base_plus_ext(fname)
        if prefix is not None and DECLARED_MEMBER_RE.match(ext.lower()) and prefix != state["prefix"]:
            state["prefix"] = prefix
            state["n"] += 1
        return False

    try:
        with open(url, "rb") as f:
            for _ in wds.tariterators.tar_file_iterator(f, select_files=select):
                pass
    except Exception as exc:
        raise DataError(f"{url}:{state['prefix'] or '<start>'}: cannot read tar ({exc})") from None
    return state["n"]


