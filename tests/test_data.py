"""Shards end to end on the real webdataset library: writer, reader, demo tasks, bad input, CLI."""

import argparse
import io
import json
import logging
import os
import pickle
import tarfile
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from livr_ds.data import index as index_mod
from livr_ds.data import reader as reader_mod
from livr_ds.data.cli import add_shards_commands
from livr_ds.data.demo import TASKS, make_demo
from livr_ds.data.loader import LivrLoader
from livr_ds.data.schema import DataError, validate_record
from livr_ds.data.convert import convert_jsonl, convert_parquet, verify_shards
from livr_ds.data.manifest import read_manifest
from livr_ds.data.sources import ShardSource
from livr_ds.data.writer import write_shards

pytestmark = pytest.mark.timeout(120)


# ---- helpers --------------------------------------------------------------------------------
def _img(seed: int, size=(12, 10)) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _enc(im: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _sample(i: int, task="t", n_images=1, size=(12, 10)) -> dict:
    return {"key": f"s{i:04d}", "task": task, "question": f"q{i}?", "choices": ["x", "y"],
            "answer": "AB"[i % 2], "images": [_enc(_img(1000 * i + j, size)) for j in range(n_images)]}


def _dataset(tmp_path, n: int, n_shards: int, name="ds", task="t", size=(12, 10)) -> str:
    out = str(tmp_path / name)
    per = -(-n // n_shards)
    write_shards([_sample(i, task, size=size) for i in range(n)], out, "train", shard_size=per, progress=False)
    assert len(read_manifest(out)["splits"]["train"]["shards"]) == n_shards
    return out


def _keys(batches) -> list[list[str]]:
    return [[s.key for s in b] for b in batches]


def _run(loader) -> list[list]:
    return [list(b) for b in loader]


def _member_bytes(d: str) -> dict[str, tuple[int, int]]:
    """Per key, from python's tarfile: (bytes from its first member's header to its last member's
    data end, sum of its members' header + data bytes)."""
    out: dict[str, list[int]] = {}
    for name in sorted(os.listdir(d)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(d, name)) as tf:
                for ti in tf:
                    key = ti.name.split(".", 1)[0]
                    first, _, hd = out.get(key, (ti.offset, 0, 0))
                    out[key] = [first, ti.offset_data + ti.size, hd + ti.offset_data - ti.offset + ti.size]
    return {k: (end - first, hd) for k, (first, end, hd) in out.items()}


def _raw_tar(path: str, samples: list[dict]) -> None:
    """Write members exactly as given (no validation), like a foreign or damaged producer."""
    with wds.TarWriter(path, encoder=False, mtime=0) as tw:
        for s in samples:
            tw.write(s)


def _good_raw(key: str, seed=0, **record) -> dict:
    rec = {"task": "t", "question": "q?", "choices": ["x", "y"], "answer": "A", **record}
    return {"__key__": key, "json": json.dumps(rec).encode(), "0.png": _enc(_img(seed))}


def _manifest_for(path_dir: str, names_counts: list[tuple[str, int]]) -> None:
    with open(os.path.join(path_dir, "manifest.json"), "w") as f:
        json.dump({"splits": {"train": {"shards": [{"name": n, "count": c} for n, c in names_counts]}}}, f)


# ---- writer: JSONL and parquet round trips --------------------------------------------------
def test_jsonl_roundtrip_fields_pixels_and_val_split(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    lines, originals = [], {}
    for i in range(5):
        names = []
        for j in range(1 + i % 2):
            im = _img(10 * i + j, size=(16, 12))
            fmt, ext = ("JPEG", "jpg") if j == 0 and i % 3 == 0 else ("PNG", "png")
            data = _enc(im, fmt)
            (root / f"{i}_{j}.{ext}").write_bytes(data)
            names.append(f"{i}_{j}.{ext}")
            originals[(f"k{i}", j)] = data
        mc = i != 4
        lines.append({"key": f"k{i}", "task": "count" if not mc else "mc", "question": f"Q{i}",
                      "choices": ["a", "b", "c"] if mc else [], "answer": ["(B)", "c", "A", "(C)", "3"][i],
                      "images": names, "meta": {"i": i}})
    jl = tmp_path / "m.jsonl"
    jl.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    m = convert_jsonl(str(jl), str(root), str(tmp_path / "out"), val_fraction=0.4, seed=3, shard_size=2,
                      progress=False)
    assert m["splits"]["train"]["total"] == 3 and m["splits"]["val"]["total"] == 2
    assert verify_shards(str(tmp_path / "out")) == []
    m2 = convert_jsonl(str(jl), str(root), str(tmp_path / "out2"), val_fraction=0.4, seed=3, progress=False)
    assert m2["splits"]["val"]["total"] == 2  # same seed -> same split (checked on keys below)

    got = {}
    for split in ("train", "val"):
        for b in LivrLoader(ShardSource(str(tmp_path / "out"), split=split), batch_size=1, shuffle=False):
            got[b[0].key] = (split, b[0])
    assert sorted(got) == [f"k{i}" for i in range(5)]
    val2 = {b[0].key for b in LivrLoader(ShardSource(str(tmp_path / "out2"), split="val"), batch_size=1)}
    assert val2 == {k for k, (sp, _) in got.items() if sp == "val"}
    for i, line in enumerate(lines):
        s = got[f"k{i}"][1]
        assert (s.task, s.question, s.choices, s.meta) == (line["task"], line["question"], line["choices"], {"i": i})
        assert s.answer == ["B", "C", "A", "C", "3"][i]
        assert len(s.images) == len(line["images"])
        for j, im in enumerate(s.images):
            ref = Image.open(io.BytesIO(originals[(f"k{i}", j)])).convert("RGB")
            assert np.array_equal(np.asarray(im), np.asarray(ref))
    # original encoded bytes are stored unchanged (no re-encode of JPEG/PNG)
    blob = b"".join((tmp_path / "out" / s["name"]).read_bytes() for sp in m["splits"].values() for s in sp["shards"])
    assert all(data in blob for data in originals.values())


def test_blink_parquet_structs_and_raw_bytes(tmp_path):
    ims = [_img(i) for i in range(5)]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    t1 = pa.table({
        "idx": ["val_Counting_1", "val_Jigsaw_2"],
        "question": ["How many?", "Which patch?"],
        "choices": [["1", "2", "3"], ["first", "second"]],
        "answer": ["(C)", "(B)"],
        "sub_task": ["Counting", "Jigsaw"],
        "prompt": ["How many?\n(A) 1\n(B) 2\n(C) 3", "Which patch?\n(A) first\n(B) second"],
        "image_1": pa.array([{"bytes": _enc(ims[0]), "path": "a.png"}, {"bytes": _enc(ims[1]), "path": "b.png"}],
                            type=struct),
        "image_2": pa.array([None, {"bytes": _enc(ims[2], "JPEG"), "path": "c.jpg"}], type=struct),
        "image_3": pa.array([None, {"bytes": _enc(ims[3]), "path": "d.png"}], type=struct),
        "image_4": pa.array([None, None], type=struct),
    })
    t2 = pa.table({  # raw binary image columns, no idx column
        "question": ["Odd one?"], "choices": [["x", "y"]], "answer": ["A"], "sub_task": ["Art_Style"],
        "image_1": pa.array([_enc(ims[4])], type=pa.binary()), "image_2": pa.array([None], type=pa.binary()),
    })
    pq.write_table(t1, tmp_path / "blink.parquet")
    pq.write_table(t2, tmp_path / "raw.parquet")
    m = convert_parquet([str(tmp_path / "blink.parquet"), str(tmp_path / "raw.parquet")], str(tmp_path / "out"),
                        split="test", progress=False)
    assert m["splits"]["test"]["tasks"] == {"art_style": 1, "counting": 1, "jigsaw": 1}
    got = {s.key: s for b in LivrLoader(ShardSource(str(tmp_path / "out"), split="test"), batch_size=3) for s in b}
    assert set(got) == {"val_Counting_1", "val_Jigsaw_2", "raw-000000"}
    c, j, r = got["val_Counting_1"], got["val_Jigsaw_2"], got["raw-000000"]
    assert (c.task, c.answer, c.choices, len(c.images)) == ("counting", "C", ["1", "2", "3"], 1)
    assert c.meta["prompt"].endswith("(C) 3") and c.meta["sub_task"] == "Counting"
    assert (j.answer, len(j.images)) == ("B", 3)
    assert np.array_equal(np.asarray(j.images[2]), np.asarray(ims[3]))
    assert (r.task, r.answer, len(r.images)) == ("art_style", "A", 1)
    assert np.array_equal(np.asarray(r.images[0]), np.asarray(ims[4]))


def test_dedup_removes_identical_pixels_even_reencoded(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(4):
        _img(i).save(root / f"tr{i}.png")
    _img(2).save(root / "te0.png", compress_level=0)  # same pixels as tr2, different bytes
    _img(99).save(root / "te1.png")
    assert (root / "te0.png").read_bytes() != (root / "tr2.png").read_bytes()
    rec = {"task": "t", "question": "q", "choices": ["a", "b"], "answer": "A"}
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({**rec, "key": f"k{i}", "images": [f"tr{i}.png"]}) + "\n"
                                                  for i in range(4)))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({**rec, "images": [f"te{i}.png"]}) + "\n"
                                                 for i in range(2)))
    m = convert_jsonl(str(tmp_path / "train.jsonl"), str(root), str(tmp_path / "out"),
                      dedup_against=str(tmp_path / "test.jsonl"), dedup_image_root=str(root), progress=False)
    assert m["dedup"]["removed"] == {"train": 1} and m["dedup"]["removed_keys"]["train"] == ["k2"]
    assert m["splits"]["train"]["total"] == 3 and m["splits"]["train"]["dedup_removed"] == 1
    keys = {s.key for b in LivrLoader(str(tmp_path / "out"), batch_size=1) for s in b}
    assert keys == {"k0", "k1", "k3"}


