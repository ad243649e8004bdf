"""`livr-ds doctor [--config C] [--set k=v ...]`: one screen on whether this machine can run a job.

Checks torch and its CUDA build, the GPUs and their memory, bf16, NCCL, flash-attn (importable,
so built for this torch), flex attention compiling on this device (a tiny compiled call, in a
subprocess; forward only on CPU, where training never uses it), DeepSpeed and whether its ops
need a build, the versions of the stack against setup.py's pins, torchvision (which breaks the
image processors on a CPU build), SLURM commands and the current allocation, and free disk where
output.dir goes. With --config: the model path (a local checkpoint with config.json, weights and
processor files, or tiny:/arch:), and every shard source (`ShardSource(...).resolve()`).

Each line is `ok`, `note` (fine here, worth knowing: no GPU on a CPU machine), `warn` (may matter:
a version other than the tested one) or `FAIL` (the run would stop: fix it first). Exit 1 when
anything FAILs, else 0. `--quick` (slurm/train.sbatch) skips the flex compile where no GPU is
visible and the shard scan (the trainer resolves the shards first, before loading the model,
and stops with exit 2).
"""

import argparse

from .report import Check, render
from .runner import Doctor

__all__ = ["Check", "Doctor", "add_doctor_command", "doctor_cmd", "render"]


def doctor_cmd(args) -> int:
    cfg = None
    head = "livr-ds doctor" + (f": {args.config}" if args.config else ": this machine (give --config to check a run)")
    print(head, flush=True)
    if args.config or args.overrides:
        from ...config import ConfigError, load_config

        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            print(render([Check("FAIL", "config", str(e), "fix the key named above")]))
            return 1
    checks = Doctor(cfg, ds_path=args.ds, quick=args.quick).run()
    print(render(checks), flush=True)
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def add_doctor_command(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="check that this machine (and a config's model and data) can run a job",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML: also check its model path, processor files and shard sources")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, as launch/train.py does (repeatable)")
    p.add_argument("--ds", help="DeepSpeed JSON whose optimizer is checked (default: the config's `deepspeed` key)")
    p.add_argument("--quick", action="store_true",
                   help="skip the flex compile without a GPU and the shard scan (what slurm/train.sbatch runs)")
    p.set_defaults(func=doctor_cmd)
