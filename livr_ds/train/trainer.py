"""The training loop: one stage of LIVR on a DeepSpeed engine.

    batch -> mask for this stage -> NLL on answer tokens -> engine.backward -> engine.step

Stage 1 (bottleneck mask) and Stage 2 (standard mask) are separate launches; Stage 2 starts
from Stage 1's export with `--init-from` and a fresh optimizer and schedule.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time

import deepspeed
import torch
import yaml
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from .. import generate
from ..config import ExperimentConfig
from ..data.collate import LivrCollator
from ..data.reader import LivrLoader, ShardSource
from ..modeling import build_backbone
from . import checkpoint
from . import distributed as dist
from .ds_config import build_ds_config
from .metrics import MetricsLogger, Window

log = logging.getLogger(__name__)

EXIT_DIVERGED = 3


class TrainingDiverged(RuntimeError):
    pass


def stage_dir(cfg: ExperimentConfig, stage: int | None = None) -> str:
    return os.path.join(cfg.output.dir, f"stage{stage or cfg.stage}")


NO_DECAY = ("trainable_tokens", "embed_tokens", "norm", "bias")


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
        torch.manual_seed(cfg.seed)

        self.backbone = build_backbone(cfg, policy=self.policy, device=self.device, packed=cfg.data.packing)
        self.init_from = checkpoint.init_from_export(self.backbone, cfg, init_from) if init_from else None
        self.backbone.model.to(self.device)
        self.collator = LivrCollator(self.backbone.adapter, self.backbone.processor, self.backbone.latent_ids,
                                     cfg.data.max_tokens, cfg.data.too_long, packing=cfg.data.packing)
        self.loader = self._loader(cfg.data.train, cfg.data.train_split, cfg.optim.micro_batch_size,
                                   self.collator, shuffle=True)
        gas = cfg.optim.grad_accum
        self.total_steps = max(1, math.ceil(self.epochs * len(self.loader) / gas))

        ds = build_ds_config(ds_config_path, cfg, dist.world_size())
        warmup = int(cfg.optim.warmup_ratio * self.total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.backbone.model,
            model_parameters=param_groups(self.backbone.model, cfg.optim.weight_decay),
            config=ds,
            lr_scheduler=lambda opt: get_cosine_schedule_with_warmup(opt, warmup, self.total_steps),
        )
        self.state = {"epoch": 0, "global_step": 0, "best_val": None,
                      "best_epoch": None, "wandb_id": None, "world_size": dist.world_size()}
        self._maybe_resume(resume)
        self.metrics = MetricsLogger(self.out, cfg.logging.wandb, cfg.logging.project,
                                     f"{cfg.name}-stage{cfg.stage}", cfg.to_dict(), self.state["wandb_id"],
                                     enabled=dist.is_main())
        self.state["wandb_id"] = dist.broadcast_object(self.metrics.run_id)
        if self.state["global_step"]:
            self.metrics.truncate_after(self.state["global_step"])
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

    def _maybe_resume(self, resume: str) -> None:
        self.resumed_rng = None
        path = None
        if resume == "auto":
            path = checkpoint.latest_checkpoint(self.ckpt_root)
            if path is None:
                log.info("--resume auto: no checkpoint in %s, starting fresh", self.ckpt_root)
        elif resume not in ("none", ""):
            path = resume
        if path:
            saved = checkpoint.load_resume(self.engine, path)
            self.resumed_rng = saved.get("rng")
            self.state.update({k: saved[k] for k in self.state if k in saved and k != "world_size"})
            self.loader.load_state_dict(saved["loader"])
            log.info("resumed from %s: epoch %d, batch %d, step %d", path, self.state["epoch"],
                     self.loader.state_dict()["batches_consumed"], self.state["global_step"])

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
        cfg, st = self.cfg, self.state
        log.info("stage %d (%s mask): %d epochs x %d micro-batches/rank, %d optimizer steps, world %d",
                 cfg.stage, self.policy, self.epochs, len(self.loader), self.total_steps, dist.world_size())
        done = st["epoch"] * len(self.loader) + self.loader.state_dict()["batches_consumed"]
        bar = tqdm(total=self.epochs * len(self.loader), initial=done,
                   disable=not (dist.is_main() and cfg.logging.progress_bar), desc=f"stage {cfg.stage}", unit="batch")
        window = Window()
        while st["epoch"] < self.epochs:
            self.loader.set_epoch(st["epoch"])  # keeps a resumed mid-epoch position
            for batch in self.loader:
                window.add(self._micro_step(batch), batch["meta"])
                bar.update(1)
                if self.engine.micro_steps % cfg.optim.grad_accum:
                    continue  # mid-accumulation: the optimizer has not stepped
                st["global_step"] = self.engine.global_steps
                checkpoint.fault_point("after_step")
                if st["global_step"] % cfg.logging.every_steps == 0:
                    self._log(window)
                stop = dist.any_rank(self.stop_requested)
                due = cfg.output.save_every_steps and st["global_step"] % cfg.output.save_every_steps == 0
                if stop or due:
                    self.save()
                if stop:
                    log.warning("stopped on signal at step %d; resume with --resume auto", st["global_step"])
                    bar.close()
                    return "interrupted"
            st["epoch"] += 1
            self._end_of_epoch()
        bar.close()
        if dist.is_main():
            checkpoint.save_export(self.backbone, cfg, cfg.stage, os.path.join(self.out, "export", "final"),
                                   extra={"epoch": st["epoch"], "global_step": st["global_step"]})
            with open(os.path.join(self.out, "DONE"), "w") as f:
                f.write(f"{st['global_step']}\n")
        dist.barrier()
        self.metrics.close()
        return "done"

    def _micro_step(self, batch: dict) -> float:
        batch = generate.to_device(batch, self.device)
        loss = self.engine(batch, policy=self.policy)
        if dist.any_rank(not torch.isfinite(loss).item()):
            raise TrainingDiverged(
                f"non-finite loss at step {self.state['global_step']} (epoch {self.state['epoch']}, keys "
                f"{batch['meta']['keys']}); stopping. The last good checkpoint is {checkpoint.latest_checkpoint(self.ckpt_root)}; "
                "lower optim.lr or check the data"
            )
        self.engine.backward(loss)
        self.engine.step()
        return loss.item()

    def _log(self, window: Window) -> None:
        elapsed = max(time.time() - window.start, 1e-9)
        loss_sum, n, samples, tokens = dist.all_sum([window.loss, window.n, window.samples, window.tokens])
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "step": self.state["global_step"], "epoch": self.state["epoch"], "stage": self.cfg.stage,
            "loss": loss_sum / max(n, 1), "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed,
            "pad_fraction": window.pad_fraction / max(window.n, 1),
        }
        self.metrics.log(record)
        window.reset()

    def _end_of_epoch(self) -> None:
        st = self.state
        if self.cfg.data.val:
            acc = self.validate()
            if dist.is_main():
                self.metrics.log({"step": st["global_step"], "epoch": st["epoch"], "stage": self.cfg.stage,
                                  "val_accuracy": acc["mean"],
                                  **{f"val_{t}": v["accuracy"] for t, v in acc["per_task"].items()}})
                log.info("epoch %d: validation accuracy %.2f %s", st["epoch"], acc["mean"],
                         {t: round(v["accuracy"], 2) for t, v in acc["per_task"].items()})
            if st["best_val"] is None or acc["mean"] > st["best_val"]:
                st["best_val"], st["best_epoch"] = acc["mean"], st["epoch"]
                if dist.is_main():
                    checkpoint.save_export(self.backbone, self.cfg, self.cfg.stage,
                                           os.path.join(self.out, "export", "best"),
                                           extra={"epoch": st["epoch"], "val_accuracy": acc["mean"]})
            dist.barrier()
        if self.engine.micro_steps % self.cfg.optim.grad_accum == 0:
            self.save()

    def validate(self) -> dict:
        """Greedy answers on this rank's share of the validation split, gathered on every rank."""
        cfg = self.cfg
        collator = LivrCollator(self.backbone.adapter, self.backbone.processor, self.backbone.latent_ids,
                                cfg.data.max_tokens, "error", with_answer=False)
        # Shuffled with a fixed epoch, so val_max_samples takes the same mixed subset every time.
        loader = self._loader(cfg.data.val, cfg.data.val_split, max(cfg.optim.micro_batch_size, 4),
                              collate_fn=None, shuffle=True)
        records, seen = [], 0
        self.engine.eval()
        for samples in loader:
            real = [s for s in samples if not s.is_pad]
            if cfg.data.val_max_samples:
                real = real[: max(0, cfg.data.val_max_samples // dist.world_size() - seen)]
            seen += len(real)
            if real:
                preds = generate.greedy_answers(self.engine.module, collator, real, self.policy_for_eval())
                records += generate.score(real, preds)
        self.engine.train()
        gathered = [r for part in dist.gather_objects(records) for r in part]
        return generate.accuracy_by_task(gathered)

    def policy_for_eval(self) -> str:
        # Validation measures the model as it will be used: the standard mask (the paper
        # evaluates with plain causal attention after both stages).
        return "standard"

    def save(self) -> None:
        tag = f"step-{self.state['global_step']:08d}"
        trainer_state = {**self.state, "world_size": dist.world_size(), "stage": self.cfg.stage,
                         "loader": self.loader.state_dict(), "loader_stats": self.loader.stats}
        checkpoint.save_resume(self.engine, self.ckpt_root, tag, trainer_state, self.cfg.output.keep_last)


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
    log.info("stage %d %s; outputs in %s", cfg.stage, status, stage_dir(cfg))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use launch/train.py")