def test_writer_rejects_bad_records(tmp_path):
    _img(0).save(tmp_path / "a.png")
    rec = {"task": "t", "question": "q", "choices": ["a", "b"], "images": ["a.png"]}
    cases = [({**rec, "answer": "C"}, "not among the 2 choices"), ({**rec, "answer": "A", "images": ["zz.png"]},
             "not found"), ({**rec, "answer": "A", "images": []}, "no images"),
             ({k: v for k, v in rec.items() if k != "question"} | {"answer": "A"}, "missing field 'question'")]
    for i, (line, msg) in enumerate(cases):
        jl = tmp_path / f"bad{i}.jsonl"
        jl.write_text(json.dumps(line) + "\n")
        with pytest.raises(DataError, match=msg) as e:
            convert_jsonl(str(jl), str(tmp_path), str(tmp_path / f"o{i}"), progress=False)
        assert f"bad{i}.jsonl:1" in str(e.value)
    assert validate_record({"task": "t", "question": "q", "choices": ["a"], "answer": "(a)"}, "w")["answer"] == "A"


# ---- reader: coverage, equal batches, order --------------------------------------------------
@pytest.mark.parametrize("n_shards", [1, 3, 4, 7])
def test_rank_worker_coverage_equal_batches(tmp_path, n_shards):
    n, world, bs = 21, 2, 3
    d = _dataset(tmp_path, n, n_shards)
    per_rank, lens = [], []
    for rank in range(world):
        loader = LivrLoader(d, rank=rank, world_size=world, batch_size=bs, num_workers=2, seed=5, timeout=60)
        batches = _run(loader)
        assert len(batches) == len(loader) == 4 and all(len(b) == bs for b in batches)
        lens.append(len(batches))
        per_rank.append(batches)
        assert loader.stats["pad"] == loader.num_padded and loader.stats["samples"] == sum(
            not s.is_pad for b in batches for s in b)
    assert lens[0] == lens[1]
    flat = [s for batches in per_rank for b in batches for s in b]
    real = Counter(s.key for s in flat if not s.is_pad)
    assert real == Counter({f"s{i:04d}": 1 for i in range(n)})
    pads = [s for s in flat if s.is_pad]
    assert len(pads) == world * bs * 4 - n == 3
    # the global order does not depend on world size or workers: rank slices of each global
    # batch, concatenated, equal the 1-rank order with the same global batch
    glob = [s.key for step in zip(*per_rank) for b in step for s in b]
    one = [s.key for b in LivrLoader(d, rank=0, world_size=1, batch_size=world * bs, num_workers=0, seed=5)
           for s in b]
    assert glob == one


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_one_shard_sixteen_ranks_four_workers(tmp_path, caplog):
    d = _dataset(tmp_path, 5, 1)
    caplog.set_level(logging.WARNING)
    seen, lens = [], set()
    for rank in range(16):
        loader = LivrLoader(d, rank=rank, world_size=16, batch_size=1, num_workers=0, seed=0)
        batches = _run(loader)
        lens.add(len(batches))
        seen += [s for b in batches for s in b]
    assert lens == {1}
    assert sorted(s.key for s in seen if not s.is_pad) == [f"s{i:04d}" for i in range(5)]
    assert sum(s.is_pad for s in seen) == 11
    assert "16 ranks > 5 samples" in caplog.text
    for rank in (0, 15):  # real worker processes: 3 of 4 workers have nothing to do
        loader = LivrLoader(d, rank=rank, world_size=16, batch_size=1, num_workers=4, seed=0, timeout=60)
        batches = _run(loader)
        assert len(batches) == 1 and batches[0][0].is_pad == (rank >= 5)


