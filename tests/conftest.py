"""Shared fixtures: tiny random checkpoints of the real transformers architectures."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> directory of a tiny random checkpoint, written once per session."""
    from livr_ds.models import FAMILIES, get_adapter

    root = tmp_path_factory.mktemp("tiny")
    return {f: get_adapter(f).write_tiny(str(root / f), seed=0) for f in FAMILIES}


# The tied tiny models carry the released small checkpoints' layout (Qwen2.5-VL-3B, Qwen3-VL-4B):
# lm_head tied to embed_tokens, embedding rows beyond the tokenizer's length (fewer than the
# tests' 4 latents, so adding them both fills spare rows and grows the table), and the
# family's default system prompt where the released chat template has one.
TINY_SPARE_ROWS = 2
TIED_FAMILIES = ("qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="session")
def tiny_tied_dirs(tmp_path_factory):
    """family -> directory of a tiny random checkpoint with a tied output head, written once per session."""
    from livr_ds.models import get_adapter

    root = tmp_path_factory.mktemp("tiny_tied")
    return {f: get_adapter(f).write_tiny(str(root / f), seed=0, tied=True, spare_rows=TINY_SPARE_ROWS,
                                         system_prompt=True) for f in TIED_FAMILIES}


@pytest.fixture(scope="session")
def photos():
    """Real photographs that ship with scikit-image, as 112 x 112 RGB PIL images."""
    from PIL import Image
    from skimage import data

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        arr = getattr(data, name)()
        out.append(Image.fromarray(arr).convert("RGB").resize((112, 112)))
    return out


# ---- SLURM (tests/test_slurm.py, tests/test_multinode.py) ---------------------------------------
# Session-wide, so the one-node reference training chain runs once and both modules compare with
# it: the multi-node runs must equal this one-node run of the same world size bit for bit.

@pytest.fixture(scope="session")
def slurm():
    """A private one-node SLURM cluster (tests/slurm_cluster.py); skips where none can start."""
    import slurm_cluster as sc

    reason = sc.unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = sc.SlurmCluster.start(timeout=60)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def train_setup(slurm, tmp_path_factory):
    """(directory, --set overrides): demo shards and a tiny model the SLURM jobs train on."""
    from test_slurm import make_train_data

    tmp = tmp_path_factory.mktemp("slurm-train")
    return tmp, make_train_data(tmp)


@pytest.fixture(scope="session")
def reference_chain(slurm, train_setup):
    """Stage 1 -> Stage 2 through slurm/submit.sh, one node x 2 tasks, uninterrupted (<tmp>/ref)."""
    import time

    from test_slurm import _read, _run_chain

    tmp, overrides = train_setup
    t0 = time.time()
    res = _run_chain(slurm, tmp, overrides, str(tmp / "ref"))
    res["seconds"] = time.time() - t0
    res["steps"] = {s: int(_read(tmp / "ref" / s / "DONE").strip() or 0) if os.path.exists(tmp / "ref" / s / "DONE")
                    else 0 for s in ("stage1", "stage2")}
    res["dir"] = tmp / "ref"
    return res


REFUSED_KEY = "thin"


def write_shards_with_a_refused_image(out, n: int = 7) -> str:
    """n counting samples in train and test splits, one of them (key REFUSED_KEY) with a 4000 x 10
    image, which the Qwen-VL processors refuse (aspect ratio above 200): shards written elsewhere,
    without the shape check livr-ds's writer makes (lifted here to write them)."""
    import io

    import numpy as np
    from PIL import Image

    from livr_ds.data import writer

    def png(size, seed):
        arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    check, writer.MAX_ASPECT_RATIO = writer.MAX_ASPECT_RATIO, 10**9
    try:
        for split in ("train", "test"):
            samples = [{"key": REFUSED_KEY if i == 2 else f"{split}-{i}", "task": "counting",
                        "question": "How many circles are there?", "choices": ["1", "2", "3", "4"],
                        "answer": "ABCD"[i % 4], "images": [png((4000, 10) if i == 2 else (56, 56), i)]}
                       for i in range(n)]
            writer.write_shards(samples, str(out), split, shard_size=4, progress=False)
    finally:
        writer.MAX_ASPECT_RATIO = check
    return str(out)


def damage_first_image(shard) -> str:
    """Overwrite the start of the shard's first image in place (same size) and record the shard's
    new sha256 in its manifest: a shard written with one undecodable image. (Without the manifest
    update it is a shard changed after writing, which the index refuses as a whole.) -> the key."""
    import tarfile

    from livr_ds.data.manifest import read_manifest, sha256_file, write_manifest

    shard = str(shard)
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith((".png", ".jpg", ".jpeg")))
    with open(shard, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\0" * 64)  # no image format left to recognise
    digest, folder = sha256_file(shard), os.path.dirname(shard)
    for _ in range(3):  # the shard's own folder's manifest and those above that list it (demo data)
        if os.path.isfile(os.path.join(folder, "manifest.json")):
            manifest, name = read_manifest(folder), os.path.relpath(shard, folder)
            for split in manifest["splits"].values():
                for entry in split.get("shards", []):
                    if entry["name"] == name:
                        entry["sha256"] = digest
            write_manifest(folder, manifest)
        folder = os.path.dirname(folder)
    return member.name.split(".")[0]
