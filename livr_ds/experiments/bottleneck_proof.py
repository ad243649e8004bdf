"""The bottleneck proof: the paper's test-time-bottleneck finding, reproduced end to end on CPU.

    livr-ds experiment bottleneck-proof --out runs/bottleneck-proof

A tiny random Qwen2.5-VL (2 layers, hidden 64, vision depth 2; every weight trains) learns the
synthetic 4-way task "which colour is the square" (livr_ds/experiments/synthetic.py; chance 25 %)
through the real pipeline: `launch/train.py` subprocesses (DeepSpeed ZeRO-2, webdataset shards,
exports), then `launch/eval.py`'s code in this process. Three runs, equal optimizer steps:

| run          | K | training                                          |
|--------------|---|---------------------------------------------------|
| Direct SFT   | 0 | standard mask, S1 + S2 steps                      |
| Latents only | 4 | standard mask, S1 + S2 steps                      |
| LIVR         | 4 | S1 steps bottleneck mask, then S2 steps standard  |

each evaluated under the test-time modes (standard, no_latents, bottleneck,
bottleneck_no_latents; K = 0 has only standard and bottleneck), twice: greedy generation with
answer parsing (the paper's protocol) and forced choice (`--scoring likelihood`: the option whose
answer has the highest log-likelihood, which never fails to parse). The paper's qualitative
finding (Section 5, Localization: LIVR keeps 70.49 under the bottleneck, latents-only falls to
chance, bottleneck + no latents is chance) is checked and written to DIR/proof.json:

- LIVR under the test-time bottleneck is well above chance (>= chance + `--margin` points);
- latents-only under the bottleneck is at chance: generation no better than chance + 3 binomial
  standard errors, forced choice within 3 standard errors of chance;
- LIVR under the bottleneck with the latents dropped is at chance (same rule).

Outputs in DIR: data/ (shards), tiny-qwen2_5_vl/, runs/<run>/ (training runs with their logs),
results/<run>.<mode>[.likelihood].json (+ predictions JSONL; attention probes and heat maps for
the generation runs with latents), table.md (Table 1 layout, a by-mode table, the probes, the
checks), proof.json. A rerun with the same settings reuses finished data and training runs
(--force retrains).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time

from . import pipeline

MODES_WITH_LATENTS = ("standard", "no_latents", "bottleneck", "bottleneck_no_latents")
CHANCE = 25.0  # 4-way, answers exactly balanced

# (key, row name, K, trained with the Stage 1 bottleneck, eval modes)
RUNS = (
    ("direct_sft", "Direct SFT", 0, False, ("standard", "bottleneck")),
    ("latents_only", "Latents only", 4, False, MODES_WITH_LATENTS),
    ("livr", "LIVR", 4, True, MODES_WITH_LATENTS),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    root = pipeline.repo_root()
    p.add_argument("--out", required=True, help="output directory (data, runs, results, table.md, proof.json)")
    p.add_argument("--config", default=os.path.join(root, "configs", "experiments", "bottleneck_proof.yaml"))
    p.add_argument("--stage1-steps", type=int, default=400, help="S1: LIVR's Stage 1 (bottleneck) steps (default 400)")
    p.add_argument("--stage2-steps", type=int, default=200, help="S2: LIVR's Stage 2 (standard) steps (default 200)")
    p.add_argument("--batch", type=int, default=32, help="micro batch size (one rank)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the config's)")
    p.add_argument("--warmup", type=int, default=100, help="warmup steps per stage (restarted for Stage 2)")
    p.add_argument("--n-val", type=int, default=64, help="validation samples (evaluated after every epoch)")
    p.add_argument("--n-test", type=int, default=200, help="test samples")
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    p.add_argument("--margin", type=float, default=25.0,
                   help="'well above chance' = at least this many points above 25 %% (default 25)")
    p.add_argument("--probe-images", type=int, default=4, help="heat maps per probed evaluation")
    p.add_argument("--runs", nargs="+", choices=[r[0] for r in RUNS], default=[r[0] for r in RUNS])
    p.add_argument("--force", action="store_true", help="regenerate data and retrain even if finished")


# ---- steps ----------------------------------------------------------------------------------
def _params(args) -> dict:
    return {"stage1_steps": args.stage1_steps, "stage2_steps": args.stage2_steps, "batch": args.batch,
            "lr": args.lr, "warmup": args.warmup, "n_val": args.n_val, "n_test": args.n_test, "seed": args.seed,
            "config": os.path.abspath(args.config)}


def make_data(out: str, args) -> str:
    """Train: S1 * batch fresh samples (one pass = LIVR's Stage 1); val/test held out."""
    from . import synthetic

    data = os.path.join(out, "data")
    params = {"n_train": args.stage1_steps * args.batch, "n_val": args.n_val, "n_test": args.n_test, "seed": args.seed,
              "task": synthetic.TASK}
    stamp = os.path.join(data, "experiment_data.json")
    if not args.force and pipeline.same_params(stamp, params):
        return data
    shutil.rmtree(data, ignore_errors=True)
    synthetic.write_task(data, params["n_train"], args.n_val, args.n_test, seed=args.seed)
    pipeline.write_json(stamp, params)
    return data


def _train(args, run: str, stage: str, sets: list[str], extra: list[str], log_path: str) -> None:
    pipeline.train(args.config, stage, sets, extra, log_path, run)


def _data_weight(steps: int, args) -> float:
    """Loader weight that makes one epoch `steps` optimizer steps over the S1 * batch samples
    (weight w = floor(w) full passes + a fresh subset; livr_ds/data/reader.py)."""
    return steps / args.stage1_steps


def train_run(args, out: str, data: str, run: str, k: int, two_stage: bool) -> tuple[str, float]:
    """Train one run unless an identical finished one is there. Returns (stage-2 dir, seconds)."""
    run_dir = os.path.join(out, "runs", run)
    params = {**_params(args), "run": run, "k": k, "two_stage": two_stage}
    stamp = os.path.join(run_dir, "experiment_run.json")
    stage2 = os.path.join(run_dir, "stage2")
    if not args.force and pipeline.same_params(stamp, params) and os.path.exists(os.path.join(stage2, "DONE")):
        return stage2, 0.0
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    started = time.time()
    tiny = os.path.join(out, "tiny-qwen2_5_vl")
    every = max(1, min(25, min(args.stage1_steps, args.stage2_steps) // 4))
    common = [f"name=bottleneck-proof-{run}", f"seed={args.seed}", f"model.path=tiny:{tiny}",
              f"data.val=[{data}]", f"output.dir={run_dir}", f"latents.num={k}",
              f"optim.micro_batch_size={args.batch}", f"optim.global_batch_size={args.batch}", f"data.val_max_samples={args.n_val}",
              "schedule.stage2_epochs=1", "logging.wandb=disabled",
              "logging.progress_bar=false", f"logging.every_steps={every}"]
    if args.lr is not None:
        common.append(f"optim.lr={args.lr}")

    def stage_sets(steps: int) -> list[str]:
        return [f"data.train=[{{path: {json.dumps(data)}, weight: {_data_weight(steps, args)!r}}}]",
                f"optim.warmup_ratio={min(args.warmup / steps, 0.99)!r}"]

    log_path = os.path.join(run_dir, "train.log")
    if two_stage:
        common.append("schedule.stage1_epochs=1")
        _train(args, run, "1", common + stage_sets(args.stage1_steps), [], log_path)
        init = os.path.join(run_dir, "stage1", "export", "final")
        _train(args, run, "2", common + stage_sets(args.stage2_steps), ["--init-from", init], log_path)
    else:  # Stage 2 only (standard mask), as long as both LIVR stages together
        common.append("schedule.stage1_epochs=0")
        _train(args, run, "2", common + stage_sets(args.stage1_steps + args.stage2_steps), [], log_path)
    pipeline.write_json(stamp, params)
    return stage2, time.time() - started


FORCED = "forced choice"


def eval_run(stage2: str, data: str, results_dir: str, run: str, name: str, mode: str, n_test: int,
             scoring: str, probe: bool, probe_images: int) -> tuple[str, dict]:
    """One evaluation through launch/eval.py's argument parser and code (in this process)."""
    stem = f"{run}.{mode}" + ("" if scoring == "generate" else f".{scoring}")
    out = os.path.join(results_dir, f"{stem}.json")
    return out, pipeline.evaluate(stage2, data, out, name if scoring == "generate" else f"{name} [{FORCED}]", mode,
                                  n_test, scoring, probe, probe_images)


def band(n: int) -> float:
    """3 binomial standard errors at chance, in points."""
    p = CHANCE / 100
    return 300 * math.sqrt(p * (1 - p) / max(n, 1))


def checks(results: dict, n: int, margin: float) -> dict:
    """The finding, from {(run, mode, scoring): results}. "At chance" needs both: the generated
    answers do no better than chance, and forced choice among the options (which never fails to
    parse) lands within 3 standard errors of chance."""
    def acc(run, mode, scoring="generate"):
        r = results.get((run, mode, scoring))
        return None if r is None else r["mean"]

    b = band(n)
    out = {}
    gen, lik = acc("livr", "bottleneck"), acc("livr", "bottleneck", "likelihood")
    out["livr_bottleneck_well_above_chance"] = {
        "generate": gen, "likelihood": lik, "rule": f"generate >= {CHANCE + margin:.2f}",
        "passed": None if gen is None else gen >= CHANCE + margin}
    for key, run, mode in (("latents_only_bottleneck_at_chance", "latents_only", "bottleneck"),
                           ("livr_bottleneck_no_latents_at_chance", "livr", "bottleneck_no_latents")):
        gen, lik = acc(run, mode), acc(run, mode, "likelihood")
        ok = None if gen is None or lik is None else (gen <= CHANCE + b and abs(lik - CHANCE) <= b)
        out[key] = {"generate": gen, "likelihood": lik,
                    "rule": f"generate <= {CHANCE + b:.2f} and likelihood in [{CHANCE - b:.2f}, {CHANCE + b:.2f}]",
                    "passed": ok}
    out["finding_shown"] = all(v["passed"] for v in out.values())
    return out


def run_experiment(args) -> dict:
    from ..evaluation import table

    out = os.path.abspath(args.out)
    args.config = os.path.abspath(args.config)
    if min(args.stage1_steps, args.stage2_steps, args.batch) < 1:
        raise ValueError("--stage1-steps, --stage2-steps and --batch must be >= 1")
    os.makedirs(out, exist_ok=True)
    timings = {}
    t = time.time()
    data = make_data(out, args)
    timings["data_s"] = round(time.time() - t, 1)
    results_dir = os.path.join(out, "results")
    results, files = {}, {"generate": [], "likelihood": []}
    for run, name, k, two_stage, modes in RUNS:
        if run not in args.runs:
            continue
        print(f"[bottleneck-proof] training {name} ...", flush=True)
        stage2, secs = train_run(args, out, data, run, k, two_stage)
        timings[f"train_{run}_s"] = round(secs, 1)
        t = time.time()
        for mode in modes:
            for scoring in ("generate", "likelihood"):
                path, res = eval_run(stage2, data, results_dir, run, name, mode, args.n_test, scoring,
                                     probe=scoring == "generate" and k > 0 and mode in ("standard", "bottleneck"),
                                     probe_images=args.probe_images)
                results[(run, mode, scoring)] = res
                files[scoring].append(path)
            print(f"[bottleneck-proof] {name:<13} {mode:<22} {results[(run, mode, 'generate')]['mean']:6.2f} "
                  f"(forced choice {results[(run, mode, 'likelihood')]['mean']:6.2f})", flush=True)
        timings[f"eval_{run}_s"] = round(time.time() - t, 1)
    verdict = checks(results, args.n_test, args.margin)
    task_md = table.format_table(files["generate"], baseline="Direct SFT" if "direct_sft" in args.runs else None)
    mode_md = table.format_table(files["generate"] + files["likelihood"], by="mode")
    probes = {f"{run}.{mode}": {"answer_to_latent": r["probe"]["answer_to_latent"],
                                "answer_to_latent_per_latent": r["probe"]["answer_to_latent_per_latent"],
                                "heatmaps": os.path.relpath(r["probe"]["heatmaps"], out)}
              for (run, mode, _), r in results.items() if r.get("probe")}
    key = (lambda run, mode, scoring: f"{run}.{mode}" + ("" if scoring == "generate" else f".{scoring}"))
    summary = {
        "command": "livr-ds experiment bottleneck-proof " + " ".join(_argv(args)),
        "params": _params(args), "chance": CHANCE, "chance_band": round(band(args.n_test), 2),
        "accuracy": {key(*k): r["mean"] for k, r in results.items()},
        "parse_failures": {key(*k): r["parse_failures"]["total"] for k, r in results.items()},
        "probes": probes, "checks": verdict, "timings": timings,
    }
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(render(summary, task_md, mode_md))
    pipeline.write_json(os.path.join(out, "proof.json"), summary)
    return summary


def _argv(args) -> list[str]:
    parts = ["--out", args.out, "--stage1-steps", str(args.stage1_steps), "--stage2-steps", str(args.stage2_steps),
             "--batch", str(args.batch), "--warmup", str(args.warmup),
             "--n-val", str(args.n_val), "--n-test", str(args.n_test), "--seed", str(args.seed)]
    if args.lr is not None:
        parts += ["--lr", str(args.lr)]
    return parts


def _num(v, digits=2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def render(summary: dict, task_md: str, mode_md: str) -> str:
    fails = {k: v for k, v in summary["parse_failures"].items() if v}
    lines = ["# Bottleneck proof", "", f"`{summary['command']}`", "",
             f"Task: which colour is the square (4-way, chance {CHANCE:.0f} %), {summary['params']['n_test']} test "
             f"samples; 3 standard errors at chance = {summary['chance_band']:.2f} points.", "",
             "## Table 1 layout (greedy generation, parsed)", "", task_md, "",
             f"## By evaluation mode (rows [{FORCED}]: the option with the highest answer log-likelihood)", "",
             mode_md, "",
             "Parse failures (generation): " + (", ".join(f"{k} {v}" for k, v in fails.items()) or "none") + ".", "",
             "## Attention probes (answer -> latent attention mass, mean over layers, heads, answer tokens)", "",
             "| run.mode | answer->latent | per latent | heat maps |", "|---|---:|---:|---|"]
    for k, p in summary["probes"].items():
        lines.append(f"| {k} | {_num(p['answer_to_latent'], 4)} | {_num(p['answer_to_latent_per_latent'], 4)} | "
                     f"{p['heatmaps']} |")
    lines += ["", "## Checks", ""]
    for k, c in summary["checks"].items():
        if isinstance(c, dict):
            lines.append(f"- {k}: generate {_num(c['generate'])}, {FORCED} {_num(c['likelihood'])}; "
                         f"{c['rule']} -> {'PASS' if c['passed'] else 'FAIL'}")
    lines += [f"- finding shown: {summary['checks']['finding_shown']}", "",
              "Timings (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings"].items()), ""]
    return "\n".join(lines)


def run_cmd(args) -> int:
    summary = pipeline.run_and_print(run_experiment, args, "proof.json")
    print(f"total {summary['timings']['total_s']:.0f} s; finding shown: {summary['checks']['finding_shown']}")
    return 0


def add_command(experiments) -> None:
    """`livr-ds experiment bottleneck-proof` (argparse set-up only: the heavy imports are deferred)."""
    b = experiments.add_parser("bottleneck-proof", formatter_class=argparse.RawDescriptionHelpFormatter,
                               help="tiny VLM from scratch: LIVR vs latents-only vs Direct SFT under the test-time "
                                    "bottleneck", description=__doc__)
    add_arguments(b)
    b.set_defaults(func=run_cmd)