def test_epoch_orders_pure_function_of_seed_and_epoch(tmp_path):
    d = _dataset(tmp_path, 24, 3)

    def order(seed, epoch, nw=0):
        loader = LivrLoader(d, batch_size=4, num_workers=nw, seed=seed, shuffle_block=8)
        loader.set_epoch(epoch)
        return [k for b in _keys(loader) for k in b]

    e0, e1 = order(0, 0), order(0, 1)
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert order(0, 1) == e1 and order(0, 1, nw=2) == e1 and order(1, 1) != e1
    loader = LivrLoader(d, batch_size=4, shuffle=False)
    assert [k for b in _keys(loader) for k in b] == [f"s{i:04d}" for i in range(24)]
    assert loader.state_dict()["epoch"] == 1  # a finished epoch moves on


def test_resume_mid_epoch_exact_and_skips_without_decoding(tmp_path, monkeypatch):
    d = _dataset(tmp_path, 30, 3)
    kw = dict(rank=1, world_size=2, batch_size=2, seed=7)
    full = _keys(LivrLoader(d, num_workers=2, **kw))
    assert len(full) == 8
    loader = LivrLoader(d, num_workers=2, **kw)
    it = iter(loader)
    head = [[s.key for s in next(it)] for _ in range(3)]  # workers have prefetched further
    state = loader.state_dict()
    it.close()
    assert state["batches_consumed"] == 3 and head == full[:3]
    assert _keys(LivrLoader(d, num_workers=2, state=state, **kw)) == full[3:]

    decoded = []
    real_decode = reader_mod.decode_image
    monkeypatch.setattr(reader_mod, "decode_image", lambda *a: decoded.append(a[2]) or real_decode(*a))
    resumed = LivrLoader(d, num_workers=0, **kw)  # another worker count: same order
    resumed.load_state_dict(state)
    assert _keys(resumed) == full[3:]
    assert len(decoded) == 5 * 2  # only the 5 remaining batches x 2 samples x 1 image were decoded
    spans = _member_bytes(d)  # ... and only their bytes were read
    assert resumed.stats["bytes_read"] == sum(spans[k][0] for b in full[3:] for k in b)

    # another world size with the same global batch continues with exactly the unseen samples
    g = [_keys(LivrLoader(d, rank=r, world_size=2, batch_size=2, seed=7)) for r in range(2)]
    remaining = [k for step in zip(*g) for b in step for k in b][3 * 4:]
    one = LivrLoader(d, rank=0, world_size=1, batch_size=4, seed=7, state=state)
    assert [k for b in _keys(one) for k in b] == remaining
    with pytest.raises(DataError, match="not a multiple of the new global batch"):
        LivrLoader(d, rank=0, world_size=1, batch_size=5, seed=7, state=state)
    with pytest.raises(DataError, match="fingerprint"):
        LivrLoader(d, seed=8, state=state)


def test_weighted_mixing_of_two_sources(tmp_path):
    a = _dataset(tmp_path, 6, 2, name="a", task="ta")
    b = _dataset(tmp_path, 10, 2, name="b", task="tb")
    loader = LivrLoader([ShardSource(a, weight=2.0), (b, 0.5)], batch_size=1, seed=0, shuffle_block=64)
    orders = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        samples = [s for batch in loader for s in batch]
        assert len(samples) == len(loader) == 6 * 2 + 5
        ca = Counter(s.key for s in samples if s.task == "ta")
        cb = Counter(s.key for s in samples if s.task == "tb")
        assert ca == Counter({f"s{i:04d}": 2 for i in range(6)})
        assert len(cb) == 5 and set(cb.values()) == {1}
        orders.append(sorted(cb))
    assert orders[0] != orders[1]  # a different half of b each epoch


def test_drop_last_and_zero_samples(tmp_path):
    d = _dataset(tmp_path, 7, 2)
    loader = LivrLoader(d, rank=1, world_size=2, batch_size=2, drop_last=True)
    batches = _run(loader)
    assert len(batches) == 1 and not any(s.is_pad for b in batches for s in b)
    assert loader.layout.num_dropped == 3
    with pytest.raises(DataError, match="drop_last"):
        LivrLoader(d, world_size=4, batch_size=2, drop_last=True)
    write_shards([], str(tmp_path / "empty"), "train", progress=False)
    with pytest.raises(DataError, match="no samples"):
        LivrLoader(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"no shards match .*nowhere-\{00000\.\.00003\}\.tar"):
        LivrLoader(str(tmp_path / "nowhere-{00000..00003}.tar"))


def test_brace_pattern_without_manifest_scans_counts(tmp_path, caplog, monkeypatch):
    for i in range(2):
        _raw_tar(str(tmp_path / f"p-{i:05d}.tar"), [_good_raw(f"k{i}_{j}", seed=j) for j in range(3 + i)])
    scans = []
    real_scan = index_mod.scan_shard
    monkeypatch.setattr(index_mod, "scan_shard", lambda url, *a: scans.append(url) or real_scan(url, *a))
    caplog.set_level(logging.INFO)
    loader = LivrLoader(str(tmp_path / "p-{00000..00001}.tar"), batch_size=2)
    assert loader.num_samples == 7 and "indexing 2 of 2 shard(s)" in caplog.text
    assert sorted(s.key for b in loader for s in b if not s.is_pad) == sorted(
        [f"k0_{j}" for j in range(3)] + [f"k1_{j}" for j in range(4)])
    assert len(scans) == 2  # the count's header pass is the reads' index


# ---- indexed reads: bytes, index files, cache ------------------------------------------------
@pytest.mark.timeout(60)
def test_indexed_reads_read_only_own_samples_same_as_stream(tmp_path):
    d = _dataset(tmp_path, 56, 7, size=(40, 40))
    spans = _member_bytes(d)
    read = {"indexed": 0, "stream": 0}
    own = hd = 0
    for rank in range(4):
        kw = dict(rank=rank, world_size=4, batch_size=2, num_workers=2, seed=3, shuffle_block=16, timeout=60)
        got = {}
        for mode in ("indexed", "stream"):
            loader = LivrLoader(d, **kw)
            loader._read_mode = mode
            got[mode] = _run(loader)
            read[mode] += loader.stats["bytes_read"]
        assert _keys(got["indexed"]) == _keys(got["stream"])  # same samples, same batches, same rank
        for a, b in zip((s for bt in got["indexed"] for s in bt), (s for bt in got["stream"] for s in bt)):
            assert (a.question, a.answer, a.meta) == (b.question, b.answer, b.meta)
            assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
        keys = [s.key for b in got["indexed"] for s in b]
        own += sum(spans[k][0] for k in keys)
        hd += sum(spans[k][1] for k in keys)
    assert read["indexed"] == own  # exactly the decoded samples' byte ranges, nothing else
    assert hd <= read["indexed"] <= 1.1 * hd  # their headers + data (+ < 512 B padding between members)
    assert read["stream"] > 3 * read["indexed"]  # 8 readers each streaming most shards


