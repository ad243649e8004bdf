"""The report's plots: matplotlib's Agg canvas (no display, no pyplot state), one PNG per view.

Runs are livr_ds.report.run.Run objects (stages, metrics rows, validation rows, checkpoint marks)."""

from __future__ import annotations

import math

from ..evaluation.table import _task_order
from .run import Run, checkpoint_rows


def _figure(nrows: int, ncols: int = 1, size=(9.0, 3.0), sharex=True):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0], size[1] * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharex=sharex, squeeze=False)
    return fig, axes


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _mark_stages(ax, runs: list[Run], top: bool) -> None:
    """A dashed line where each run's Stage 2 (and later) begins; with one run, the top panel
    names each stage and its mask over the middle of its steps."""
    for i, run in enumerate(runs):
        for s in run.stages[1:]:
            ax.axvline(s.step_offset, color="0.35" if len(runs) == 1 else _colour(i), ls="--", lw=1)
    if not (top and len(runs) == 1):
        return
    for s in runs[0].stages:
        if s.train:
            mid = s.step_offset + s.last_step / 2
            label = f"stage {s.num}" + (f" ({s.policy} mask)" if s.policy else "")
            ax.annotate(label, (mid, 1), xycoords=("data", "axes fraction"), xytext=(0, -12),
                        textcoords="offset points", ha="center", fontsize=8, color="0.3")


def _series(run: Run, key: str):
    xs, ys = [], []
    for s in run.stages:
        for r in s.train:
            v = r.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                xs.append(r["step"] + s.step_offset)
                ys.append(v)
    return xs, ys


def run_title(runs: list[Run]) -> str:
    return ", ".join(r.name for r in runs)


def plot_training(runs: list[Run], path: str) -> None:
    panels = [("loss", "loss (mean NLL per answer token)"), ("lr", "learning rate"), ("grad_norm", "gradient norm")]
    fig, axes = _figure(len(panels), size=(9.0, 2.4))
    for (key, label), ax in zip(panels, axes[:, 0]):
        for i, run in enumerate(runs):
            xs, ys = _series(run, key)
            ax.plot(xs, ys, color=_colour(i), lw=1.2, label=run.name)
        if key == "loss":
            ys = [y for run in runs for y in _series(run, key)[1]]
            if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
                ax.set_yscale("log")
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
        _mark_stages(ax, runs, top=key == "loss")
    axes[-1, 0].set_xlabel("optimizer step (Stage 2 continues after Stage 1)")
    if len(runs) > 1:
        axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Training: {run_title(runs)}", fontsize=11)
    fig.savefig(path)


def plot_throughput(runs: list[Run], path: str) -> None:
    panels = [("tokens_per_s", "tokens/s (all ranks)"), ("pad_fraction", "pad fraction of the micro-batches")]
    fig, axes = _figure(len(panels), size=(9.0, 2.4))
    for (key, label), ax in zip(panels, axes[:, 0]):
        for i, run in enumerate(runs):
            xs, ys = _series(run, key)
            ax.plot(xs, ys, color=_colour(i), lw=1.2, label=run.name)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
        _mark_stages(ax, runs, top=key == "tokens_per_s")
    axes[1, 0].set_ylim(0, 1)
    axes[-1, 0].set_xlabel("optimizer step")
    if len(runs) > 1:
        axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Throughput: {run_title(runs)}", fontsize=11)
    fig.savefig(path)


def _tasks(runs: list[Run]) -> list[str]:

    return _task_order({k[4:] for run in runs for s in run.stages for r in s.val
                        for k in r if k.startswith("val_") and k != "val_accuracy"})


def plot_validation(runs: list[Run], path: str) -> None:

    from matplotlib.lines import Line2D

    keys = [("val_accuracy", "mean over tasks")] + [(f"val_{t}", t.replace("_", " ")) for t in _tasks(runs)]
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = _figure(nrows, ncols, size=(3.6 * ncols, 2.8), sharex=True)
    flat = list(axes.flat)
    for (key, label), ax in zip(keys, flat):
        for i, run in enumerate(runs):
            c = _colour(i)
            for s in run.stages:
                pts = [(r["epoch"] + s.epoch_offset, r[key]) for r in s.val if isinstance(r.get(key), (int, float))]
                if not pts:
                    continue
                ax.plot(*zip(*pts), color=c, marker="o", ms=3, lw=1.2, ls="-" if s.num == 1 else "-.")
                for kind, row in checkpoint_rows(s):
                    if isinstance(row.get(key), (int, float)):
                        x = row["epoch"] + s.epoch_offset
                        if kind == "best":
                            ax.plot(x, row[key], marker="*", ms=13, color=c, mec="k", mew=0.6, ls="none")
                        else:
                            ax.plot(x, row[key], marker="s", ms=9, mfc="none", mec=c, mew=1.5, ls="none")
            for s in run.stages[1:]:
                if s.val:
                    ax.axvline(s.epoch_offset + 0.5, color="0.35" if len(runs) == 1 else c, ls="--", lw=1)
        ax.set_title(label, fontsize=10)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for i, ax in enumerate(flat):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if i >= len(keys):
            ax.set_axis_off()
        elif i + ncols >= len(keys):  # nothing below it: label its epochs
            ax.xaxis.set_tick_params(labelbottom=True)
    for i, ax in enumerate(flat[:len(keys)]):
        if i + ncols >= len(keys):
            ax.set_xlabel("epoch (Stage 2 continues)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("val accuracy (%)", fontsize=9)
    handles = [Line2D([], [], marker="*", ms=12, color="0.5", mec="k", ls="none", label="best (export/best)"),
               Line2D([], [], marker="s", ms=8, mfc="none", mec="0.3", mew=1.5, ls="none",
                      label="final (export/final) or latest"),
               Line2D([], [], color="0.3", ls="-", label="stage 1"),
               Line2D([], [], color="0.3", ls="-.", label="stage 2")]
    if len(runs) > 1:
        handles += [Line2D([], [], color=_colour(i), lw=2, label=run.name) for i, run in enumerate(runs)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8)
    fig.suptitle(f"Validation accuracy per task: {run_title(runs)}", fontsize=11)
    fig.savefig(path)
