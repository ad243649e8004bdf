"""LIVR vs Direct SFT over seeds, under controlled conditions.

    livr-ds experiment livr-vs-sft --seeds 5 --out runs/livr-vs-sft

The paper reports +6 points for LIVR over Direct SFT (Qwen2.5-VL-3B, 61.61 -> 67.85); the one
independent reproduction found none on counting (76.06 vs 75.14, one seed). This experiment asks
the question in a regime closer to the paper's than the bottleneck proof's from-scratch task:

1. **Pre-training** (once, fixed seed): a tiny random Qwen2.5-VL (2 layers, hidden 64, vision
   depth 2) learns broad synthetic scenes with every weight trainable and no latents
   (livr_ds/experiments/scenes.py, `scene_attributes`: the colour of the square in a named
   quadrant, or whether a quadrant holds one). Its final export is the base checkpoint.
2. **Fine-tuning** (per seed, three runs with identical data and equal optimizer steps): LoRA on
   the LM + the latent rows only (vision tower and projector frozen), the paper's recipe shape
   (configs/experiments/livr_vs_sft.yaml), on ~1k samples of `count_colour` ("how many red
   squares", 0-3, chance 25 %): a task that needs every quadrant, never seen in pre-training.

| run          | K | fine-tuning                                     |
|--------------|---|-------------------------------------------------|
| Direct SFT   | 0 | standard mask, E1 + E2 epochs                   |
| Latents only | 4 | standard mask, E1 + E2 epochs                   |
| LIVR         | 4 | E1 epochs bottleneck mask, then E2 standard     |

Each run's final export is evaluated on a held-out test set (greedy generation, parsed) in the
standard mode, and the runs with latents also under the test-time bottleneck; `livr-ds analyze
latents` runs on each run with latents (swap, ablations, sensitivity, probe). Statistics: per run
the per-seed accuracies, their mean, a 95 % interval from a bootstrap over test samples paired
across seeds and runs (the same resampled samples for every seed and run), a t interval over
seeds, and the paired differences LIVR - Direct SFT and LIVR - latents only with their
bootstrap intervals, the seeds on which LIVR was ahead, and the smallest difference the design
detects with 80 % power (2.8 bootstrap standard errors). DIR/results.json holds it all,
DIR/table.md renders it. Finished steps are reused when their parameters are unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time

import numpy as np

from . import pipeline

CHANCE = 25.0
# (key, row name, K > 0, trained with the Stage 1 bottleneck)
RUNS = (
    ("direct_sft", "Direct SFT", False, False),
    ("latents_only", "Latents only", True, False),
    ("livr", "LIVR", True, True),
)
QUICK = {"pretrain_steps": 12, "pretrain_batch": 8, "n_train": 32, "n_val": 8, "n_test": 16, "batch": 8,
         "stage1_epochs": 1, "stage2_epochs": 1, "seeds": 2, "analysis_samples": 6, "bootstrap": 200}


def add_arguments(p: argparse.ArgumentParser) -> None:
    root = pipeline.repo_root()
    p.add_argument("--out", required=True, help="output directory (data, runs, results, results.json, table.md)")
    p.add_argument("--config", default=os.path.join(root, "configs", "experiments", "livr_vs_sft.yaml"))
    p.add_argument("--seeds", type=int, default=5, help="fine-tuning seeds (default 5)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--pretrain-seed", type=int, default=0, help="pre-training data and weights seed")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--n-train", type=int, default=1024, help="fine-tuning samples (default 1024)")
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--batch", type=int, default=16, help="fine-tuning batch (one rank)")
    p.add_argument("--stage1-epochs", type=int, default=2, help="E1: LIVR's Stage 1 epochs")
    p.add_argument("--stage2-epochs", type=int, default=2, help="E2: LIVR's Stage 2 epochs")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning lr (default: the config's)")
    p.add_argument("--num-latents", type=int, default=4, help="K of the runs with latents")
    p.add_argument("--analysis-samples", type=int, default=64, help="samples for `analyze latents` (0 = skip)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--runs", nargs="+", choices=[r[0] for r in RUNS], default=[r[0] for r in RUNS])
    p.add_argument("--quick", action="store_true",
                   help="a minutes-long smoke version (tests): " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--force", action="store_true", help="regenerate data and retrain even if finished")


def apply_quick(args) -> None:
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)


def seeds(args) -> list[int]:
    return list(range(args.first_seed, args.first_seed + args.seeds))


# ---- data and pre-training -------------------------------------------------------------------
def make_data(out: str, args) -> tuple[str, str]:
    from . import scenes

    pre, count = os.path.join(out, "data", "pretrain"), os.path.join(out, "data", "count")
    wanted = (
        (pre, scenes.attribute_samples, {"train": args.pretrain_steps * args.pretrain_batch, "val": args.n_val},
         args.pretrain_seed),
        (count, scenes.count_samples, {"train": args.n_train, "val": args.n_val, "test": args.n_test}, 0),
    )
    for path, make, sizes, seed in wanted:
        params = {"sizes": sizes, "seed": seed, "task": make.__name__}
        stamp = os.path.join(path, "experiment_data.json")
        if args.force or not pipeline.same_params(stamp, params):
            shutil.rmtree(path, ignore_errors=True)
            scenes.write(path, make, sizes, seed)
            pipeline.write_json(stamp, params)
    return pre, count


def _finished(run_dir: str, params: dict, args) -> bool:
    return (not args.force and pipeline.same_params(os.path.join(run_dir, "experiment_run.json"), params)
            and os.path.exists(os.path.join(run_dir, "stage2", "DONE")))


def _start(run_dir: str) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)


def pretrain(out: str, data: str, args) -> tuple[str, float]:
    """The base checkpoint: a tiny random model trained on every weight (K = 0) for one pass."""
    run_dir = os.path.join(out, "runs", "pretrain")
    params = {"steps": args.pretrain_steps, "batch": args.pretrain_batch, "lr": args.pretrain_lr,
              "seed": args.pretrain_seed, "config": os.path.abspath(args.config)}
    base = os.path.join(run_dir, "stage2", "export", "final")
    if _finished(run_dir, params, args):
        return base, 0.0
    _start(run_dir)
    started = time.time()
    sets = ["name=livr-vs-sft-pretrain", f"seed={args.pretrain_seed}",
            f"model.path=tiny:{os.path.join(out, 'tiny-qwen2_5_vl')}", "model.trainable=all", "latents.num=0",
            f"data.train=[{data}]", f"data.val=[{data}]", f"optim.lr={args.pretrain_lr!r}",
            f"optim.micro_batch_size={args.pretrain_batch}", f"optim.global_batch_size={args.pretrain_batch}",
            "optim.warmup_ratio=0.1", "schedule.stage1_epochs=0", "schedule.stage2_epochs=1",
            f"data.val_max_samples={args.n_val}", f"output.dir={run_dir}", "logging.wandb=disabled",
            "logging.progress_bar=false", f"logging.every_steps={max(1, min(50, args.pretrain_steps // 4))}"]
    pipeline.train(args.config, "2", sets, [], os.path.join(run_dir, "train.log"), "pre-training")
    pipeline.write_json(os.path.join(run_dir, "experiment_run.json"), params)
    return base, time.time() - started


# ---- fine-tuning -----------------------------------------------------------------------------
def finetune(out: str, base: str, data: str, run: str, k: int, two_stage: bool, seed: int,
             args) -> tuple[str, float]:
    """One fine-tuning run (stage-2 dir, seconds); reused when finished with the same parameters."""
    run_dir = os.path.join(out, "runs", f"{run}-seed{seed}")
    params = {"run": run, "k": k, "two_stage": two_stage, "seed": seed, "n_train": args.n_train, "batch": args.batch,
              "stage1_epochs": args.stage1_epochs, "stage2_epochs": args.stage2_epochs, "lr": args.lr,
              "base": base, "config": os.path.abspath(args.config)}
    stage2 = os.path.join(run_dir, "stage2")
    if _finished(run_dir, params, args):
        return stage2, 0.0
    _start(run_dir)
    started = time.time()
    steps = math.ceil(args.n_train / args.batch) * (args.stage1_epochs + args.stage2_epochs)
    sets = [f"name=livr-vs-sft-{run}", f"seed={seed}", f"model.path={base}", f"latents.num={k}",
            f"data.train=[{data}]", f"data.val=[{data}]", f"optim.micro_batch_size={args.batch}",
            f"optim.global_batch_size={args.batch}", f"data.val_max_samples={args.n_val}", f"output.dir={run_dir}",
            "logging.wandb=disabled", "logging.progress_bar=false", f"logging.every_steps={max(1, min(25, steps // 8))}"]
    if args.lr is not None:
        sets.append(f"optim.lr={args.lr!r}")
    log_path = os.path.join(run_dir, "train.log")
    what = f"{run} seed {seed}"
    if two_stage:
        sets += [f"schedule.stage1_epochs={args.stage1_epochs}", f"schedule.stage2_epochs={args.stage2_epochs}"]
        pipeline.train(args.config, "1", sets, [], log_path, what)
        init = os.path.join(run_dir, "stage1", "export", "final")
        pipeline.train(args.config, "2", sets, ["--init-from", init], log_path, what)
    else:  # Stage 2 only (standard mask), as many epochs as both LIVR stages together
        sets += ["schedule.stage1_epochs=0", f"schedule.stage2_epochs={args.stage1_epochs + args.stage2_epochs}"]
        pipeline.train(args.config, "2", sets, [], log_path, what)
    pipeline.write_json(os.path.join(run_dir, "experiment_run.json"), params)
    return stage2, time.time() - started


def correct_vector(result: dict, results_path: str) -> tuple[list[str], np.ndarray]:
    """(keys, 0/1 correctness) in dataset order, from an evaluation's predictions JSONL."""
    name = result.get("predictions") or os.path.basename(results_path).removesuffix(".json") + ".predictions.jsonl"
    path = os.path.join(os.path.dirname(results_path), name)
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows.sort(key=lambda r: r["index"])
    return [r["key"] for r in rows], np.array([1.0 if r["correct"] else 0.0 for r in rows])


