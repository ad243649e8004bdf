"""The evaluation entry points: `launch/eval.py`, and the `livr-ds` subcommands `eval` and `table`
(`add_eval_commands(subparsers)` registers them; livr_ds/cli.py calls it). The loop itself is
livr_ds/evaluation/loop.py, shared with training's validation and the experiments.

    python launch/eval.py --ckpt RUN/stage2 --data shards/ --mode standard --out results/livr.json
    torchrun --nproc_per_node 2 launch/eval.py ...          (same results, gathered on rank 0)

Outputs: `results.json` ({"mode", "per_task": {task: {"accuracy", "n"}}, "mean", ...} plus
provenance: checkpoint, data paths with the manifest's sha256 and the dataset revision, split,
pixel budget, parse failures, versions) and the raw predictions in `results.predictions.jsonl`
beside it; the paper's Table 1 columns for the tasks evaluated are printed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import time

import torch

from .loop import (DEFAULT_MAX_TOKENS, SCORINGS, default_max_tokens, evaluate, gather_records, load_model,
                   resolve_device, resolve_dtype)
from ..inference import DEFAULT_MAX_NEW_TOKENS, MODES, EvalMode, get_mode
from .scoring import accuracy_by_task, parse_failures
from .provenance import checkpoint_provenance, data_provenance, git_state, pixel_budget

log = logging.getLogger(__name__)


def summarize(records: list[dict], mode: EvalMode, *, name: str | None = None, provenance: dict | None = None,
              probe: dict | None = None, scoring: str = "generate") -> dict:
    acc = accuracy_by_task(records)
    out = {"name": name, "mode": mode.name, "policy": mode.policy, "latents_kept": mode.keep_latents,
           "scoring": scoring,
           "per_task": acc["per_task"], "mean": acc["mean"], "n": len(records),
           "parse_failures": parse_failures(records)}
    if probe is not None:
        out["probe"] = probe
    out["provenance"] = provenance or {}
    return out


def predictions_path(out: str) -> str:
    return f"{out.removesuffix('.json')}.predictions.jsonl"


def write_results(results: dict, records: list[dict], out: str) -> tuple[str, str]:
    """results.json + the raw predictions (one JSON object per sample) beside it, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    preds = predictions_path(out)
    results = {**results, "predictions": os.path.basename(preds)}
    for path, text in ((preds, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)),
                       (out, json.dumps(results, indent=1) + "\n")):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return out, preds


# ---- the entry point (launch/eval.py, `livr-ds eval`) -----------------------------------------
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="an export dir (with livr.json) or a stage run dir (uses export/<which>)")
    p.add_argument("--which", default="final", choices=["final", "best"], help="export of a run dir")
    p.add_argument("--base-model", help="zero-shot: a local base checkpoint (no --ckpt); with --ckpt: "
                                        "load the adapter onto this base instead of livr.json's")
    p.add_argument("--family", choices=["qwen2_5_vl", "qwen3_vl", "llava_onevision"], help="zero-shot: model family")
    p.add_argument("--data", nargs="+", required=True, help="shard directories (each with manifest.json)")
    p.add_argument("--split", default="test")
    p.add_argument("--mode", default="standard", choices=list(MODES))
    p.add_argument("--out", required=True, help="results JSON; predictions go to <stem>.predictions.jsonl")
    p.add_argument("--name", help="run name for `livr-ds table` (default: the file stem)")
    p.add_argument("--scoring", default="generate", choices=SCORINGS,
                   help="generate: greedy answers, parsed (default, the paper's protocol); likelihood: forced "
                        "choice, the option whose answer has the highest log-likelihood (multiple choice only)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per rank per generation batch")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--max-samples", type=int, default=0, help="a fixed mixed subset: the first N of a seeded shuffle of the split, the same at any world size (0 = all)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="refuse longer samples (answers are never cut); default: the export's max_tokens from "
                        f"training (livr.json), {DEFAULT_MAX_TOKENS} zero-shot")
    p.add_argument("--attn-backend", default="sdpa", choices=["sdpa", "eager"],
                   help="sdpa; eager is forced by --probe attention (attention weights need it)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: cuda:LOCAL_RANK when a GPU is visible, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on a CUDA device with bf16 support, else float32")
    p.add_argument("--probe", choices=["attention"], help="also measure answer->latent attention and draw "
                                                           "latent->image heat maps")
    p.add_argument("--probe-images", type=int, default=4, help="heat-map PNGs to draw (rank 0's first samples)")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers per rank")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _distributed_env() -> bool:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1


