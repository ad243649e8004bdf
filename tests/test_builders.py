"""Paper data builders (`data build TASK`), de-duplication and `shards show`.

Fixtures are tiny copies of each source in its real on-disk layout (tests/builder_fixtures.py says
where each layout comes from). Per builder: same seed -> byte-identical shards; the recipe's
constraints on every sample; no source image in both train and val; a near-duplicate of a test
image (re-encoded, resized, blurred) is removed while different images are kept; corrupt images
are skipped and counted; bad layouts and over-large requests fail with a message naming the file
or the possible count.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from builder_fixtures import (blink_parquet, make_coco, make_mid, make_pixmo, near_duplicate, texture)
from livr_ds.builders.cli import TASKS, add_data_commands, build_task
from livr_ds.builders.geometry import iou
from livr_ds.builders.markers import marker_sizes, place_labels
from livr_ds.builders.dedup import Deduper
from livr_ds.data.schema import DataError


# ---- helpers --------------------------------------------------------------------------------
def read_split(out: str, split: str) -> list[dict]:
    m = json.load(open(os.path.join(out, "manifest.json")))
    samples = []
    for sh in m["splits"][split]["shards"]:
        cur: dict[str, dict] = {}
        with tarfile.open(os.path.join(out, sh["name"])) as tf:
            for ti in tf:
                key, ext = os.path.basename(ti.name).split(".", 1)
                s = cur.setdefault(key, {"key": key, "images": {}})
                data = tf.extractfile(ti).read()
                if ext == "json":
                    s.update(json.loads(data))
                else:
                    s["images"][int(ext.split(".")[0])] = Image.open(io.BytesIO(data)).convert("RGB")
        samples += [{**s, "images": [s["images"][i] for i in sorted(s["images"])]} for s in cur.values()]
    return samples


def shard_bytes(out: str) -> dict[str, bytes]:
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n.endswith(".tar")}


def run_cli(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    s = p.add_subparsers(dest="command")
    add_data_commands(s)
    from livr_ds.data.cli import add_shards_commands

    add_shards_commands(s)
    a = p.parse_args(argv)
    a.func(a)


def check_common(out: str, task: str, sizes: dict, n_choices: int | None):
    m = json.load(open(os.path.join(out, "manifest.json")))
    b = m["build"]
    assert b["task"] == task and b["seed"] == 42
    for s, n in sizes.items():
        assert m["splits"][s]["total"] == n
    assert all(len(v) == 64 for v in b["annotation_files"].values())  # sha256 per annotation file
    units = {}
    for s in sizes:
        samples = read_split(out, s)
        for smp in samples:
            assert smp["task"] == task
            if n_choices:
                assert len(smp["choices"]) == n_choices and "(A)" in smp["question"]
                assert smp["answer"] in [chr(65 + i) for i in range(n_choices)]
        units[s] = samples
    return m, units


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    d, i = make_pixmo(str(root / "pixmo"))
    return {"coco": make_coco(str(root / "coco")), "pixmo": d, "pixmo_images": i, "mid": make_mid(str(root / "mid")),
            "root": root}


# ---- dedup ----------------------------------------------------------------------------------
def test_deduper_near_duplicate_and_pair_rule():
    a, b, c, d = (texture(s, 320, 240) for s in (1, 2, 3, 4))
    dd = Deduper([[a], [b, c]])
    assert dd.is_duplicate([near_duplicate(a)])[0]
    assert not dd.is_duplicate([d])[0]
    # pair-aware: both images must match the two images of one test pair
    assert dd.is_duplicate([near_duplicate(b), near_duplicate(c)])[0]
    assert not dd.is_duplicate([near_duplicate(b), d])[0]
    assert not dd.is_duplicate([near_duplicate(a), near_duplicate(b)])[0]  # different test samples
    assert not dd.is_duplicate([near_duplicate(b), near_duplicate(b)])[0]  # one test image twice
    desc = dd.describe()
    assert "cheap embedding" in desc["retrieval"] and "SSIM" in desc["confirm"]


def test_deduper_on_real_photos_catches_crops_and_keeps_other_photos():
    """scikit-image's photographs at full size: re-encoded/resized/blurred copies and 95% crops of test
    images are removed (plain SSIM misses the crops: 0.15-0.57), other photographs are kept."""
    from skimage import data

    def photo(name):
        a = getattr(data, name)()
        return Image.fromarray(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]).convert("RGB")

    test = [photo(n) for n in ("astronaut", "coffee", "chelsea", "camera", "immunohistochemistry")]
    others = [photo(n) for n in ("rocket", "coins", "text", "retina", "grass")]
    dd = Deduper([[im] for im in test])
    for im in test:
        w, h = im.size
        crop = im.crop((w // 40, h // 40, w - w // 40, h - h // 40))
        assert dd.is_duplicate([near_duplicate(im)])[0]
        assert dd.is_duplicate([near_duplicate(crop)])[0]
    for im in others:
        assert not dd.is_duplicate([im])[0] and not dd.is_duplicate([near_duplicate(im)])[0]
    assert "ORB+RANSAC" in dd.describe()["confirm"]


def test_deduper_clip_model_offline(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    cfg = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "vocab_size": 100},
                     vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                     projection_dim=8)
    CLIPModel(cfg).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    a, b = texture(1, 200, 150), texture(2, 200, 150)
    dd = Deduper([[a], [b]], clip_model=str(tmp_path), top_k=2, min_sim=-1.0)
    assert "CLIP" in dd.describe()["retrieval"]
    assert dd.is_duplicate([near_duplicate(a)])[0] and not dd.is_duplicate([texture(9, 200, 150)])[0]


# ---- COCO: jigsaw, localization ------------------------------------------------------------
def _coco_image(src, name):
    return Image.open(os.path.join(src["coco"], "train2017", name)).convert("RGB")


@pytest.mark.parametrize("task", ["jigsaw", "localization"])
def test_coco_builders(src, tmp_path, task):
    sizes = {"train": 12, "val": 6}
    o1, o2 = str(tmp_path / "a"), str(tmp_path / "b")
    run_cli(["data", "build", task, "--source", src["coco"], "--out", o1, "--seed", "42", "--n-train", "12",
             "--n-val", "6", "--no-progress"])
    build_task(task, o2, source=src["coco"], seed=42, n_train=12, n_val=6)
    assert shard_bytes(o1) == shard_bytes(o2)  # determinism, byte for byte
    m, samples = check_common(o1, task, sizes, 2)
    assert sum(v["skipped_corrupt"] for v in m["build"]["splits"].values()) == 1  # the truncated JPEG
    ids = {s: {x["meta"]["image_id"] for x in samples[s]} for s in sizes}
    assert not ids["train"] & ids["val"]
    for s in sizes:
        answers = Counter(x["answer"] for x in samples[s])
        assert abs(answers["A"] - answers["B"]) <= 1
        for x in samples[s]:
            if task == "jigsaw":
                canvas, p1, p2 = x["images"]
                W, H = canvas.size
                assert W == 400 and 170 <= H <= 230
                assert p1.size == p2.size == (200, H // 2)
                dark = np.asarray(canvas)[H - H // 2:, 200:].astype(float)
                assert dark.mean() < 8  # blacked-out bottom-right quadrant
                true = x["images"][1 if x["answer"] == "A" else 2]
                src_im = _coco_image(src, x["meta"]["file"])
                ref = src_im.crop(tuple(x["meta"]["true_patch"]))
                diff = np.abs(np.asarray(ref, float) - np.asarray(true, float)).mean()
                assert diff < 6, diff
                assert iou(x["meta"]["true_patch"], x["meta"]["distractor_patch"]) <= 0.25
            else:
                assert 0.2 <= x["meta"]["iou"] <= 0.5
                assert 0.15 <= x["meta"]["area_fraction"] <= 0.5 and x["meta"]["mask_fill"] >= 0.6
                assert x["meta"]["ann_id"] % 10 == 0  # only the qualifying instance of each fixture image


def test_coco_dedup_removes_near_duplicate(src, tmp_path):
    base = str(tmp_path / "base")
    build_task("localization", base, source=src["coco"], seed=42, n_train=6, n_val=3)
    first = read_split(base, "train")[0]["meta"]["image_id"]
    dup = near_duplicate(_coco_image(src, f"{first:012d}.jpg"))
    blink_parquet(str(tmp_path / "BLINK" / "Object_Localization" / "val-00000-of-00001.parquet"),
                         [[dup], [texture(4242, 300, 200)]], "Object_Localization")
    blink_parquet(str(tmp_path / "BLINK" / "Jigsaw" / "val-00000-of-00001.parquet"),
                  [[near_duplicate(_coco_image(src, f"{1005:012d}.jpg"))]], "Jigsaw")
    out = str(tmp_path / "dd")
    m = build_task("localization", out, source=src["coco"], seed=42, n_train=6, n_val=3,
                   dedup_against=str(tmp_path / "BLINK"))
    b = m["build"]
    assert b["splits"]["train"]["dedup_removed"] == 1 and b["splits"]["val"]["dedup_removed"] == 0
    assert b["dedup"]["test_samples"] == 2  # only the task's own BLINK subset was read
    got = {x["meta"]["image_id"] for s in ("train", "val") for x in read_split(out, s)}
    assert first not in got and len(read_split(out, "train")) == 6
    kept = {x["meta"]["image_id"] for x in read_split(base, "train")[1:]}
    assert kept <= got  # different images are kept


def test_builders_dedup_reads_the_blink_hub_as_it_ships(tmp_path):
    """The hub copy (val and test of every subtask): a task reads its own subtask's folder (named in
    data/tasks.py); a glob or a hub-cache repo folder works as well."""
    from builder_fixtures import make_blink_hub

    from livr_ds.builders.dedup import load_test_groups

    hub = make_blink_hub(str(tmp_path / "BLINK"), n_val=2, n_test=1)
    groups, files = load_test_groups(hub, task="localization")
    assert len(groups) == 3 and sorted(os.path.relpath(f, hub) for f in files) == [
        "Object_Localization/test-00000-of-00001.parquet", "Object_Localization/val-00000-of-00001.parquet"]
    assert len(load_test_groups(hub, task="jigsaw")[0]) == 3 and len(load_test_groups(hub)[0]) == 9
    groups, files = load_test_groups(os.path.join(hub, "*", "val-*.parquet"))
    assert len(groups) == 6 and len(files) == 3
    cache = tmp_path / "hub" / "datasets--BLINK-Benchmark--BLINK"  # the Hugging Face cache layout
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text("0" * 40)
    (cache / "snapshots").mkdir()
    os.rename(hub, cache / "snapshots" / ("0" * 40))
    groups, files = load_test_groups(str(cache), task="localization")
    assert len(groups) == 3 and all("Object_Localization" in f for f in files)
    with pytest.raises(DataError, match="matches no"):
        load_test_groups(str(tmp_path / "nowhere" / "*.parquet"))


def test_coco_bad_layout_and_too_many(src, tmp_path):
    with pytest.raises(DataError, match="instances_train2017.json"):
        build_task("localization", str(tmp_path / "x"), source=str(tmp_path), seed=1)
    with pytest.raises(DataError, match="can give at most"):
        build_task("localization", str(tmp_path / "y"), source=src["coco"], seed=42, n_train=100, n_val=6)


# ---- counting -------------------------------------------------------------------------------
def test_counting(src, tmp_path):
    sizes = {"train": 36, "val": 18}
    o1, o2 = str(tmp_path / "a"), str(tmp_path / "b")
    for o in (o1, o2):
        build_task("counting", o, source=src["pixmo"], source_2=src["pixmo_images"], seed=42, n_train=36, n_val=18)
    assert shard_bytes(o1) == shard_bytes(o2)
    m, samples = check_common(o1, "counting", sizes, None)
    b = m["build"]
    assert b["splits"]["train"]["skipped_corrupt"] == 1  # sha256 mismatch
    assert b["notes"]["rows_without_local_image"] == 1 and b["notes"]["official_splits"]
    for s, n in sizes.items():
        counts = Counter(int(x["answer"]) for x in samples[s])
        assert set(counts) == set(range(2, 11)) and max(counts.values()) - min(counts.values()) <= 1
        for x in samples[s]:
            assert x["choices"] == [] and x["question"] == f"How many {x['meta']['label']} are there in the image?"
    shas = {s: {x["meta"]["image_sha256"] for x in samples[s]} for s in sizes}
    assert not shas["train"] & shas["val"]
    with pytest.raises(DataError, match="at most 27 balanced"):  # 9 counts x 3 validation rows each
        build_task("counting", str(tmp_path / "c"), source=src["pixmo"], source_2=src["pixmo_images"], seed=42,
                   n_train=9, n_val=30)
    with pytest.raises(DataError, match="--source-2"):
        build_task("counting", str(tmp_path / "d"), source=src["pixmo"], seed=42)


def test_counting_dedup(src, tmp_path):
    base = str(tmp_path / "base")
    build_task("counting", base, source=src["pixmo"], source_2=src["pixmo_images"], seed=42, n_train=9, n_val=9)
    x = read_split(base, "val")[0]
    sha = x["meta"]["image_sha256"]
    path = [os.path.join(src["pixmo_images"], n) for n in os.listdir(src["pixmo_images"])
            if n.startswith(sha) or n == x["meta"]["image_url"].split("/")[-1].split("?")[0]][0]
    tdir = tmp_path / "test_images"
    tdir.mkdir()
    near_duplicate(Image.open(path).convert("RGB")).save(tdir / "t0.png")
    texture(31337, 160, 120).save(tdir / "t1.png")
    out = str(tmp_path / "dd")
    m = build_task("counting", out, source=src["pixmo"], source_2=src["pixmo_images"], seed=42, n_train=9, n_val=9,
                   dedup_against=str(tdir))
    assert m["build"]["splits"]["val"]["dedup_removed"] == 1 and m["build"]["splits"]["train"]["dedup_removed"] == 0
    assert sha not in {y["meta"]["image_sha256"] for y in read_split(out, "val")}
    assert len(read_split(out, "val")) == 9


# ---- relative reflectance ------------------------------------------------------------------
def test_relative_reflectance(src, tmp_path):
    sizes = {"train": 40, "val": 12}
    o1, o2 = str(tmp_path / "a"), str(tmp_path / "b")
    for o in (o1, o2):
        build_task("relative_reflectance", o, source=src["mid"], seed=42, n_train=40, n_val=12)
    assert shard_bytes(o1) == shard_bytes(o2)
    m, samples = check_common(o1, "relative_reflectance", sizes, 3)
    scenes = {s: {x["meta"]["scene"] for x in samples[s]} for s in sizes}
    assert not scenes["train"] & scenes["val"]
    for s, n in sizes.items():
        ans = Counter(x["answer"] for x in samples[s])
        assert ans["C"] == round(n / 4) and abs(ans["A"] - ans["B"]) <= 1
        for x in samples[s]:
            ya, yb = x["meta"]["Y"]
            d = abs(ya - yb) / max(ya, yb)
            assert (x["answer"] == "C") == (d <= 0.10)
            if x["answer"] != "C":
                assert (ya < yb) == (x["answer"] == "A")
    # dedup: a near-duplicate of one photo removes that photo's samples only
    first = samples["train"][0]["meta"]
    im = Image.open(os.path.join(src["mid"], first["scene"], first["photo"])).convert("RGB")
    test = blink_parquet(str(tmp_path / "t.parquet"), [[near_duplicate(im)], [texture(77, 240, 160)]],
                         "Relative_Reflectance")
    out = str(tmp_path / "dd")
    m = build_task("relative_reflectance", out, source=src["mid"], seed=42, n_train=40, n_val=12, dedup_against=test)
    assert m["build"]["splits"]["train"]["dedup_removed"] == 1
    photos = {(x["meta"]["scene"], x["meta"]["photo"]) for x in read_split(out, "train")}
    assert (first["scene"], first["photo"]) not in photos and len(photos) > 1


def test_reflectance_missing_albedo(tmp_path):
    make_mid(str(tmp_path / "mid"), n_scenes=2)
    os.remove(tmp_path / "mid" / "everett_kitchen1" / "albedo.png")
    with pytest.raises(DataError, match="albedo.png"):
        build_task("relative_reflectance", str(tmp_path / "o"), source=str(tmp_path / "mid"), seed=1)


# ---- shards show ---------------------------------------------------------------------------
SHOW_SOURCES = {"counting": ("pixmo", "pixmo_images"), "jigsaw": ("coco", None), "localization": ("coco", None),
                "relative_reflectance": ("mid", None)}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_shards_show_every_task(src, tmp_path, task):
    """Every builder's output renders: one row per sample, images at 240 px with question and answer."""
    if task in SHOW_SOURCES:
        key, key2 = SHOW_SOURCES[task]
        kw = {"source": src[key], "source_2": src[key2] if key2 else None}
    else:
        kw = {"source": MORE[task][0](str(tmp_path / "src"))}
    out = str(tmp_path / task)
    build_task(task, out, seed=42, n_train=3, n_val=1, n_test=1 if TASKS[task][2][2] else 0, **kw)
    png = str(tmp_path / "grid.png")
    run_cli(["shards", "show", out, "--n", "3", "--out", png])
    im = Image.open(png)
    assert im.height >= 3 * 240 and im.width > 400


