"""`livr-ds report RUN_DIR [RUN_DIR ...] [--out DIR]`: what a run did, as plots and tables.

A run is `output.dir` (with stage1/ and/or stage2/) or a single stage directory. For one run,
or several side by side, the report holds:

- training.png: loss, learning rate and gradient norm per optimizer step; Stage 2's steps continue
  after Stage 1's, and the stage boundary is marked;
- validation.png: validation accuracy per task per epoch (epochs continue across stages), the
  epochs exported as `export/best` and `export/final` marked;
- throughput.png: tokens/s and the pad fraction of the micro-batches;
- the per-task validation table (best vs final checkpoint of each stage), the resolved config
  (each stage's config.yaml), evaluation results found under the run directory (the JSON files
  `livr-ds eval` writes; rendered with livr_ds/table.py, the paper's Table 1 numbers beside them
  when the tasks match: livr_ds/data/paper_results.json) and their attention-probe heat maps
  (`<results stem>.probes/*.png`).

Written to `--out`: report.html (self-contained: plots inline as base64 PNG), report.md (links to
the PNGs beside it), the PNGs, and the probe heat maps under probes/.

A run that is still going or was interrupted works: metrics.jsonl may end without DONE and with a
half-written last line (skipped); a stage without export/final shows its latest validation.
`launch/train.py --stage all` prints `validation_table` at its end.
"""

from __future__ import annotations

import base64
import difflib
import html
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field

import yaml

from .report_plots import plot_training, plot_throughput, plot_validation, run_title
from .table import canonical_per_task, load_results, mode_table, row_label, task_table

log = logging.getLogger(__name__)

PAPER_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "paper_results.json")
PLOTS = ("training.png", "validation.png", "throughput.png")
SKIP_DIRS = {"checkpoints", "export", "wandb", "report", "logs"}  # never hold eval results
MAX_PROBES_PER_RESULT = 8


# ---- reading a run ---------------------------------------------------------------------------

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
    return run


# ---- the validation table (also printed by launch/train.py --stage all) ---------------------

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


# ---- writing the report ------------------------------------------------------------------------

