"""The evaluation subcommands of `livr-ds`: `eval`, `table` and `experiment bottleneck-proof`.

`add_eval_commands(subparsers)` registers them; livr_ds/cli.py calls it.
"""

from __future__ import annotations

import argparse


def _eval(args) -> int:
    from .evaluate import run
    from .table import results_table
    from .train import distributed as dist

    results = run(args)
    if dist.is_main():  # the paper's Table 1 columns for the tasks evaluated (livr_ds/table.py)
        print(results_table(results, args.out), flush=True)
    return 0


def _table(args) -> int:
    from .table import table_cmd

    return table_cmd(args)


def _bottleneck_proof(args) -> int:
    from .experiments.bottleneck_proof import run_cmd

    return run_cmd(args)


def add_eval_commands(subparsers) -> None:
    from .evaluate import add_eval_arguments

    p = subparsers.add_parser("eval", help="evaluate an export (or a base model, zero-shot) on a test split",
                              description="Same as python launch/eval.py (single process; use launch/eval.py "
                                          "under torchrun/deepspeed/srun for several ranks).")
    add_eval_arguments(p)
    p.set_defaults(func=_eval)

    p = subparsers.add_parser("table", help="results JSONs as a markdown table (the paper's Table 1 layout)")
    p.add_argument("results", nargs="+", help="results JSON files written by launch/eval.py")
    p.add_argument("--baseline", help="row name to compare against (adds a Δ column: mean minus its mean)")
    p.add_argument("--by", choices=["task", "mode"], default="task",
                   help="task: tasks as columns (Table 1); mode: one row per run, one column per eval mode")
    p.add_argument("--digits", type=int, default=2)
    p.add_argument("--out", help="also write the table to this file")
    p.set_defaults(func=_table)

    from .experiments import bottleneck_proof  # argparse set-up only: the heavy imports are deferred

    p = subparsers.add_parser("experiment", help="run a built-in experiment end to end")
    exp = p.add_subparsers(dest="experiment", required=True)
    b = exp.add_parser("bottleneck-proof", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="tiny VLM from scratch: LIVR vs latents-only vs Direct SFT under the test-time bottleneck",
                       description=bottleneck_proof.__doc__)
    bottleneck_proof.add_arguments(b)
    b.set_defaults(func=_bottleneck_proof)
