"""The report's tables: the runs, each stage's best/final validation, evaluation results beside
the paper's Table 1, the resolved config. All markdown (the HTML renders the same tables)."""

from __future__ import annotations

import difflib
import json
import os

from ..evaluation.table import canonical_per_task, mode_table, row_label, task_table
from .run import Run, checkpoint_rows

PAPER_RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "paper_results.json")


def _pseudo_result(label: str, row: dict) -> dict:
    per_task = {k[4:]: {"accuracy": v} for k, v in row.items()
                if k.startswith("val_") and k != "val_accuracy" and isinstance(v, (int, float))}
    return {"name": label, "per_task": canonical_per_task(per_task), "mean": row["val_accuracy"], "_stem": label}


def validation_results(runs: list[Run]) -> list[dict]:
    rows = []
    for run in runs:
        prefix = f"{run.name}: " if len(runs) > 1 else ""
        for s in run.stages:
            for kind, row in checkpoint_rows(s):
                label = f"{prefix}stage {s.num} {kind} (epoch {row.get('epoch')}, step {row['step']})"
                rows.append(_pseudo_result(label, row))
    return rows


def validation_table(runs: list[Run], digits: int = 2) -> str:
    """Per-task validation accuracy of each stage's best and final checkpoints, as markdown."""
    rows = validation_results(runs)
    if not rows:
        return "(no validation yet: metrics.jsonl has no val_accuracy rows)"
    return task_table(rows, digits=digits, first="Checkpoint")


# ---- evaluation results and the paper's numbers ----------------------------------------------

def paper_results() -> dict:
    with open(PAPER_RESULTS) as f:
        return json.load(f)


def paper_rows(tasks: set[str], families: list[str]) -> tuple[list[dict], str | None]:
    """The paper's Table 1 rows for these backbones, cut to the tasks we evaluated (their Mean is
    over those tasks), and a caption; none when no task matches the paper's."""
    paper = paper_results()
    shared = sorted(tasks & set(paper["random_choice"]["per_task"]))
    if not shared:
        return [], None

    def row(name: str, rec: dict) -> dict:
        vals = {t: rec["per_task"][t] for t in shared}
        return {"name": name, "per_task": {t: {"accuracy": v} for t, v in vals.items()},
                "mean": sum(vals.values()) / len(vals), "_stem": name}

    rows = [row("paper: Random choice", paper["random_choice"])]
    for fam in families:
        b = paper["backbones"].get(fam)
        if b:
            rows += [row(f"paper: {n} ({b['model']})", r) for n, r in b["rows"].items()]
    src = paper["source"]
    caption = (f"Rows `paper:` are published numbers: {src['paper']} {src['table']} (its test sets, "
               f"not necessarily this data), on the {len(shared)} task(s) evaluated here, Mean over those tasks. "
               "Source and test sets: livr_ds/data/paper_results.json.")
    return rows, caption


def results_tables(runs: list[Run]) -> tuple[str | None, str | None, str | None]:
    """(ours + the paper's rows by task, a mode pivot when several modes, the caption)."""
    results = []
    for run in runs:
        for r in run.results:
            name = r.get("name") or r["_stem"]
            results.append({**r, "name": f"{run.name}: {name}" if len(runs) > 1 else name})
    if not results:
        return None, None, None
    labels = [row_label(r) for r in results]
    for r, label in zip(results, labels):
        if labels.count(label) > 1:  # two files under one name and mode: tell them apart by path
            r["name"] = f"{r['name']} [{os.path.relpath(r['_path'])}]"
    families = []
    for run in runs:
        fams = [((r.get("provenance") or {}).get("livr") or {}).get("family") for r in run.results] + [run.family]
        for f in fams:
            if f and f not in families:
                families.append(f)
    extra, caption = paper_rows({t for r in results for t in r["per_task"]}, families)
    by_task = task_table(results + extra)
    modes: dict[str, set] = {}
    for r in results:
        modes.setdefault(r["name"], set()).add(r.get("mode", "standard"))
    try:  # the pivot, when a run was evaluated under several modes
        by_mode = mode_table(results) if any(len(m) > 1 for m in modes.values()) else None
    except ValueError:  # the pivot needs one file per (run, mode)
        by_mode = None
    return by_task, by_mode, caption


def runs_table(runs: list[Run]) -> str:
    lines = ["| run | stage | mask | status | steps | epochs | path |", "|---|---:|---|---|---:|---:|---|"]
    for run in runs:
        for s in run.stages:
            note = f"; {s.skipped_lines} unreadable line(s) skipped" if s.skipped_lines else ""
            lines.append(f"| {run.name} | {s.num} | {s.policy or '?'} | {s.status}{note} | {s.last_step} | "
                         f"{s.last_epoch} | `{s.path}` |")
    return "\n".join(lines)


def config_blocks(run: Run) -> list[tuple[str, str, str]]:
    """[(title, language, text)]: the first stage's config.yaml whole, later ones as a diff."""
    out, first = [], None
    for s in run.stages:
        if s.config_text is None:
            continue
        if first is None:
            first = s
            out.append((f"{run.name}: stage {s.num} (`{os.path.join(s.path, 'config.yaml')}`)", "yaml", s.config_text))
            continue
        diff = "".join(difflib.unified_diff(first.config_text.splitlines(True), s.config_text.splitlines(True),
                                            f"stage{first.num}/config.yaml", f"stage{s.num}/config.yaml", n=1))
        out.append((f"{run.name}: stage {s.num}, the differences from stage {first.num}", "diff",
                    diff or "(identical)\n"))
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def analysis_table(analysis: dict) -> str:
    """One `livr-ds analyze latents` result: per mode, accuracy (%) with each latent intervention
    (Wilson 95% interval), the swap outcomes and the linear probe's held-out accuracy."""
    lines = ["| mode | n | own latents | zeroed | mean | noise | swap: follow donor | follow recipient | neither "
             "| probe (majority) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in analysis.get("modes", {}).items():
        acc = [f"{_pct(a.get('accuracy'))} [{_pct(a['ci95'][0])}, {_pct(a['ci95'][1])}]"
               for a in (m["accuracy"].get(k, {"accuracy": None, "ci95": [None, None]})
                         for k in ("none", "zeroed", "mean", "noise"))]
        sw, pr = m.get("swap", {}), m.get("probe", {})
        probe = f"{_pct(pr.get('accuracy'))} ({_pct(pr.get('majority_baseline'))})"
        lines.append(f"| {name} | {m.get('n', '?')} | " + " | ".join(acc) + f" | {_pct(sw.get('follow_donor'))} | "
                     f"{_pct(sw.get('follow_recipient'))} | {_pct(sw.get('neither'))} (n={sw.get('n', 0)}) | {probe} |")
    return "\n".join(lines)