def test_old_shards_without_index_one_header_pass_cached(tmp_path, caplog, monkeypatch):
    d = _dataset(tmp_path, 20, 4, size=(24, 24))
    kw = dict(rank=1, world_size=2, batch_size=2, seed=1)
    ref = LivrLoader(d, **kw)  # the writer's indexes
    ref_keys = _keys(ref)
    idx_files = sorted(f for f in os.listdir(d) if f.endswith(".idx.json"))
    assert idx_files == [f"train-{i:05d}.tar.idx.json" for i in range(4)]
    with open(os.path.join(d, idx_files[0])) as f:
        j = json.load(f)
    assert j["format"] == "livr-ds-index/1" and [s[0] for s in j["samples"]] == [f"s{i:04d}" for i in range(5)]

    scans = []
    real_scan = index_mod.scan_shard
    monkeypatch.setattr(index_mod, "scan_shard",
                        lambda url, *a: (lambda r: scans.append((url, r[1])) or r)(real_scan(url, *a)))
    caplog.set_level(logging.INFO)

    def fresh(**extra):  # a new process: nothing in memory
        index_mod._MEMO.clear()
        loader = LivrLoader(d, **kw, **extra)
        assert _keys(loader) == ref_keys and loader.stats["bytes_read"] == ref.stats["bytes_read"]

    for f in idx_files:  # shards written before indexes existed
        os.remove(os.path.join(d, f))
    fresh()
    assert len(scans) == 4 and caplog.text.count("indexing 4 of 4 shards") == 1
    for url, nread in scans:  # header-only: one 512-byte header (+1 byte) per member, no member data
        with tarfile.open(url) as tf:
            assert nread <= 513 * len(tf.getmembers()) + 1024 < os.path.getsize(url) / 2
    assert sorted(f for f in os.listdir(d) if f.endswith(".idx.json")) == idx_files  # cached beside
    fresh()
    assert len(scans) == 4  # the cache is used

    # a read-only shard folder: the cache dir, keyed by shard path + size + mtime
    for f in idx_files:
        os.remove(os.path.join(d, f))
    monkeypatch.setattr(index_mod, "_dir_writable", lambda _: False)
    cache = tmp_path / "cache"
    fresh(index_cache=str(cache))
    assert len(scans) == 8 and len(os.listdir(cache)) == 4
    fresh(index_cache=str(cache))
    assert len(scans) == 8
    os.utime(os.path.join(d, "train-00000.tar"))  # a touched shard is re-indexed
    fresh(index_cache=str(cache))
    assert len(scans) == 9


