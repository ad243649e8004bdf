"""De-duplication of training sources against test images, the paper's way: retrieval by image
embedding, then confirmation by perceptual hash AND SSIM.

    dd = Deduper.from_path("BLINK/", task="localization", clip_model=None)
    dup, info = dd.is_duplicate([img])            # one source image
    dup, info = dd.is_duplicate([img1, img2])     # a pair: pair-aware (see below)

1. Embedding. With ``clip_model`` (a local directory holding a transformers CLIPModel and its
   image processor, loaded offline) the CLIP image embedding; otherwise a cheap, stated
   replacement: a 12x12 RGB thumbnail (mean-removed) concatenated with a 4x4-cell, 8-bin gradient
   orientation histogram of a 64x64 grey image, each part L2-normalised. Retrieval: the ``top_k``
   test images of highest cosine similarity (at least ``min_sim``) are candidates.
2. Confirmation: a candidate matches when the imagehash pHash Hamming distance is <= ``phash_max``
   (of 64 bits) AND skimage's SSIM of the two 128x128 grey images is >= ``ssim_min``. SSIM of
   unaligned images fails for a copy that is cropped by a few percent or shifted (measured on
   scikit-image's photos: a 95% centre crop gave SSIM 0.15-0.57), so a candidate within
   ``phash_max + align_slack`` that fails the plain SSIM is aligned first: ORB keypoints, RANSAC
   similarity transform (>= 12 inliers), then SSIM over the overlap must be >= ``aligned_ssim_min``
   (those crops: 0.97-1.0; every pair of different photos: below 0.4 or no alignment at all).
3. Pair-aware rule: a unit of one image is a duplicate when it matches any test image. A unit of
   two or more images (a correspondence pair, a similarity triplet) is a duplicate only when every
   one of its images matches a *different* image of one and the same test sample, i.e. a training
   pair is a duplicate only if both its images match the two images of a test pair. (The paper's
   supplement is not in this repository's copy of the paper; this is the rule its issue states.)

Test sets: a BLINK parquet file or glob, a folder of parquet files (BLINK's Hugging Face layout
``<Sub_Task>/{val,test}-*.parquet``, both splits read, or a hub-cache repo folder; when a
sub-folder named after the task's BLINK subset (data/tasks.py) exists only it is used), a livr-ds
shard folder (manifest.json), a JSONL manifest, or a plain folder of images (each image its own
test sample).
"""

from __future__ import annotations

import glob
import logging
import os
import tarfile

import numpy as np
from PIL import Image

from ..data.images import open_image
from ..data.schema import DataError
from ..data.tasks import BLINK_SUBTASKS, canonical_task

log = logging.getLogger(__name__)

# livr-ds task -> BLINK hub folder (localization -> Object_Localization): data/tasks.py's one mapping
BLINK_SUBSETS = {task: sub for sub, task in BLINK_SUBTASKS.items()}
IMAGE_FILE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff")


# ---- test sets ------------------------------------------------------------------------------
def _decode(data: bytes, where: str) -> Image.Image | None:
    try:
        return open_image(data, where)
    except DataError as exc:
        log.warning("dedup: test image %s cannot be decoded (%s); ignored", where, exc)
        return None


