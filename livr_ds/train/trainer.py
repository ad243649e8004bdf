"""The training loop: one stage of LIVR on a DeepSpeed engine.

    grad_accum micro-batches -> mask for this stage -> NLL on answer tokens -> engine.backward
    -> one all-reduce (loss, flags) -> engine.step            (docs/training.md)

Stage 1 (bottleneck mask) and Stage 2 (standard mask) are separate launches; Stage 2 starts
from Stage 1's export with `--init-from` and a fresh optimizer and schedule.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import torch
import yaml
from tqdm import tqdm

from .. import export
from ..config import ConfigError, ExperimentConfig
from ..data.schema import DataError
from ..evaluation import generate
from ..evaluation.loop import evaluate, gather_accuracy
from ..report.run import validation_history
from .. import distributed as dist
from . import builders, checkpoint
from .checkpointer import Checkpointer
from .ds_config import build_ds_config
from .faults import fault_point
from .guards import GUARD_STEPS, FirstStepGuard, FirstStepGuardError, GradientWatch
from .metrics import MetricsLogger, Window
from .schedule import resolve_accumulation
from .step import StepConsensus, accumulation_groups

log = logging.getLogger(__name__)

EXIT_DIVERGED = 3
EXIT_GUARD = 4


class TrainingDiverged(RuntimeError):
    pass


def stage_dir(cfg: ExperimentConfig, stage: int | None = None) -> str:
    return os.path.join(cfg.output.dir, f"stage{stage or cfg.stage}")


class Trainer:
    """One stage, wired from the components `builders.py` makes; `fit` runs it to the end."""

    def __init__(self, cfg: ExperimentConfig, ds_config_path: str, resume: str = "none",
                 init_from: str | None = None, device: torch.device | None = None):
        self.cfg = cfg
        self.device = device or torch.device("cpu")
        self.out = stage_dir(cfg)
        self.policy = cfg.policy()
        self.epochs = cfg.epochs()
        resolve_accumulation(cfg, dist.world_size())  # refuse a recipe that cannot hold before loading
        self.loader = builders.build_train_loader(cfg)
        torch.manual_seed(cfg.seed)
        ds = build_ds_config(ds_config_path, cfg, dist.world_size())
        self.model = builders.build_model(cfg, ds, self.device, init_from)
        self.backbone = self.model.backbone
        self.loader.collate_fn = builders.build_collator(cfg, self.backbone)
        self.plan = builders.build_plan(cfg, self.loader)
        self.engine, self.scheduler = builders.build_engine(cfg, self.model, ds, self.plan)
        trainable = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        self.watch = GradientWatch(trainable, self.device)
        self.guard = FirstStepGuard(self.engine.module, self.backbone.adapter, self.watch)

        self.state = {"epoch": 0, "global_step": 0, "best_val": None, "best_epoch": None, "wandb_id": None,
                      "metrics_lines": 0, "bad_samples": 0, "skipped_steps": 0}
        self.checkpointer = Checkpointer(cfg, self.out, self.plan)
        resumed = self.checkpointer.restore(resume, self.engine, self.scheduler, self.loader, self.state)
        if not resumed and dist.is_main():
            self.checkpointer.set_aside_previous_run()
        dist.barrier()
        self.metrics = MetricsLogger(self.out, cfg.logging.wandb, cfg.logging.project,
                                     f"{cfg.name}-stage{cfg.stage}", cfg.to_dict(), self.state["wandb_id"],
                                     enabled=dist.is_main(), keep_lines=self.state["metrics_lines"])
        self.state["wandb_id"] = dist.broadcast_object(self.metrics.run_id)
        self.stop_requested = False
        self._write_run_files(ds)

    @property
    def resumed_from(self) -> str | None:
        return self.checkpointer.resumed_from

    def _write_run_files(self, ds: dict) -> None:
        if dist.is_main():
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "config.yaml"), "w") as f:
                yaml.safe_dump(self.cfg.to_dict(), f, sort_keys=False)
            with open(os.path.join(self.out, "ds_config.json"), "w") as f:
                json.dump(ds, f, indent=1)

    def _on_signal(self, signum, frame) -> None:
        log.warning("rank %d got signal %d: finishing the step, then saving", dist.rank(), signum)
        self.stop_requested = True

    # ---- the loop ------------------------------------------------------------------------
    def fit(self) -> str:
        """Train to the end of the stage or until a stop signal. Returns "done" or "interrupted".

        The stop-signal handlers are this Trainer's only while it trains: a handler left installed
        holds the Trainer (and its engine, model and optimizer) alive, and `--stage all` would build
        Stage 2 next to all of Stage 1."""
        stop_signals = (signal.SIGTERM, signal.SIGUSR1)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in stop_signals}
        try:
            return self._fit()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def close(self) -> None:
        """Let go of the engine so `--stage all` does not build Stage 2 beside all of Stage 1
        (dropping the last Python reference is not enough: see builders.release_engine)."""
        self.watch.close()
        builders.release_engine(self.engine)

    def _fit(self) -> str:
        if self.checkpointer.resumed_rng is not None:  # last, so nothing in set-up consumes the restored stream
            checkpoint.set_rng_state(self.checkpointer.resumed_rng)
        cfg, st, plan = self.cfg, self.state, self.plan
        log.info("stage %d (%s mask, %s attention, %s on %s): %d epochs x %d micro-batches/rank = %d optimizer steps, "
                 "world %d", cfg.stage, self.policy, self.backbone.model.backend, cfg.model.dtype, self.device,
                 self.epochs, len(self.loader), plan.total_steps, dist.world_size())
        done = st["epoch"] * len(self.loader) + self.loader.state_dict()["batches_consumed"]
        bar = tqdm(total=self.epochs * len(self.loader), initial=done,
                   disable=not (dist.is_main() and cfg.logging.progress_bar), desc=f"stage {cfg.stage}", unit="batch")
        window = Window()
        while st["epoch"] < self.epochs:
            self.loader.set_epoch(st["epoch"])  # keeps a resumed mid-epoch position
            for micro_batches in accumulation_groups(self.loader, plan.grad_accum):
                totals = self.train_step(micro_batches)
                bar.update(len(micro_batches))
                window.add(totals)
                fault_point("after_step")
                if st["global_step"] % cfg.logging.every_steps == 0:
                    self._log(window)
                if self._epoch_finished(st["epoch"]):
                    continue  # the epoch's last step: the epoch end saves, after validation
                if totals["stop"] or totals["save_due"] or self.checkpointer.step_save_due(st["global_step"]):
                    self.save()
                if totals["stop"]:
                    return self._interrupted(bar)
            self._end_of_epoch()
            if self.stop_requested_anywhere():
                return self._interrupted(bar)
        bar.close()
        if not self.guard.done:
            log.info("first-step guard: not run (this stage applied %d of the %d updating steps it needs)",
                     self.guard.updates, GUARD_STEPS)
        if st["skipped_steps"]:
            log.warning("%d optimizer steps of this stage were skipped (no answer token on any rank)",
                        st["skipped_steps"])
        export.save_export(self.backbone, cfg, cfg.stage, os.path.join(self.out, "export", "final"),
                           extra={"epoch": st["epoch"], "global_step": st["global_step"]},
                           validation=self._validation_history(), init_from=self.model.init_from)
        if dist.is_main():
            with open(os.path.join(self.out, "DONE"), "w") as f:
                f.write(f"{st['global_step']}\n")
        dist.barrier()
        self.metrics.close()
        return "done"

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches (grad_accum of them, fewer at an
        epoch's end). The step's loss is the mean NLL over the answer tokens of all its
        micro-batches on all ranks: each micro-batch's NLL sum is scaled by world / (the step's
        answer tokens on all ranks), and ZeRO's gradient average divides by the world size. A
        short last step is therefore a full-weight update whose gradient averages fewer samples.

        Nothing updates silently: a step with no answer token on any rank is skipped (no forward,
        no AdamW update, no weight decay; the schedule still advances, so the plan's step count
        and every later LR stay as planned), and a non-finite loss or gradient anywhere stops the
        run before the update."""
        step = self.state["global_step"] + 1
        answer_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        step_tokens = dist.all_reduce([answer_tokens])[0].item()
        lr = self.scheduler.get_last_lr()[0]  # what this step applies
        self.watch.begin_step(step)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        if step_tokens > 0:  # the same on every rank: all skip the forwards together (ZeRO-3 lockstep)
            self.guard.before_step(lr)
            scale = dist.world_size() / step_tokens
            for batch in micro_batches:
                batch = generate.to_device(batch, self.device)
                n = (batch["labels"][:, 1:] != -100).sum()
                nll_sum = self.engine(batch, policy=self.policy) * n  # forward returns the mean over n
                self.engine.backward(nll_sum * scale, scale_wrt_gas=False)
                loss_sum += nll_sum.detach().double()
        fault_point("before_step_sync")
        metas = [b["meta"] for b in micro_batches]
        c = StepConsensus.reduce(StepConsensus(
            loss_sum=loss_sum.item() if torch.isfinite(loss_sum) else 0.0,
            nonfinite_loss=0.0 if torch.isfinite(loss_sum) else 1.0,
            nonfinite_grad=float(self.watch.nonfinite.item()),
            stop=1.0 if self.stop_requested else 0.0,
            save_due=1.0 if dist.is_main() and self.checkpointer.time_save_due() else 0.0,
            samples=sum(len(m["keys"]) - sum(m["pad"]) for m in metas),
            tokens=sum(m["tokens"] for m in metas),
            pad_fraction_sum=sum(m["pad_fraction"] for m in metas),
            micro_batches=len(metas),
        ))
        if c.nonfinite_loss or c.nonfinite_grad:
            what = "loss" if c.nonfinite_loss else "gradient (the loss was finite)"
            raise TrainingDiverged(
                f"non-finite {what} at step {step} (epoch {self.state['epoch']}; rank "
                f"{dist.rank()}'s samples in the step: {[k for m in metas for k in m['keys']]}); "
                "stopping before the update. "
                f"The last good checkpoint is {self.checkpointer.latest()}; lower optim.lr or "
                "check the data")
        if step_tokens > 0:
            self.engine.step()
        else:
            self.scheduler.step()
            self.engine.global_steps += 1
            self.state["skipped_steps"] += 1
            log.warning("step %d skipped: no answer token on any rank (%d samples, all padding or skipped as bad); "
                        "no optimizer update, the LR schedule moves on", step, int(c.samples))
        self.state["global_step"] = step
        if step_tokens > 0:
            self.guard.after_step()  # after the count moved: a guard stop names the step it judged
        return {"lr": lr, "loss_sum": c.loss_sum, "answer_tokens": step_tokens, "stop": c.stop > 0,
                "save_due": c.save_due > 0, "samples": c.samples, "tokens": c.tokens,
                "pad_fraction_sum": c.pad_fraction_sum, "micro_batches": c.micro_batches}

    def _epoch_finished(self, epoch: int) -> bool:
        position = self.loader.state_dict()
        return position["epoch"] != epoch or position["batches_consumed"] == len(self.loader)

    def stop_requested_anywhere(self) -> bool:
        return dist.any_rank(self.stop_requested)

    def _interrupted(self, bar) -> str:
        log.warning("stopped on signal at step %d; resume with --resume auto", self.state["global_step"])
        bar.close()
        self.metrics.close()
        return "interrupted"

    def _log(self, window: "Window") -> None:
        elapsed = max(time.time() - window.start, 1e-9)
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "step": self.state["global_step"], "epoch": self.state["epoch"], "stage": self.cfg.stage,
            "loss": window.loss_sum / window.answer_tokens if window.answer_tokens else None, "lr": window.lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "samples_per_s": window.samples / elapsed, "tokens_per_s": window.tokens / elapsed,
            "pad_fraction": window.pad_fraction_sum / max(window.micro_batches, 1),
        }
        self.metrics.log(record)
        window.reset()

    def _end_of_epoch(self) -> None:
        st = self.state
        st["epoch"] += 1
        if self.cfg.data.val:
            fault_point("validation")
            acc = self.validate()
            if dist.is_main():
                self.metrics.log({"step": st["global_step"], "epoch": st["epoch"], "stage": self.cfg.stage,
                                  "val_accuracy": acc["mean"],
                                  **{f"val_{t}": v["accuracy"] for t, v in acc["per_task"].items()}})
                log.info("epoch %d: validation accuracy %.2f %s", st["epoch"], acc["mean"],
                         {t: round(v["accuracy"], 2) for t, v in acc["per_task"].items()})
            if st["best_val"] is None or acc["mean"] > st["best_val"]:
                st["best_val"], st["best_epoch"] = acc["mean"], st["epoch"]
                export.save_export(self.backbone, self.cfg, self.cfg.stage,
                                   os.path.join(self.out, "export", "best"),
                                   extra={"epoch": st["epoch"], "val_accuracy": acc["mean"]},
                                   validation=self._validation_history(), init_from=self.model.init_from)
            dist.barrier()
        self.save()

    def validate(self) -> dict:
        """Accuracy on the validation split: the eval CLI's loop (evaluation.loop.evaluate, KV-cached greedy
        answers), each rank a share, gathered on every rank. With data.val_max_samples, the first N
        of a fixed seeded shuffle: the same mixed subset every epoch and at any world size.
        Validation measures the model as it will be used: the standard mask (the paper evaluates
        with plain causal attention after both stages)."""
        cfg = self.cfg
        records, _ = evaluate(
            self.backbone, cfg.data.val, "standard", split=cfg.data.val_split,
            batch_size=max(cfg.optim.micro_batch_size, 4), max_samples=cfg.data.val_max_samples,
            max_tokens=cfg.data.max_tokens, num_workers=cfg.data.num_workers, seed=cfg.seed,
            on_error=cfg.data.on_error, rank=dist.rank(), world_size=dist.world_size())
        return gather_accuracy(records)

    def _validation_history(self) -> list[dict] | None:
        """For the export's livr.json and card, which rank 0 alone writes (and alone has metrics.jsonl)."""
        if not dist.is_main():
            return None
        return validation_history(os.path.join(self.out, "metrics.jsonl"), self.cfg.stage)

    def save(self) -> None:
        """A resume checkpoint of the current step (collective). At most one per step."""
        self.checkpointer.save(self.engine, self.loader, self.state, self.metrics.lines)


def run(cfg: ExperimentConfig, ds_config_path: str, resume: str = "none", init_from: str | None = None) -> int:
    device = dist.init()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {dist.rank()}] %(levelname)s %(name)s: %(message)s")
    if not dist.is_main():
        logging.getLogger().setLevel(logging.WARNING)
    trainer = None
    try:
        trainer = Trainer(cfg, ds_config_path, resume=resume, init_from=init_from, device=device)
        status = trainer.fit()
    except TrainingDiverged as e:
        log.error("%s", e)
        return EXIT_DIVERGED
    except FirstStepGuardError as e:
        log.error("%s", e)
        return EXIT_GUARD
    except (ConfigError, checkpoint.CheckpointError, DataError) as e:
        log.error("%s", e)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
    log.info("stage %d %s; outputs in %s", cfg.stage, status, stage_dir(cfg))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use launch/train.py")
