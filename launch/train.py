"""Train one LIVR stage.

    deepspeed launch/train.py --ds ds_configs/zero2.json --config configs/demo.yaml [--set k=v ...]
    torchrun --nproc_per_node 2 launch/train.py ...      srun python launch/train.py ...

--stage 1|2 picks the stage (default: the config's `stage`); `--stage all` runs Stage 1, then
Stage 2 initialised from Stage 1's final export, as two phases of one launch.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from livr_ds.config import ConfigError, load_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--ds", default="ds_configs/zero2.json", help="DeepSpeed JSON; 'auto' fields come from the YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set latents.num=8 (repeatable)")
    p.add_argument("--stage", choices=["1", "2", "all"], default=None)
    p.add_argument("--resume", default="none", help="'auto' (latest checkpoint of this stage, if any), a path, or none")
    p.add_argument("--init-from", default=None, help="a Stage 1 run directory or export to start Stage 2 from")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        stage_overrides = [] if args.stage in (None, "all") else [f"stage={args.stage}"]
        cfg = load_config(args.config, args.overrides + stage_overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from livr_ds.train.trainer import run, stage_dir

    if args.stage != "all":
        return run(cfg, args.ds, resume=args.resume, init_from=args.init_from)
    stages = [s for s in (1, 2) if cfg.epochs(s) > 0]
    init_from = args.init_from
    for stage in stages:
        cfg.stage = stage
        code = run(cfg, args.ds, resume=args.resume, init_from=init_from)
        if code:
            return code
        if not os.path.exists(os.path.join(stage_dir(cfg), "DONE")):
            return 0  # interrupted by a signal: resume continues from here
        init_from = stage_dir(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
