"""metrics.jsonl (one JSON object per line) and wandb, offline by default, on rank 0 only."""

from __future__ import annotations

import json
import logging
import os
import time

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, out_dir: str, mode: str, project: str, run_name: str, config: dict,
                 run_id: str | None, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.wandb = None
        self.run_id = run_id
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
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
        self.run_id = self.wandb.id

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines written after the checkpoint so the curve has no duplicates."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(lines)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


class Window:
    """Sums over the micro-batches since the last log line (this rank's share)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss, self.n, self.samples, self.tokens, self.pad_fraction = 0.0, 0, 0, 0, 0.0
        self.start = time.time()

    def add(self, loss: float, meta: dict) -> None:
        self.loss += loss
        self.n += 1
        self.samples += len(meta["keys"]) - sum(meta["pad"])
        self.tokens += meta["tokens"]
        self.pad_fraction += meta["pad_fraction"]