def test_point_labels_never_cover_circles_or_each_other():
    from PIL import ImageDraw

    im = Image.new("RGB", (448, 336))
    r, _, fs = marker_sizes(im)
    # four candidates packed as tightly as the builders allow (SPair: 5% of the long side), one at an edge
    pts = [(200, 150), (222, 150), (211, 170), (440, 5)]
    boxes = place_labels(ImageDraw.Draw(im), pts, list("ABCD"), r, fs, im.size)
    circles = [(x - r, y - r, x + r, y + r) for x, y in pts]
    inter = lambda a, b: min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])  # noqa: E731
    for i, b in enumerate(boxes):
        assert 0 <= b[0] and b[2] <= im.width and 0 <= b[1] and b[3] <= im.height
        assert not any(inter(b, c) for c in circles)
        assert not any(inter(b, o) for j, o in enumerate(boxes) if j != i)


# ---- correspondence, art style, visual similarity ------------------------------------------
from builder_fixtures import (hpatches_h, make_artbench, make_funkpoint, make_hpatches, make_nights,  # noqa: E402
                              make_spair)

MORE = {
    "visual_correspondence": (make_hpatches, {"train": 16, "val": 8, "test": 8}, 4),
    "semantic_correspondence": (make_spair, {"train": 16, "val": 8}, 4),
    "functional_correspondence": (make_funkpoint, {"train": 16, "val": 8, "test": 8}, 4),
    "art_style": (make_artbench, {"train": 12, "val": 4}, 2),
    "visual_similarity": (make_nights, {"train": 8, "val": 4}, 2),
}


