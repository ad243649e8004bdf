"""`shards show DIR --n 8 --out grid.png`: render samples with their question and answer (PIL only).

Each sample is one row: its images side by side (height 240 px each), then the question (wrapped),
the choices and the answer, with the key and task.
"""

from __future__ import annotations

import json
import os
import tarfile
import textwrap

from PIL import Image, ImageDraw

from .images import decode_image, font
from .manifest import read_manifest
from .schema import DataError

ROW_H, PAD, TEXT_W = 240, 8, 560


def read_samples(shard_dir: str, split: str = "train", n: int = 8) -> list[dict]:
    m = read_manifest(shard_dir)
    if split not in m["splits"]:
        raise DataError(f"{shard_dir}: no split {split!r} in manifest.json (has {sorted(m['splits'])})")
    out: list[dict] = []
    for sh in m["splits"][split]["shards"]:
        path = os.path.join(shard_dir, sh["name"])
        cur: dict[str, dict] = {}
        with tarfile.open(path, "r:") as tf:
            for ti in tf:
                base = os.path.basename(ti.name)
                if not ti.isreg() or "." not in base:
                    continue
                key, ext = base.split(".", 1)
                s = cur.setdefault(key, {"key": key, "images": {}})
                data = tf.extractfile(ti).read()
                if ext == "json":
                    s["record"] = json.loads(data)
                elif ext.split(".")[-1] in ("jpg", "jpeg", "png"):
                    i, e = ext.split(".")
                    s["images"][int(i)] = decode_image(data, e, f"{path}:{key}")
        for s in cur.values():
            if "record" in s:
                out.append({**s, "images": [s["images"][i] for i in sorted(s["images"])]})
            if len(out) >= n:
                return out
    return out


def render(samples: list[dict]) -> Image.Image:
    f, fb = font(14), font(16)
    rows = []
    for s in samples:
        ims = [im.resize((max(1, round(im.width * ROW_H / im.height)), ROW_H), Image.BICUBIC) for im in s["images"]]
        r = s["record"]
        lines = [f"{s['key']}  [{r['task']}]"]
        for para in r["question"].split("\n"):
            lines += textwrap.wrap(para, 70) or [""]
        if r.get("choices") and "(A)" not in r["question"]:
            lines += [f"({chr(65 + i)}) {c}" for i, c in enumerate(r["choices"])]
        lines.append(f"ANSWER: {r['answer']}")
        text_h = 18 * len(lines) + PAD
        h = max(ROW_H, text_h) + PAD
        w = sum(im.width + PAD for im in ims) + TEXT_W + PAD
        row = Image.new("RGB", (w, h), (255, 255, 255))
        x = PAD
        for im in ims:
            row.paste(im, (x, PAD // 2))
            x += im.width + PAD
        d = ImageDraw.Draw(row)
        for i, line in enumerate(lines):
            d.text((x, PAD // 2 + 18 * i), line, fill=(200, 0, 0) if line.startswith("ANSWER") else (0, 0, 0),
                   font=fb if i == 0 or line.startswith("ANSWER") else f)
        rows.append(row)
    if not rows:
        raise DataError("no samples to show")
    W = max(r.width for r in rows)
    grid = Image.new("RGB", (W, sum(r.height for r in rows) + len(rows)), (160, 160, 160))
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height + 1
    return grid


def show(shard_dir: str, out: str, n: int = 8, split: str = "train") -> str:
    samples = read_samples(shard_dir, split, n)
    grid = render(samples)
    grid.save(out)
    return out