def analyze_run(stage2: str, data: str, out_dir: str, args, seed: int) -> dict:
    from ..evaluation import latent_analysis

    ns = argparse.Namespace(ckpt=stage2, which="final", base_model=None, data=[data], split="test",
                            mode=["standard", "bottleneck"], max_samples=args.analysis_samples, seed=seed,
                            max_new_tokens=6, pixel_noise=0.03, device="cpu", dtype="float32", out=out_dir)
    result = latent_analysis.run(ns)
    return {mode: {**{k: m["swap"][k] for k in ("follow_donor", "follow_recipient", "neither", "n")},
                   "accuracy": {a: v["accuracy"] for a, v in m["accuracy"].items()},
                   "probe": m["probe"].get("accuracy"),
                   "cross_sample_cosine_last": m["sensitivity"]["cross_sample_cosine"][-1]}
            for mode, m in result["modes"].items()}


# ---- statistics ------------------------------------------------------------------------------
def t_interval(values: list[float]) -> list[float] | None:
    """95 % t interval of the mean over seeds."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return None
    m, s = float(np.mean(values)), float(np.std(values, ddof=1))
    h = float(stats.t.ppf(0.975, n - 1)) * s / math.sqrt(n)
    return [m - h, m + h]


def summarise(correct: dict[tuple[str, str, int], np.ndarray], runs: list[str], modes: dict[str, list[str]],
              seed_list: list[int], n_boot: int, boot_seed: int = 12345) -> dict:
    """correct[(run, mode, seed)]: 0/1 per test sample (the same samples, in the same order, for
    every key). Bootstrap over samples, one resample shared by every run and seed (paired)."""
    n = len(next(iter(correct.values())))
    idx = np.random.default_rng(boot_seed).integers(0, n, size=(n_boot, n))

    def boot_means(run, mode):  # (n_boot,) mean over seeds of the resampled accuracy, in points
        per_seed = np.stack([correct[(run, mode, s)][idx].mean(1) for s in seed_list])
        return 100 * per_seed.mean(0)

    out = {"runs": {}, "differences": {}}
    for run in runs:
        out["runs"][run] = {}
        for mode in modes[run]:
            accs = [100 * float(correct[(run, mode, s)].mean()) for s in seed_list]
            b = boot_means(run, mode)
            out["runs"][run][mode] = {
                "per_seed": dict(zip(map(str, seed_list), accs)), "mean": float(np.mean(accs)),
                "ci95": [float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))],
                "seed_ci95": t_interval(accs), "n_test": n, "seeds": len(seed_list)}
    for a, b_ in (("livr", "direct_sft"), ("livr", "latents_only"), ("latents_only", "direct_sft")):
        if a not in runs or b_ not in runs:
            continue
        for mode in sorted(set(modes[a]) & set(modes[b_])):
            diffs = [100 * float(correct[(a, mode, s)].mean() - correct[(b_, mode, s)].mean()) for s in seed_list]
            boot = boot_means(a, mode) - boot_means(b_, mode)
            se = float(np.std(boot, ddof=1))
            out["differences"][f"{a}-{b_}.{mode}"] = {
                "mean": float(np.mean(diffs)), "per_seed": dict(zip(map(str, seed_list), diffs)),
                "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
                "seed_ci95": t_interval(diffs), "seeds_ahead": int(sum(d > 0 for d in diffs)),
                "seeds_tied": int(sum(d == 0 for d in diffs)), "bootstrap_se": se, "mde80": 2.8 * se}
    return out


# ---- the experiment --------------------------------------------------------------------------
def run_experiment(args) -> dict:
    apply_quick(args)
    out = os.path.abspath(args.out)
    args.config = os.path.abspath(args.config)
    if min(args.seeds, args.n_train, args.batch, args.pretrain_steps, args.n_test) < 1 or \
            min(args.stage1_epochs, args.stage2_epochs) < 1:
        raise ValueError("--seeds, --n-train, --n-test, --batch, --pretrain-steps and the epochs must be >= 1")
    os.makedirs(out, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.time()
    pre_data, data = make_data(out, args)
    timings["data_s"] = round(time.time() - t, 1)
    print("[livr-vs-sft] pre-training ...", flush=True)
    base, secs = pretrain(out, pre_data, args)
    timings["pretrain_s"] = round(secs, 1)
    results_dir = os.path.join(out, "results")
    runs = [r for r in RUNS if r[0] in args.runs]
    modes = {run: ["standard", "bottleneck"] if latents else ["standard"] for run, _, latents, _ in runs}
    correct, keys_seen, swaps = {}, None, {}
    for seed in seeds(args):
        for run, name, latents, two_stage in runs:
            print(f"[livr-vs-sft] seed {seed}: training {name} ...", flush=True)
            stage2, secs = finetune(out, base, data, run, args.num_latents if latents else 0, two_stage, seed, args)
            timings[f"train_{run}_seed{seed}_s"] = round(secs, 1)
            for mode in modes[run]:
                path = os.path.join(results_dir, f"{run}-seed{seed}.{mode}.json")
                res = pipeline.evaluate(stage2, data, path, f"{name} (seed {seed})", mode, args.n_test)
                keys, vec = correct_vector(res, path)
                if keys_seen is None:
                    keys_seen = keys
                elif keys != keys_seen:
                    raise RuntimeError(f"{path}: evaluated other test samples than the first run")
                correct[(run, mode, seed)] = vec
                print(f"[livr-vs-sft] seed {seed}: {name:<13} {mode:<10} {100 * vec.mean():6.2f}", flush=True)
            if latents and args.analysis_samples >= 2:
                swaps[f"{run}-seed{seed}"] = analyze_run(stage2, data, os.path.join(out, "analysis", f"{run}-seed{seed}"),
                                                         args, seed)
    stats = summarise(correct, [r[0] for r in runs], modes, seeds(args), args.bootstrap)
    summary = {"command": "livr-ds experiment livr-vs-sft " + " ".join(_argv(args)), "params": _params(args),
               "chance": CHANCE, "n_test": len(keys_seen or []), **stats, "latent_analysis": swaps,
               "timings": timings}
    pipeline.write_json(os.path.join(out, "results.json"), summary)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(render(summary))
    return summary


def _params(args) -> dict:
    keys = ("seeds", "first_seed", "pretrain_seed", "pretrain_steps", "pretrain_batch", "pretrain_lr", "n_train",
            "n_val", "n_test", "batch", "stage1_epochs", "stage2_epochs", "lr", "num_latents", "analysis_samples",
            "bootstrap", "quick")
    return {k: getattr(args, k) for k in keys} | {"config": args.config}


def _argv(args) -> list[str]:
    parts = ["--out", args.out, "--seeds", str(args.seeds)]
    if args.quick:
        return parts + ["--quick"]
    for flag in ("first_seed", "pretrain_steps", "n_train", "n_test", "batch", "stage1_epochs", "stage2_epochs"):
        parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.lr is not None:
        parts += ["--lr", str(args.lr)]
    return parts


def _ci(v) -> str:
    return "–" if v is None else f"[{v[0]:.1f}, {v[1]:.1f}]"


def render(summary: dict) -> str:
    names = {r[0]: r[1] for r in RUNS}
    lines = ["# LIVR vs Direct SFT", "", f"`{summary['command']}`", "",
             f"Task: count_colour (how many red squares, 0-3; chance {CHANCE:.0f} %), {summary['n_test']} test "
             f"samples, {summary['params']['seeds']} seeds; accuracy in %, greedy generation.", "",
             "| run | mode | mean | 95 % CI (bootstrap, paired) | 95 % CI (t over seeds) | per seed |",
             "|---|---|---:|---|---|---|"]
    for run, by_mode in summary["runs"].items():
        for mode, r in by_mode.items():
            per = ", ".join(f"{v:.1f}" for v in r["per_seed"].values())
            lines.append(f"| {names[run]} | {mode} | {r['mean']:.2f} | {_ci(r['ci95'])} | {_ci(r['seed_ci95'])} | "
                         f"{per} |")
    lines += ["", "| difference | mean | 95 % CI (bootstrap) | 95 % CI (t over seeds) | seeds ahead | "
              "detectable at 80 % power |", "|---|---:|---|---|---:|---:|"]
    for key, d in summary["differences"].items():
        lines.append(f"| {key} | {d['mean']:+.2f} | {_ci(d['ci95'])} | {_ci(d['seed_ci95'])} | "
                     f"{d['seeds_ahead']}/{len(d['per_seed'])} | {d['mde80']:.1f} |")
    if summary["latent_analysis"]:
        lines += ["", "Latent swap (`livr-ds analyze latents`): fraction of recipients whose answer follows the donor "
                  "/ stays / neither; accuracy with zeroed latents.", "",
                  "| run | mode | follow donor | follow recipient | neither | n | accuracy: own | zeroed | mean |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for run, by_mode in summary["latent_analysis"].items():
            for mode, a in by_mode.items():
                acc = a["accuracy"]
                lines.append(f"| {run} | {mode} | {a['follow_donor']:.2f} | {a['follow_recipient']:.2f} | "
                             f"{a['neither']:.2f} | {a['n']} | {acc['none']:.2f} | {acc['zeroed']:.2f} | "
                             f"{acc['mean']:.2f} |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings"].items()), ""]
    return "\n".join(lines)


def run_cmd(args) -> int:
    summary = pipeline.run_and_print(run_experiment, args, "results.json")
    print(f"total {summary['timings']['total_s']:.0f} s")
    return 0


def add_command(experiments) -> None:
    """`livr-ds experiment livr-vs-sft` (argparse set-up only: the heavy imports are deferred)."""
    p = experiments.add_parser("livr-vs-sft", formatter_class=argparse.RawDescriptionHelpFormatter,
                               help="pre-trained tiny VLM, LoRA fine-tuning: LIVR vs latents-only vs Direct SFT "
                                    "over seeds", description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run_cmd)