def _source_images(task, x) -> set[str]:
    m = x["meta"]
    if task == "visual_correspondence":
        return {m["sequence"]}
    if task == "art_style":
        return {m["reference"], m["same_style"], m["other_style"]}
    return set(m["images"])


@pytest.mark.parametrize("task", sorted(MORE))
def test_more_builders(tmp_path, task):
    make, sizes, k = MORE[task]
    root = make(str(tmp_path / "src"))
    kw = {f"n_{s}": n for s, n in sizes.items()}
    o1, o2 = str(tmp_path / "a"), str(tmp_path / "b")
    for o in (o1, o2):
        build_task(task, o, source=root, seed=42, **kw)
    assert shard_bytes(o1) == shard_bytes(o2)
    m, samples = check_common(o1, task, sizes, k)
    imgs = {s: set().union(*(_source_images(task, x) for x in samples[s])) for s in sizes}
    for a in sizes:
        for b in sizes:
            assert a == b or not imgs[a] & imgs[b], (a, b)
        ans = Counter(x["answer"] for x in samples[a])
        assert max(ans.values()) - min(ans.values()) <= 1 and len(ans) == k
    for x in samples["train"]:
        if k == 4:
            true = x["meta"]["candidates"][ord(x["answer"]) - 65]
            assert len(x["images"]) == 2
            for c in x["meta"]["candidates"]:
                assert c == true or np.hypot(c[0] - true[0], c[1] - true[1]) > 3
        else:
            assert len(x["images"]) == 3
        if task == "visual_correspondence":
            seq = int(x["meta"]["sequence"].split("scene")[1])
            i, j = x["meta"]["pair"]
            assert j - i >= 2
            hi = np.eye(3) if i == 1 else hpatches_h(seq, i)
            hij = hpatches_h(seq, j) @ np.linalg.inv(hi)
            sa, sb = x["meta"]["scales"]
            q = hij @ np.array([x["meta"]["ref"][0] / sa, x["meta"]["ref"][1] / sa, 1.0])
            assert np.allclose(q[:2] / q[2] * sb, true, atol=0.2)
        if task == "art_style":
            assert x["meta"]["same_style"].split("/")[0] == x["meta"]["style"] != x["meta"]["other"]
        if task == "visual_similarity":
            lv, rv = x["meta"]["votes"]
            assert lv != rv
            # the preferred image is the one the answer names
            pref = x["images"][1 if x["answer"] == "A" else 2]
            ref_name = x["meta"]["images"][1 if lv > rv else 2]
            want = Image.open(os.path.join(root, ref_name)).convert("RGB")
            assert np.abs(np.asarray(pref, float) - np.asarray(want, float)).mean() < 6
    if task == "semantic_correspondence":
        assert m["build"]["notes"]["pairs_dropped_for_sharing_train_images"]["val"] == 1
        assert m["build"]["notes"]["pairs_with_fewer_than_4_keypoints"] >= 1
    if task == "visual_similarity":
        assert m["build"]["notes"]["tied_votes_skipped"] >= 2
        assert m["build"]["notes"]["low_agreement_skipped"] >= 2  # one row per split has votes = 3


