"""Tiny source datasets in each source's real on-disk layout, for tests/test_builders.py.

Where each layout comes from is said next to its writer. Images are random smooth colour fields:
every seed gives a clearly different picture (so near-duplicate detection has something to do).
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
from PIL import Image, ImageFilter


def texture(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.01, 0.08), rng.uniform(0.01, 0.08), rng.uniform(0, 6.28)
        base += 40 * np.sin(fx * xx + fy * yy + ph)[..., None] * rng.uniform(-1, 1, size=3)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def jpeg_bytes(im: Image.Image, q: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=q)
    return buf.getvalue()


def near_duplicate(im: Image.Image) -> Image.Image:
    """Re-encoded (JPEG q70), resized (0.8x) and lightly blurred."""
    small = im.resize((int(im.width * 0.8), int(im.height * 0.8)), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1))
    return Image.open(io.BytesIO(jpeg_bytes(small, 70))).convert("RGB")


def write_corrupt(path: str) -> None:
    data = jpeg_bytes(texture(999, 64, 64))
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])


# ---- COCO 2017: cocodataset.org "Data format" (instances_*.json: images/annotations/categories),
# images in ROOT/train2017/<file_name>, annotations in ROOT/annotations/instances_train2017.json.
def make_coco(root: str, n_images: int = 24, w: int = 480, h: int = 320, corrupt: int = 1) -> str:
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, "train2017"), exist_ok=True)
    images, anns = [], []
    rng = np.random.default_rng(0)
    for i in range(n_images):
        iid = 1000 + i
        name = f"{iid:012d}.jpg"
        images.append({"id": iid, "file_name": name, "width": w, "height": h})
        if i < corrupt:
            write_corrupt(os.path.join(root, "train2017", name))
        else:
            texture(i, w, h).save(os.path.join(root, "train2017", name), quality=90)
        # qualifying: box covers ~30% of the image, mask fills 80% of it
        bw, bh = int(w * rng.uniform(0.45, 0.6)), int(h * rng.uniform(0.5, 0.65))
        bx, by = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        area = 0.8 * bw * bh
        anns.append({"id": 10 * iid, "image_id": iid, "category_id": 1 + i % 2, "bbox": [bx, by, bw, bh],
                     "area": area, "iscrowd": 0, "segmentation": [[bx, by, bx + bw, by, bx + bw, by + bh, bx, by + bh]]})
        # not qualifying: too small / low fill / crowd
        anns.append({"id": 10 * iid + 1, "image_id": iid, "category_id": 1, "bbox": [5, 5, 30, 30], "area": 800,
                     "iscrowd": 0, "segmentation": []})
        anns.append({"id": 10 * iid + 2, "image_id": iid, "category_id": 2, "bbox": [0, 0, w * 0.8, h * 0.6],
                     "area": 0.3 * w * h * 0.9, "iscrowd": 0, "segmentation": []})  # fill 0.56
        anns.append({"id": 10 * iid + 3, "image_id": iid, "category_id": 1, "bbox": [0, 0, w / 2, h / 2],
                     "area": 0.2 * w * h, "iscrowd": 1, "segmentation": {}})
    cats = [{"id": 1, "name": "dog", "supercategory": "animal"}, {"id": 2, "name": "bus", "supercategory": "vehicle"}]
    with open(os.path.join(root, "annotations", "instances_train2017.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats, "info": {}, "licenses": []}, f)
    return root


# ---- PixMo-Count: Hugging Face allenai/pixmo-count dataset card: parquet files
# data/{train,validation,test}-*.parquet with columns image_url, image_sha256, count, label, points.
# Images are fetched by the user from image_url; we store half of them as <sha256>.jpg and half
# under the URL's basename.
def make_pixmo(root: str, per_count_train: int = 5, per_count_val: int = 3) -> tuple[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data, imgs = os.path.join(root, "data"), os.path.join(root, "images")
    os.makedirs(data, exist_ok=True)
    os.makedirs(imgs, exist_ok=True)
    k = 0
    for split, per in (("train", per_count_train), ("validation", per_count_val), ("test", 1)):
        rows = []
        for c in [0, 1, 11] + list(range(2, 11)) * per:
            b = jpeg_bytes(texture(5000 + k, 160, 120))
            sha = hashlib.sha256(b).hexdigest()
            url = f"https://example.org/img/{k:05d}.jpg?x=1"
            path = os.path.join(imgs, f"{sha}.jpg" if k % 2 else f"{k:05d}.jpg")
            with open(path, "wb") as f:
                f.write(b)
            rows.append({"image_url": url, "image_sha256": sha, "count": c, "label": "dogs" if k % 3 else "people",
                         "points": {"x": [1.0] * c, "y": [2.0] * c}})
            k += 1
        if split == "train":  # one corrupt image (sha256 mismatch) and one row whose image was never downloaded
            with open(os.path.join(imgs, f"{rows[5]['image_sha256']}.jpg" if 5 % 2 else "00005.jpg"), "ab") as f:
                f.write(b"junk")
            rows.append({"image_url": "https://example.org/img/missing.jpg", "image_sha256": "0" * 64, "count": 3,
                         "label": "cats", "points": {"x": [], "y": []}})
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(data, f"{split}-00000-of-00001.parquet"))
    return data, imgs


# ---- MID: multi_illumination_train_mip2_jpg/<scene>/dir_<k>_mip2.jpg (the official archive layout,
# projects.csail.mit.edu/illumination); the albedo (not shipped by MID) as <scene>/albedo.png.
def make_mid(root: str, n_scenes: int = 6, n_dirs: int = 2, w: int = 240, h: int = 160) -> str:
    rng = np.random.default_rng(3)
    for s in range(n_scenes):
        sd = os.path.join(root, f"everett_kitchen{s}")
        os.makedirs(sd, exist_ok=True)
        for k in range(n_dirs):
            texture(700 + 10 * s + k, w, h).save(os.path.join(sd, f"dir_{k}_mip2.jpg"), quality=90)
        # albedo: 4 x 6 grid of flat grey-ish patches, levels chosen so that both "same" and "different"
        # pairs exist
        levels = rng.choice([60, 64, 66, 120, 180, 230], size=(4, 6))
        alb = np.kron(levels, np.ones((h // 4, w // 6))).astype(np.uint8)
        Image.fromarray(np.stack([alb] * 3, -1)).save(os.path.join(sd, "albedo.png"))
    return root


def blink_parquet(path: str, groups: list[list[Image.Image]], sub_task: str) -> str:
    """A BLINK-style parquet (HF layout: image_1..image_4 {bytes, path} structs, question, answer)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, g in enumerate(groups):
        r = {f"image_{j + 1}": ({"bytes": jpeg_bytes(g[j]), "path": None} if j < len(g) else None) for j in range(4)}
        rows.append({"idx": f"val_{sub_task}_{i}", "question": "q?", "choices": ["a", "b"], "answer": "(A)",
                     "sub_task": sub_task, **r})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# BLINK as it ships (huggingface.co/datasets/BLINK-Benchmark/BLINK): one folder per subtask with
