"""`livr-ds experiment NAME`: the built-in experiments' command registry."""

from __future__ import annotations


def add_experiment_command(subparsers) -> None:
    from . import bottleneck_proof, livr_vs_sft

    p = subparsers.add_parser("experiment", help="run a built-in experiment end to end")
    experiments = p.add_subparsers(dest="experiment", required=True)
    bottleneck_proof.add_command(experiments)
    livr_vs_sft.add_command(experiments)
