"""Which resume checkpoint a stage continues from, and when and what it saves next.

`checkpoint.py` owns the files (atomic, world-size-free); this module owns the decisions around
them, each one taken for all ranks: the checkpoint `--resume` picks, whether that checkpoint may
continue this run, restoring the engine, schedule and data position, and the save cadence.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from ..config import ConfigError, ExperimentConfig
from . import checkpoint
from .. import distributed as dist
from .schedule import StepPlan

log = logging.getLogger(__name__)

# The loader counters a checkpoint carries, summed over all ranks.
COUNTED = ("samples", "pad", "bad")


class Checkpointer:
    def __init__(self, cfg: ExperimentConfig, stage_dir: str, plan: StepPlan):
        self.cfg = cfg
        self.stage_dir = stage_dir
        self.root = os.path.join(stage_dir, "checkpoints")
        self.plan = plan
        self.resumed_from: str | None = None
        self.resumed_rng: dict | None = None
        # What the loaders of earlier runs of this stage counted (all ranks, from the checkpoint
        # resumed): the counters of a run killed and resumed add up to an uninterrupted run's.
        self.counted_before_resume = {k: 0 for k in COUNTED}
        self.last_saved_step: int | None = None
        self.last_save_time = time.time()

    def latest(self) -> str | None:
        return checkpoint.latest_checkpoint(self.root)

    # ---- resume --------------------------------------------------------------------------
    def restore(self, resume: str, engine, scheduler, loader, state: dict) -> bool:
        """One decision for all ranks: rank 0 picks the checkpoint (nodes of a shared filesystem may
        see different states), every rank checks it can read that one, and its plan must be this
        run's. Restores the trainable tensors and moments, `state`, the schedule and the data position."""
        if resume in ("none", ""):
            return False
        path = None
        if dist.is_main():
            path = self.latest() if resume == "auto" else resume
        path = dist.broadcast_object(path)
        if path is None:
            log.info("--resume auto: no usable checkpoint in %s, starting fresh", self.root)
            return False
        problem, saved_state = "", {}
        try:
            saved_state = checkpoint.check_checkpoint(path)
        except checkpoint.CheckpointError as e:
            problem = str(e)
        problems = dist.gather_objects(problem)
        bad = [(r, p) for r, p in enumerate(problems) if p]
        if bad:
            raise checkpoint.CheckpointError(
                f"rank 0 chose {path} to resume from, but {len(bad)} rank(s) cannot read it (rank {bad[0][0]}: "
                f"{bad[0][1]}); is {self.root} on a filesystem every node sees alike?")
        self._check_plan(path, saved_state)
        saved = checkpoint.load_resume(engine, path)
        self.resumed_from = path
        self.resumed_rng = saved.get("rng")
        state.update({k: saved[k] for k in state if k in saved})
        step = state["global_step"]
        # The schedule continues where it was: the LR of the next step is the one it would have had.
        scheduler.last_epoch = step - 1
        scheduler.step()
        engine.global_steps = step
        engine.global_samples = step * self.plan.global_batch_size
        loader.load_state_dict(saved["loader"])
        self.counted_before_resume = {k: int((saved.get("loader_stats") or {}).get(k, 0)) for k in COUNTED}
        self.last_saved_step = step
        if saved["world_size"] != dist.world_size():
            log.warning("resumed %s at world size %d (saved at %d): LoRA weights, latent rows, Adam moments, step "
                        "%d and the LR schedule restored; data continues at global sample %d; RNG streams are "
                        "new (dropout draws differ from an uninterrupted run)", path, dist.world_size(),
                        saved["world_size"], step, saved["loader"]["samples_consumed"])
        log.info("resumed from %s: epoch %d, batch %d, step %d", path, state["epoch"],
                 loader.state_dict()["batches_consumed"], step)
        return True

    def _check_plan(self, path: str, saved: dict) -> None:
        """A checkpoint continues only the stage and recipe that wrote it; a new world size is fine."""
        stage, problems = self.cfg.stage, []
        if saved.get("stage", stage) != stage:
            problems.append(f"it is a Stage {saved['stage']} checkpoint and this is Stage {stage} "
                            "(Stage 2 starts from Stage 1 with --init-from, not --resume)")
        plan = saved.get("plan") or {}
        for key, config_key in (("global_batch_size", "optim.global_batch_size"),
                                ("epochs", f"schedule.stage{stage}_epochs"),
                                ("warmup_ratio", "optim.warmup_ratio")):
            if key in plan and plan[key] != getattr(self.plan, key):
                problems.append(f"{config_key} was {plan[key]} there, {getattr(self.plan, key)} here")
        if plan and self.plan.world_size == plan.get("world_size") and \
                plan.get("micro_batches_per_epoch") != self.plan.micro_batches_per_epoch:
            problems.append(f"the training data gave {plan['micro_batches_per_epoch']} micro-batches per rank and "
                            f"epoch there, {self.plan.micro_batches_per_epoch} here (data.train changed?)")
        if problems:
            raise ConfigError(f"--resume {path}: " + "; ".join(problems) + ". Resume with the run's own config "
                              f"({os.path.join(self.stage_dir, 'config.yaml')}), or start fresh without --resume")

    def set_aside_previous_run(self) -> None:
        """A fresh start in a stage directory that already holds a run: move it aside (nothing is
        lost, and the new run's checkpoint tags and metrics cannot mix with the old ones). Rank 0."""
        out = self.stage_dir
        old = [p for p in ("checkpoints", "metrics.jsonl", "DONE") if os.path.exists(os.path.join(out, p))]
        if not old:
            return
        aside = f"{out}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        os.rename(out, aside)
        log.warning("%s held an earlier run (%s) and this one starts fresh (no --resume auto): moved it to %s",
                    out, ", ".join(old), aside)

    # ---- save ----------------------------------------------------------------------------
    def time_save_due(self) -> bool:
        minutes = self.cfg.output.save_every_minutes
        return bool(minutes) and time.time() - self.last_save_time >= 60 * minutes

    def step_save_due(self, step: int) -> bool:
        every = self.cfg.output.save_every_steps
        return bool(every) and step % every == 0

    def save(self, engine, loader, state: dict, metrics_lines: int) -> None:
        """A resume checkpoint of the current step (collective). At most one per step."""
        step = state["global_step"]
        if self.last_saved_step == step:
            return
        counts = {k: self.counted_before_resume[k] + int(n)
                  for k, n in zip(COUNTED, dist.all_reduce([loader.stats[k] for k in COUNTED]).tolist())}
        state["bad_samples"] = counts["bad"]
        trainer_state = {**state, "metrics_lines": metrics_lines, "world_size": dist.world_size(),
                         "stage": self.cfg.stage, "loader": loader.state_dict(),
                         "loader_stats": {**counts, "bad_keys_rank0": loader.stats["bad_keys"]},
                         "plan": dataclasses.asdict(self.plan)}
        checkpoint.save_resume(engine, self.root, checkpoint.checkpoint_tag(step), trainer_state,
                               self.cfg.output.keep_last)
        self.last_saved_step = step
        self.last_save_time = time.time()
        if counts["bad"]:
            log.warning("%d bad samples skipped so far (all ranks; data.on_error: skip)", counts["bad"])
