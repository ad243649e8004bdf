"""Visual correspondence from HPatches (Balntas et al. 2017; ``hpatches-sequences-release``).

Layout (the official release, github.com/hpatches/hpatches-dataset): one folder per sequence
(``i_*`` illumination, ``v_*`` viewpoint) holding ``1.ppm`` .. ``6.ppm`` and the homographies
``H_1_2`` .. ``H_1_6`` (3x3, whitespace-separated) mapping pixels of image 1 to image k.

Recipe: image pairs (i, j), i < j, j - i >= 2 (10 per sequence); H_i_j = H_1_j inv(H_1_i) (H_1_1 =
I). A REF point is drawn on image i, its warped position plus three distractors (>= 8% of the
long side from it and from each other) on image j as A-D (true position balanced over A-D).
Sequences are split between train / val / test (default 1000 / 500 / 700 samples, proportional
sequence counts); a pair gives up to 30 samples with different points.
"""

from __future__ import annotations

import os

import numpy as np

from ..data.schema import DataError
from .build import build
from .geometry import far_points
from .image_format import fit
from .source import need_dir, open_image
from .splits import balanced, split_by_key, split_fractions
from .units import Pools, Unusable
from .correspond import ref_and_candidates

QUESTION = ('A point is circled on the first image, labeled with REF. We change the camera position or lighting '
            'and shoot the second image. You are given multiple red-circled points on the second image, choices '
            'of "A, B, C, D" are drawn beside each circle. Which point on the second image corresponds to the '
            'point in the first image?')
PAIRS = [(i, j) for i in range(1, 7) for j in range(i + 2, 7)]


def read_h(path: str) -> np.ndarray:
    try:
        h = np.loadtxt(path, dtype=np.float64)
    except Exception as exc:
        raise DataError(f"{path}: cannot read a 3x3 homography ({exc})") from None
    if h.shape != (3, 3):
        raise DataError(f"{path}: expected a 3x3 homography, got shape {h.shape}")
    return h


def build_visual_correspondence(out: str, *, source: str, seed: int, sizes: dict, deduper=None,
                                shard_size: int = 256, progress: bool = False, **_) -> dict:
    task = "visual_correspondence"
    need_dir(source, "hpatches-sequences-release/ with one folder per sequence")
    seqs = sorted(d for d in os.listdir(source) if os.path.isdir(os.path.join(source, d)))
    if not seqs:
        raise DataError(f"{source}: no sequence folders (expected e.g. i_ajuntament/1.ppm, H_1_2)")
    H: dict[str, dict[int, np.ndarray]] = {}
    ann = []
    for s in seqs:
        sd = os.path.join(source, s)
        for k in range(1, 7):
            if not os.path.exists(os.path.join(sd, f"{k}.ppm")):
                raise DataError(f"{sd}: missing {k}.ppm (an HPatches sequence has 1.ppm .. 6.ppm)")
        H[s] = {1: np.eye(3)}
        for k in range(2, 7):
            p = os.path.join(sd, f"H_1_{k}")
            if not os.path.isfile(p):
                raise DataError(f"{sd}: missing homography file H_1_{k}")
            H[s][k] = read_h(p)
            ann.append(p)
    assign = split_by_key(seqs, split_fractions(sizes), seed)
    units = {sp: [(s, i, j) for s in keys for i, j in PAIRS] for sp, keys in assign.items()}

    def img(s, k):
        return open_image(os.path.join(source, s, f"{k}.ppm"))

    def make(u, rng, label):
        s, i, j = u
        a, b = img(s, i), img(s, j)
        hij = H[s][j] @ np.linalg.inv(H[s][i])
        a, sa = fit(a)
        b, sb = fit(b)
        long = max(b.size)
        margin = 0.06 * long
        for _ in range(100):
            p = (float(rng.uniform(0.06 * max(a.size), a.width - 0.06 * max(a.size))),
                 float(rng.uniform(0.06 * max(a.size), a.height - 0.06 * max(a.size))))
            q = hij @ np.array([p[0] / sa, p[1] / sa, 1.0])
            if abs(q[2]) < 1e-9:
                continue
            q = (float(q[0] / q[2] * sb), float(q[1] / q[2] * sb))
            if margin <= q[0] <= b.width - margin and margin <= q[1] <= b.height - margin:
                break
        else:
            raise Unusable("no point visible in both images")
        others = far_points(rng, b.width, b.height, 3, [q], 0.08 * long, margin)
        return ref_and_candidates(a, p, b, q, others, label, QUESTION,
                                  {"sequence": s, "pair": [i, j], "true_point": [round(v, 2) for v in q],
                                   "scales": [sa, sb]})

    pools = Pools(units=units, images=lambda u: [img(u[0], u[1]), img(u[0], u[2])],
                  unit_id=lambda u: f"{u[0]}:{u[1]}-{u[2]}", unit_images=lambda u: [u[0]], reuse=30,
                  annotations=ann, sources={"hpatches": source},
                  notes={"sequences_per_split": {sp: len(k) for sp, k in assign.items()},
                         "sequences": {sp: k for sp, k in assign.items()}})
    recipe = {"pairs": "(i, j), j - i >= 2, 10 per sequence", "ref_on": "image i", "candidates": 4,
              "distractor_min_dist": "8% of the long side", "split": "by sequence", "max_samples_per_pair": 30,
              "answers": "A-D balanced"}
    return build(task, out, seed=seed, sizes=sizes, pools=pools, make=make, labels_fn=balanced(4), recipe=recipe,
                 deduper=deduper, shard_size=shard_size, progress=progress)
