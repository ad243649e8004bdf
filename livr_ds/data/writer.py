"""Write samples into webdataset tar shards plus a manifest.json.

    write_shards(samples, out_dir, split, shard_size=256)      any iterable of sample dicts
    convert_jsonl(jsonl, image_root, out_dir, ...)              JSONL manifest + image folder
    convert_parquet(paths, out_dir, ...)                        BLINK parquet: files, globs, the hub folder
    verify_shards(out_dir) -> list of problems                  sha256 + sample counts

A sample dict is ``{"key"?, "task", "question", "choices", "answer", "meta"?, "images": [...]}``
where each image is encoded bytes (JPEG/PNG bytes are stored unchanged with their own extension;
other formats are re-encoded to PNG) or a PIL image (stored as PNG). Nothing is pickled.

Shards are ``out_dir/{split}-{i:05d}.tar`` (plain tar, fixed mtime/owner, so the same input gives
byte-identical shards). ``out_dir/manifest.json`` holds, per split, the shard names with sample
counts and sha256, the counts per task and the total; the reader takes counts from it.

``val_fraction`` moves a deterministic subset (a function of seed and key, exact size
round(fraction * N)) to split "val". ``dedup_against`` drops train/val samples that have an image
whose decoded RGB pixels equal an image of the given test set (JSONL, parquet files / glob / BLINK
hub folder, or a shard directory); the number removed and their keys are recorded in the manifest.
JSONL image paths are read only inside the image root (``inside_root``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from typing import Any, Callable, Iterable, Iterator

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from .schema import DECLARED_MEMBER_RE, IMAGE_MEMBER_RE, DataError, decode_image, sanitize_key, validate_record
from .tasks import canonical_task
from .index import INDEX_SUFFIX, scan_shard, write_index

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "livr-ds-shards/1"
TAR_MTIME = 0  # fixed member metadata: identical input -> identical bytes
_SOURCE_FORMATS = ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]


# ---- images --------------------------------------------------------------------------------
def pixel_hash(img: Image.Image) -> str:
    """sha256 of the decoded RGB pixels (and size): lossless re-encodes hash the same."""
    rgb = img.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def encode_image(image: Any, where: str) -> tuple[bytes, str, Image.Image]:
    """-> (bytes to store, extension, decoded RGB image). JPEG/PNG bytes are kept unchanged."""
    if isinstance(image, Image.Image):
        rgb = image.convert("RGB")
        buf = io.BytesIO()
        rgb.save(buf, format="PNG")
        return buf.getvalue(), "png", rgb
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        try:
            with Image.open(io.BytesIO(data), formats=_SOURCE_FORMATS) as im:
                fmt = im.format
                im.load()
                rgb = im.convert("RGB")
        except Exception as exc:
            raise DataError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from None
        if fmt == "JPEG":
            return data, "jpg", rgb
        if fmt == "PNG":
            return data, "png", rgb
        buf = io.BytesIO()
        rgb.save(buf, format="PNG")
        return buf.getvalue(), "png", rgb
    raise DataError(f"{where}: an image must be bytes or a PIL image, got {type(image).__name__}")


# ---- manifest -------------------------------------------------------------------------------
def read_manifest(out_dir: str) -> dict:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return {"format": FORMAT, "splits": {}}
    with open(path) as f:
        try:
            m = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(m, dict) or not isinstance(m.get("splits"), dict):
        raise DataError(f"{path}: not a livr-ds manifest (no 'splits' object)")
    return m


def write_manifest(out_dir: str, manifest: dict) -> None:
    path = os.path.join(out_dir, MANIFEST)
    tmp = path + ".tmp"
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


# ---- writing --------------------------------------------------------------------------------
class SplitWriter:
    """Writes one split's shards; ``close()`` returns its manifest entry."""

    def __init__(self, out_dir: str, split: str, shard_size: int = 256):
        if not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise DataError(f"split name {split!r}: use letters, digits and '_' only")
        if shard_size < 1:
            raise DataError(f"shard_size must be >= 1, got {shard_size}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.split = out_dir, split
        for name in os.listdir(out_dir):  # stale shards (and their indexes) of an earlier, larger write
            if re.fullmatch(rf"{re.escape(split)}-\d{{5}}\.tar({re.escape(INDEX_SUFFIX)})?", name):
                os.remove(os.path.join(out_dir, name))
        self.shards: list[dict] = []
        self.tasks: dict[str, int] = {}
        self.keys: set[str] = set()
        self.total = 0
        self._in_shard = 0
        pattern = os.path.join(out_dir.replace("%", "%%"), f"{split}-%05d.tar")
        self._writer = wds.ShardWriter(
            pattern, maxcount=shard_size, verbose=0, post=self._finished,
            encoder=False, mtime=TAR_MTIME, user="livr", group="livr", mode=0o444,
        )

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
        return {"shards": self.shards, "tasks": dict(sorted(self.tasks.items())), "total": self.total}


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
        encoded.append((data, ext))
        decoded.append(rgb)
    return key, record, encoded, decoded


def write_shards(samples: Iterable[dict], out_dir: str, split: str = "train", shard_size: int = 256, *,
                 progress: bool = True, total: int | None = None) -> dict:
    """Write an iterable of sample dicts (see module docstring) as one split; returns the split's
    manifest entry and updates ``out_dir/manifest.json``. Samples without a key get
    ``{split}-{i:06d}``."""
    sw = SplitWriter(out_dir, split, shard_size)
    try:
        for i, sample in enumerate(tqdm(samples, total=total, desc=f"writing {split}", unit="sample",
                                        disable=not progress)):
            if isinstance(sample, dict) and not sample.get("key"):
                sample = {**sample, "key": f"{split}-{i:06d}"}
            key, record, encoded, _ = prepare_sample(sample, f"{split}[{i}]")
            sw.write(key, record, encoded)
    finally:
        entry = sw.close()
    manifest = read_manifest(out_dir)
    manifest["format"] = FORMAT
    manifest["splits"][split] = entry
    write_manifest(out_dir, manifest)
    log.info("wrote %d %s samples in %d shards to %s", entry["total"], split, len(entry["shards"]), out_dir)
    return entry


# ---- sources --------------------------------------------------------------------------------
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


def _jsonl_keys(path: str) -> list[str]:
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


def _task_name(s: str) -> str:
    return canonical_task(s)  # BLINK's Object_Localization -> localization (data/tasks.py)


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
                yield {"key": key, "task": _task_name(raw_task), "question": r["question"], "choices": list(choices),
                       "answer": r["answer"], "meta": meta, "images": images, "_where": where}
                row += 1


def _parquet_keys(paths: list[str]) -> list[str]:
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


# ---- split, dedup, convert ------------------------------------------------------------------
def choose_val(keys: list[str], fraction: float, seed: int) -> set[str]:
    """Exactly round(fraction * N) keys (at least 1 if fraction > 0 and N > 1, never all),
    chosen by sha256(seed:key): a pure function of (seed, key set)."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {fraction}")
    n = len(keys)
    k = int(round(fraction * n))
    if fraction > 0 and n > 1:
        k = min(max(k, 1), n - 1)
    ranked = sorted(keys, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    return set(ranked[:k])


def pixel_hashes_of(path: str, image_root: str | None = None) -> set[str]:
    """Pixel hashes of every image of a test set: a JSONL manifest, parquet file(s) (a file, a glob
    pattern, or a BLINK hub folder: its ``*/val-*.parquet`` and ``*/test-*.parquet``), or a shard
    directory (all splits of its manifest.json) / single .tar."""
    hashes: set[str] = set()
    is_shards = path.endswith(".tar") or os.path.isfile(os.path.join(path, MANIFEST))
    if not is_shards and (os.path.isdir(path) or path.endswith(".parquet") or any(c in path for c in "*?[")):
        from .blink import resolve_parquet

        try:
            files, _ = resolve_parquet([path], splits=("val", "test"))
        except DataError as exc:
            if not os.path.isdir(path):
                raise
            raise DataError(f"{path}: --dedup-against folder is neither a shard folder (no {MANIFEST}) nor a "
                            f"BLINK hub folder ({exc})") from None
        for s in iter_parquet(files, task="dedup"):
            for i, im in enumerate(s["images"]):
                hashes.add(pixel_hash(encode_image(im, f"{s['_where']}:image {i}")[2]))
        log.info("dedup: %d distinct test images in %d parquet file(s) of %s", len(hashes), len(files), path)
        return hashes
    if is_shards:
        import tarfile

        if os.path.isdir(path):
            m = read_manifest(path)
            tars = [os.path.join(path, s["name"]) for sp in m["splits"].values() for s in sp["shards"]]
            if not tars:
                raise DataError(f"{path}: no shards listed in {MANIFEST}")
        else:
            tars = [path]
        for t in tars:
            with tarfile.open(t, "r:") as tf:
                for ti in tf:
                    base = os.path.basename(ti.name)
                    ext = base.split(".", 1)[1] if "." in base else ""
                    m_ = IMAGE_MEMBER_RE.match(ext.lower())
                    if ti.isreg() and m_:
                        data = tf.extractfile(ti).read()
                        hashes.add(pixel_hash(decode_image(data, m_.group(2), f"{t}:{ti.name}")))
    else:
        if not os.path.isfile(path):
            raise DataError(f"{path}: --dedup-against not found")
        for s in iter_jsonl(path, image_root):
            for i, im in enumerate(s["images"]):
                hashes.add(pixel_hash(encode_image(im, f"{s['_where']}:image {i}")[2]))
    log.info("dedup: %d distinct test images in %s", len(hashes), path)
    return hashes


def convert(samples: Callable[[], Iterable[dict]], keys: list[str], out_dir: str, *, split: str = "train",
            shard_size: int = 256, val_fraction: float = 0.0, seed: int = 0,
            dedup_against: str | list[str] | None = None, dedup_image_root: str | None = None,
            source: dict | None = None, revision: str | None = None, progress: bool = True) -> dict:
    """Stream sample dicts once into ``split`` (+ "val" when val_fraction > 0); returns the manifest.
    ``source`` and ``revision`` go to the manifest's top level (evaluation copies both into its
    results' provenance) and ``source`` also to ``build``. ``dedup_against``: one test set or a
    list of them (see ``pixel_hashes_of``)."""
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise DataError(f"duplicate keys in the input: {dup}")
    val_keys = choose_val(keys, val_fraction, seed) if val_fraction > 0 else set()
    against = [dedup_against] if isinstance(dedup_against, str) else list(dedup_against or [])
    test_hashes: set[str] = set()
    for a in against:
        test_hashes |= pixel_hashes_of(a, dedup_image_root)
    writers = {split: SplitWriter(out_dir, split, shard_size)}
    if val_keys:
        writers["val"] = SplitWriter(out_dir, "val", shard_size)
    removed: dict[str, list[str]] = {name: [] for name in writers}
    try:
        for sample in tqdm(samples(), total=len(keys), desc=f"writing {out_dir}", unit="sample", disable=not progress):
            where = sample.pop("_where", "sample")
            key, record, encoded, decoded = prepare_sample(sample, where)
            target = "val" if key in val_keys else split
            if test_hashes and any(pixel_hash(im) in test_hashes for im in decoded):
                removed[target].append(key)
                continue
            writers[target].write(key, record, encoded)
    finally:
        entries = {name: w.close() for name, w in writers.items()}
    manifest = read_manifest(out_dir)
    manifest["format"] = FORMAT
    for name, entry in entries.items():
        entry["dedup_removed"] = len(removed[name])
        manifest["splits"][name] = entry
    manifest["build"] = {"source": source or {}, "seed": seed, "val_fraction": val_fraction, "shard_size": shard_size}
    manifest["source"] = source or {}
    manifest["revision"] = revision
    if against:
        manifest["dedup"] = {
            "against": os.path.abspath(against[0]) if len(against) == 1 else [os.path.abspath(a) for a in against],
            "test_images": len(test_hashes),
            "method": "sha256 of RGB pixels",
            "removed": {k: len(v) for k, v in removed.items()},
            "removed_keys": {k: v[:1000] for k, v in removed.items()},
        }
        n = sum(len(v) for v in removed.values())
        log.info("dedup: removed %d samples whose images appear in %s", n, ", ".join(against))
    write_manifest(out_dir, manifest)
    for name, entry in entries.items():
        log.info("wrote %d %s samples in %d shards to %s", entry["total"], name, len(entry["shards"]), out_dir)
    return manifest


def convert_jsonl(jsonl: str, image_root: str | None, out_dir: str, **opts) -> dict:
    """JSONL manifest + image root -> shards (options as in `convert`)."""
    if not os.path.isfile(jsonl):
        raise DataError(f"{jsonl}: JSONL file not found")
    return convert(lambda: iter_jsonl(jsonl, image_root), _jsonl_keys(jsonl), out_dir,
                   source={"jsonl": os.path.abspath(jsonl)}, **opts)


def convert_parquet(paths: list[str] | str, out_dir: str, task: str | None = None, *, parquet_split: str = "val",
                    revision: str | None = None, **opts) -> dict:
    """BLINK-style parquet -> shards (options as in `convert`). ``paths``: parquet files, glob
    patterns and/or BLINK hub folders, of which ``parquet_split`` ("val" or "test") picks
    ``<Sub_Task>/<parquet_split>-*.parquet``. The files' sha256 sums and the dataset revision
    (``revision``, else the hub copy's git/hub-cache commit when there is one) go to the manifest."""
    from .blink import parquet_provenance, resolve_parquet

    if parquet_split not in ("val", "test"):
        raise DataError(f"parquet_split must be 'val' or 'test', got {parquet_split!r}")
    files, folders = resolve_parquet(paths, splits=(parquet_split,))
    prov = parquet_provenance(files, folders, split=parquet_split, revision=revision)

    def samples():
        for s in iter_parquet(files, task):
            if str(s["answer"]).strip().lower() == "hidden":
                raise DataError(f"{s['_where']}: answer is 'hidden' (BLINK's test split keeps its answers on "
                                "EvalAI); convert --parquet-split val, the split the paper reports")
            yield s

    return convert(samples, _parquet_keys(files), out_dir, source=prov["source"], revision=prov["revision"], **opts)


def verify_shards(out_dir: str) -> list[str]:
    """Re-hash every shard listed in the manifest and recount its samples; returns problems."""
    import tarfile

    problems = []
    m = read_manifest(out_dir)
    if not m["splits"]:
        return [f"{out_dir}: no {MANIFEST} or no splits in it"]
    for split, entry in sorted(m["splits"].items()):
        for s in entry["shards"]:
            path = os.path.join(out_dir, s["name"])
            if not os.path.isfile(path):
                problems.append(f"{path}: missing")
                continue
            if "sha256" in s and sha256_file(path) != s["sha256"]:
                problems.append(f"{path}: sha256 differs from {MANIFEST}")
            try:
                with tarfile.open(path, "r:") as tf:
                    keys = []
                    for ti in tf:
                        base = os.path.basename(ti.name)
                        if "." in base and DECLARED_MEMBER_RE.match(base.split(".", 1)[1].lower()):
                            k = ti.name[: len(ti.name) - len(base)] + base.split(".", 1)[0]
                            if not keys or keys[-1] != k:
                                keys.append(k)
                if len(keys) != s["count"]:
                    problems.append(f"{path}: {len(keys)} samples, {MANIFEST} says {s['count']}")
            except tarfile.TarError as exc:
                problems.append(f"{path}: unreadable tar ({exc})")
    return problems