def _unique_names(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        n = seen.get(run.name, 0)
        seen[run.name] = n + 1
        if n:
            run.name = f"{run.name} ({n + 1})"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def _runs_table(runs: list[Run]) -> str:
    lines = ["| run | stage | mask | status | steps | epochs | path |", "|---|---:|---|---|---:|---:|---|"]
    for run in runs:
        for s in run.stages:
            note = f"; {s.skipped_lines} unreadable line(s) skipped" if s.skipped_lines else ""
            lines.append(f"| {run.name} | {s.num} | {s.policy or '?'} | {s.status}{note} | {s.last_step} | "
                         f"{s.last_epoch} | `{s.path}` |")
    return "\n".join(lines)


def _config_blocks(run: Run) -> list[tuple[str, str, str]]:
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


def _copy_probes(runs: list[Run], out_dir: str) -> list[tuple[str, list[str]]]:
    """[(results file label, [PNG paths relative to out_dir])], copied under out_dir/probes/."""
    found = []
    for run in runs:
        for r in run.results:
            src = r["_path"].removesuffix(".json") + ".probes"
            if not os.path.isdir(src):
                continue
            pngs = sorted(f for f in os.listdir(src) if f.endswith(".png"))[:MAX_PROBES_PER_RESULT]
            if not pngs:
                continue
            rel_dir = os.path.join("probes", _safe(run.name), _safe(r["_stem"]))
            os.makedirs(os.path.join(out_dir, rel_dir), exist_ok=True)
            rels = []
            for f in pngs:
                shutil.copyfile(os.path.join(src, f), os.path.join(out_dir, rel_dir, f))
                rels.append(os.path.join(rel_dir, f))
            found.append((f"{run.name}: {r.get('name') or r['_stem']} ({r.get('mode', 'standard')} mode)", rels))
    return found


def _md_table_html(md: str) -> str:
    lines = [ln for ln in md.strip().splitlines() if ln.startswith("|")]
    if len(lines) < 2:
        return f"<p>{html.escape(md)}</p>"

    def cells(ln):
        return [c.strip() for c in ln.strip().strip("|").split("|")]

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells(lines[0]))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c).replace('`', '')}</td>" for c in cells(ln)) + "</tr>"
                   for ln in lines[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline(text: str) -> str:
    """Escaped text with `code` spans."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _img_html(out_dir: str, rel: str, alt: str) -> str:
    with open(os.path.join(out_dir, rel), "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" data-file="{html.escape(rel)}">'


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:14px}th,td{border:1px solid #ccc;padding:3px 8px}
td{text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}
pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:12px}.cap{color:#555;font-size:13px}
.probes img{max-width:48%;margin:2px}"""


def write_report(run_dirs: list[str], out_dir: str) -> dict:
    """Read the runs, write the plots, report.html and report.md into out_dir; return the paths."""
    runs = [load_run(d) for d in run_dirs]
    _unique_names(runs)
    os.makedirs(out_dir, exist_ok=True)
    plots = {"training.png": ("Loss, learning rate, gradient norm", plot_training),
             "validation.png": ("Validation accuracy per task", plot_validation),
             "throughput.png": ("Throughput and padding", plot_throughput)}
    for name, (_, draw) in plots.items():
        draw(runs, os.path.join(out_dir, name))
    vtable = validation_table(runs)
    by_task, by_mode, caption = results_tables(runs)
    probes = _copy_probes(runs, out_dir)
    title = f"livr-ds report: {run_title(runs)}"
    vcap = ("Validation accuracy (%) of each stage's checkpoints: `best` = export/best (highest validation "
            "accuracy, the paper's single-task rule), `final` = export/final (last epoch, the paper's multi-task "
            "rule), `latest` = the last validation of a stage without a final export yet. From metrics.jsonl.")

    md = [f"# {title}", "", _runs_table(runs), ""]
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>", _md_table_html(_runs_table(runs))]
    for name, (heading, _) in plots.items():
        md += [f"## {heading}", "", f"![{heading}]({name})", ""]
        h += [f"<h2>{html.escape(heading)}</h2>", _img_html(out_dir, name, heading)]
        if name == "validation.png":
            md += [vcap, "", vtable, ""]
            h += [f"<p class='cap'>{_inline(vcap)}</p>", _md_table_html(vtable)]
    md += ["## Evaluation results", ""]
    h += ["<h2>Evaluation results</h2>"]
    if by_task is None:
        hint = ("No results JSON under the run directory yet: `livr-ds eval --ckpt RUN/stage2 --data DATA "
                "--out RUN/results/NAME.json` writes one (docs/evaluation.md).")
        md += [hint, ""]
        h += [f"<p class='cap'>{_inline(hint)}</p>"]
    else:
        files = ", ".join(f"`{r['_path']}`" for run in runs for r in run.results)
        md += [f"From {files}.", "", by_task, ""] + ([caption, ""] if caption else [])
        h += [f"<p class='cap'>From {_inline(files)}.</p>", _md_table_html(by_task)]
        h += [f"<p class='cap'>{_inline(caption)}</p>"] if caption else []
        if by_mode:
            md += ["Mean accuracy by evaluation mode:", "", by_mode, ""]
            h += ["<p class='cap'>Mean accuracy by evaluation mode:</p>", _md_table_html(by_mode)]
    for label, rels in probes:
        cap = f"Latent -> image attention heat maps: {label}"
        md += [f"### {cap}", ""] + [f"![{os.path.basename(r)}]({r})" for r in rels] + [""]
        h += [f"<h3>{html.escape(cap)}</h3><div class='probes'>", *(_img_html(out_dir, r, r) for r in rels), "</div>"]
    md += ["## Resolved config", ""]
    h += ["<h2>Resolved config</h2>"]
    for run in runs:
        for heading, lang, text in _config_blocks(run):
            md += [f"### {heading}", "", f"```{lang}", text.rstrip("\n"), "```", ""]
            h += [f"<h3>{_inline(heading)}</h3><pre>{html.escape(text)}</pre>"]
    h += ["</body></html>"]
    paths = {"html": os.path.join(out_dir, "report.html"), "md": os.path.join(out_dir, "report.md"),
             "plots": [os.path.join(out_dir, p) for p in plots],
             "probes": [os.path.join(out_dir, r) for _, rels in probes for r in rels]}
    with open(paths["md"], "w") as f:
        f.write("\n".join(md))
    with open(paths["html"], "w") as f:
        f.write("\n".join(h))
    return paths


def default_out(run_dirs: list[str]) -> str:
    return os.path.join(run_dirs[0], "report") if len(run_dirs) == 1 else "report"


def report_cmd(args) -> int:
    out = args.out or default_out(args.runs)
    paths = write_report(args.runs, out)
    print(f"wrote {paths['html']} (self-contained) and {paths['md']}, plots: "
          f"{', '.join(os.path.basename(p) for p in paths['plots'])}"
          + (f", {len(paths['probes'])} probe heat map(s)" if paths["probes"] else ""))
    return 0


def add_report_command(subparsers) -> None:
    p = subparsers.add_parser("report", help="plots and tables of one or more training runs (HTML + markdown)",
                              description="Loss / lr / grad norm per step with the stage boundary, validation "
                                          "accuracy per task per epoch with the best and final checkpoints, "
                                          "throughput, the per-task table, the resolved config, eval results found "
                                          "under the run (with the paper's numbers) and probe heat maps.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output.dir of a run (stage1/, stage2/) or one stage dir")
    p.add_argument("--out", help="output directory (default: RUN_DIR/report for one run, ./report for several)")
    p.set_defaults(func=report_cmd)