def load_test_groups(path: str, task: str | None = None) -> tuple[list[list[Image.Image]], list[str]]:
    """-> (images grouped per test sample, the files read)."""
    from ..data.blink import hub_root, resolve_parquet
    from ..data.inputs import iter_jsonl, iter_parquet
    from ..data.manifest import read_manifest

    is_glob = not os.path.exists(path) and any(c in path for c in "*?[")
    if not os.path.exists(path) and not is_glob:
        raise DataError(f"{path}: --dedup-against not found (a BLINK parquet file, glob or hub folder, a shard "
                        "folder, a JSONL manifest or an image folder)")
    groups: list[list[Image.Image]] = []
    files: list[str] = []

    def add(images, where):
        g = [im for i, b in enumerate(images) if (im := _decode(b, f"{where}:{i}")) is not None]
        if g:
            groups.append(g)

    if is_glob:
        parquets = [p for p in resolve_parquet([path])[0] if p.endswith(".parquet")]
        if not parquets:
            raise DataError(f"{path}: pattern matches no .parquet file")
    elif os.path.isfile(path) and path.endswith(".parquet"):
        parquets = [path]
    elif os.path.isdir(path) and not os.path.isfile(os.path.join(path, "manifest.json")):
        root = hub_root(path)
        sub = BLINK_SUBSETS.get(canonical_task(task)) if task else None
        root = os.path.join(root, sub) if sub and os.path.isdir(os.path.join(root, sub)) else root
        parquets = sorted(glob.glob(os.path.join(glob.escape(root), "**", "*.parquet"), recursive=True))
    else:
        parquets = []
    if parquets:
        for s in iter_parquet(parquets, task="test"):
            add(s["images"], s["_where"])
        files = parquets
    elif os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json")):
        m = read_manifest(path)
        for sp in m["splits"].values():
            for sh in sp["shards"]:
                t = os.path.join(path, sh["name"])
                files.append(t)
                by_key: dict[str, list[bytes]] = {}
                with tarfile.open(t, "r:") as tf:
                    for ti in tf:
                        base = os.path.basename(ti.name)
                        if ti.isreg() and "." in base and base.rsplit(".", 1)[1].lower() in ("jpg", "jpeg", "png"):
                            by_key.setdefault(base.split(".", 1)[0], []).append(tf.extractfile(ti).read())
                for k, imgs in by_key.items():
                    add(imgs, f"{t}:{k}")
    elif os.path.isfile(path) and path.endswith(".jsonl"):
        for s in iter_jsonl(path):
            add(s["images"], s["_where"])
        files = [path]
    elif os.path.isdir(path):
        for p in sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True)):
            if p.lower().endswith(IMAGE_FILE_EXTS):
                with open(p, "rb") as f:
                    add([f.read()], p)
                files.append(p)
    else:
        raise DataError(f"{path}: --dedup-against must be a .parquet or .jsonl file or a folder")
    if not groups:
        raise DataError(f"{path}: no test images found to de-duplicate against")
    return groups, files


# ---- features -------------------------------------------------------------------------------
def cheap_embedding(im: Image.Image) -> np.ndarray:
    """Colour thumbnail + gradient-orientation histogram (robust to re-encoding, resizing, blur)."""
    thumb = np.asarray(im.convert("RGB").resize((12, 12), Image.BOX), dtype=np.float32) / 255.0
    thumb = (thumb - thumb.mean(axis=(0, 1), keepdims=True)).ravel()
    g = np.asarray(im.convert("L").resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255.0
    gy, gx = np.gradient(g)
    mag, ang = np.hypot(gx, gy), (np.arctan2(gy, gx) % np.pi)
    bins = np.minimum((ang / np.pi * 8).astype(int), 7)
    hist = np.zeros((4, 4, 8), np.float32)
    for cy in range(4):
        for cx in range(4):
            sl = (slice(cy * 16, cy * 16 + 16), slice(cx * 16, cx * 16 + 16))
            hist[cy, cx] = np.bincount(bins[sl].ravel(), weights=mag[sl].ravel(), minlength=8)
    parts = [thumb, hist.ravel()]
    v = np.concatenate([p / (np.linalg.norm(p) + 1e-8) for p in parts])
    return v / (np.linalg.norm(v) + 1e-8)


class ClipEmbedder:
    def __init__(self, model_dir: str):
        if not os.path.isdir(model_dir):
            raise DataError(f"{model_dir}: --clip-model must be a local directory with a CLIPModel "
                            "(config.json, weights, preprocessor_config.json)")
        import torch
        from transformers import CLIPImageProcessor, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval()
            self.proc = CLIPImageProcessor.from_pretrained(model_dir, local_files_only=True)
        except Exception as exc:
            raise DataError(f"{model_dir}: cannot load a CLIPModel offline ({type(exc).__name__}: {exc})") from None
        self.torch = torch
        self.name = os.path.abspath(model_dir)

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        out = []
        with self.torch.no_grad():
            for i in range(0, len(images), 32):
                px = self.proc(images=images[i:i + 32], return_tensors="pt")["pixel_values"]
                f = self.model.get_image_features(pixel_values=px)
                f = getattr(f, "pooler_output", f)  # newer transformers may return an output object
                f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-8)
                out.append(f.float().numpy())
        return np.concatenate(out)


