"""Conversions: user inputs (inputs.py) -> shards, with a validation split and test-set
de-duplication; and ``verify_shards``, which checks a shard folder against its manifest.

    convert_jsonl(jsonl, image_root, out_dir, ...)              JSONL manifest + image folder
    convert_parquet(paths, out_dir, ...)                        BLINK parquet: files, globs, the hub folder
    verify_shards(out_dir) -> list of problems                  sha256 + sample counts + member extents

``val_fraction`` moves a deterministic subset (a function of seed and key, exact size
round(fraction * N)) to split "val". ``dedup_against`` drops train/val samples that have an image
whose decoded RGB pixels equal an image of the given test set (JSONL, parquet files / glob / BLINK
hub folder, or a shard directory); the number removed and their keys are recorded in the manifest.

A conversion writes into a temporary folder beside ``out_dir`` and swaps it in only when every
split is complete: a failed or interrupted re-run leaves the previous shards as they were.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from typing import Callable, Iterable

from tqdm import tqdm

from .blink import parquet_provenance, resolve_parquet
from .images import decode_image, encode_image, pixel_hash
from .index import scan_shard
from .inputs import iter_jsonl, iter_parquet, jsonl_keys, parquet_keys
from .manifest import FORMAT, MANIFEST, read_manifest, sha256_file, write_manifest
from .schema import IMAGE_MEMBER_RE, DataError
from .writer import SplitWriter, prepare_sample

log = logging.getLogger(__name__)


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
        if os.path.isdir(path):
            m = read_manifest(path)
            tars = [os.path.join(path, s["name"]) for sp in m["splits"].values() for s in sp["shards"]]
            if not tars:
                raise DataError(f"{path}: no shards listed in {MANIFEST}")
        else:
            tars = [path]
        for t in tars:
            size = os.path.getsize(t)
            try:
                with tarfile.open(t, "r:") as tf:
                    for ti in tf:
                        base = os.path.basename(ti.name)
                        ext = base.split(".", 1)[1] if "." in base else ""
                        m_ = IMAGE_MEMBER_RE.match(ext.lower())
                        if ti.isreg() and m_:
                            if ti.offset_data + ti.size > size:
                                raise DataError(f"{t}:{ti.name}: member claims {ti.size} bytes, past the end of "
                                                f"the {size}-byte shard")
                            data = tf.extractfile(ti).read()
                            hashes.add(pixel_hash(decode_image(data, m_.group(2), f"{t}:{ti.name}")))
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise DataError(f"{t}: --dedup-against shard is not a readable tar ({exc})") from None
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
    except BaseException:  # nothing swapped in: the folder keeps its previous shards
        for w in writers.values():
            w.abort()
        raise
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
    return convert(lambda: iter_jsonl(jsonl, image_root), jsonl_keys(jsonl), out_dir,
                   source={"jsonl": os.path.abspath(jsonl)}, **opts)


def convert_parquet(paths: list[str] | str, out_dir: str, task: str | None = None, *, parquet_split: str = "val",
                    revision: str | None = None, **opts) -> dict:
    """BLINK-style parquet -> shards (options as in `convert`). ``paths``: parquet files, glob
    patterns and/or BLINK hub folders, of which ``parquet_split`` ("val" or "test") picks
    ``<Sub_Task>/<parquet_split>-*.parquet``. The files' sha256 sums and the dataset revision
    (``revision``, else the hub copy's git/hub-cache commit when there is one) go to the manifest."""
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

    return convert(samples, parquet_keys(files), out_dir, source=prov["source"], revision=prov["revision"], **opts)


def verify_shards(out_dir: str) -> list[str]:
    """Re-hash every shard listed in the manifest and recount its samples from the tar headers
    (index.py's header pass: the reader's grouping, member extents checked against the file
    size); returns the problems, one line each, naming the shard."""
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
                index, _ = scan_shard(path)
            except (DataError, OSError) as exc:
                problems.append(f"{path}: unreadable tar ({exc})")
                continue
            if index.error:
                problems.append(f"{path}: damaged tar after sample {len(index)} ({index.error})")
            if len(index) != s["count"]:
                problems.append(f"{path}: {len(index)} samples, {MANIFEST} says {s['count']}")
    return problems
