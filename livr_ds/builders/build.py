"""The build driver: turns a builder's ``Pools`` into every requested split's shards and the
manifest that records where they came from.

Units are visited in a seeded order, each unit may be de-duplicated against the test set, made into
a sample (``make(unit, rng, label)``), skipped when its images are corrupt or it cannot give a valid
sample, and the samples are written with the shared ``write_shards``. Every random choice comes
from ``rng_for(seed, task, split, position)``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..data.manifest import FORMAT, read_manifest, sha256_file, write_manifest
from ..data.schema import DataError
from ..data.writer import write_shards
from .image_format import JPEG_QUALITY, MAX_SIDE, jpeg
from .seeding import rng_for
from .units import CorruptImage, Pools, Unusable

log = logging.getLogger(__name__)


def annotation_checksums(paths: list[str], max_listed: int = 64) -> dict:
    """{abs path: sha256}; beyond max_listed files (SPair has 70k pair files) one combined
    checksum: sha256 over the sorted "path sha256" lines, plus the file count."""
    sums = {os.path.abspath(p): sha256_file(p) for p in sorted(set(paths))}
    if len(sums) <= max_listed:
        return sums
    h = hashlib.sha256("".join(f"{p} {d}\n" for p, d in sums.items()).encode()).hexdigest()
    return {"combined": {"files": len(sums), "common_dir": os.path.commonpath(list(sums)), "sha256_of_list": h}}


@dataclass
class Stats:
    corrupt: int = 0
    unusable: int = 0
    duplicates: int = 0
    removed: list[str] = field(default_factory=list)
    corrupt_units: list[str] = field(default_factory=list)


def _pool_size(units) -> int:
    return sum(len(v) for v in units.values()) if isinstance(units, dict) else len(units)


def _check_capacity(task: str, split: str, n: int, units, reuse: int, labels: list | None) -> None:
    if isinstance(units, dict):
        need: dict = {}
        for lab in labels or []:
            need[lab] = need.get(lab, 0) + 1
        short = {lab: (len(units.get(lab, [])) * reuse, c) for lab, c in need.items()
                 if len(units.get(lab, [])) * reuse < c}
        if short:
            k = len(need)
            can = k * min(len(units.get(lab, [])) * reuse for lab in need)
            raise DataError(f"{task}: {split} needs {n} samples balanced over {k} labels but the source has "
                            f"too few for labels {sorted(short)} (have, need: {short}); it can give at most "
                            f"{can} balanced {split} samples (use --n-{split} {can})")
    else:
        can = len(units) * reuse
        if can < n:
            raise DataError(f"{task}: {split} asks for {n} samples but the source can give at most {can} "
                            f"({len(units)} usable units x {reuse}); use --n-{split} {can} or less")


def sample_stream(task: str, split: str, n: int, seed: int, pools: Pools, make: Callable, labels: list | None,
                  deduper, stats: Stats):
    """Yield n sample dicts for one split (see module docstring)."""
    units = pools.units[split]
    _check_capacity(task, split, n, units, pools.reuse, labels)
    keyed = units if isinstance(units, dict) else {None: units}
    orders = {lab: [u for u in rng_for(seed, task, split, "order", lab).permutation(len(lst))]
              for lab, lst in keyed.items()}
    pos = {lab: 0 for lab in keyed}
    bad: set[str] = set()
    dup_cache: dict[str, bool] = {}
    visits = 0
    written = 0
    while written < n:
        label = labels[written] if labels is not None else None
        lab = label if isinstance(units, dict) else None
        lst, order = keyed.get(lab, []), orders.get(lab, [])
        if pos[lab] >= len(order) * pools.reuse:
            raise DataError(
                f"{task}: the source ran out after {written} of {n} {split} samples "
                f"({stats.corrupt} corrupt images, {stats.duplicates} test duplicates, {stats.unusable} "
                f"units unusable under the recipe were skipped); it can give {written} "
                f"{split} samples{'' if lab is None else f' with label {lab!r} at this point'}")
        unit = lst[order[pos[lab] % len(order)]]
        pos[lab] += 1
        visits += 1
        uid = pools.unit_id(unit)
        if uid in bad:
            continue
        try:
            if deduper is not None:
                if uid not in dup_cache:
                    dup, info = deduper.is_duplicate(pools.images(unit))
                    dup_cache[uid] = dup
                    if dup:
                        stats.duplicates += 1
                        stats.removed.append(f"{split}:{uid} ~ {info}")
                if dup_cache[uid]:
                    continue
            rng = rng_for(seed, task, split, visits)
            s = make(unit, rng, label)
        except CorruptImage as exc:
            bad.add(uid)
            stats.corrupt += 1
            stats.corrupt_units.append(str(exc))
            log.warning("%s: skipped a corrupt image: %s", task, exc)
            continue
        except Unusable:
            stats.unusable += 1
            continue
        s.setdefault("meta", {})["source_unit"] = uid
        yield {"key": f"{task}-{split}-{written:06d}", "task": task,
               **{k: v for k, v in s.items() if k != "images"},
               "images": [jpeg(im) for im in s["images"]]}
        written += 1


def check_disjoint(task: str, pools: Pools, splits: list[str]) -> None:
    """No source image may be in two splits."""
    seen: dict[str, str] = {}
    for split in splits:
        units = pools.units.get(split, [])
        flat = [u for v in units.values() for u in v] if isinstance(units, dict) else units
        for u in flat:
            for img in pools.unit_images(u):
                other = seen.setdefault(img, split)
                if other != split:
                    raise DataError(f"{task}: source image {img!r} is in both {other} and {split} "
                                    "(internal split error)")


def build(task: str, out_dir: str, *, seed: int, sizes: dict[str, int], pools: Pools, make: Callable,
          labels_fn: Callable[[np.random.Generator, int], list] | None, recipe: dict, deduper=None,
          shard_size: int = 256, progress: bool = False) -> dict:
    """Write every split in ``sizes`` (n > 0) to out_dir and the manifest with provenance."""
    splits = [s for s, n in sizes.items() if n > 0]
    for s in splits:
        if s not in pools.units:
            raise DataError(f"{task}: the source has no {s} split")
    check_disjoint(task, pools, splits)
    per_split = {}
    for split in splits:
        n = sizes[split]
        labels = labels_fn(rng_for(seed, task, split, "labels"), n) if labels_fn else None
        stats = Stats()
        entry = write_shards(sample_stream(task, split, n, seed, pools, make, labels, deduper, stats),
                             out_dir, split, shard_size, progress=progress, total=n)
        per_split[split] = {"samples": entry["total"], "skipped_corrupt": stats.corrupt,
                            "corrupt": stats.corrupt_units[:100], "skipped_unusable": stats.unusable,
                            "dedup_removed": stats.duplicates, "dedup_removed_units": stats.removed[:1000],
                            "pool_units": _pool_size(pools.units[split])}
    m = read_manifest(out_dir)
    m["format"] = FORMAT
    for stale in [s for s in m["splits"] if s not in splits]:
        del m["splits"][stale]
    m["build"] = {
        "task": task, "seed": seed, "sizes": {s: sizes[s] for s in splits}, "recipe": recipe,
        "sources": {k: os.path.abspath(v) for k, v in pools.sources.items()},
        "annotation_files": annotation_checksums(pools.annotations),
        "splits": per_split, "notes": pools.notes,
        "dedup": deduper.describe() if deduper is not None else None,
        "jpeg_quality": JPEG_QUALITY, "max_side": MAX_SIDE,
    }
    write_manifest(out_dir, m)
    return m
