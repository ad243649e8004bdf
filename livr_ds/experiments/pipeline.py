"""The steps every built-in experiment takes through the real pipeline: train with
`launch/train.py` in a subprocess (DeepSpeed ZeRO-2, one rank, shards, exports, exactly as a
user launches it), evaluate with `launch/eval.py`'s argument parser and code in this process,
and reuse a finished step when its recorded parameters are the same."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def same_params(path: str, params: dict) -> bool:
    """True when `path` (a step's stamp) records exactly `params`."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f) == params


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def log_tail(path: str, n: int = 4000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def train(config: str, stage: str, sets: list[str], extra: list[str], log_path: str, what: str) -> None:
    """One `launch/train.py --stage STAGE` run of `config` with `--set` overrides; its output is
    appended to log_path, and a failure raises with the log's tail."""
    root = repo_root()
    script = os.path.join(root, "launch", "train.py")
    if not os.path.exists(script):
        raise FileNotFoundError(f"{script} not found: the experiment runs the repository's launch/train.py")
    cmd = [sys.executable, script, "--ds", os.path.join(root, "ds_configs", "zero2.json"), "--config", config,
           "--stage", stage, *extra]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("MASTER_PORT", str(29000 + os.getpid() % 500))
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        r = subprocess.run(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"training {what} (stage {stage}) failed with exit code {r.returncode}; "
                           f"log {log_path}:\n{log_tail(log_path)}")


def evaluate(ckpt: str, data: str, out: str, name: str, mode: str, n_test: int, scoring: str = "generate",
             probe: bool = False, probe_images: int = 4, which: str = "final") -> dict:
    """One evaluation through launch/eval.py's argument parser and code (in this process)."""
    from ..evaluation.cli import add_eval_arguments
    from ..evaluation.cli import run as run_eval

    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    argv = ["--ckpt", ckpt, "--which", which, "--data", data, "--split", "test", "--mode", mode, "--out", out,
            "--name", name, "--scoring", scoring, "--batch-size", "50", "--max-new-tokens", "6",
            "--max-samples", str(n_test)]
    if probe:
        argv += ["--probe", "attention", "--probe-images", str(probe_images)]
    return run_eval(p.parse_args(argv))


def run_and_print(run_experiment, args, summary_name: str) -> dict:
    """Run an experiment, add its total wall time to DIR/summary_name, print DIR/table.md."""
    started = time.time()
    summary = run_experiment(args)
    summary["timings"]["total_s"] = round(time.time() - started, 1)
    out = os.path.abspath(args.out)
    write_json(os.path.join(out, summary_name), summary)
    with open(os.path.join(out, "table.md")) as f:
        print(f.read())
    return summary
