"""BLINK as it ships: the Hugging Face hub layout, and which revision of it was read.

The hub copy (``git clone``, ``huggingface-cli download --local-dir`` or the hub cache) holds one
folder per subtask with ``val-*.parquet`` and ``test-*.parquet`` in it::

    BLINK/Counting/val-00000-of-00001.parquet
    BLINK/Counting/test-00000-of-00001.parquet
    BLINK/Object_Localization/val-00000-of-00001.parquet ...

``resolve_parquet(inputs, splits)`` turns parquet files, glob patterns and hub folders into the
list of files to read; ``parquet_provenance(...)`` records their sha256 sums and the dataset
revision (``--revision``, else found in the hub copy) for the shard manifest.
"""

from __future__ import annotations

import glob
import logging
import os
import re

from .manifest import sha256_file
from .schema import DataError

log = logging.getLogger(__name__)

_HASH = re.compile(r"[0-9a-f]{40}")
_GLOB_CHARS = set("*?[")


def hub_root(d: str) -> str:
    """The folder holding the subtask folders: ``d`` itself, or for a hub-cache repo folder
    (``datasets--BLINK-Benchmark--BLINK`` with refs/main and snapshots/) the snapshot refs/main names."""
    return _hub_cache_snapshot(d) or d


def _hub_cache_snapshot(d: str) -> str | None:
    """A hub-cache repo folder (``datasets--X--Y`` with refs/main and snapshots/) -> its snapshot."""
    ref = os.path.join(d, "refs", "main")
    if os.path.isfile(ref) and os.path.isdir(os.path.join(d, "snapshots")):
        with open(ref) as f:
            snap = os.path.join(d, "snapshots", f.read().strip())
        if os.path.isdir(snap):
            return snap
    return None


def hub_files(folder: str, split: str) -> list[str]:
    """``<folder>/*/<split>-*.parquet`` (a hub copy), or ``<folder>/<split>-*.parquet`` (one
    subtask's folder)."""
    folder = hub_root(folder)
    found = glob.glob(os.path.join(glob.escape(folder), "*", f"{split}-*.parquet"))
    found += glob.glob(os.path.join(glob.escape(folder), f"{split}-*.parquet"))
    return sorted(found)


def resolve_parquet(inputs: list[str] | str, splits: tuple[str, ...] = ("val",)) -> tuple[list[str], list[str]]:
    """Parquet files, glob patterns and BLINK hub folders -> (files, the folders given).

    A folder contributes its hub files of each split in ``splits`` (see ``hub_files``); a file is
    taken as it is; a pattern (``*``, ``?``, ``[``) is expanded (``**`` recursive)."""
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    files: list[str] = []
    folders: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            got = [f for s in splits for f in hub_files(item, s)]
            if not got:
                want = " or ".join(f"{s}-*.parquet" for s in splits)
                raise DataError(f"{item}: a folder, but no <Sub_Task>/{want} in it (BLINK's hub layout)")
            folders.append(os.path.abspath(item))
            files += got
        elif os.path.isfile(item):
            files.append(item)
        elif _GLOB_CHARS & set(item):
            got = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not got:
                raise DataError(f"{item}: pattern matches no file")
            files += got
        else:
            raise DataError(f"{item}: parquet file not found")
    seen: set[str] = set()
    out = []
    for f in files:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out, folders


# ---- revision --------------------------------------------------------------------------------
def _git_revision(d: str) -> str | None:
    git = os.path.join(d, ".git")
    head = os.path.join(git, "HEAD")
    if not os.path.isfile(head):
        return None
    with open(head) as f:
        text = f.read().strip()
    if not text.startswith("ref:"):
        return text if _HASH.fullmatch(text) else None
    ref = text.split(":", 1)[1].strip()
    path = os.path.join(git, *ref.split("/"))
    if os.path.isfile(path):
        with open(path) as f:
            value = f.read().strip()
        return value if _HASH.fullmatch(value) else None
    packed = os.path.join(git, "packed-refs")
    if os.path.isfile(packed):
        with open(packed) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref and _HASH.fullmatch(parts[0]):
                    return parts[0]
    return None


def _local_dir_revision(d: str, files: list[str]) -> str | None:
    """``huggingface-cli download --local-dir`` keeps ``.cache/huggingface/download/<file>.metadata``
    whose first line is the commit the file came from."""
    meta_root = os.path.join(d, ".cache", "huggingface", "download")
    if not os.path.isdir(meta_root):
        return None
    commits = set()
    for f in files:
        rel = os.path.relpath(os.path.abspath(f), d)
        meta = os.path.join(meta_root, rel + ".metadata")
        if os.path.isfile(meta):
            with open(meta) as fh:
                first = fh.readline().strip()
            if _HASH.fullmatch(first):
                commits.add(first)
    if len(commits) > 1:
        log.warning("%s: parquet files from %d different hub commits: %s", d, len(commits), sorted(commits))
        return "mixed:" + ",".join(sorted(commits))
    return commits.pop() if commits else None


def detect_revision(files: list[str], folders: list[str]) -> tuple[str | None, str | None]:
    """(revision, where it was found) from the hub copy the files come from, else (None, None).

    Looks at the folders given and, for each file, its folder and the one above (the hub layout's
    ``<hub>/<Sub_Task>/file``) for a ``.git`` checkout holding parquet files, a hub-cache snapshot
    (``snapshots/<commit>/``, or a repo folder with ``refs/main``) or ``huggingface-cli download
    --local-dir`` metadata."""
    candidates: list[str] = [hub_root(d) for d in folders]
    for f in files:
        d = os.path.dirname(os.path.abspath(f))
        candidates += [d, os.path.dirname(d)]
    seen = set()
    for d in candidates:
        if d in seen:
            continue
        seen.add(d)
        holds_parquet = glob.glob(os.path.join(glob.escape(d), "*.parquet")) or \
            glob.glob(os.path.join(glob.escape(d), "*", "*.parquet"))
        rev = _git_revision(d) if holds_parquet else None  # not the checkout of some project the data sits in
        if rev:
            return rev, f"git checkout {d}"
        real = os.path.realpath(d)
        if os.path.basename(os.path.dirname(real)) == "snapshots" and _HASH.fullmatch(os.path.basename(real)):
            return os.path.basename(real), f"hub cache snapshot {real}"
        rev = _local_dir_revision(d, files)
        if rev:
            return rev, f"huggingface-cli --local-dir metadata in {d}"
    return None, None


def parquet_provenance(files: list[str], folders: list[str], *, split: str | None = None,
                       revision: str | None = None) -> dict:
    """The manifest's ``source`` (files with sha256, the folders and hub split read) and
    ``revision`` (``revision`` as given, else the one found in the hub copy, else null)."""
    found, where = detect_revision(files, folders)
    if revision and found and found != revision:
        log.warning("--revision %s, but the hub copy says %s (%s); recording --revision", revision, found, where)
    roots = [os.path.abspath(hub_root(d)) for d in folders]

    def name(f):  # relative to the hub folder (not resolving symlinks: hub-cache files link to blobs/)
        a = os.path.abspath(f)
        for r in roots:
            if a.startswith(r + os.sep):
                return os.path.relpath(a, r)
        return a

    source = {
        "kind": "parquet",
        "parquet": [os.path.abspath(f) for f in files],
        "hub": folders or None,
        "hub_split": split if folders else None,
        "files": [{"name": name(f), "sha256": sha256_file(f), "bytes": os.path.getsize(f)} for f in files],
        "revision_from": "--revision" if revision else where,
    }
    if revision and found and found != revision:
        source["revision_found"] = found
    return {"source": source, "revision": revision or found}
