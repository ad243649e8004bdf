"""Counting from PixMo-Count (allenai/pixmo-count on the Hugging Face Hub).

Rows: the Hub's parquet files (``data/train-*.parquet``, ``data/validation-*.parquet``,
``data/test-*.parquet``) or JSONL with the same columns: ``image_url``, ``image_sha256``,
``count``, ``label`` (the dataset card's fields; ``points`` is ignored). PixMo ships URLs only, so
``--source-2`` is the folder of images you downloaded: an image is found as
``<image_sha256>.<ext>`` or under the URL's basename (any sub-folder); when the row has
``image_sha256`` the file's sha256 must equal it (else it is counted as corrupt).

Splits: the official ones (the file name says train / validation); a single file without a split
name is split by a hash of (seed, image). Test rows are never used. Counts 2..10 only, exactly
balanced per split (counts differ by at most one); prompt "How many {label} are there in the
image?", open-ended answer "N".
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re

from ..data.schema import DataError
from .build import build
from .image_format import fit
from .seeding import hash_rank
from .source import need_dir, open_image_bytes
from .splits import balanced_labels
from .units import CorruptImage, Pools

COUNTS = list(range(2, 11))
QUESTION = "How many {label} are there in the image?"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


def _split_of(path: str) -> str | None:
    name = os.path.basename(path).lower()
    if name.startswith("train"):
        return "train"
    if name.startswith("validation") or name.startswith("val"):
        return "val"
    if name.startswith("test"):
        return "test"
    return None


def read_rows(path: str) -> tuple[list[tuple[str, dict]], list[str]]:
    """-> ([(split or None, row)], files read)."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True) +
                       glob.glob(os.path.join(path, "**", "*.jsonl"), recursive=True))
        if not files:
            raise DataError(f"{path}: no PixMo-Count *.parquet or *.jsonl files (expected e.g. "
                            "data/train-00000-of-00001.parquet)")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"{path}: PixMo-Count rows not found (a parquet/JSONL file or a folder of them)")
    rows = []
    for f in files:
        if f.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(f)
            got = table.to_pylist()
            names = table.schema.names
        else:
            got = []
            with open(f, encoding="utf-8") as fh:
                for i, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            got.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise DataError(f"{f}:{i}: not valid JSON ({exc})") from None
            names = sorted(got[0]) if got else []
        for col in ("count", "label"):
            if got and col not in names:
                raise DataError(f"{f}: missing column {col!r} (PixMo-Count has image_url, image_sha256, count, label)")
        if got and "image_url" not in names and "image_sha256" not in names:
            raise DataError(f"{f}: missing column 'image_url' (or 'image_sha256') to find each image")
        sp = _split_of(f)
        rows += [(sp, r) for r in got]
    return rows, files


def _index_images(image_dir: str) -> dict[str, str]:
    index = {}
    for p in sorted(glob.glob(os.path.join(image_dir, "**", "*"), recursive=True)):
        if os.path.isfile(p):
            base = os.path.basename(p)
            index.setdefault(base, p)
            stem, ext = os.path.splitext(base)
            if ext.lower() in IMAGE_EXTS or not ext:
                index.setdefault(stem, p)
    return index


def build_counting(out: str, *, source: str, source_2: str | None, seed: int, sizes: dict, deduper=None,
                   shard_size: int = 256, progress: bool = False, **_) -> dict:
    task = "counting"
    if not source_2:
        raise DataError("counting: --source-2 must be the folder of downloaded PixMo-Count images")
    need_dir(source_2, "the folder of downloaded PixMo-Count images")
    rows, files = read_rows(source)
    index = _index_images(source_2)
    have_official = any(sp in ("train", "val") for sp, _ in rows)
    units: dict[str, dict[int, list[dict]]] = {s: {c: [] for c in COUNTS} for s in sizes if sizes[s] > 0}
    missing = out_of_range = 0
    seen: dict[str, str] = {}
    val_frac = sizes.get("val", 0) / max(1, sum(sizes.values()))
    for sp, r in rows:
        try:
            c = int(r["count"])
        except (TypeError, ValueError):
            raise DataError(f"counting: row with count {r.get('count')!r} is not an integer") from None
        if c not in COUNTS:
            out_of_range += 1
            continue
        url, sha = r.get("image_url") or "", r.get("image_sha256") or ""
        ident = sha or url
        path = index.get(sha) if sha else None
        if path is None and url:
            path = index.get(re.sub(r"[?#].*$", "", url).rstrip("/").rsplit("/", 1)[-1])
        if path is None:
            missing += 1
            continue
        if have_official:
            split = sp
        else:
            split = "val" if hash_rank(seed, ident) < val_frac else "train"
        if split not in units or seen.setdefault(ident, split) != split:
            continue  # test rows, or an image already used by another split
        units[split][c].append({"id": ident, "path": path, "sha": sha, "label": str(r["label"]), "count": c,
                                "url": url})

    def load(u):
        with open(u["path"], "rb") as f:
            data = f.read()
        if u["sha"] and hashlib.sha256(data).hexdigest() != u["sha"]:
            raise CorruptImage(f"{u['path']}: sha256 differs from the row's image_sha256")
        return open_image_bytes(data, u["path"])

    def make(u, rng, count):
        im, _ = fit(load(u))
        return {"images": [im], "question": QUESTION.format(label=u["label"]), "choices": [],
                "answer": str(u["count"]), "meta": {"label": u["label"], "count": u["count"], "image_url": u["url"],
                                                    "image_sha256": u["sha"]}}

    pools = Pools(units=units, images=lambda u: [load(u)], unit_id=lambda u: u["id"],
                  unit_images=lambda u: [u["id"]], annotations=files,
                  sources={"rows": source, "images": source_2},
                  notes={"official_splits": have_official, "rows": len(rows), "rows_without_local_image": missing,
                         "rows_count_outside_2_10": out_of_range,
                         "pool_per_count": {s: {c: len(v) for c, v in d.items()} for s, d in units.items()}})
    recipe = {"counts": [COUNTS[0], COUNTS[-1]], "balance": "exactly uniform over counts per split (+-1)",
              "question": QUESTION, "answer": "open-ended integer", "splits": "official (train / validation)"}
    return build(task, out, seed=seed, sizes=sizes, pools=pools, make=make,
                 labels_fn=lambda rng, n: [COUNTS[i] for i in balanced_labels(rng, n, len(COUNTS))],
                 recipe=recipe, deduper=deduper, shard_size=shard_size, progress=progress)