def test_pair_aware_dedup_semantic(tmp_path):
    root = make_spair(str(tmp_path / "spair"))
    base = str(tmp_path / "base")
    build_task("semantic_correspondence", base, source=root, seed=42, n_train=8, n_val=4)
    x = read_split(base, "train")[0]
    a, b = (Image.open(os.path.join(root, "JPEGImages", "cat", n)).convert("RGB") for n in x["meta"]["images"])
    y = read_split(base, "train")[-1]
    other = [n for n in y["meta"]["images"] if n not in x["meta"]["images"]]
    c = Image.open(os.path.join(root, "JPEGImages", "cat", other[0])).convert("RGB")
    # test pair 1: both images of x's pair -> x's pair removed; test pair 2: only one image of y's
    # pair next to an unrelated image -> y's pair kept
    test = blink_parquet(str(tmp_path / "t.parquet"), [[near_duplicate(b), near_duplicate(a)],
                                                        [near_duplicate(c), texture(5151, 200, 150)]],
                         "Semantic_Correspondence")
    out = str(tmp_path / "dd")
    m = build_task("semantic_correspondence", out, source=root, seed=42, n_train=8, n_val=4, dedup_against=test)
    assert m["build"]["splits"]["train"]["dedup_removed"] == 1
    got = {z["meta"]["pair"] for z in read_split(out, "train")}
    assert x["meta"]["pair"] not in got and y["meta"]["pair"] in got


