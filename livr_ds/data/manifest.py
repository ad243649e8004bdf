"""A shard folder's manifest.json: per split the shard names, sample counts and sha256 sums, the
counts per task, and how the folder was built. Written atomically (temporary file + rename), so
a reader never sees half a manifest."""

from __future__ import annotations

import hashlib
import json
import os

from .schema import DataError

MANIFEST = "manifest.json"
FORMAT = "livr-ds-shards/1"


def read_manifest(out_dir: str) -> dict:
    """The manifest of ``out_dir``; an empty one when the folder has none yet."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return {"format": FORMAT, "splits": {}}
    with open(path) as f:
        try:
            m = json.load(f)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise DataError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(m, dict) or not isinstance(m.get("splits"), dict):
        raise DataError(f"{path}: not a livr-ds manifest (no 'splits' object)")
    return m


def write_manifest(out_dir: str, manifest: dict) -> None:
    path = os.path.join(out_dir, MANIFEST)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
