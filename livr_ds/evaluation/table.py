"""`livr-ds table results/*.json`: evaluation results as a markdown table laid out like the
paper's Table 1 (tasks as columns, one row per run, the mean, and the change of the mean against a
baseline row).

A row's name is the results file's `name` field or, without one, the file stem; a result under a
mode other than `standard` gets the mode appended ("LIVR (bottleneck)"). `--by mode` pivots
instead: one row per run name, one column per evaluation mode (mean accuracy), the layout of the
paper's test-time-bottleneck analysis.

Task names are read through livr_ds/data/tasks.py (BLINK's `object_localization` is the paper's
`localization` column). `livr-ds eval` prints its result with `results_table`.
"""

from __future__ import annotations

import json
import os

from ..data.tasks import PAPER_TASKS, canonical_task

# The paper's column order (Table 1, data/tasks.py); other tasks follow alphabetically.
PAPER_ORDER = PAPER_TASKS
MODE_ORDER = ("standard", "no_latents", "bottleneck", "bottleneck_no_latents")


def load_results(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        with open(path) as f:
            try:
                res = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not a results JSON ({e})") from None
        if not isinstance(res, dict) or "per_task" not in res or "mean" not in res:
            raise ValueError(f"{path}: not a livr-ds results file (no per_task / mean)")
        stem = os.path.basename(path).removesuffix(".json")
        out.append({**res, "per_task": canonical_per_task(res["per_task"], path), "_stem": stem, "_path": path})
    if not out:
        raise ValueError("no results files given")
    return out


def canonical_per_task(per_task: dict, where: str = "results") -> dict:
    """Task names as data/tasks.py's canonical names (BLINK's object_localization -> localization),
    so results of shards written under BLINK's names land in the paper's columns."""
    out: dict = {}
    for t, v in per_task.items():
        c = canonical_task(t)
        if c in out:
            raise ValueError(f"{where}: tasks {t!r} and another both name task {c!r}")
        out[c] = v
    return out


def run_name(res: dict) -> str:
    return res.get("name") or res["_stem"]


def row_label(res: dict) -> str:
    name, mode = run_name(res), res.get("mode", "standard")
    return name if mode == "standard" or mode in name else f"{name} ({mode})"


def _task_order(tasks) -> list[str]:
    known = [t for t in PAPER_ORDER if t in tasks]
    return known + sorted(t for t in tasks if t not in PAPER_ORDER)


def _column(task: str) -> str:
    return task.replace("_", " ").title()


def _fmt(v, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _find(results: list[dict], name: str, label=row_label) -> dict:
    for key in (label, run_name, lambda r: r["_stem"]):
        hits = [r for r in results if key(r) == name]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ValueError(f"--baseline {name!r} matches {len(hits)} rows; name one of: "
                             f"{', '.join(label(r) for r in hits)}")
    raise ValueError(f"--baseline {name!r} is not a row; rows are: {', '.join(label(r) for r in results)}")


def task_table(results: list[dict], baseline: str | None = None, digits: int = 2, first: str = "Method") -> str:
    """Tasks as columns, one row per results file, Mean, and Δ (mean minus the baseline's mean).
    `first` heads the row-name column (livr_ds/report/tables.py's validation tables: "Checkpoint")."""
    labels = [row_label(r) for r in results]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"two results files share the row name(s) {dupes}; give them distinct --name values")
    tasks = _task_order({t for r in results for t in r["per_task"]})
    base = _find(results, baseline) if baseline else None
    header = [first, *(_column(t) for t in tasks), "Mean"] + (["Δ"] if base else [])
    rows = []
    for r in results:
        cells = [row_label(r)] + [_fmt(r["per_task"].get(t, {}).get("accuracy"), digits) for t in tasks]
        cells.append(_fmt(r["mean"], digits))
        if base:
            cells.append("–" if r is base else f"{r['mean'] - base['mean']:+.{digits}f}")
        rows.append(cells)
    return _markdown(header, rows)


def mode_table(results: list[dict], digits: int = 2) -> str:
    """One row per run name, one column per evaluation mode (mean accuracy)."""
    names, cells = [], {}
    for r in results:
        name, mode = run_name(r), r.get("mode", "standard")
        if name not in names:
            names.append(name)
        if (name, mode) in cells:
            raise ValueError(f"two results files for run {name!r} under mode {mode!r}")
        cells[(name, mode)] = r["mean"]
    modes = [m for m in MODE_ORDER if any(k[1] == m for k in cells)]
    modes += sorted({k[1] for k in cells} - set(modes))
    rows = [[n, *(_fmt(cells.get((n, m)), digits) for m in modes)] for n in names]
    return _markdown(["Run", *modes], rows)


def results_table(results: dict, path: str, digits: int = 2) -> str:
    """One in-memory results dict (as `livr-ds eval` writes to ``path``) as a Table 1 row."""
    stem = os.path.basename(path).removesuffix(".json")
    return task_table([{**results, "per_task": canonical_per_task(results["per_task"], path), "_stem": stem}],
                      digits=digits)


def format_table(paths: list[str], baseline: str | None = None, by: str = "task", digits: int = 2) -> str:
    results = load_results(paths)
    if by == "mode":
        if baseline:
            raise ValueError("--baseline applies to the task layout (--by task)")
        return mode_table(results, digits)
    return task_table(results, baseline, digits)


def table_cmd(args) -> int:
    text = format_table(args.results, baseline=args.baseline, by=args.by, digits=args.digits)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0