def test_hpatches_bad_layout(tmp_path):
    root = make_hpatches(str(tmp_path / "hp"), n_seq=3)
    os.remove(os.path.join(root, "v_scene1", "H_1_4"))
    with pytest.raises(DataError, match="H_1_4"):
        build_task("visual_correspondence", str(tmp_path / "o"), source=root, seed=1)


def _unit_images(task, root, x) -> list[Image.Image]:
    """The source images a unit is de-duplicated by (before markers are drawn)."""
    m = x["meta"]
    if task == "jigsaw":
        names = [os.path.join("train2017", m["file"])]
    elif task == "visual_correspondence":
        names = [os.path.join(m["sequence"], f"{i}.ppm") for i in m["pair"]]
    elif task == "art_style":
        names = [os.path.join("train", m["reference"])]
    else:  # functional correspondence (a pair), visual similarity (a triplet)
        names = m["images"]
    return [Image.open(os.path.join(root, n)).convert("RGB") for n in names]


DEDUP_MORE = {"jigsaw": "Jigsaw", "visual_correspondence": "Visual_Correspondence", "art_style": "Art_Style",
              "functional_correspondence": "Functional_Correspondence", "visual_similarity": "Visual_Similarity"}


@pytest.mark.parametrize("task", sorted(DEDUP_MORE))
def test_dedup_removes_the_unit_of_an_injected_near_duplicate(src, tmp_path, task):
    """Near-duplicates (re-encoded, resized, blurred) of one unit's source images, as one test sample,
    remove that unit; an unrelated test image removes nothing (every other unit is still built)."""
    if task == "jigsaw":
        root, make_sizes = src["coco"], {"n_train": 6, "n_val": 3}
    else:
        make, sizes, _ = MORE[task]
        root, make_sizes = make(str(tmp_path / "src")), {f"n_{s}": n for s, n in sizes.items()}
    base = str(tmp_path / "base")
    build_task(task, base, source=root, seed=42, **make_sizes)
    x = read_split(base, "train")[0]
    test = blink_parquet(str(tmp_path / "t.parquet"), [[near_duplicate(im) for im in _unit_images(task, root, x)],
                                                       [texture(6161, 240, 180)]], DEDUP_MORE[task])
    out = str(tmp_path / "dd")
    m = build_task(task, out, source=root, seed=42, dedup_against=test, **make_sizes)
    assert m["build"]["splits"]["train"]["dedup_removed"] >= 1
    # a unit is its set of source images: (a, b) and (b, a) are the same pair, both removed
    units = lambda d, s: {frozenset(y["meta"]["source_unit"].split("|")) for y in read_split(d, s)}  # noqa: E731
    got, mine = units(out, "train") | units(out, "val"), frozenset(x["meta"]["source_unit"].split("|"))
    assert mine not in got
    assert units(base, "train") - {mine} <= got


