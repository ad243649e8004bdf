"""`data build TASK` : build one of the paper's nine training tasks from its source dataset.

    livr-ds data build localization --source /data/coco --out shards/localization --seed 42 \\
        --dedup-against /data/BLINK [--clip-model /models/clip-vit-b32] [--n-train 1000 --n-val 250]

The package CLI registers it with ``add_data_commands(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging

from ..data.cli import _run
from ..data.schema import DataError

log = logging.getLogger(__name__)

# task -> (module, function, default sizes (train, val, test)); out dir names match
# configs/livr_multitask_6k.yaml (shards/<task>).
TASKS = {
    "counting": ("pixmo", "build_counting", (1000, 250, 0)),
    "jigsaw": ("coco", "build_jigsaw", (1000, 250, 0)),
    "localization": ("coco", "build_localization", (1000, 250, 0)),
    "visual_correspondence": ("hpatches", "build_visual_correspondence", (1000, 500, 700)),
    "art_style": ("artbench", "build_art_style", (1000, 250, 0)),
    "semantic_correspondence": ("spair", "build_semantic_correspondence", (1000, 250, 0)),
    "functional_correspondence": ("funkpoint", "build_functional_correspondence", (1000, 144, 146)),
    "relative_reflectance": ("mid", "build_reflectance", (1000, 250, 0)),
    "visual_similarity": ("nights", "build_visual_similarity", (1000, 250, 0)),
}


def build_task(task: str, out: str, *, source: str, source_2: str | None = None, seed: int = 42,
               n_train: int | None = None, n_val: int | None = None, n_test: int | None = None,
               dedup_against: str | None = None, clip_model: str | None = None, shard_size: int = 256,
               progress: bool = False, **opts) -> dict:
    """Python entry point of `data build`; returns the manifest."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    mod, fn, (d_train, d_val, d_test) = TASKS[task]
    sizes = {"train": d_train if n_train is None else n_train, "val": d_val if n_val is None else n_val,
             "test": d_test if n_test is None else n_test}
    for s, n in sizes.items():
        if n < 0:
            raise DataError(f"--n-{s} must be >= 0, got {n}")
    if sizes["train"] + sizes["val"] + sizes["test"] == 0:
        raise DataError("nothing to build: all of --n-train/--n-val/--n-test are 0")
    deduper = None
    if dedup_against:
        from .dedup import Deduper

        deduper = Deduper.from_path(dedup_against, task=task, clip_model=clip_model)
    elif clip_model:
        raise DataError("--clip-model is only used with --dedup-against")
    builder = getattr(importlib.import_module(f"{__package__}.{mod}"), fn)
    return builder(out, source=source, source_2=source_2, seed=seed, sizes=sizes, deduper=deduper,
                   shard_size=shard_size, progress=progress, **opts)


def _build(args: argparse.Namespace) -> int:
    m = build_task(args.task, args.out, source=args.source, source_2=args.source_2, seed=args.seed,
                   n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, dedup_against=args.dedup_against,
                   clip_model=args.clip_model, shard_size=args.shard_size, progress=not args.no_progress,
                   coco_split=args.coco_split, albedo_linear=args.albedo_linear)
    b = m["build"]
    print(json.dumps({"out": args.out, "task": args.task,
                      "splits": {s: {"samples": v["samples"], "skipped_corrupt": v["skipped_corrupt"],
                                     "dedup_removed": v["dedup_removed"]} for s, v in b["splits"].items()}},
                     indent=1))
    return 0




def add_data_commands(subparsers) -> argparse.ArgumentParser:
    """Register ``data build TASK ...`` on an ``add_subparsers()`` object."""
    data = subparsers.add_parser("data", help="build the paper's training tasks from their source datasets")
    sub = data.add_subparsers(dest="data_command", metavar="{build}")
    sub.required = True
    b = sub.add_parser("build", help="build one task's train/val shards (docs/builders.md)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("task", choices=sorted(TASKS))
    b.add_argument("--source", required=True, help="the source dataset (layout per task: docs/builders.md)")
    b.add_argument("--source-2", help="second source: counting = folder of downloaded PixMo images; "
                   "relative_reflectance = folder of per-scene albedo images")
    b.add_argument("--out", required=True, help="output shard folder (use shards/<task> for the 6k mixture)")
    b.add_argument("--seed", type=int, default=42)
    b.add_argument("--n-train", type=int, default=None, help="train samples (default 1000)")
    b.add_argument("--n-val", type=int, default=None, help="val samples (default 250; 500 visual_correspondence, "
                   "144 functional_correspondence)")
    b.add_argument("--n-test", type=int, default=None, help="held-out test samples (visual_correspondence 700, "
                   "functional_correspondence 146; others 0: their test set is BLINK)")
    b.add_argument("--dedup-against", metavar="TEST", help="test set to de-duplicate against: BLINK parquet file or "
                   "folder (HF layout), livr-ds shard folder, JSONL, or image folder")
    b.add_argument("--clip-model", metavar="DIR", help="local CLIPModel directory for dedup retrieval "
                   "(offline); default: a cheap colour/gradient embedding")
    b.add_argument("--coco-split", default="train2017", help="jigsaw/localization: COCO split folder to draw from")
    b.add_argument("--albedo-linear", action="store_true", help="relative_reflectance: albedo files are linear "
                   "(default: sRGB-encoded, linearised)")
    b.add_argument("--shard-size", type=int, default=256)
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_run(_build))
    return data
