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