def test_multitask_config_reads_the_six_built_tasks(src, tmp_path, monkeypatch):
    """configs/livr_multitask_6k.yaml over six built tasks is the paper's mixture: one epoch holds
    every sample of the six train splits exactly once (6 x n here, 6 x 1000 at full size)."""
    from livr_ds.config import load_config
    from livr_ds.data.loader import LivrLoader
    from livr_ds.data.sources import ShardSource

    n = 4
    kw = {"counting": {"source": src["pixmo"], "source_2": src["pixmo_images"]},
          "localization": {"source": src["coco"]}, "relative_reflectance": {"source": src["mid"]}}
    for task in ("visual_correspondence", "semantic_correspondence", "functional_correspondence"):
        kw[task] = {"source": MORE[task][0](str(tmp_path / "src" / task))}
    for task, k in kw.items():
        build_task(task, str(tmp_path / "shards" / task), seed=42, n_train=n, n_val=2,
                   n_test=2 if TASKS[task][2][2] else 0, **k)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "livr_multitask_6k.yaml"))
    assert (cfg.schedule.stage1_epochs, cfg.schedule.stage2_epochs) == (2, 3)
    loader = LivrLoader([ShardSource(s.path, weight=s.weight) for s in cfg.data.train], 0, 1, batch_size=5,
                        seed=cfg.seed, collate_fn=lambda b: b)
    seen = [(s.task, s.key) for batch in loader for s in batch if not (s.meta or {}).get("_pad")]
    assert len(seen) == len(set(seen)) == 6 * n
    assert Counter(t for t, _ in seen) == {t: n for t in kw}


