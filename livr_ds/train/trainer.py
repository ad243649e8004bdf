"""The training loop: one stage of LIVR on a DeepSpeed engine.

    grad_accum micro-batches -> mask for this stage -> NLL on answer tokens -> engine.backward
    -> one all-reduce (loss, flags) -> engine.step            (docs/training.md)

Stage 1 (bottleneck mask) and Stage 2 (standard mask) are separate launches; Stage 2 starts
from Stage 1's export with `--init-from` and a fresh optimizer and schedule.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time

import deepspeed
import torch
import yaml
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from .. import export, segments
from ..evaluation import generate
from ..evaluation.loop import evaluate, gather_accuracy
from ..config import ConfigError, ExperimentConfig
from ..data.collate import LivrCollator
from ..data.loader import LivrLoader
from ..data.sources import ShardSource
from ..data.schema import DataError
from ..modeling import build_backbone, resolve_model_path
from ..models import get_adapter
from . import checkpoint
from . import distributed as dist
from .ds_config import build_ds_config
from .faults import fault_point
from .guards import GUARD_STEPS, FirstStepGuard, FirstStepGuardError, GradientWatch
from .metrics import MetricsLogger, Window
from .schedule import resolve_accumulation, step_plan

log = logging.getLogger(__name__)

EXIT_DIVERGED = 3
EXIT_GUARD = 4


class TrainingDiverged(RuntimeError):
    pass


def stage_dir(cfg: ExperimentConfig, stage: int | None = None) -> str:
    return os.path.join(cfg.output.dir, f"stage{stage or cfg.stage}")


NO_DECAY = ("latent_rows", "embed_tokens", "norm", "bias")


def param_groups(model, weight_decay: float) -> list[dict]:
    """LoRA matrices (and full weight matrices) decay; embedding rows, norms and biases do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(s in name for s in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


@dataclasses.dataclass
class StepConsensus:
    """Everything the loop decides on after a step, summed over all ranks in one collective: the
    loss, non-finite loss or gradient anywhere, a stop signal anywhere, rank 0's clock for timed
    saves, throughput."""

    loss_sum: float
    nonfinite_loss: float
    nonfinite_grad: float
    stop: float
    save_due: float
    samples: float
    tokens: float
    pad_fraction_sum: float
    micro_batches: float

    @classmethod
    def reduce(cls, local: "StepConsensus") -> "StepConsensus":
        names = [f.name for f in dataclasses.fields(cls)]
        total = dist.all_reduce([getattr(local, n) for n in names]).tolist()
        return cls(**dict(zip(names, total)))


class Trainer:
    def __init__(self, cfg: ExperimentConfig, ds_config_path: str, resume: str = "none",
                 init_from: str | None = None, device: torch.device | None = None):
        self.cfg = cfg
        self.device = device or torch.device("cpu")
        self.out = stage_dir(cfg)
        self.ckpt_root = os.path.join(self.out, "checkpoints")
        self.policy = cfg.policy()
        self.epochs = cfg.epochs()
        if not cfg.data.train:
            raise ConfigError("data.train is empty: name at least one shard directory")
        resolve_accumulation(cfg, dist.world_size())  # refuse a recipe that cannot hold before loading
        # Data first: a missing or empty shard directory stops the launch before the model loads.
        self.loader = self._loader(cfg.data.train, cfg.data.train_split, cfg.optim.micro_batch_size,
                                   collate_fn=None, shuffle=True)
        self.loader.index_shards(barrier=dist.barrier)  # missing indexes: each rank builds its share
        for s in cfg.data.val:
            ShardSource(s.path, weight=s.weight, split=cfg.data.val_split).resolve()
        torch.manual_seed(cfg.seed)

        ds = build_ds_config(ds_config_path, cfg, dist.world_size())
        self.zero3 = ds.get("zero_optimization", {}).get("stage", 0) == 3
        self._zero3_init = None
        if self.zero3:
            # Build the model partitioned from the start (deepspeed.zero.Init inside transformers'
            # from_pretrained, enabled while this object lives): no rank ever holds the whole
            # backbone (a 72B one is 145 GB in bf16, per rank). A tiny model is written first,
            # unpartitioned.
            from transformers.integrations import HfDeepSpeedConfig

            resolve_model_path(cfg, get_adapter(cfg.model.family))
            self._zero3_init = HfDeepSpeedConfig(ds)
        self.backbone = build_backbone(cfg, policy=self.policy, device=self.device, packed=cfg.data.packing)
        if self.zero3:
            frozen = [p for p in self.backbone.model.parameters() if not p.requires_grad]
            held = sum(p.ds_tensor.numel() if dist.is_partitioned(p) else p.numel() for p in frozen)
            total = sum(getattr(p, "ds_numel", p.numel()) for p in frozen)
            log.info("ZeRO-3: the backbone was built partitioned; this rank holds %.1f%% of its %d frozen parameters",
                     100.0 * held / max(total, 1), total)
        self.init_from = export.init_from_export(self.backbone, cfg, init_from) if init_from else None
        self.backbone.model.to(self.device)
        self.collator = LivrCollator(self.backbone.adapter, self.backbone.processor, self.backbone.latent_ids,
                                     cfg.data.max_tokens, cfg.data.too_long, packing=cfg.data.packing,
                                     pad_to_multiple=segments.pad_multiple(self.backbone.model.backend))
        self.loader.collate_fn = self.collator
        self.plan = step_plan(cfg, dist.world_size(), len(self.loader), self.epochs)
        log.info("stage %d recipe: %s", cfg.stage, self.plan.describe())
        if cfg.optim.warmup_ratio > 0 and self.plan.total_steps < 20:
            log.warning("only %d optimizer steps in this stage: warmup is %d of them; the global batch (%d) is "
                        "large for %d samples", self.plan.total_steps, self.plan.warmup_steps,
                        self.plan.global_batch_size, self.loader.num_samples)
        if not cfg.optim.global_batch_size:
            log.warning("optim.global_batch_size is 0: the global batch is micro x accumulation x world size "
                        "= %d and changes with the number of ranks", self.plan.global_batch_size)

        plan = self.plan
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.backbone.model,
            model_parameters=param_groups(self.backbone.model, cfg.optim.weight_decay),
            config=ds,
            lr_scheduler=lambda opt: get_cosine_schedule_with_warmup(opt, plan.warmup_steps, plan.total_steps),
        )
        # ZeRO-3: every forward gathers partitioned weights, so all ranks run the same forwards.
        self.backbone.model.lockstep = self.zero3
        trainable = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        self.watch = GradientWatch(trainable, self.device)
        self.guard = FirstStepGuard(self.engine.module, self.backbone.adapter, self.watch)
        if getattr(self.engine, "managed_gradient_accumulation", lambda: True)():
            raise ConfigError(f"DeepSpeed {deepspeed.__version__} steps on its own micro-step counter "
                              "(no managed_gradient_accumulation: false); livr-ds owns the step boundary and is "
                              "tested with the version setup.py pins")
        self.state = {"epoch": 0, "global_step": 0, "best_val": None, "best_epoch": None, "wandb_id": None,
                      "metrics_lines": 0, "bad_samples": 0, "skipped_steps": 0}
        self.resumed_rng = None
        self.resumed_from: str | None = None
        # What the loaders of earlier runs of this stage counted (all ranks, from the checkpoint
        # resumed): the counters of a run killed and resumed add up to an uninterrupted run's.
        self.counted_before_resume = {"samples": 0, "pad": 0, "bad": 0}
        resumed = self._maybe_resume(resume)
        if not resumed and dist.is_main():
            self._set_aside_previous_run()
        dist.barrier()
        self.metrics = MetricsLogger(self.out, cfg.logging.wandb, cfg.logging.project,
                                     f"{cfg.name}-stage{cfg.stage}", cfg.to_dict(), self.state["wandb_id"],
                                     enabled=dist.is_main(), keep_lines=self.state["metrics_lines"])
        self.state["wandb_id"] = dist.broadcast_object(self.metrics.run_id)
        self.last_saved_step = self.state["global_step"] if resumed else None
        self.last_save_time = time.time()
        self.stop_requested = False
        self._write_run_files(ds)

    # ---- set-up helpers ------------------------------------------------------------------
    def _loader(self, sources, split, batch_size, collate_fn, shuffle):
        return LivrLoader(
            [ShardSource(s.path, weight=s.weight, split=split) for s in sources],
            rank=dist.rank(), world_size=dist.world_size(), batch_size=batch_size,
            num_workers=self.cfg.data.num_workers, seed=self.cfg.seed, collate_fn=collate_fn,
            shuffle=shuffle, on_error=self.cfg.data.on_error,
        )

    def _maybe_resume(self, resume: str) -> bool:
        """One decision for all ranks: rank 0 picks the checkpoint (nodes of a shared filesystem may
        see different states), every rank checks it can read that one, and its plan must be this run's."""
        if resume in ("none", ""):
            return False
        path = None
        if dist.is_main():
            path = checkpoint.latest_checkpoint(self.ckpt_root) if resume == "auto" else resume
        path = dist.broadcast_object(path)
        if path is None:
            log.info("--resume auto: no usable checkpoint in %s, starting fresh", self.ckpt_root)
            return False
        problem = ""
        try:
            checkpoint.check_checkpoint(path)
        except checkpoint.CheckpointError as e:
            problem = str(e)
        problems = dist.gather_objects(problem)
        bad = [(r, p) for r, p in enumerate(problems) if p]
        if bad:
            raise checkpoint.CheckpointError(
                f"rank 0 chose {path} to resume from, but {len(bad)} rank(s) cannot read it (rank {bad[0][0]}: "
                f"{bad[0][1]}); is {self.ckpt_root} on a filesystem every node sees alike?")
        self._check_resume_plan(path, checkpoint.check_checkpoint(path))
        saved = checkpoint.load_resume(self.engine, path)
        self.resumed_from = path
        self.resumed_rng = saved.get("rng")
        self.state.update({k: saved[k] for k in self.state if k in saved})
        step = self.state["global_step"]
        # The schedule continues where it was: the LR of the next step is the one it would have had.
        self.scheduler.last_epoch = step - 1
        self.scheduler.step()
        self.engine.global_steps = step
        self.engine.global_samples = step * self.plan.global_batch_size
        self.loader.load_state_dict(saved["loader"])
        self.counted_before_resume = {k: int((saved.get("loader_stats") or {}).get(k, 0))
                                      for k in self.counted_before_resume}
        if saved["world_size"] != dist.world_size():
            log.warning("resumed %s at world size %d (saved at %d): LoRA weights, latent rows, Adam moments, step "
                        "%d and the LR schedule restored; data continues at global sample %d; RNG streams are "
                        "new (dropout draws differ from an uninterrupted run)", path, dist.world_size(),
                        saved["world_size"], step, saved["loader"]["samples_consumed"])
        log.info("resumed from %s: epoch %d, batch %d, step %d", path, self.state["epoch"],
                 self.loader.state_dict()["batches_consumed"], step)
        return True

    def _check_resume_plan(self, path: str, saved: dict) -> None:
        """A checkpoint continues only the stage and recipe that wrote it; a new world size is fine."""
        problems = []
        if saved.get("stage", self.cfg.stage) != self.cfg.stage:
            problems.append(f"it is a Stage {saved['stage']} checkpoint and this is Stage {self.cfg.stage} "
                            "(Stage 2 starts from Stage 1 with --init-from, not --resume)")
        plan = saved.get("plan") or {}
        for key, config_key in (("global_batch_size", "optim.global_batch_size"),
                                ("epochs", f"schedule.stage{self.cfg.stage}_epochs"),
                                ("warmup_ratio", "optim.warmup_ratio")):
            if key in plan and plan[key] != getattr(self.plan, key):
                problems.append(f"{config_key} was {plan[key]} there, {getattr(self.plan, key)} here")
        if plan and self.plan.world_size == plan.get("world_size") and \
                plan.get("micro_batches_per_epoch") != self.plan.micro_batches_per_epoch:
            problems.append(f"the training data gave {plan['micro_batches_per_epoch']} micro-batches per rank and "
                            f"epoch there, {self.plan.micro_batches_per_epoch} here (data.train changed?)")
        if problems:
            raise ConfigError(f"--resume {path}: " + "; ".join(problems) + ". Resume with the run's own config "
                              f"({os.path.join(self.out, 'config.yaml')}), or start fresh without --resume")

    def _set_aside_previous_run(self) -> None:
        """A fresh start in a stage directory that already holds a run: move it aside (nothing is
        lost, and the new run's checkpoint tags and metrics cannot mix with the old ones)."""
        old = [p for p in ("checkpoints", "metrics.jsonl", "DONE") if os.path.exists(os.path.join(self.out, p))]
        if not old:
            return
        aside = f"{self.out}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        os.rename(self.out, aside)
        log.warning("%s held an earlier run (%s) and this one starts fresh (no --resume auto): moved it to %s",
                    self.out, ", ".join(old), aside)

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
        """Let go of the engine so `--stage all` does not build Stage 2 beside all of Stage 1.

        Dropping the last Python reference is not enough: DeepSpeed's gradient hooks live on
        autograd's C++ AccumulateGrad nodes, which the garbage collector cannot traverse, and they
        hold the optimizer (and through it the engine and model). `engine.destroy()` removes them."""
        self.watch.close()
        self.engine.destroy()
        # Two process-wide holds of ZeRO-3 on a finished engine (DeepSpeed 0.19.8): the module stack
        # its forward pre-hook pushes to (runtime/zero/parameter_offload.py; the last module run
        # stays on it), and the class-level lru_cache of the parameter coordinator's
        # `__params_to_release` (runtime/zero/partitioned_param_coordinator.py), whose keys hold
        # the coordinator and submodules. Each pins the whole model. Nothing trains between stages.
        from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator

        parameter_offload.FWD_MODULE_STACK.clear()
        coordinator = partitioned_param_coordinator.PartitionedParameterCoordinator
        release = getattr(coordinator, "_PartitionedParameterCoordinator__params_to_release", None)
        # instrument_w_nvtx wraps the lru_cache without functools.wraps: it is in the closure.
        for cell in getattr(release, "__closure__", None) or ():
            if hasattr(cell.cell_contents, "cache_clear"):
                cell.cell_contents.cache_clear()

    def _fit(self) -> str:
        if self.resumed_rng is not None:  # last, so nothing in set-up consumes the restored stream
            checkpoint.set_rng_state(self.resumed_rng)
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
                if totals["stop"] or totals["save_due"] or self._step_save_due():
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
                           run_dir=self.out, init_from=self.init_from)
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
            save_due=1.0 if dist.is_main() and self._time_save_due() else 0.0,
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
                f"The last good checkpoint is {checkpoint.latest_checkpoint(self.ckpt_root)}; lower optim.lr or "
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

    def _time_save_due(self) -> bool:
        minutes = self.cfg.output.save_every_minutes
        return bool(minutes) and time.time() - self.last_save_time >= 60 * minutes

    def _step_save_due(self) -> bool:
        every = self.cfg.output.save_every_steps
        return bool(every) and self.state["global_step"] % every == 0

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
                                   run_dir=self.out, init_from=self.init_from)
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

    def save(self) -> None:
        """A resume checkpoint of the current step (collective). At most one per step."""
        st = self.state
        if self.last_saved_step == st["global_step"]:
            return
        keys = ("samples", "pad", "bad")
        counts = [self.counted_before_resume[k] + int(n) for k, n in
                  zip(keys, dist.all_reduce([self.loader.stats[k] for k in keys]).tolist())]
        st["bad_samples"] = int(counts[2])
        trainer_state = {**st, "metrics_lines": self.metrics.lines, "world_size": dist.world_size(),
                         "stage": self.cfg.stage, "loader": self.loader.state_dict(),
                         "loader_stats": {"samples": int(counts[0]), "pad": int(counts[1]), "bad": int(counts[2]),
                                          "bad_keys_rank0": self.loader.stats["bad_keys"]},
                         "plan": dataclasses.asdict(self.plan)}
        checkpoint.save_resume(self.engine, self.ckpt_root, checkpoint.checkpoint_tag(st["global_step"]),
                               trainer_state, self.cfg.output.keep_last)
        self.last_saved_step = st["global_step"]
        self.last_save_time = time.time()
        if counts[2]:
            log.warning("%d bad samples skipped so far (all ranks; data.on_error: skip)", int(counts[2]))


def accumulation_groups(loader, grad_accum: int):
    """The loader's micro-batches, grad_accum at a time; the last group of an epoch may be short."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []
    if group:
        yield group


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
