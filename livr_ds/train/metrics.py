"""metrics.jsonl (one JSON object per line) and wandb, offline by default, on rank 0 only.

Exact after a kill at any point: a resume checkpoint records how many lines the file had when
it was written (`lines`), and a resumed run cuts the file back to that many before it appends;
a fresh start (no checkpoint) starts the file anew. wandb plots against our own `step` (a
defined step metric), not wandb's internal counter, so a resumed run's rows land on their steps.
"""

from __future__ import annotations

import json
import logging
import os
import time

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, out_dir: str, mode: str, project: str, run_name: str, config: dict,
                 run_id: str | None, enabled: bool, keep_lines: int = 0):
        """keep_lines: the line count a resume checkpoint recorded (0 for a fresh start)."""
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.wandb = None
        self.run_id = run_id
        self.lines = 0
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._truncate(keep_lines)
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed; metrics go to %s only", self.path)
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb.init(
            project=project, name=run_name, dir=out_dir, mode=mode, config=config,
            id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        self.wandb.define_metric("step")
        self.wandb.define_metric("*", step_metric="step")
        self.run_id = self.wandb.id

    def _truncate(self, keep_lines: int) -> None:
        """Keep the first keep_lines complete lines (what the checkpoint had seen), atomically."""
        lines = []
        if keep_lines and os.path.exists(self.path):
            with open(self.path) as f:
                lines = [ln for ln in f if ln.endswith("\n")][:keep_lines]
            if len(lines) < keep_lines:
                log.warning("%s has %d lines, the checkpoint saw %d", self.path, len(lines), keep_lines)
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, self.path)
        self.lines = len(lines)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        self.lines += 1
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


class Window:
    """Sums over the optimizer steps since the last log line, all ranks (train_step's totals)."""

    FIELDS = ("loss_sum", "answer_tokens", "samples", "tokens", "pad_fraction_sum", "micro_batches")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        for f in self.FIELDS:
            setattr(self, f, 0.0)
        self.start = time.time()

    def add(self, totals: dict) -> None:
        for f in self.FIELDS:
            setattr(self, f, getattr(self, f) + totals[f])
        self.lr = totals["lr"]  # the last step's