def test_no_external_program_runs_on_a_source_file_in_disguise(tmp_path):
    """An EPS file named .jpg in a source folder: bare PIL hands it to Ghostscript; livr-ds's
    builders open images with named formats only, so the fake `gs` on PATH never runs."""
    import subprocess
    import sys

    root = make_artbench(str(tmp_path / "src"))
    eps = os.path.join(root, "train", "baroque", "baroque_0000.jpg")
    with open(eps, "wb") as f:
        f.write(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n%%EOF\n")
    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    probe = "from PIL import Image\ntry:\n Image.open(%r).load()\nexcept Exception: pass" % eps
    subprocess.run([sys.executable, "-c", probe], env=env, check=True)
    assert marker.exists(), "the fixture must really reach Ghostscript through bare PIL"
    marker.unlink()
    out = str(tmp_path / "out")
    cmd = [os.path.join(os.path.dirname(sys.executable), "livr-ds"), "data", "build", "art_style", "--source", root,
           "--out", out, "--n-train", "12", "--n-val", "4"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not marker.exists()
    m = json.load(open(os.path.join(out, "manifest.json")))
    corrupt = m["build"]["splits"]["train"]["corrupt"]
    # The unit holding the disguised file is refused each time a triplet draws it: counted per draw.
    assert m["build"]["splits"]["train"]["skipped_corrupt"] >= 1
    assert corrupt and all("baroque_0000.jpg" in c for c in corrupt), corrupt
