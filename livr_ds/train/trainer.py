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

from .. import evaluate, export, generate
from ..config import ConfigError, ExperimentConfig
from ..data.collate import LivrCollator
from ..data.reader import LivrLoader, ShardSource
from ..data.schema import DataError
from ..modeling import build_backbone, resolve_model_path
from ..models import get_adapter
from . import checkpoint
from . import distributed as dist
from .ds_config import build_ds_config
from .metrics import MetricsLogger, Window
from .schedule import resolve_accumulation, step_plan

log = logging.getLogger(__name__)

EXIT_DIVERGED = 3


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
                                     cfg.data.max_tokens, cfg.data.too_long, packing=cfg.data.packing)
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
        if getattr(self.engine, "managed_gradient_accumulation", lambda: True)():
            raise ConfigError(f"DeepSpeed {deepspeed.__version__} steps on its own micro-step counter "
                              "(no managed_gradient_accumulation: false); livr-ds owns the step boundary and is "
                              "tested with the version setup.py pins")
        self.state = {"epoch": 0, "global_step": 0, "best_val": None, "best_epoch": None, "wandb_id": None,
                      "metrics_lines": 0, "bad_samples": 0}
        self.resumed_rng = None
        self.resumed_from: str | None = None
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
        if resume == "auto":
            path = checkpoint.latest_checkpoint(self.ckpt_root)
            if path is None:
                log.info("--resume auto: no usable checkpoint in %s, starting fresh", self.ckpt_root)
                return False
        elif resume in ("none", ""):
            return False
        else:
            path = resume
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
        if saved["world_size"] != dist.world_size():
            log.warning("resumed %s at world size %d (saved at %d): LoRA weights, latent rows, Adam moments, step "
                        "%d and the LR schedule restored; data continues at global sample %d; RNG streams are "
                        "new (dropout draws differ from an uninterrupted run)", path, dist.world_size(),
                        saved["world_size"], step, saved["loader"]["samples_consumed"])
        log.info("resumed from %s: epoch %d, batch %d, step %d", path, self.state["epoch"],
                 self.loader.state_dict()["batches_consumed"], step)
        return True

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
        """Train to the end of the stage or until a stop signal. Returns "done" or "interrupted"."""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
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
                checkpoint.fault_point("after_step")
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
        export.save_export(self.backbone, cfg, cfg.stage, os.path.join(self.out, "export", "final"),
                           extra={"epoch": st["epoch"], "global_step": st["global_step"]})
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
        answer tokens on all ranks), and ZeRO's gradient average divides by the world size."""
        answer_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        step_tokens = dist.all_reduce([answer_tokens])[0].item()
        scale = dist.world_size() / max(step_tokens, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in micro_batches:
            batch = generate.to_device(batch, self.device)
            n = (batch["labels"][:, 1:] != -100).sum()
            nll_sum = self.engine(batch, policy=self.policy) * n  # forward returns the mean over n
            self.engine.backward(nll_sum * scale, scale_wrt_gas=False)
            loss_sum += nll_sum.detach().double()
        checkpoint.fault_point("before_step_sync")
        # One collective per step for everything the loop decides on: the loss, a non-finite
        # loss anywhere, a stop signal anywhere, rank 0's clock for timed saves, throughput.
        metas = [b["meta"] for b in micro_batches]
        local = [
            loss_sum.item() if torch.isfinite(loss_sum) else 0.0,
            0.0 if torch.isfinite(loss_sum) else 1.0,
            1.0 if self.stop_requested else 0.0,
            1.0 if dist.is_main() and self._time_save_due() else 0.0,
            sum(len(m["keys"]) - sum(m["pad"]) for m in metas),
            sum(m["tokens"] for m in metas),
            sum(m["pad_fraction"] for m in metas),
            len(metas),
        ]
        g = dist.all_reduce(local).tolist()
        if g[1] > 0:
            raise TrainingDiverged(
                f"non-finite loss at step {self.state['global_step'] + 1} (epoch {self.state['epoch']}; rank "
                f"{dist.rank()}'s samples in the step: {[k for m in metas for k in m['keys']]}); "
                "stopping before the update. "
                f"The last good checkpoint is {checkpoint.latest_checkpoint(self.ckpt_root)}; lower optim.lr or "
                "check the data")
        lr = self.scheduler.get_last_lr()[0]  # what this step applies
        self.engine.step()
        self.state["global_step"] += 1
        return {"lr": lr, "loss_sum": g[0], "answer_tokens": step_tokens, "stop": g[2] > 0, "save_due": g[3] > 0,
                "samples": g[4], "tokens": g[5], "pad_fraction_sum": g[6], "micro_batches": g[7]}

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
            "loss": window.loss_sum / max(window.answer_tokens, 1), "lr": window.lr,
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
            checkpoint.fault_point("validation")
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
                                   extra={"epoch": st["epoch"], "val_accuracy": acc["mean"]})
            dist.barrier()
        self.save()

    def validate(self) -> dict:
        """Accuracy on the validation split: the eval CLI's loop (evaluate.evaluate, KV-cached greedy
        answers), each rank a share, gathered on every rank. With data.val_max_samples, the first N
        of a fixed seeded shuffle: the same mixed subset every epoch and at any world size.
        Validation measures the model as it will be used: the standard mask (the paper evaluates
        with plain causal attention after both stages)."""
        cfg = self.cfg
        records, _ = evaluate.evaluate(
            self.backbone, cfg.data.val, "standard", split=cfg.data.val_split,
            batch_size=max(cfg.optim.micro_batch_size, 4), max_samples=cfg.data.val_max_samples,
            max_tokens=cfg.data.max_tokens, num_workers=cfg.data.num_workers, seed=cfg.seed,
            on_error=cfg.data.on_error, rank=dist.rank(), world_size=dist.world_size())
        return evaluate.gather_accuracy(records)

    def save(self) -> None:
        """A resume checkpoint of the current step (collective). At most one per step."""
        st = self.state
        if self.last_saved_step == st["global_step"]:
            return
        counts = dist.all_reduce([self.loader.stats["samples"], self.loader.stats["pad"],
                                  self.loader.stats["bad"]]).tolist()
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
    try:
        trainer = Trainer(cfg, ds_config_path, resume=resume, init_from=init_from, device=device)
        status = trainer.fit()
    except TrainingDiverged as e:
        log.error("%s", e)
        return EXIT_DIVERGED
    except (ConfigError, checkpoint.CheckpointError, DataError) as e:
        log.error("%s", e)
        return 2
    log.info("stage %d %s; outputs in %s", cfg.stage, status, stage_dir(cfg))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use launch/train.py")