def run(args: argparse.Namespace) -> dict:
    """Evaluate as the arguments say; rank 0 writes the files. Returns the results on every rank."""
    from . import probes
    from .. import distributed as dist

    if args.mode not in MODES:
        raise ValueError(f"unknown eval mode {args.mode!r}; choose one of {', '.join(MODES)}")
    for name in ("max_samples", "batch_size", "max_new_tokens", "max_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name in ("max_samples", "max_tokens") else 1):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {value}: must be >= {0 if name in ('max_samples', 'max_tokens') else 1}"
                             + (" (0 = all samples)" if name == "max_samples" else ""))
    if args.ckpt is None and not (args.base_model and args.family):
        raise ValueError("give --ckpt (an export or a stage run dir), or --base-model and --family for zero-shot")
    started = time.time()
    requested = getattr(args, "device", "auto")
    if _distributed_env():  # several ranks: a process group (nccl on GPUs, gloo on CPUs)
        device = dist.init(None if requested == "auto" else requested)
    else:  # one process: no torch.distributed at all
        device = resolve_device(requested)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    backend = "eager" if args.probe == "attention" else args.attn_backend
    dtype = resolve_dtype(args.dtype, device)
    backbone = load_model(args.ckpt, which=args.which, base_model=args.base_model, family=args.family,
                          attn_backend=backend, device=device, dtype=dtype)
    max_tokens = args.max_tokens or default_max_tokens(backbone)
    mode = get_mode(args.mode)
    probe_dir = f"{args.out.removesuffix('.json')}.probes" if args.probe else None
    if probe_dir and dist.is_main():
        os.makedirs(probe_dir, exist_ok=True)
    records, probe_state = evaluate(
        backbone, args.data, mode, split=args.split, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        max_samples=args.max_samples, max_tokens=max_tokens, rank=dist.rank(), world_size=dist.world_size(),
        probe=args.probe, probe_images=args.probe_images if dist.is_main() else 0, probe_dir=probe_dir,
        num_workers=args.num_workers, scoring=args.scoring,
    )
    records, probe_states = gather_records(records, probe_state)
    probe = probes.AttentionAccumulator.merge(probe_states).summary(len(backbone.latent_ids)
                                                                            if mode.keep_latents else 0) \
        if args.probe else None
    if probe is not None:
        probe["heatmaps"] = os.path.abspath(probe_dir)
        probe["backend"] = backend
    import transformers

    provenance = {
        **checkpoint_provenance(backbone, args.ckpt, args.which, args.base_model),
        "family": backbone.adapter.family,
        "num_latents": len(backbone.latent_ids),
        "latents_fed": len(backbone.latent_ids) if mode.keep_latents else 0,
        "data": data_provenance(args.data, args.split),
        "max_samples": args.max_samples,
        "pixels": pixel_budget(backbone.processor),
        "generation": {"scoring": args.scoring, "greedy": True, "kv_cache": True,
                       "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size},
        "max_tokens": max_tokens,
        "attn_backend": backend, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
        "world_size": dist.world_size(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, **git_state()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - started, 2),
    }
    results = summarize(records, mode, name=args.name, provenance=provenance, probe=probe, scoring=args.scoring)
    if dist.is_main():
        out, preds = write_results(results, records, args.out)
        fails = results["parse_failures"]["total"]
        log.info("%s: mean %.2f over %d samples %s; %d parse failures; wrote %s and %s", mode.name, results["mean"],
                 len(records), {t: round(v["accuracy"], 2) for t, v in results["per_task"].items()}, fails, out, preds)
        if fails:
            log.warning("%d predictions named no valid answer (see 'parsed': null in %s)", fails, preds)
        from .table import results_table

        print(results_table(results, args.out), flush=True)  # the paper's Table 1 columns, tasks present
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"eval: error: {e}", flush=True)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def _eval(args) -> int:
    run(args)
    return 0


def _table(args) -> int:
    from .table import table_cmd

    return table_cmd(args)


def add_eval_commands(subparsers) -> None:
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
