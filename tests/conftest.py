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
