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
  `livr-ds eval` writes; rendered with livr_ds/evaluation/table.py, the paper's Table 1 numbers beside them
  when the tasks match: livr_ds/data/paper_results.json) and their attention-probe heat maps
  (`<results stem>.probes/*.png`).

Written to `--out`: report.html (self-contained: plots inline as base64 PNG), report.md (links to
the PNGs beside it), the PNGs, and the probe heat maps under probes/.

A run that is still going or was interrupted works: metrics.jsonl may end without DONE and with a
half-written last line (skipped); a stage without export/final shows its latest validation.
`launch/train.py --stage all` prints `validation_table` at its end.
"""

from __future__ import annotations

import os
import re
import shutil

from .document import Caption, Code, Gallery, Heading, Image, Table, to_html, to_markdown
from .plots import plot_throughput, plot_training, plot_validation, run_title
from .run import Run, load_run
from .tables import analysis_table, config_blocks, results_tables, runs_table, validation_table

MAX_PROBES_PER_RESULT = 8


def _unique_names(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        n = seen.get(run.name, 0)
        seen[run.name] = n + 1
        if n:
            run.name = f"{run.name} ({n + 1})"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


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


ANALYSIS_CAPTION = (
    "`livr-ds analyze latents` (docs/analysis.md): accuracy (%) with the latents' own states, zeroed, the mean "
    "over samples, or norm-matched noise, [Wilson 95% interval]; what a recipient's answer follows when decoded "
    "with a donor's latent states; the held-out accuracy of a linear probe from the latents to the gold answer "
    "(majority-class baseline).")


def _analysis_blocks(runs: list[Run], out_dir: str) -> list:
    """A section per analysis.json under the runs (its sensitivity.png copied under out_dir/analysis/)."""
    blocks = []
    for run in runs:
        for i, a in enumerate(run.analyses):
            if not blocks:
                blocks.append(Heading("Latent analysis"))
            blocks += [Caption(f"{run.name}: `{a['_path']}`. " + ANALYSIS_CAPTION), Table(analysis_table(a))]
            png = os.path.join(os.path.dirname(a["_path"]), "sensitivity.png")
            if os.path.isfile(png):
                rel = os.path.join("analysis", f"{_safe(run.name)}-{i}-sensitivity.png")
                os.makedirs(os.path.join(out_dir, "analysis"), exist_ok=True)
                shutil.copyfile(png, os.path.join(out_dir, rel))
                blocks += [Caption("Cosine similarity of latent states per layer: across samples, and between "
                                   "each image and a noisy copy."), Image(rel, "latent sensitivity")]
    return blocks


VALIDATION_CAPTION = (
    "Validation accuracy (%) of each stage's checkpoints: `best` = export/best (highest validation accuracy, the "
    "paper's single-task rule), `final` = export/final (last epoch, the paper's multi-task rule), `latest` = the "
    "last validation of a stage without a final export yet. From metrics.jsonl.")


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
    by_task, by_mode, caption = results_tables(runs)
    probes = _copy_probes(runs, out_dir)

    doc = [Table(runs_table(runs))]
    for name, (heading, _) in plots.items():
        doc += [Heading(heading), Image(name, heading)]
        if name == "validation.png":
            doc += [Caption(VALIDATION_CAPTION), Table(validation_table(runs))]
    doc.append(Heading("Evaluation results"))
    if by_task is None:
        doc.append(Caption("No results JSON under the run directory yet: `livr-ds eval --ckpt RUN/stage2 --data DATA "
                           "--out RUN/results/NAME.json` writes one (docs/evaluation.md)."))
    else:
        files = ", ".join(f"`{r['_path']}`" for run in runs for r in run.results)
        doc += [Caption(f"From {files}."), Table(by_task)] + ([Caption(caption)] if caption else [])
        if by_mode:
            doc += [Caption("Mean accuracy by evaluation mode:"), Table(by_mode)]
    for label, rels in probes:
        doc += [Heading(f"Latent -> image attention heat maps: {label}", 3), Gallery([Image(r, r) for r in rels])]
    doc += _analysis_blocks(runs, out_dir)
    doc.append(Heading("Resolved config"))
    for run in runs:
        for heading, language, text in config_blocks(run):
            doc += [Heading(heading, 3), Code(text, language)]

    title = f"livr-ds report: {run_title(runs)}"
    paths = {"html": os.path.join(out_dir, "report.html"), "md": os.path.join(out_dir, "report.md"),
             "plots": [os.path.join(out_dir, p) for p in plots],
             "probes": [os.path.join(out_dir, r) for _, rels in probes for r in rels]}
    with open(paths["md"], "w") as f:
        f.write(to_markdown(title, doc))
    with open(paths["html"], "w") as f:
        f.write(to_html(title, doc, out_dir))
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
