"""`shards` subcommands: write, demo, verify, show.

The package CLI registers them with ``add_shards_commands(subparsers)``; for a quick run alone:

    python -c "import argparse; from livr_ds.data.cli import add_shards_commands; \\
p=argparse.ArgumentParser(); s=p.add_subparsers(dest='command'); add_shards_commands(s); \\
a=p.parse_args(); a.func(a)" shards demo --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .schema import DataError

log = logging.getLogger(__name__)


def _write(args: argparse.Namespace) -> int:
    from .convert import convert_jsonl, convert_parquet

    opts = dict(split=args.split, shard_size=args.shard_size, val_fraction=args.val_fraction, seed=args.seed,
                dedup_against=args.dedup_against, dedup_image_root=args.dedup_image_root,
                progress=not args.no_progress)
    if args.jsonl:
        for flag, value in (("--task", args.task), ("--parquet-split", args.parquet_split),
                            ("--revision", args.revision)):
            if value:
                raise DataError(f"{flag} applies to --parquet only")
        m = convert_jsonl(args.jsonl, args.image_root, args.out, **opts)
    else:
        m = convert_parquet(args.parquet, args.out, task=args.task, parquet_split=args.parquet_split or "val",
                            revision=args.revision, **opts)
    summary = {k: {"total": v["total"], "shards": len(v["shards"]), "tasks": v["tasks"]}
               for k, v in m["splits"].items()}
    print(json.dumps({"out": args.out, "splits": summary, "dedup": m.get("dedup", {}).get("removed"),
                      "revision": m.get("revision")}, indent=1))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import make_demo

    m = make_demo(args.out, seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                  image_size=args.image_size, tasks=args.tasks, shard_size=args.shard_size,
                  progress=not args.no_progress)
    print(json.dumps({"out": args.out, "splits": {k: v["tasks"] for k, v in m["splits"].items()}}, indent=1))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .convert import verify_shards

    problems = verify_shards(args.dir)
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{args.dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def _show(args: argparse.Namespace) -> int:
    from .show import show

    print(show(args.dir, args.out, n=args.n, split=args.split))
    return 0


def _run(fn):
    def run(args):
        try:
            rc = fn(args)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        if rc:
            raise SystemExit(rc)
        return 0
    return run


def add_shards_commands(subparsers) -> argparse.ArgumentParser:
    """Register ``shards {write,demo,verify,show}`` on an ``add_subparsers()`` object."""
    shards = subparsers.add_parser("shards", help="write, generate and check webdataset shards")
    sub = shards.add_subparsers(dest="shards_command", metavar="{write,demo,verify,show}")
    sub.required = True

    w = sub.add_parser("write", help="convert a JSONL manifest or BLINK-style parquet to shards")
    src = w.add_mutually_exclusive_group(required=True)
    src.add_argument("--jsonl", help="JSONL: one sample per line (task, question, choices, answer, images, ...)")
    src.add_argument("--parquet", nargs="+", help="BLINK-style parquet: file(s), a glob pattern, or the BLINK hub "
                     "folder (<Sub_Task>/{val,test}-*.parquet; see --parquet-split)")
    w.add_argument("--parquet-split", choices=["val", "test"], default=None,
                   help="with a hub folder: read its <Sub_Task>/<this>-*.parquet (default: val, what the paper "
                        "reports; BLINK's test answers are hidden). --split names the split written")
    w.add_argument("--revision", help="parquet: the dataset revision to record in the manifest (default: the "
                   "commit of the hub copy's .git or hub cache, if any)")
    w.add_argument("--image-root", help="JSONL: folder the image paths are relative to, and the only folder images "
                   "are read from (default: the JSONL's folder)")
    w.add_argument("--out", required=True, help="output folder for {split}-NNNNN.tar and manifest.json")
    w.add_argument("--split", default="train", help="split name for the written samples (default: train)")
    w.add_argument("--shard-size", type=int, default=256, help="samples per shard (default: 256)")
    w.add_argument("--val-fraction", type=float, default=0.0, help="move this fraction to split 'val'")
    w.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    w.add_argument("--dedup-against", metavar="TEST", nargs="+",
                   help="test samples: JSONL, shard folder, or parquet file(s) / glob / BLINK hub folder (its "
                        "val and test files): drop samples with a pixel-identical image")
    w.add_argument("--dedup-image-root", help="image root of a JSONL --dedup-against (default: its folder)")
    w.add_argument("--task", help="parquet only: task name for every row (default: the sub_task column)")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.set_defaults(func=_run(_write))

    d = sub.add_parser("demo", help="generate the BLINK-style demo tasks from scikit-image photos")
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--n-train", type=int, default=200)
    d.add_argument("--n-val", type=int, default=50)
    d.add_argument("--n-test", type=int, default=50)
    d.add_argument("--image-size", type=int, default=112)
    d.add_argument("--tasks", nargs="+", default=None,
                   help="subset of: jigsaw counting localization visual_similarity (default: all)")
    d.add_argument("--shard-size", type=int, default=256)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_run(_demo))

    v = sub.add_parser("verify", help="check a shard folder's sha256 sums and sample counts")
    v.add_argument("dir")
    v.set_defaults(func=_run(_verify))

    sh = sub.add_parser("show", help="render samples with their question and answer to a PNG grid")
    sh.add_argument("dir", help="shard folder (with manifest.json)")
    sh.add_argument("--n", type=int, default=8, help="number of samples (default: 8)")
    sh.add_argument("--split", default="train")
    sh.add_argument("--out", required=True, help="output image, e.g. grid.png")
    sh.set_defaults(func=_run(_show))
    return shards
