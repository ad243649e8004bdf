"""What conversions read: a JSONL manifest with an image folder, and BLINK-style parquet files.

Both yield sample dicts (``{"key", "task", "question", "choices", "answer", "meta", "images",
"_where"}``, images as encoded bytes) for ``convert.py``; ``jsonl_keys`` / ``parquet_keys`` list
the keys without reading images, so the validation split can be chosen before the one pass.

Paths are data, not instructions: a JSONL image path or a parquet struct's ``path`` is read only
inside its root after resolving symlinks (``inside_root``); ``../``, absolute paths and symlinks
that leave the root are refused with the line that named them.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator

from .schema import DataError, sanitize_key
from .tasks import canonical_task


def _read_jsonl_lines(path: str) -> Iterator[tuple[str, dict]]:
    """Yield (where, object) for each non-empty line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: each line must be a JSON object")
            yield where, obj


def inside_root(root: str, p: str, where: str, what: str = "image") -> str:
    """``p`` (relative to ``root``, or absolute) as a real path that lies inside ``root`` after
    resolving symlinks; a path that leaves it (``../``, absolute, a symlink out) is refused."""
    real_root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(real_root, p))
    if os.path.commonpath([real_root, full]) != real_root:
        raise DataError(f"{where}: {what} {p!r} resolves to {full!r}, outside the image root {real_root!r}; "
                        "refused (images are read only inside --image-root)")
    return full


def iter_jsonl(path: str, image_root: str | None = None) -> Iterator[dict]:
    """Sample dicts from a JSONL manifest: one object per line with task, question, choices,
    answer, images (paths relative to ``image_root``, default the JSONL's folder), optional key
    (default ``<file stem>-<line>``) and meta. Images are read only inside ``image_root`` (after
    resolving symlinks): ``../``, absolute paths or symlinks leading out of it are refused."""
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(root):
        raise DataError(f"{path}: image root {root!r} is not a folder")
    stem = re.sub(r"[^A-Za-z0-9_\-]+", "_", os.path.splitext(os.path.basename(path))[0])
    for where, obj in _read_jsonl_lines(path):
        lineno = int(where.rsplit(":", 1)[1])
        paths = obj.get("images")
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise DataError(f"{where}: 'images' must be a list of paths")
        images = []
        for p in paths:
            full = inside_root(root, p, where)
            if not os.path.isfile(full):
                raise DataError(f"{where}: image {p!r} not found under {root!r}")
            with open(full, "rb") as f:
                images.append(f.read())
        key = obj.get("key") or f"{stem}-{lineno:06d}"
        yield {**obj, "key": key, "images": images, "_where": where}


def jsonl_keys(path: str) -> list[str]:
    stem = re.sub(r"[^A-Za-z0-9_\-]+", "_", os.path.splitext(os.path.basename(path))[0])
    return [sanitize_key(obj.get("key") or f"{stem}-{int(w.rsplit(':', 1)[1]):06d}")
            for w, obj in _read_jsonl_lines(path)]


def _image_columns(names: list[str]) -> list[str]:
    cols = [n for n in names if re.fullmatch(r"image(_\d+)?", n)]
    return sorted(cols, key=lambda n: int(n.split("_")[1]) if "_" in n else 0)


def _cell_bytes(cell: Any, base_dir: str, where: str) -> bytes | None:
    if cell is None:
        return None
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return bytes(cell["bytes"])
        p = cell.get("path")
        if p:
            full = inside_root(base_dir, p, where, "image struct path")  # the parquet's own folder only
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    return f.read()
            raise DataError(f"{where}: image struct has no bytes and path {p!r} does not exist")
        return None
    raise DataError(f"{where}: image cell must be bytes or a {{'bytes','path'}} struct, got {type(cell).__name__}")


def iter_parquet(paths: list[str], task: str | None = None, batch_rows: int = 32) -> Iterator[dict]:
    """Sample dicts from BLINK-style parquet files: ``image_1..image_4`` (encoded bytes or HF
    ``{"bytes","path"}`` structs, null when absent), ``question``, ``choices`` (list of str),
    ``answer`` ("(A)"), ``sub_task`` (-> task: data/tasks.py's canonical name, e.g.
    Object_Localization -> localization), ``idx`` (-> key) if present.
    ``prompt``/``explanation`` columns are kept in meta."""
    import pyarrow.parquet as pq

    for path in paths:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        img_cols = _image_columns(names)
        if not img_cols:
            raise DataError(f"{path}: no image columns (expected image_1 .. image_4)")
        for col in ("question", "answer"):
            if col not in names:
                raise DataError(f"{path}: missing column {col!r}")
        if task is None and "sub_task" not in names and "task" not in names:
            raise DataError(f"{path}: no 'sub_task' column; pass task=... (--task)")
        stem = re.sub(r"[^A-Za-z0-9_\-]+", "_", os.path.splitext(os.path.basename(path))[0])
        base_dir = os.path.dirname(os.path.abspath(path))
        row = 0
        for batch in pf.iter_batches(batch_size=batch_rows):
            for r in batch.to_pylist():
                where = f"{path}:row {row}"
                key = str(r["idx"]) if r.get("idx") not in (None, "") else f"{stem}-{row:06d}"
                images = [b for c in img_cols if (b := _cell_bytes(r.get(c), base_dir, f"{where}:{c}")) is not None]
                choices = r.get("choices") or []
                if isinstance(choices, str):
                    try:
                        choices = json.loads(choices)
                    except json.JSONDecodeError:
                        raise DataError(f"{where}: 'choices' is a string that is not a JSON list") from None
                raw_task = task if task is not None else (r.get("sub_task") or r.get("task") or "")
                meta = {k: r[k] for k in ("sub_task", "prompt", "explanation") if isinstance(r.get(k), str)}
                yield {"key": key, "task": canonical_task(raw_task), "question": r["question"], "choices": list(choices),
                       "answer": r["answer"], "meta": meta, "images": images, "_where": where}
                row += 1


def parquet_keys(paths: list[str]) -> list[str]:
    import pyarrow.parquet as pq

    keys = []
    for path in paths:
        pf = pq.ParquetFile(path)
        stem = re.sub(r"[^A-Za-z0-9_\-]+", "_", os.path.splitext(os.path.basename(path))[0])
        if "idx" in pf.schema_arrow.names:
            col = pf.read(columns=["idx"]).column("idx").to_pylist()
            keys += [sanitize_key(str(v)) if v not in (None, "") else sanitize_key(f"{stem}-{i:06d}")
                     for i, v in enumerate(col)]
        else:
            keys += [sanitize_key(f"{stem}-{i:06d}") for i in range(pf.metadata.num_rows)]
    return keys
