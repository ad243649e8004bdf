"""Write samples into webdataset tar shards plus the folder's manifest.json.

    write_shards(samples, out_dir, split, shard_size=256)      any iterable of sample dicts

A sample dict is ``{"key"?, "task", "question", "choices", "answer", "meta"?, "images": [...]}``
where each image is encoded bytes (JPEG/PNG bytes are stored unchanged with their own extension;
other formats are re-encoded to PNG) or a PIL image (stored as PNG). Nothing is pickled.

Shards are ``out_dir/{split}-{i:05d}.tar`` (plain tar, fixed mtime/owner, so the same input gives
byte-identical shards), each with its index ``<shard>.idx.json`` (index.py). manifest.json
(manifest.py) holds, per split, the shard names with sample counts and sha256, the counts per task
and the total; the reader takes counts from it. Images the backbones' processors would refuse
(``check_image_shape``) are refused here, naming the sample, rather than at training time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from typing import Iterable

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from .images import encode_image
from .index import INDEX_SUFFIX, scan_shard, write_index
from .manifest import FORMAT, read_manifest, sha256_file, write_manifest
from .schema import DataError, sanitize_key, validate_record

log = logging.getLogger(__name__)

TAR_MTIME = 0  # fixed member metadata: identical input -> identical bytes
# Qwen2-VL / 2.5-VL / 3-VL processors (smart_resize) raise "absolute aspect ratio must be smaller
# than 200"; LLaVA-OneVision's anyres tiling accepts any shape. The strictest family sets the rule.
MAX_ASPECT_RATIO = 200


def check_image_shape(im: Image.Image, where: str) -> None:
    """Refuse a shape the supported processors reject (today: aspect ratio above 200)."""
    w, h = im.size
    if max(w, h) / max(1, min(w, h)) > MAX_ASPECT_RATIO:
        raise DataError(f"{where}: image is {w} x {h}, aspect ratio {max(w, h) / max(1, min(w, h)):.0f}; the "
                        f"Qwen-VL processors refuse ratios above {MAX_ASPECT_RATIO} (crop or pad it)")


class SplitWriter:
    """Writes one split's shards into a staging folder inside ``out_dir``; ``close()`` swaps them
    in (the split's old shards go only then) and returns the manifest entry, ``abort()`` removes
    the staging folder and leaves the old shards as they were. As a context manager: close on
    success, abort on an exception."""

    def __init__(self, out_dir: str, split: str, shard_size: int = 256):
        if not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise DataError(f"split name {split!r}: use letters, digits and '_' only")
        if shard_size < 1:
            raise DataError(f"shard_size must be >= 1, got {shard_size}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.split = out_dir, split
        self.staging = os.path.join(out_dir, f".staging-{split}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(self.staging)
        self.shards: list[dict] = []
        self.tasks: dict[str, int] = {}
        self.keys: set[str] = set()
        self.total = 0
        self._in_shard = 0
        pattern = os.path.join(self.staging.replace("%", "%%"), f"{split}-%05d.tar")
        self._writer = wds.ShardWriter(
            pattern, maxcount=shard_size, verbose=0, post=self._finished,
            encoder=False, mtime=TAR_MTIME, user="livr", group="livr", mode=0o444,
        )

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.entry = self.close()
        else:
            self.abort()

    def _finished(self, fname: str) -> None:
        if self._in_shard == 0:
            os.remove(fname)  # ShardWriter opens a first shard eagerly
            return
        sha = sha256_file(fname)
        self.shards.append({"name": os.path.basename(fname), "count": self._in_shard,
                            "sha256": sha, "bytes": os.path.getsize(fname)})
        index, _ = scan_shard(fname, sha)  # member offsets -> <shard>.idx.json (reads the tar headers only)
        if len(index) != self._in_shard or index.error:
            raise DataError(f"{fname}: internal: indexed {len(index)} samples, wrote {self._in_shard}")
        write_index(fname, index)
        self._in_shard = 0

    def write(self, key: str, record: dict, images: list[tuple[bytes, str]]) -> None:
        if key in self.keys:
            raise DataError(f"{self.split}:{key}: duplicate key")
        self.keys.add(key)
        obj = {"__key__": key, "json": json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")}
        for i, (data, ext) in enumerate(images):
            obj[f"{i}.{ext}"] = data
        self._writer.write(obj)
        self._in_shard += 1
        self.total += 1
        self.tasks[record["task"]] = self.tasks.get(record["task"], 0) + 1

    def close(self) -> dict:
        self._writer.close()
        own = re.compile(rf"{re.escape(self.split)}-\d{{5}}\.tar({re.escape(INDEX_SUFFIX)})?")
        for name in os.listdir(self.out_dir):  # the split's old shards and indexes, now that the new ones exist
            if own.fullmatch(name):
                os.remove(os.path.join(self.out_dir, name))
        for name in sorted(os.listdir(self.staging)):  # os.replace keeps the mtime each index records
            os.replace(os.path.join(self.staging, name), os.path.join(self.out_dir, name))
        os.rmdir(self.staging)
        return {"shards": self.shards, "tasks": dict(sorted(self.tasks.items())), "total": self.total}

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # the error being handled is the one to report
            pass
        shutil.rmtree(self.staging, ignore_errors=True)


def prepare_sample(sample: dict, where: str) -> tuple[str, dict, list[tuple[bytes, str]], list[Image.Image]]:
    """Validate one sample dict -> (key, json record, [(bytes, ext)], decoded images)."""
    if not isinstance(sample, dict):
        raise DataError(f"{where}: a sample must be a dict, got {type(sample).__name__}")
    images = sample.get("images")
    if isinstance(images, (bytes, Image.Image)):
        images = [images]
    if not isinstance(images, list):
        raise DataError(f"{where}: 'images' must be a list")
    key = sanitize_key(sample["key"]) if sample.get("key") not in (None, "") else None
    if key is None:
        raise DataError(f"{where}: missing 'key'")
    where = f"{where}:{key}"
    record = validate_record(sample, where, n_images=len(images))
    encoded, decoded = [], []
    for i, im in enumerate(images):
        data, ext, rgb = encode_image(im, f"{where}:image {i}")
        check_image_shape(rgb, f"{where}:image {i}")
        encoded.append((data, ext))
        decoded.append(rgb)
    return key, record, encoded, decoded


def write_shards(samples: Iterable[dict], out_dir: str, split: str = "train", shard_size: int = 256, *,
                 progress: bool = True, total: int | None = None) -> dict:
    """Write an iterable of sample dicts (see module docstring) as one split; returns the split's
    manifest entry and updates ``out_dir/manifest.json``. Samples without a key get
    ``{split}-{i:06d}``."""
    with SplitWriter(out_dir, split, shard_size) as sw:
        for i, sample in enumerate(tqdm(samples, total=total, desc=f"writing {split}", unit="sample",
                                        disable=not progress)):
            if isinstance(sample, dict) and not sample.get("key"):
                sample = {**sample, "key": f"{split}-{i:06d}"}
            key, record, encoded, _ = prepare_sample(sample, f"{split}[{i}]")
            sw.write(key, record, encoded)
    entry = sw.entry
    manifest = read_manifest(out_dir)
    manifest["format"] = FORMAT
    manifest["splits"][split] = entry
    write_manifest(out_dir, manifest)
    log.info("wrote %d %s samples in %d shards to %s", entry["total"], split, len(entry["shards"]), out_dir)
    return entry
