"""The optimizer-step arithmetic of a stage: global batch, accumulation, steps, warmup.

A pure function of the config, the world size and the loader's length, so the recipe can be
checked (and printed) before any model is built.

    global batch  = micro batch x accumulation x world size   (the paper: 8)
    steps/epoch   = ceil(micro-batches per rank per epoch / accumulation)

The last step of an epoch may be short (fewer micro-batches). It is a full-weight update, not a
down-weighted one: the loss of a step is the mean over its answer tokens on every rank, so a short
step's gradient averages fewer samples (it is noisier) but has the same scale and the same LR. With a micro batch of 1 and any world size that divides the global
batch, steps/epoch = ceil(samples / global batch): the same schedule at 1 GPU and at 8.
"""

from __future__ import annotations

import dataclasses
import math

from ..config import ConfigError, ExperimentConfig


@dataclasses.dataclass(frozen=True)
class StepPlan:
    micro_batch_size: int
    world_size: int
    grad_accum: int
    global_batch_size: int
    micro_batches_per_epoch: int  # per rank
    epochs: int
    warmup_ratio: float

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.micro_batches_per_epoch // self.grad_accum)

    @property
    def total_steps(self) -> int:
        return max(1, self.epochs * self.steps_per_epoch)

    @property
    def warmup_steps(self) -> int:
        # Rounded up, as transformers' Trainer does: a ratio > 0 always gives >= 1 warmup step.
        return math.ceil(self.warmup_ratio * self.total_steps)

    @property
    def short_last_step(self) -> int:
        """Micro-batches in each epoch's last step when it is short, else 0."""
        return self.micro_batches_per_epoch % self.grad_accum

    def describe(self) -> str:
        short = f", the last of {self.short_last_step} micro-batches" if self.short_last_step else ""
        return (f"global batch {self.global_batch_size} = micro {self.micro_batch_size} x accumulation "
                f"{self.grad_accum} x {self.world_size} ranks; {self.steps_per_epoch} optimizer steps per epoch"
                f"{short} x {self.epochs} epochs = {self.total_steps} steps, {self.warmup_steps} warmup "
                f"({self.warmup_ratio:g}) then cosine")


def resolve_accumulation(cfg: ExperimentConfig, world_size: int) -> tuple[int, int]:
    """(grad_accum, global batch) for this world size, or a ConfigError naming the numbers."""
    o = cfg.optim
    per_pass = o.micro_batch_size * world_size
    if o.global_batch_size:
        if o.global_batch_size % per_pass:
            raise ConfigError(
                f"optim.global_batch_size {o.global_batch_size} is not a multiple of micro batch "
                f"{o.micro_batch_size} x {world_size} ranks = {per_pass}; use a world size that divides "
                f"{o.global_batch_size // o.micro_batch_size} or change optim.global_batch_size / micro_batch_size")
        accum = o.global_batch_size // per_pass
        if o.grad_accum and o.grad_accum != accum:
            raise ConfigError(
                f"optim.grad_accum {o.grad_accum} contradicts optim.global_batch_size {o.global_batch_size} at "
                f"{world_size} ranks x micro batch {o.micro_batch_size} (which needs {accum}); leave grad_accum "
                "at 0 (derived) or set global_batch_size: 0 to use grad_accum as given")
        return accum, o.global_batch_size
    accum = o.grad_accum or 1
    return accum, per_pass * accum


def step_plan(cfg: ExperimentConfig, world_size: int, micro_batches_per_epoch: int, epochs: int) -> StepPlan:
    accum, global_batch = resolve_accumulation(cfg, world_size)
    return StepPlan(cfg.optim.micro_batch_size, world_size, accum, global_batch, micro_batches_per_epoch,
                    epochs, cfg.optim.warmup_ratio)
