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

from livr_ds.config import ConfigError, load_config, resolve_deepspeed_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--ds", default=None,
                   help="DeepSpeed JSON (default: the experiment's `deepspeed` key); 'auto' fields come from the YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set latents.num=8 (repeatable)")
    p.add_argument("--stage", choices=["1", "2", "all"], default=None)
    p.add_argument("--resume", default="none", help="'auto' (latest checkpoint of this stage, if any), a path, or none")
    p.add_argument("--init-from", default=None, help="a Stage 1 run directory or export to start Stage 2 from")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def split_cpu_threads() -> None:
    """Several CPU ranks on one node: give each its share of the cores. torchrun sets
    OMP_NUM_THREADS=1; the deepspeed launcher does not, and every rank then runs torch's default
    of all cores (measured, the README's demo on 2 cores at 2 ranks: 0.6 s per step instead of 0.1,
    and much worse on a busy machine). An OMP_NUM_THREADS that is set is left alone; GPU ranks too."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    if "OMP_NUM_THREADS" in os.environ or ranks <= 1:
        return
    import torch

    if torch.cuda.is_available():
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // ranks)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # data-loader workers inherit it
    torch.set_num_threads(threads)


def main(argv=None) -> int:
    args = parse_args(argv)
    split_cpu_threads()
    try:
        stage_overrides = [] if args.stage in (None, "all") else [f"stage={args.stage}"]
        cfg = load_config(args.config, args.overrides + stage_overrides)
        ds = resolve_deepspeed_config(cfg, args.ds)
        if args.ds and os.path.basename(ds) != os.path.basename(cfg.deepspeed):
            print(f"note: --ds {args.ds} replaces the experiment's deepspeed: {cfg.deepspeed}", file=sys.stderr)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from livr_ds.train.trainer import run, stage_dir

    if args.stage != "all":
        return run(cfg, ds, resume=args.resume, init_from=args.init_from)
    stages = [s for s in (1, 2) if cfg.epochs(s) > 0]
    init_from = args.init_from
    for stage in stages:
        cfg.stage = stage
        code = run(cfg, ds, resume=args.resume, init_from=init_from)
        if code:
            return code
        if not os.path.exists(os.path.join(stage_dir(cfg), "DONE")):
            return 0  # interrupted by a signal: resume continues from here
        init_from = stage_dir(cfg)
    from livr_ds import distributed as dist

    if dist.is_main():
        try:
            print(finished_summary(cfg, stages), flush=True)
        except Exception as e:  # noqa: BLE001 - the stages are done; a summary must not fail the launch
            print(f"both stages done in {cfg.output.dir}; no summary ({type(e).__name__}: {e})", flush=True)
    return 0


def finished_summary(cfg, stages: list[int]) -> str:
    """What `--stage all` prints at its end: where the outputs are, the per-task validation
    table of both stages (livr_ds/report/tables.py), and the commands to run next."""
    from livr_ds.data.sources import ShardSource
    from livr_ds.report.run import load_run
    from livr_ds.report.tables import validation_table
    from livr_ds.train.trainer import stage_dir

    out = cfg.output.dir
    run = load_run(out, stages=stages)
    last = stage_dir(cfg, stages[-1])
    data = " ".join(s.path for s in cfg.data.val) or "DATA"
    split = "test"
    try:  # evaluate on the test split where the data has one
        for s in cfg.data.val:
            ShardSource(s.path, split="test").resolve()
    except Exception:  # noqa: BLE001 - no test split: name the validation one
        split = cfg.data.val_split
    rule = "=" * 100
    lines = [rule, "--stage all finished: " + ", then ".join(
        f"Stage {s} ({cfg.policy(s)} mask, {cfg.epochs(s)} epochs)" for s in stages), "",
        "Where everything is:"]
    for s in stages:
        lines.append(f"  {stage_dir(cfg, s)}/  metrics.jsonl, export/best/ and export/final/ (adapter + tokenizer "
                     "+ livr.json), checkpoints/, config.yaml")
    lines += [f"  evaluate {last} (its export/final/, or --which best)", ""]
    if cfg.data.val:
        n = f"a fixed subset of {cfg.data.val_max_samples} samples of " if cfg.data.val_max_samples else ""
        lines += [f"Validation accuracy per task (%; {n}data.val {data} ({cfg.data.val_split}), standard mask):",
                  validation_table([run]), ""]
    if cfg.model.path.startswith("tiny:"):
        lines += ["A tiny random model trained for minutes: accuracies near chance are expected (the demo's",
                  "two-choice tasks 50 %, counting 1-6 about 17 %). A run that learns: `livr-ds experiment",
                  "bottleneck-proof` (README, \"The bottleneck works\").", ""]
    results = os.path.join(out, "results")
    lines += ["Next:",
              f"  livr-ds eval --ckpt {last} --data {data} --split {split} --out {results}/livr.json",
              f"  livr-ds eval --ckpt {last} --data {data} --split {split} --mode bottleneck "
              f"--out {results}/livr_bottleneck.json",
              f"  livr-ds table {results}/*.json",
              f"  livr-ds report {out}        # plots and tables -> {os.path.join(out, 'report', 'report.html')}",
              rule]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