@pytest.mark.parametrize("private_cache", [False, True], ids=["shared-cache", "node-local-cache"])
def test_missing_indexes_are_built_split_across_ranks(tmp_path, private_cache):
    """Two real ranks (torchrun, gloo) open 5 shards without indexes through index_shards, as the
    trainer does: with a shared cache each shard is indexed exactly once, by one rank, the ranks
    sharing the work; when neither can see the other's results each builds what it is missing.
    Either way every rank reads exactly the samples and bytes of a loader given the indexes."""
    import subprocess
    import sys

    d = _dataset(tmp_path, 20, 5, size=(24, 24))
    refs = []
    for r in range(2):
        index_mod._MEMO.clear()
        ref = LivrLoader(d, rank=r, world_size=2, batch_size=2, seed=3)  # the writer's indexes
        refs.append(([s.key for b in ref for s in b], ref.stats["bytes_read"]))
    for f in os.listdir(d):
        if f.endswith(".idx.json"):
            os.remove(os.path.join(d, f))
    out = tmp_path / "out"
    out.mkdir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    probe = os.path.join(root, "tests", "index_share_probe.py")
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(29700 + os.getpid() % 200), probe, d, str(out)]
    r = subprocess.run(argv + (["--private-cache"] if private_cache else []), capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    shards = [f"train-{i:05d}.tar" for i in range(5)]
    if private_cache:
        assert [sorted(x["built"]) for x in ranks] == [shards, shards]
        assert "built by other ranks were not visible here" in r.stderr
    else:
        assert sorted(ranks[0]["built"] + ranks[1]["built"]) == shards  # each exactly once
        assert [sorted(x["built"]) for x in ranks] == [shards[0::2], shards[1::2]]
        assert sorted(os.listdir(d)) == sorted(shards + [f + ".idx.json" for f in shards] + ["manifest.json"])
    for x, (keys, nbytes) in zip(ranks, refs):
        assert x["keys"] == keys and x["bytes_read"] == nbytes


def test_tar_cut_inside_a_member_keeps_complete_samples(tmp_path):
    d = _dataset(tmp_path, 12, 2, size=(24, 24))  # shard 1: s0006 .. s0011
    shard = os.path.join(d, "train-00001.tar")
    with tarfile.open(shard) as tf:
        ti = tf.getmember("s0009.0.png")
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(data[: ti.offset_data + ti.size // 2])  # inside s0009's image
    loader = LivrLoader(d, batch_size=4, shuffle=False, on_error="skip")
    got = [s for b in loader for s in b]
    assert [s.key for s in got if not s.is_pad] == [f"s{i:04d}" for i in range(9)]  # s0008 included
    assert loader.stats["bad"] == 3 and loader.stats["bad_keys"] == ["s0009", "#4", "#5"]
    with pytest.raises(DataError, match="corrupt or truncated tar") as e:
        for b in LivrLoader(d, batch_size=1, shuffle=False):
            last = b[0].key
    assert f"{shard}:s0009:" in str(e.value) and last == "s0008"

    # an index that does not match its shard is an error naming shard and key, not garbage
    idx_path = os.path.join(d, "train-00000.tar.idx.json")
    with open(idx_path) as f:
        j = json.load(f)
    j["samples"][1][1] += 512  # s0001's run now starts at its second member
    with open(idx_path, "w") as f:
        json.dump(j, f)
    index_mod._MEMO.clear()
    loader = LivrLoader(d, batch_size=4, shuffle=False, on_error="skip")
    _run(loader)
    assert "s0001" in loader.stats["bad_keys"]
    with pytest.raises(DataError, match="stale index") as e:
        _run(LivrLoader(d, batch_size=4, shuffle=False))
    assert f"{d}/train-00000.tar:s0001:" in str(e.value)


# ---- bad input -------------------------------------------------------------------------------
def _bad_set(tmp_path, kind: str) -> tuple[str, str]:
    """A 2-shard set (6 good samples + one damaged shard); returns (dir, damaged shard name)."""
    d = tmp_path / kind
    d.mkdir()
    _raw_tar(str(d / "train-00000.tar"), [_good_raw(f"g{j}", seed=j) for j in range(6)])
    bad = [_good_raw(f"b{j}", seed=10 + j) for j in range(4)]
    if kind == "truncated_image":
        bad[1]["0.png"] = bad[1]["0.png"][: len(bad[1]["0.png"]) // 2]
    elif kind == "missing_field":
        bad[1]["json"] = json.dumps({"task": "t", "choices": ["x"], "answer": "A"}).encode()
    elif kind == "deep_json":  # json.loads recurses once per level: RecursionError, not JSONDecodeError
        bad[1]["json"] = b"[" * 100_000 + b"]" * 100_000
    elif kind == "answer_not_in_choices":
        bad[1]["json"] = json.dumps({"task": "t", "question": "q", "choices": ["x", "y"], "answer": "C"}).encode()
    _raw_tar(str(d / "train-00001.tar"), bad)
    if kind == "garbage_tar":
        (d / "train-00001.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "truncated_tar":
        data = (d / "train-00001.tar").read_bytes()
        (d / "train-00001.tar").write_bytes(data[: 512 * 3 + 100])  # just after sample b0 (json padding)
    _manifest_for(str(d), [("train-00000.tar", 6), ("train-00001.tar", 4)])
    return str(d), str(d / "train-00001.tar")


@pytest.mark.parametrize("kind,key,msg", [
    ("truncated_image", "b1", "cannot decode image"),
    ("missing_field", "b1", "missing field 'question'"),
    ("answer_not_in_choices", "b1", "not among the 2 choices"),
    ("deep_json", "b1", "json member is not valid JSON \\(RecursionError"),
    ("garbage_tar", "", "corrupt or truncated tar|shard ended"),
    ("truncated_tar", "#1", "shard ended after 1 samples"),  # b0 is complete and delivered
])
def test_bad_input_raise_names_shard_and_key_skip_counts(tmp_path, kind, key, msg):
    d, shard = _bad_set(tmp_path, kind)
    with pytest.raises(DataError, match=msg) as e:
        _run(LivrLoader(d, batch_size=3, shuffle=False))
    assert f"{shard}:{key}" in str(e.value)

    n_bad = {"garbage_tar": 4, "truncated_tar": 3}.get(kind, 1)
    lens, got = [], []
    for rank in range(2):
        loader = LivrLoader(d, rank=rank, world_size=2, batch_size=1, on_error="skip", seed=1)
        batches = _run(loader)  # 10 samples: no padding, so every _replaces is a bad sample
        lens.append(len(batches))
        got += [s for b in batches for s in b]
        assert all(len(b) == 1 for b in batches) and loader.stats["bad"] == len(loader.stats["bad_keys"])
    assert lens[0] == lens[1] == len(loader) == 5
    replaced = [s for s in got if "_replaces" in s.meta]
    assert len(replaced) == n_bad and all(s.is_pad for s in replaced)
    good = {f"g{j}" for j in range(6)} | {f"b{j}" for j in range(4)}
    assert {s.key for s in got if not s.is_pad} <= good
    assert len([s for s in got if not s.is_pad]) == 10 - n_bad


def test_bad_input_raise_through_worker_processes(tmp_path):
    d, shard = _bad_set(tmp_path, "missing_field")
    with pytest.raises(DataError, match="missing field") as e:
        _run(LivrLoader(d, batch_size=2, num_workers=2, shuffle=False, timeout=60))
    assert f"{shard}:b1" in str(e.value)
    loader = LivrLoader(d, batch_size=2, num_workers=2, on_error="skip", timeout=60)
    assert len(_run(loader)) == 5 and loader.stats["bad"] == 1 and loader.stats["bad_keys"] == ["b1"]


def test_shard_shorter_than_manifest(tmp_path):
    d = tmp_path / "short"
    d.mkdir()
    _raw_tar(str(d / "train-00000.tar"), [_good_raw(f"g{j}") for j in range(3)])
    _manifest_for(str(d), [("train-00000.tar", 5)])
    with pytest.raises(DataError, match="shard ended after 3 samples"):
        _run(LivrLoader(str(d), batch_size=5, shuffle=False))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_members_are_never_unpickled(tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Exploit(str(probe))))  # the payload is live: unpickling creates the file
    assert probe.exists()
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(str(marker)))
    d = tmp_path / "evil"
    d.mkdir()
    s = _good_raw("k0", seed=3)
    s.update({"pyd": payload, "pickle": payload, "pth": payload, "0.pyd": payload})
    only_pickle = {"__key__": "evil", "pyd": payload}  # no declared member: not a sample at all
    _raw_tar(str(d / "train-00000.tar"), [s, only_pickle, _good_raw("k1", seed=4)])
    _manifest_for(str(d), [("train-00000.tar", 2)])
    (tmp_path / "nomanifest").mkdir()
    (tmp_path / "nomanifest/e-00000.tar").write_bytes((d / "train-00000.tar").read_bytes())
    for src, nw in ((str(d), 0), (str(d), 2), (str(tmp_path / "nomanifest/e-{00000..00000}.tar"), 0)):
        samples = [x for b in LivrLoader(src, batch_size=2, num_workers=nw, shuffle=False) for x in b]
        assert [x.key for x in samples] == ["k0", "k1"] and not any(x.is_pad for x in samples)
        assert np.array_equal(np.asarray(samples[0].images[0]), np.asarray(_img(3)))
    assert not marker.exists()


# ---- demo tasks -------------------------------------------------------------------------------
def test_demo_deterministic_valid_balanced(tmp_path):
    kw = dict(seed=3, n_train=12, n_val=0, n_test=6, image_size=64)
    make_demo(str(tmp_path / "a"), **kw)
    make_demo(str(tmp_path / "b"), **kw)
    make_demo(str(tmp_path / "c"), **{**kw, "seed": 4, "n_test": 0}, tasks=["counting"])
    files = sorted(os.path.relpath(os.path.join(r, f), tmp_path / "a") for r, _, fs in os.walk(tmp_path / "a")
                   for f in fs)
    assert len([f for f in files if f.endswith(".tar")]) == 8 and "manifest.json" in files
    for f in files:
        a, b = (tmp_path / "a" / f).read_bytes(), (tmp_path / "b" / f).read_bytes()
        if f.endswith(".idx.json"):  # an index records its shard file's mtime (index.py): all else equal
            a, b = ({**json.loads(x), "mtime_ns": None} for x in (a, b))
        assert a == b, f
    other_seed = (tmp_path / "c/counting/train-00000.tar").read_bytes()
    assert (tmp_path / "a/counting/train-00000.tar").read_bytes() != other_seed

    n_images = {"jigsaw": 3, "counting": 1, "localization": 1, "visual_similarity": 3}
    for task in TASKS:
        samples = [s for b in LivrLoader(ShardSource(str(tmp_path / "a" / task)), batch_size=4) for s in b]
        assert len(samples) == 12 and {s.task for s in samples} == {task}
        assert all(len(s.images) == n_images[task] and s.images[0].size == (64, 64) for s in samples)
        answers = Counter(s.answer for s in samples)
        if task == "counting":
            assert answers == Counter({str(c): 2 for c in range(1, 7)}) and all(not s.choices for s in samples)
        else:
            assert answers == Counter({"A": 6, "B": 6})
            assert all(s.question.endswith("(A) " + s.choices[0] + "\n(B) " + s.choices[1]) for s in samples)
        if task == "localization":
            for s in samples:
                cx, cy, r = s.meta["object"]
                right, wrong = s.meta["boxes"][ord(s.answer) - 65], s.meta["boxes"][66 - ord(s.answer)]
                assert right[0] <= cx - r and right[2] >= cx + r and right[1] <= cy - r and right[3] >= cy + r
                assert not (wrong[0] <= cx <= wrong[2] and wrong[1] <= cy <= wrong[3])
    mixed = LivrLoader(str(tmp_path / "a"), batch_size=8)  # top-level manifest: all tasks mixed
    assert mixed.num_samples == 48 and {s.task for b in mixed for s in b} == set(TASKS)


# ---- CLI ----------------------------------------------------------------------------------------
def _cli(argv):
    p = argparse.ArgumentParser()
    add_shards_commands(p.add_subparsers(dest="command"))
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_write_demo_verify(tmp_path, capsys):
    _img(0).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(
        {"task": "t", "question": "q", "choices": ["a", "b"], "answer": "(B)", "images": ["a.png"]}) + "\n"
        for _ in range(4)))
    _cli(["shards", "write", "--jsonl", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "o"), "--shard-size", "3",
          "--val-fraction", "0.25", "--no-progress"])
    m = read_manifest(str(tmp_path / "o"))
    assert (m["splits"]["train"]["total"], m["splits"]["val"]["total"]) == (3, 1)
    _cli(["shards", "demo", "--out", str(tmp_path / "d"), "--n-train", "2", "--n-val", "0", "--n-test", "0",
          "--tasks", "counting", "--image-size", "48", "--no-progress"])
    assert read_manifest(str(tmp_path / "d/counting"))["splits"]["train"]["total"] == 2
    assert _cli(["shards", "verify", str(tmp_path / "o")]) == 0
    (tmp_path / "o/train-00000.tar").write_bytes(b"x" * 1024)
    with pytest.raises(SystemExit):
        _cli(["shards", "verify", str(tmp_path / "o")])
    assert "sha256 differs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _cli(["shards", "write", "--jsonl", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x")])
    assert e.value.code != 0


