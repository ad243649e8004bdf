"""Reading a run: its stages (metrics.jsonl, config.yaml, exports' livr.json, DONE) and the
evaluation results found under it. Works on a run that is still going or was interrupted:
metrics.jsonl may end with a half-written line (skipped) and no DONE."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import yaml

from ..evaluation.table import load_results

SKIP_DIRS = {"checkpoints", "export", "wandb", "report", "logs"}  # never hold eval results


@dataclass
class Stage:
    num: int
    path: str
    train: list[dict] = field(default_factory=list)  # rows with a loss
    val: list[dict] = field(default_factory=list)  # rows with val_accuracy, one per epoch
    skipped_lines: int = 0  # unreadable lines of metrics.jsonl (a half-written last line)
    done: bool = False
    best: dict | None = None  # export/best/livr.json
    final: dict | None = None  # export/final/livr.json
    config_text: str | None = None
    config: dict = field(default_factory=dict)
    step_offset: int = 0  # steps of the stages before this one
    epoch_offset: int = 0

    @property
    def last_step(self) -> int:
        if self.final and isinstance(self.final.get("global_step"), int):
            return self.final["global_step"]
        return max([r["step"] for r in self.train + self.val] or [0])

    @property
    def last_epoch(self) -> int:
        if self.final and isinstance(self.final.get("epoch"), int):
            return self.final["epoch"]
        return max([r.get("epoch", 0) for r in self.val] or [0])

    @property
    def policy(self) -> str | None:
        mask = self.config.get("mask") or {}
        return mask.get(f"stage{self.num}")

    @property
    def status(self) -> str:
        if self.done:
            return "done"
        return "running or interrupted (no DONE)"


@dataclass
class Run:
    name: str
    path: str
    stages: list[Stage]
    results: list[dict] = field(default_factory=list)  # table.load_results records
    analyses: list[dict] = field(default_factory=list)  # `livr-ds analyze latents` analysis.json, "_path" added

    @property
    def family(self) -> str | None:
        for s in self.stages:
            fam = (s.config.get("model") or {}).get("family")
            if fam:
                return fam
        return None


def read_metrics(path: str) -> tuple[list[dict], list[dict], int]:
    """(training rows, validation rows, unreadable lines) of a metrics.jsonl, which may be
    growing: a last line without its newline is being written and is skipped."""
    train, val, bad = [], {}, 0
    if not os.path.exists(path):
        return [], [], 0
    with open(path, errors="replace") as f:
        for line in f:
            if not line.endswith("\n"):
                bad += 1
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                bad += 1
            elif "val_accuracy" in row:
                if isinstance(row["val_accuracy"], (int, float)):
                    val[row.get("epoch", len(val) + 1)] = row  # one per epoch; a repeat replaces
            elif "loss" in row:
                train.append(row)
    return train, [val[e] for e in sorted(val)], bad


VAL_PREFIX = "val_"


def validation_history(metrics_path: str, stage: int) -> list[dict]:
    """Every validation of `stage` in metrics.jsonl, by epoch: {epoch, step, mean, per_task}, as
    read_metrics reads them (one row per epoch, a half-written line skipped). Exports' livr.json
    and model cards carry it."""
    _, rows, _ = read_metrics(metrics_path)
    return [{"epoch": r["epoch"], "step": r["step"], "mean": r["val_accuracy"],
             "per_task": {k[len(VAL_PREFIX):]: v for k, v in r.items() if k.startswith(VAL_PREFIX) and k != "val_accuracy"}}
            for r in rows if r.get("stage") == stage]


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _is_stage_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("metrics.jsonl", "config.yaml", "DONE"))


def _stage_dirs(run_dir: str) -> list[tuple[int | None, str]]:
    found = []
    for name in sorted(os.listdir(run_dir)):
        m = re.fullmatch(r"stage(\d+)", name)
        if m and os.path.isdir(os.path.join(run_dir, name)):
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    if found:
        return found
    if _is_stage_dir(run_dir):
        m = re.fullmatch(r"stage(\d+)", os.path.basename(os.path.normpath(run_dir)))
        return [(int(m.group(1)) if m else None, run_dir)]
    raise ValueError(f"{run_dir}: no stage1/ or stage2/ and no metrics.jsonl or config.yaml: not a livr-ds run "
                     "directory (give output.dir or one stage directory)")


def load_stage(num: int | None, path: str) -> Stage:
    train, val, bad = read_metrics(os.path.join(path, "metrics.jsonl"))
    config_text, config = None, {}
    cpath = os.path.join(path, "config.yaml")
    if os.path.exists(cpath):
        with open(cpath) as f:
            config_text = f.read()
        try:
            config = yaml.safe_load(config_text) or {}
        except yaml.YAMLError:
            config = {}
    if num is None:
        num = int(config.get("stage") or next((r["stage"] for r in train + val if "stage" in r), 1))
    return Stage(num=num, path=path, train=train, val=val, skipped_lines=bad,
                 done=os.path.exists(os.path.join(path, "DONE")),
                 best=_read_json(os.path.join(path, "export", "best", "livr.json")),
                 final=_read_json(os.path.join(path, "export", "final", "livr.json")),
                 config_text=config_text, config=config if isinstance(config, dict) else {})


def find_results(run_dir: str) -> list[str]:
    """Evaluation results JSONs (`livr-ds eval --out`) anywhere under the run directory, outside
    checkpoints, exports, wandb, logs and reports."""
    paths = []
    for root, dirs, files in os.walk(run_dir):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".probes")
                         and ".replaced-" not in d)
        for name in sorted(files):
            if not name.endswith(".json") or name in ("ds_config.json", "manifest.json"):
                continue
            path = os.path.join(root, name)
            data = _read_json(path) if os.path.getsize(path) < 50 << 20 else None
            if data is not None and isinstance(data.get("per_task"), dict) and "mean" in data:
                paths.append(path)
    return paths


def find_analyses(run_dir: str) -> list[dict]:
    """The analysis.json files (`livr-ds analyze latents --out`) under the run directory, outside
    checkpoints, exports, wandb, logs and reports; each with its path as "_path"."""
    found = []
    for root, dirs, files in os.walk(run_dir):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(".") and ".replaced-" not in d)
        if "analysis.json" in files:
            data = _read_json(os.path.join(root, "analysis.json"))
            if data is not None and data.get("kind") == "latent_analysis" and isinstance(data.get("modes"), dict):
                found.append({**data, "_path": os.path.join(root, "analysis.json")})
    return found


def load_run(run_dir: str, name: str | None = None, stages: list[int] | None = None) -> Run:
    """The run in run_dir (output.dir or one stage dir); `stages` keeps only those stage numbers."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    stages = sorted((st for st in (load_stage(n, p) for n, p in _stage_dirs(run_dir))
                     if stages is None or st.num in stages), key=lambda st: st.num)
    for prev, s in zip(stages, stages[1:]):
        s.step_offset = prev.step_offset + prev.last_step
        s.epoch_offset = prev.epoch_offset + prev.last_epoch
    paths = find_results(run_dir)
    run = Run(name=name or os.path.basename(os.path.abspath(run_dir)), path=run_dir, stages=stages)
    run.results = load_results(paths) if paths else []
    run.analyses = find_analyses(run_dir)
    return run


def _val_row(stage: Stage, epoch) -> dict | None:
    return next((r for r in stage.val if r.get("epoch") == epoch), None)


def checkpoint_rows(stage: Stage) -> list[tuple[str, dict]]:
    """[(kind, validation row)]: the epochs of export/best and export/final; without a final
    export (a stage still going or interrupted), the latest validation."""
    if not stage.val:
        return []
    out = []
    best = _val_row(stage, stage.best.get("epoch")) if stage.best else None
    if best is None:  # no export yet, or its epoch's line was lost: the highest so far, first of ties
        best = max(stage.val, key=lambda r: (r["val_accuracy"], -r.get("epoch", 0)))
    out.append(("best", best))
    final = _val_row(stage, stage.final.get("epoch")) if stage.final else None
    out.append(("final", final) if final is not None else ("latest", stage.val[-1]))
    return out
