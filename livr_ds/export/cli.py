"""`livr-ds export`: exports are written by training; this folds one into a plain checkpoint."""

from __future__ import annotations

from ..config import ConfigError
from .merge import MERGE_DTYPES, merge_export

def _export_cmd(args) -> int:
    if not args.merge:
        print("livr-ds export: nothing to do; pass --merge (exports are written by training)")
        return 2
    try:
        out = merge_export(args.ckpt, args.out, which=args.which, dtype=args.dtype, max_shard_size=args.max_shard_size)
    except ConfigError as e:
        print(f"livr-ds export: {e}")
        return 2
    print(f"wrote merged model to {out}")
    return 0


def add_export_command(sub) -> None:
    p = sub.add_parser("export", help="merge a trained adapter into a plain transformers checkpoint")
    p.add_argument("--ckpt", required=True, help="an export dir or a stage run dir")
    p.add_argument("--which", default="final", choices=["final", "best"], help="for a run dir")
    p.add_argument("--merge", action="store_true", help="fold LoRA + latent rows into the weights")
    p.add_argument("--dtype", default="auto", choices=["auto", *MERGE_DTYPES],
                   help="dtype of the merged weights (auto: the run's model.dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (an index lists them)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_export_cmd)