# val-*.parquet and test-*.parquet; columns idx ("val_<Sub_Task>_<i>"), question, sub_task,
# image_1..image_4 ({bytes, path} structs, null when absent), choices, answer ("(A)"; "hidden" in
# test), prompt, explanation.
BLINK_HUB_TASKS = {"Counting": 1, "Jigsaw": 3, "Object_Localization": 1}  # subtask -> images per sample
BLINK_HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def blink_hub_image(sub_task: str, split: str, i: int, j: int, w: int = 32, h: int = 24) -> Image.Image:
    seed = int(hashlib.sha256(f"{sub_task}/{split}/{i}/{j}".encode()).hexdigest()[:8], 16)
    return texture(seed, w, h)


def make_blink_hub(root: str, n_val: int = 2, n_test: int = 1, tasks: dict | None = None, git: bool = True) -> str:
    """A BLINK hub copy: <root>/<Sub_Task>/{val,test}-00000-of-00001.parquet (+ .git/HEAD naming
    BLINK_HUB_COMMIT when git)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for sub, n_img in (tasks or BLINK_HUB_TASKS).items():
        for split, n in (("val", n_val), ("test", n_test)):
            rows = {k: [] for k in ("idx", "question", "sub_task", "choices", "answer", "prompt", "explanation")}
            images = {f"image_{j + 1}": [] for j in range(4)}
            for i in range(n):
                choices = ["1", "2", "3"] if sub == "Counting" else ["first", "second"]
                q = f"Question {i} of {sub}?"
                rows["idx"].append(f"{split}_{sub}_{i + 1}")
                rows["question"].append(q)
                rows["sub_task"].append(sub)
                rows["choices"].append(choices)
                rows["answer"].append("hidden" if split == "test" else f"({'AB'[i % 2]})")
                rows["prompt"].append(q + "".join(f"\n({chr(65 + k)}) {c}" for k, c in enumerate(choices)))
                rows["explanation"].append("")
                for j in range(4):
                    cell = {"bytes": png_bytes(blink_hub_image(sub, split, i, j)), "path": f"{j}.png"}
                    images[f"image_{j + 1}"].append(cell if j < n_img else None)
            table = pa.table({"idx": rows["idx"], "question": rows["question"], "sub_task": rows["sub_task"],
                              **{k: pa.array(v, type=struct) for k, v in images.items()},
                              "choices": pa.array(rows["choices"], type=pa.list_(pa.string())),
                              "answer": rows["answer"], "prompt": rows["prompt"], "explanation": rows["explanation"]})
            os.makedirs(os.path.join(root, sub), exist_ok=True)
            pq.write_table(table, os.path.join(root, sub, f"{split}-00000-of-00001.parquet"))
    if git:
        os.makedirs(os.path.join(root, ".git", "refs", "heads"), exist_ok=True)
        with open(os.path.join(root, ".git", "HEAD"), "w") as f:
            f.write("ref: refs/heads/main\n")
        with open(os.path.join(root, ".git", "refs", "heads", "main"), "w") as f:
            f.write(BLINK_HUB_COMMIT + "\n")
    return root


# ---- HPatches: hpatches-sequences-release/<seq>/{1..6}.ppm + H_1_2..H_1_6 (github.com/hpatches/
# hpatches-dataset README: "each sequence ... 6 images ... homographies H_1_k from image 1 to k").
def hpatches_h(seq: int, k: int) -> np.ndarray:
    return np.array([[1 + 0.02 * k, 0.01 * seq, 4.0 * k], [0.0, 1 - 0.01 * k, 3.0 * k + seq], [0, 0, 1]])


def make_hpatches(root: str, n_seq: int = 6, w: int = 240, h: int = 180) -> str:
    for s in range(n_seq):
        sd = os.path.join(root, f"{'iv'[s % 2]}_scene{s}")
        os.makedirs(sd, exist_ok=True)
        base = texture(9000 + s, w, h)
        base.save(os.path.join(sd, "1.ppm"))
        for k in range(2, 7):
            H = hpatches_h(s, k)
            inv = np.linalg.inv(H)  # PIL maps output pixels to input pixels
            base.transform((w, h), Image.AFFINE, tuple(inv[:2].ravel()), Image.BILINEAR).save(os.path.join(sd, f"{k}.ppm"))
            np.savetxt(os.path.join(sd, f"H_1_{k}"), H)
    return root


# ---- SPair-71k: JPEGImages/<category>/<name>.jpg, PairAnnotation/{trn,val,test}/<pair>.json with
# src_imname, trg_imname, category, src_kps, trg_kps (the devkit's fields; cvlab.postech.ac.kr).
def make_spair(root: str, n_train_imgs: int = 8, n_val_imgs: int = 4) -> str:
    rng = np.random.default_rng(5)
    os.makedirs(os.path.join(root, "JPEGImages", "cat"), exist_ok=True)
    names = {"trn": [f"2008_{i:06d}.jpg" for i in range(n_train_imgs)],
             "val": [f"2009_{i:06d}.jpg" for i in range(n_val_imgs)]}
    for j, n in enumerate(names["trn"] + names["val"]):
        texture(4000 + j, 200, 150).save(os.path.join(root, "JPEGImages", "cat", n), quality=90)

    def kps(n):
        return [[float(x), float(y)] for x, y in zip(rng.uniform(15, 185, n), rng.uniform(15, 135, n))]

    for split, ns in names.items():
        d = os.path.join(root, "PairAnnotation", split)
        os.makedirs(d, exist_ok=True)
        pairs = [(a, b) for a in ns for b in ns if a < b]
        if split == "val":
            pairs.append((names["trn"][0], ns[0]))  # shares an image with train: dropped
        for i, (a, b) in enumerate(pairs):
            n = 3 if i == 1 else 6  # one pair with too few keypoints
            ann = {"filename": f"{i:06d}-{a[:-4]}-{b[:-4]}:cat", "src_imname": a, "trg_imname": b, "category": "cat",
                   "src_imsize": [200, 150, 3], "trg_imsize": [200, 150, 3], "src_kps": kps(n), "trg_kps": kps(n),
                   "kps_ids": [str(k) for k in range(n)], "src_bndbox": [0, 0, 199, 149], "trg_bndbox": [0, 0, 199, 149]}
            with open(os.path.join(d, f"{i:06d}-{a[:-4]}-{b[:-4]}:cat.json"), "w") as f:
                json.dump(ann, f)
    return root


# ---- FunKPoint: the layout livr_ds/builders/funkpoint.py defines (annotations.json + images).
def make_funkpoint(root: str, per_action: int = 8) -> str:
    rng = np.random.default_rng(6)
    recs = []
    for a, action in enumerate(["Mash_Pound", "Scoop"]):
        d = os.path.join(root, "images", action)
        os.makedirs(d, exist_ok=True)
        for i in range(per_action):
            name = f"obj{i % 4}_{i:03d}.jpg"
            texture(6000 + 100 * a + i, 200, 160).save(os.path.join(d, name), quality=90)
            grid = [(30 + 35 * k, 30 + 25 * k) for k in range(5)]
            kp = [[float(x + rng.uniform(-5, 5)), float(y + rng.uniform(-5, 5))] for x, y in grid]
            recs.append({"image": f"images/{action}/{name}", "action": action, "keypoints": kp, "object": f"obj{i % 4}"})
    with open(os.path.join(root, "annotations.json"), "w") as f:
        json.dump(recs, f)
    return root


# ---- ArtBench-10: artbench-10-imagefolder-split/{train,test}/<style>/*.jpg (the ImageFolder release).
def make_artbench(root: str, per_style: int = 8) -> str:
    for s, style in enumerate(["baroque", "impressionism", "ukiyo_e"]):
        for split in ("train", "test"):
            d = os.path.join(root, split, style)
            os.makedirs(d, exist_ok=True)
            for i in range(per_style if split == "train" else 1):
                texture(7000 + 100 * s + i + (50 if split == "test" else 0), 160, 200).save(
                    os.path.join(d, f"{style}_{i:04d}.jpg"), quality=90)
    return root


# ---- NIGHTS: nights/data.csv + ref/ + distort/ (DreamSim README: "Download the NIGHTS dataset").
def make_nights(root: str, n: dict | None = None) -> str:
    n = n or {"train": 12, "val": 6, "test": 2}
    rows, k = [], 0
    for split, cnt in n.items():
        for i in range(cnt):
            rd, dd = os.path.join(root, "ref", f"{k:03d}"), os.path.join(root, "distort", f"{k:03d}")
            os.makedirs(rd, exist_ok=True)
            os.makedirs(dd, exist_ok=True)
            texture(8000 + 3 * k, 128, 128).save(os.path.join(rd, "00.png"))
            texture(8001 + 3 * k, 128, 128).save(os.path.join(dd, "00_0.png"))
            texture(8002 + 3 * k, 128, 128).save(os.path.join(dd, "00_1.png"))
            lv = 5 if i % 3 else 2
            rv = 1 if i % 3 else 2 if i == 0 else 4  # row 0 of each split: a tie
            # the real data.csv columns (DreamSim's loader reads them); votes < 6 rows are filtered
            votes = 3 if i == 1 else 6
            rows.append({"id": k, "left_vote": lv, "right_vote": rv, "votes": votes,
                         "ref_path": f"ref/{k:03d}/00.png", "left_path": f"distort/{k:03d}/00_0.png",
                         "right_path": f"distort/{k:03d}/00_1.png", "prompt": "a photo", "split": split,
                         "is_imagenet": False})
            k += 1
    import csv

    with open(os.path.join(root, "data.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root