def test_process_exits_with_an_abandoned_or_failed_worker_epoch(tmp_path):
    """Workers ignore SIGTERM (SLURM signals every process of a step; the trainer saves first),
    so multiprocessing's exit handler (SIGTERM, then join) would hang on any worker left alive."""
    import subprocess
    import sys

    from livr_ds.data.demo import make_demo

    make_demo(str(tmp_path / "d"), seed=0, n_train=8, n_val=2, n_test=2, tasks=["counting"])
    script = f"""
from livr_ds.data.loader import LivrLoader
from livr_ds.data.sources import ShardSource
loader = LivrLoader([ShardSource({str(tmp_path / 'd')!r})], 0, 1, batch_size=1, num_workers=2, seed=0)
abandoned = iter(loader); next(abandoned)
err = None
try:
    for i, b in enumerate(loader):
        if i == 2:
            raise RuntimeError("boom")
except RuntimeError as e:
    err = e  # the traceback keeps the failed epoch's generator alive until exit
print("done")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]


# ---- BLINK as it ships, image roots ---------------------------------------------------------
def test_task_names_agree_everywhere():
    from livr_ds.evaluation import table
    from livr_ds.builders.cli import TASKS as BUILD_TASKS
    from livr_ds.builders.dedup import BLINK_SUBSETS
    from livr_ds.data.tasks import BLINK_SUBTASKS, PAPER_TASKS, blink_subtask, canonical_task

    assert table.PAPER_ORDER == PAPER_TASKS and set(BUILD_TASKS) == set(PAPER_TASKS)
    assert all(BLINK_SUBTASKS[blink_subtask(t)] == t and BLINK_SUBSETS[t] == blink_subtask(t) for t in PAPER_TASKS)
    for name in ("Object_Localization", "Object Localization", "object_localization", "localization"):
        assert canonical_task(name) == "localization"
    assert canonical_task("Multi-view_Reasoning") == "multi_view_reasoning" and canonical_task("My Task") == "my_task"


def _hub(tmp_path):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from builder_fixtures import BLINK_HUB_COMMIT, blink_hub_image, make_blink_hub

    return make_blink_hub(str(tmp_path / "BLINK")), BLINK_HUB_COMMIT, blink_hub_image


def test_blink_hub_folder_val_written_as_test_with_revision(tmp_path, capsys):
    import hashlib

    hub, commit, _ = _hub(tmp_path)
    _cli(["shards", "write", "--parquet", hub, "--parquet-split", "val", "--split", "test", "--out",
          str(tmp_path / "o"), "--no-progress"])
    m = read_manifest(str(tmp_path / "o"))
    assert list(m["splits"]) == ["test"]
    assert m["splits"]["test"]["tasks"] == {"counting": 2, "jigsaw": 2, "localization": 2}
    assert m["revision"] == commit and m["source"]["revision_from"].startswith("git checkout")
    files = {f["name"]: f["sha256"] for f in m["source"]["files"]}
    assert set(files) == {f"{s}/val-00000-of-00001.parquet" for s in ("Counting", "Jigsaw", "Object_Localization")}
    for name, sha in files.items():
        assert hashlib.sha256((tmp_path / "BLINK" / name).read_bytes()).hexdigest() == sha
    got = {s.key: s for b in LivrLoader(ShardSource(str(tmp_path / "o"), split="test"), batch_size=6) for s in b}
    loc = got["val_Object_Localization_1"]
    assert (loc.task, loc.answer, loc.meta["sub_task"]) == ("localization", "A", "Object_Localization")
    assert len(got["val_Jigsaw_2"].images) == 3
    # a quoted glob picks the same files; --revision overrides what the hub copy says
    _cli(["shards", "write", "--parquet", str(tmp_path / "BLINK" / "*" / "val-*.parquet"), "--revision", "v1.1",
          "--out", str(tmp_path / "g"), "--no-progress"])
    g = read_manifest(str(tmp_path / "g"))
    assert g["revision"] == "v1.1" and g["source"]["revision_found"] == commit
    assert sorted(f["sha256"] for f in g["source"]["files"]) == sorted(files.values())
    assert g["splits"]["train"]["tasks"] == m["splits"]["test"]["tasks"]
    capsys.readouterr()
    # BLINK's test split has its answers hidden: refused with the reason, not as a bad answer
    with pytest.raises(SystemExit):
        _cli(["shards", "write", "--parquet", hub, "--parquet-split", "test", "--out", str(tmp_path / "t")])
    assert "answer is 'hidden'" in capsys.readouterr().err
    with pytest.raises(DataError, match="no <Sub_Task>/val-"):
        convert_parquet(str(tmp_path), str(tmp_path / "x"), progress=False)


def test_dedup_against_blink_hub_folder_and_glob(tmp_path):
    hub, _, hub_image = _hub(tmp_path)
    root = tmp_path / "imgs"
    root.mkdir()
    hub_image("Object_Localization", "val", 1, 0).save(root / "a.png", compress_level=0)  # a BLINK val image
    hub_image("Jigsaw", "test", 0, 2).save(root / "b.png")  # a BLINK test image
    _img(5, size=(32, 24)).save(root / "c.png")
    rec = {"task": "t", "question": "q", "choices": ["a", "b"], "answer": "A"}
    (root / "train.jsonl").write_text("".join(json.dumps({**rec, "key": k, "images": [f"{k}.png"]}) + "\n"
                                              for k in "abc"))
    m = convert_jsonl(str(root / "train.jsonl"), None, str(tmp_path / "o"), dedup_against=hub, progress=False)
    assert m["dedup"]["removed_keys"]["train"] == ["a", "b"] and m["splits"]["train"]["total"] == 1
    assert m["dedup"]["test_images"] == 2 * (1 + 3 + 1) + 1 * (1 + 3 + 1)  # val and test of all subtasks
    _cli(["shards", "write", "--jsonl", str(root / "train.jsonl"), "--out", str(tmp_path / "g"), "--no-progress",
          "--dedup-against", str(tmp_path / "BLINK" / "*" / "val-*.parquet")])
    assert read_manifest(str(tmp_path / "g"))["dedup"]["removed_keys"]["train"] == ["a"]
    with pytest.raises(DataError, match="neither a shard folder"):
        convert_jsonl(str(root / "train.jsonl"), None, str(tmp_path / "x"), dedup_against=str(root), progress=False)


def test_jsonl_images_only_inside_the_image_root(tmp_path):
    root, outside = tmp_path / "data" / "imgs", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    _img(0).save(root / "sub" / "ok.png")
    _img(1).save(outside / "secret.png")
    os.symlink(outside / "secret.png", root / "link.png")  # inside by name, outside once resolved
    rec = {"task": "t", "question": "q", "choices": ["a", "b"], "answer": "A"}
    good = json.dumps({**rec, "images": ["sub/ok.png", str(root / "sub" / "ok.png")]})
    for bad in ["../../outside/secret.png", str(outside / "secret.png"), "link.png", "/etc/passwd"]:
        jl = tmp_path / "data" / "m.jsonl"
        jl.write_text(good + "\n\n" + json.dumps({**rec, "images": ["sub/ok.png", bad]}) + "\n")
        with pytest.raises(DataError, match="outside the image root") as e:
            convert_jsonl(str(jl), str(root), str(tmp_path / "o"), progress=False)
        assert f"{jl}:3" in str(e.value) and "refused" in str(e.value)
    # without --image-root the JSONL's own folder is the root: ../ out of it is refused too
    (tmp_path / "data" / "n.jsonl").write_text(json.dumps({**rec, "images": ["../outside/secret.png"]}) + "\n")
    with pytest.raises(SystemExit):
        _cli(["shards", "write", "--jsonl", str(tmp_path / "data" / "n.jsonl"), "--out", str(tmp_path / "o")])
    (tmp_path / "data" / "n.jsonl").write_text(json.dumps({**rec, "images": ["imgs/sub/ok.png"]}) + "\n")
    _cli(["shards", "write", "--jsonl", str(tmp_path / "data" / "n.jsonl"), "--out", str(tmp_path / "n"),
          "--no-progress"])
    assert read_manifest(str(tmp_path / "n"))["splits"]["train"]["total"] == 1
    jl.write_text(good + "\n")  # relative and absolute paths inside the root still work
    assert convert_jsonl(str(jl), str(root), str(tmp_path / "o"), progress=False)["splits"]["train"]["total"] == 1


def test_blink_revision_from_hub_cache_and_local_dir(tmp_path):
    from livr_ds.data.blink import parquet_provenance, resolve_parquet

    hub, _, _ = _hub(tmp_path)
    commit = "f" * 40
    cache = tmp_path / "datasets--BLINK-Benchmark--BLINK"  # hub cache: snapshot files link into blobs/
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(commit)
    snap = cache / "snapshots" / commit / "Counting"
    snap.mkdir(parents=True)
    (cache / "blobs").mkdir()
    os.rename(os.path.join(hub, "Counting", "val-00000-of-00001.parquet"), cache / "blobs" / "b1")
    os.symlink(cache / "blobs" / "b1", snap / "val-00000-of-00001.parquet")
    files, folders = resolve_parquet([str(cache)])
    p = parquet_provenance(files, folders, split="val")
    assert p["revision"] == commit
    assert [f["name"] for f in p["source"]["files"]] == ["Counting/val-00000-of-00001.parquet"]
    # huggingface-cli download --local-dir: .cache/huggingface/download/<file>.metadata, first line = commit
    local = tmp_path / "local"
    os.makedirs(local / "Jigsaw")
    name = "val-00000-of-00001.parquet"
    os.rename(os.path.join(hub, "Jigsaw", name), local / "Jigsaw" / name)
    meta = local / ".cache" / "huggingface" / "download" / "Jigsaw"
    meta.mkdir(parents=True)
    (meta / "val-00000-of-00001.parquet.metadata").write_text(f"{'e' * 40}\netag\n1700000000.0\n")
    files, folders = resolve_parquet([str(local)])
    assert parquet_provenance(files, folders, split="val")["revision"] == "e" * 40


# ---- bad input at the edges (#24): headers that lie, replaced shards, failed re-runs ---------------
def _huge_member_tar(path: str) -> None:
    """b0 good, then b1 whose image header claims ~1e15 bytes (the size field rewritten in place)."""
    _raw_tar(path, [_good_raw("b0"), _good_raw("b1", seed=1)])
    data = bytearray(open(path, "rb").read())
    with tarfile.open(path) as tf:
        ti = [t for t in tf.getmembers() if t.name == "b1.0.png"][0]
    size_field = ti.offset + 124  # ustar: size is 12 octal digits at byte 124 of the header
    data[size_field:size_field + 12] = b"%011o\0" % 10**15
    data[ti.offset + 148:ti.offset + 156] = b" " * 8  # recompute the header checksum
    data[ti.offset + 148:ti.offset + 156] = b"%06o\0 " % sum(data[ti.offset:ti.offset + 512])
    open(path, "wb").write(bytes(data))


def test_header_claiming_1e15_bytes_is_a_named_error_skip_and_verify_problem(tmp_path, capsys):
    d = tmp_path / "huge"
    d.mkdir()
    _raw_tar(str(d / "train-00000.tar"), [_good_raw(f"g{j}", seed=10 + j) for j in range(3)])
    _huge_member_tar(str(d / "train-00001.tar"))
    _manifest_for(str(d), [("train-00000.tar", 3), ("train-00001.tar", 2)])
    with pytest.raises(DataError, match="corrupt or truncated tar|last member cut short") as e:
        _run(LivrLoader(str(d), batch_size=5, shuffle=False))  # not a MemoryError: no 1e15-byte read
    assert f"{d}/train-00001.tar:" in str(e.value)
    loader = LivrLoader(str(d), batch_size=5, shuffle=False, on_error="skip")
    (batch,) = _run(loader)
    assert [s.key for s in batch if not s.is_pad] == ["g0", "g1", "g2", "b0"]
    assert loader.stats["bad"] == 1 and loader.stats["bad_keys"] in (["b1"], ["#1"])
    with pytest.raises(SystemExit):
        _cli(["shards", "verify", str(d)])
    err = capsys.readouterr().err
    assert f"{d}/train-00001.tar: damaged tar" in err and "Traceback" not in err


def test_same_size_replaced_shard_is_refused_not_read_with_the_stale_index(tmp_path):
    d = _dataset(tmp_path, 6, 2, size=(24, 24))
    before = {s.key: np.asarray(s.images[0]) for b in _run(LivrLoader(d, batch_size=3, shuffle=False)) for s in b}
    shard = os.path.join(d, "train-00001.tar")
    data = bytearray(open(shard, "rb").read())
    with tarfile.open(shard) as tf:  # other pixels, same keys, same size: flip bytes inside one PNG's data
        ti = [t for t in tf.getmembers() if t.name.endswith(".0.png")][0]
    os.chmod(shard, 0o644)
    data[ti.offset_data + ti.size // 2] ^= 0xFF
    time.sleep(0.01)
    open(shard, "wb").write(bytes(data))
    assert os.path.getsize(shard) == len(data)
    index_mod._MEMO.clear()
    with pytest.raises(DataError, match="bytes differ from its manifest") as e:
        _run(LivrLoader(d, batch_size=3, shuffle=False))
    assert f"{shard}:<start>" in str(e.value)
    loader = LivrLoader(d, batch_size=3, shuffle=False, on_error="skip")
    got = [s for b in _run(loader) for s in b if not s.is_pad]
    assert sorted(s.key for s in got) == sorted(k for k in before if k < "s0003") and loader.stats["bad"] == 3
    # restoring the original bytes (a new mtime again) is accepted after one check
    data[ti.offset_data + ti.size // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    index_mod._MEMO.clear()
    after = {s.key: np.asarray(s.images[0]) for b in _run(LivrLoader(d, batch_size=3, shuffle=False)) for s in b}
    assert after.keys() == before.keys() and all((after[k] == before[k]).all() for k in before)


def test_failed_rerun_of_a_conversion_keeps_the_previous_shards(tmp_path):
    for i in range(4):
        _img(i).save(tmp_path / f"{i}.png")
    rows = [{"task": "t", "question": "q", "choices": ["a", "b"], "answer": "A", "images": [f"{i}.png"]}
            for i in range(4)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "o")
    convert_jsonl(str(tmp_path / "m.jsonl"), None, out, shard_size=2, progress=False)
    snapshot = {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))}
    (tmp_path / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # the re-run fails at the last sample
    with pytest.raises(DataError, match="3.png|cannot decode image"):
        convert_jsonl(str(tmp_path / "m.jsonl"), None, out, shard_size=1, progress=False)
    assert {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))} == snapshot
    assert verify_shards(out) == []


def test_images_processors_refuse_are_refused_when_writing(tmp_path):
    with pytest.raises(DataError, match=r"4000 x 10, aspect ratio 400.*refuse ratios above 200") as e:
        write_shards([{**_sample(0), "key": "thin", "images": [_enc(Image.new("RGB", (4000, 10)))]}],
                     str(tmp_path / "o"), progress=False)
    assert "thin" in str(e.value)
    assert not [f for f in os.listdir(tmp_path / "o") if f.endswith(".tar")]  # nothing half-written


def test_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    from livr_ds.data.images import open_image

    monkeypatch.setenv("LIVR_DS_MAX_IMAGE_PIXELS", str(12 * 10 - 1))
    with pytest.raises(DataError, match="12 x 10 = 120 pixels, above the limit of 119"):
        open_image(_enc(_img(0)), "x.png")


def test_a_jpeg_above_the_limit_decodes_downscaled_and_one_limit_holds(monkeypatch):
    """A JPEG over the pixel limit is decoded by libjpeg at the least reduction that fits (never
    allocated in full); PNG over it is refused; under it, pixels equal a plain PIL decode (what a
    tool serving the export sees); beyond 64 x the limit even a JPEG is refused with our message,
    not PIL's DecompressionBombError."""
    import io

    import numpy as np
    from livr_ds.data.images import decode_image

    def jpeg(w, h):
        rng = np.random.default_rng(0)
        im = Image.fromarray(rng.integers(0, 255, (h // 10 + 1, w // 10 + 1, 3), dtype=np.uint8)).resize((w, h))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    monkeypatch.setenv("LIVR_DS_MAX_IMAGE_PIXELS", "10000")
    small = jpeg(100, 90)
    assert np.array_equal(np.asarray(decode_image(small, "jpg", "s")),
                          np.asarray(Image.open(io.BytesIO(small)).convert("RGB")))
    big = jpeg(400, 300)  # 120k pixels: 1/2 is 30k, 1/4 is 7.5k
    got = decode_image(big, "jpg", "big")
    assert got.size == (100, 75)
    reference = np.asarray(Image.open(io.BytesIO(big)).convert("RGB").resize((100, 75), Image.BILINEAR), float)
    assert np.abs(np.asarray(got, float) - reference).mean() < 8  # the same picture, smaller
    buf = io.BytesIO()
    Image.open(io.BytesIO(big)).save(buf, format="PNG")
    with pytest.raises(DataError, match="big.png: image is far above the limit of 10000 pixels \\(refused"):
        decode_image(buf.getvalue(), "png", "big.png")  # 120k > 2 x 10k: where PIL's own error fires
    buf = io.BytesIO()
    Image.open(io.BytesIO(small)).resize((110, 100)).save(buf, format="PNG")
    with pytest.raises(DataError, match="s.png: image is 110 x 100 = 11000 pixels, above the limit of 10000"):
        decode_image(buf.getvalue(), "png", "s.png")
    with pytest.raises(DataError, match=r"huge: image is far above the limit of 10000 pixels; a JPEG up to 640000"):
        decode_image(jpeg(1600, 1200), "jpg", "huge")  # 1.92 M > 2 x 640k: where PIL's own error fires
    with pytest.raises(DataError, match="huge2: image is 1000 x 800 = 800000 pixels, above the limit of 10000"):
        decode_image(jpeg(1000, 800), "jpg", "huge2")  # 1/8 is 12.5k, still above
