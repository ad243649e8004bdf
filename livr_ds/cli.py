"""`livr-ds`: the command-line entry point. Each subcommand is a thin call into the library."""

from __future__ import annotations

import argparse
import logging
import sys


def _mask(args) -> int:
    from . import segments

    seg = segments.parse_segments(args.segments)
    policies = segments.POLICIES if args.policy == "all" else [args.policy]
    for i, policy in enumerate(policies):
        if i:
            print()
        print(segments.format_mask(seg, policy))
    return 0


def _tiny_model(args) -> int:
    from .models import get_adapter

    path = get_adapter(args.family).write_tiny(args.out, seed=args.seed, tied=args.tied,
                                               spare_rows=args.spare_rows, system_prompt=args.system_prompt)
    print(f"wrote a tiny random {args.family} checkpoint to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .segments import POLICIES

    parser = argparse.ArgumentParser(prog="livr-ds", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mask", help="print the attention matrix a mask policy allows")
    p.add_argument("--policy", default="bottleneck", choices=[*POLICIES, "all"])
    p.add_argument("--segments", required=True,
                   help='one letter per token: P prompt, I image, L latent, A answer, X pad, e.g. "P I I L A"')
    p.set_defaults(func=_mask)

    p = sub.add_parser("tiny-model", help="write a tiny random checkpoint (tests, demo)")
    p.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl", "llava_onevision"])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tied", action="store_true", help="tie lm_head to embed_tokens (as Qwen2.5-VL-3B, Qwen3-VL-4B)")
    p.add_argument("--spare-rows", type=int, default=0, help="embedding rows beyond the tokenizer's length")
    p.add_argument("--system-prompt", action="store_true",
                   help="the family's default system prompt in the chat template (Qwen2.5-VL)")
    p.set_defaults(func=_tiny_model)

    for register in _optional_commands():
        register(sub)
    return parser


def _optional_commands():
    """Subcommands that live next to the code they drive."""
    from .data.cli import add_shards_commands

    yield add_shards_commands
    from .export.cli import add_export_command

    yield add_export_command
    from .builders.cli import add_data_commands

    yield add_data_commands
    from .tools.bench import add_bench_command

    yield add_bench_command
    from .evaluation.cli import add_eval_commands

    yield add_eval_commands
    from .evaluation.latent_analysis import add_analyze_command

    yield add_analyze_command
    from .experiments.cli import add_experiment_command

    yield add_experiment_command
    from .report.write import add_report_command

    yield add_report_command
    from .tools.doctor import add_doctor_command

    yield add_doctor_command
    from .tools.memory_plan import add_plan_command

    yield add_plan_command


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"livr-ds {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