def _grey(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("L").resize((128, 128), Image.BILINEAR), dtype=np.float64)


def aligned_ssim(a: Image.Image, b: Image.Image, min_inliers: int = 12) -> float | None:
    """SSIM of a and b after aligning a onto b (ORB + RANSAC similarity transform), over the part of
    b that a covers (at least half of it); None when no alignment is found."""
    from skimage.feature import ORB, match_descriptors
    from skimage.measure import ransac
    from skimage.metrics import structural_similarity
    from skimage.transform import SimilarityTransform, warp

    greys = [np.asarray(_small(im).convert("L"), dtype=np.float64) / 255.0 for im in (a, b)]
    orb, found = ORB(n_keypoints=300, fast_threshold=0.05), []
    for g in greys:
        try:
            orb.detect_and_extract(g)
        except (RuntimeError, IndexError, ValueError):  # flat or tiny images: no keypoints
            return None
        if len(orb.keypoints) < min_inliers:
            return None
        found.append((orb.keypoints[:, ::-1].copy(), orb.descriptors.copy()))  # (x, y)
    pairs = match_descriptors(found[0][1], found[1][1], cross_check=True, max_ratio=0.8)
    if len(pairs) < min_inliers:
        return None
    model, inliers = ransac((found[0][0][pairs[:, 0]], found[1][0][pairs[:, 1]]), SimilarityTransform,
                            min_samples=3, residual_threshold=2.0, max_trials=200, rng=0)
    if model is None or inliers is None or inliers.sum() < min_inliers:
        return None
    warped = warp(greys[0], model.inverse, output_shape=greys[1].shape, cval=-1.0)
    covered = warped >= 0
    if covered.mean() < 0.5:
        return None
    ys, xs = np.nonzero(covered)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    size = (128, 128)
    pa = Image.fromarray((np.clip(warped[box], 0, 1) * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    pb = Image.fromarray((greys[1][box] * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    return float(structural_similarity(np.asarray(pa, np.float64), np.asarray(pb, np.float64), data_range=255.0))


def _small(im: Image.Image) -> Image.Image:
    s = 256 / max(im.size)
    return im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR) if s < 1 else im


class Deduper:
    def __init__(self, groups: list[list[Image.Image]], *, clip_model: str | None = None, top_k: int = 10,
                 min_sim: float = 0.5, phash_max: int = 12, ssim_min: float = 0.6, align_slack: int = 8,
                 aligned_ssim_min: float = 0.8, source: str = "", files: list[str] | None = None):
        import imagehash

        self.imagehash = imagehash
        self.top_k, self.min_sim, self.phash_max, self.ssim_min = top_k, min_sim, phash_max, ssim_min
        self.align_slack, self.aligned_ssim_min = align_slack, aligned_ssim_min
        self.source, self.files = source, files or []
        self.embedder = ClipEmbedder(clip_model) if clip_model else None
        self.images: list[Image.Image] = []
        self.group_of: list[int] = []
        for gi, g in enumerate(groups):
            for im in g:
                self.images.append(_small(im))
                self.group_of.append(gi)
        self.n_groups = len(groups)
        self.emb = self._embed(self.images)
        self.hashes = [imagehash.phash(im) for im in self.images]
        self.greys = [_grey(im) for im in self.images]
        log.info("dedup: %d test images in %d test samples (%s)", len(self.images), self.n_groups, self.method)

    @classmethod
    def from_path(cls, path: str, task: str | None = None, **kw) -> "Deduper":
        groups, files = load_test_groups(path, task)
        return cls(groups, source=os.path.abspath(path), files=files, **kw)

    @property
    def method(self) -> str:
        return (f"CLIP image embedding ({self.embedder.name})" if self.embedder else
                "cheap embedding: 12x12 RGB thumbnail + 4x4x8 gradient-orientation histogram (no CLIP given)")

    def _embed(self, images: list[Image.Image]) -> np.ndarray:
        if self.embedder is not None:
            return self.embedder(images)
        return np.stack([cheap_embedding(im) for im in images])

    def matches(self, im: Image.Image) -> list[tuple[int, int, float]]:
        """Test images confirmed as near-duplicates of im: [(test index, phash distance, ssim)]."""
        from skimage.metrics import structural_similarity

        im = _small(im)
        sims = self.emb @ self._embed([im])[0]
        cand = [int(i) for i in np.argsort(-sims, kind="stable")[: self.top_k] if sims[i] >= self.min_sim]
        if not cand:
            return []
        h, g = self.imagehash.phash(im), None
        out = []
        for i in cand:
            d = int(h - self.hashes[i])
            if d > self.phash_max + self.align_slack:
                continue
            if d <= self.phash_max:
                g = _grey(im) if g is None else g
                s = float(structural_similarity(g, self.greys[i], data_range=255.0))
                if s >= self.ssim_min:
                    out.append((i, d, round(s, 3)))
                    continue
            s = aligned_ssim(im, self.images[i])  # a cropped or shifted copy
            if s is not None and s >= self.aligned_ssim_min:
                out.append((i, d, round(s, 3)))
        return out

    def is_duplicate(self, images: list[Image.Image]) -> tuple[bool, str]:
        found = [self.matches(im) for im in images]
        if len(images) == 1:
            if found[0]:
                i, d, s = found[0][0]
                return True, f"test sample {self.group_of[i]} (phash {d}, ssim {s})"
            return False, ""
        by_group: dict[int, list[set[int]]] = {}
        for k, f in enumerate(found):
            for i, _, _ in f:
                by_group.setdefault(self.group_of[i], [set() for _ in images])[k].add(i)
        for g, per in sorted(by_group.items()):
            if all(per) and _distinct_assignment(per):
                return True, f"test sample {g} (all {len(images)} images matched)"
        return False, ""

    def describe(self) -> dict:
        return {"against": self.source, "test_samples": self.n_groups, "test_images": len(self.images),
                "files": self.files[:50], "retrieval": self.method, "top_k": self.top_k, "min_cosine": self.min_sim,
                "confirm": f"imagehash.phash distance <= {self.phash_max} AND "
                           f"skimage SSIM (128x128 grey) >= {self.ssim_min}; or, for cropped/shifted copies, "
                           f"phash distance <= {self.phash_max + self.align_slack} AND SSIM after ORB+RANSAC "
                           f"alignment >= {self.aligned_ssim_min}",
                "pair_rule": "multi-image units are duplicates only when every image matches a distinct image "
                             "of one and the same test sample"}


def _distinct_assignment(per: list[set[int]]) -> bool:
    """Can each unit image be matched to a different test image (per[k] = its candidates)?
    Bipartite matching by augmenting paths."""
    match: dict[int, int] = {}

    def assign(k: int, seen: set[int]) -> bool:
        for t in sorted(per[k]):
            if t in seen:
                continue
            seen.add(t)
            if t not in match or assign(match[t], seen):
                match[t] = k
                return True
        return False

    return all(assign(k, set()) for k in range(len(per)))
