"""Provenance of an evaluation result: which checkpoint, which data (manifest checksums and the
dataset revision), which pixel budget, which code. Written into every results JSON."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess


def sha256_file(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def data_provenance(data: list[str], split: str) -> list[dict]:
    """Per data source: path, split, manifest sha256 (the data revision) and what it says of itself."""
    out = []
    for d in data:
        manifest = os.path.join(d, "manifest.json") if os.path.isdir(d) else d
        entry = {"path": os.path.abspath(d), "split": split, "manifest": os.path.abspath(manifest),
                 "manifest_sha256": sha256_file(manifest)}
        if entry["manifest_sha256"]:
            with open(manifest) as f:
                m = json.load(f)
            info = m.get("splits", {}).get(split, {})
            entry["samples"] = info.get("total")
            entry["tasks"] = info.get("tasks")
            for key in ("revision", "source", "demo", "format"):
                if key in m:
                    entry[key] = m[key]
        out.append(entry)
    return out


def pixel_budget(processor) -> dict:
    """min/max pixels the image processor resizes to, and its raw size settings.

    Qwen-VL image processors keep min/max pixels as size.shortest_edge / size.longest_edge (in
    pixels, not edges); other processors record their own size fields."""
    ip = getattr(processor, "image_processor", None)
    size = getattr(ip, "size", None)
    if size is not None and not isinstance(size, dict):
        size = {k: v for k, v in vars(size).items() if v is not None}
    size = size or {}
    lo = getattr(ip, "min_pixels", None) or size.get("min_pixels")
    hi = getattr(ip, "max_pixels", None) or size.get("max_pixels")
    if lo is None and hi is None and type(ip).__name__.startswith("Qwen"):
        lo, hi = size.get("shortest_edge"), size.get("longest_edge")
    return {"min_pixels": lo, "max_pixels": hi, "image_processor": type(ip).__name__ if ip else None,
            "size": size or None}


def git_state() -> dict:
    """The livr-ds commit and whether tracked files differ from it (best effort: may not be a checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = (lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=10,
                                         check=False))
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return {"livr_ds_commit": None}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"livr_ds_commit": head.stdout.strip(), "livr_ds_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"livr_ds_commit": None}


def checkpoint_provenance(backbone, ckpt: str | None, which: str, base_model: str | None) -> dict:
    from ..export import read_livr_metadata

    if not ckpt:
        return {"ckpt": None, "zero_shot": True, "base_model": os.path.abspath(base_model or backbone.path)}
    meta = read_livr_metadata(backbone.path)
    keep = ("family", "base_model", "stage", "policy", "latents", "epoch", "global_step", "val_accuracy",
            "merged", "min_pixels", "max_pixels", "max_tokens")
    return {"ckpt": os.path.abspath(ckpt), "which": which, "export": os.path.abspath(backbone.path),
            "zero_shot": False, "livr": {k: meta[k] for k in keep if k in meta}}
