"""The components a training stage is wired from, each built by one function.

`Trainer.__init__` calls them in this order (data first: a missing or empty shard directory stops
the launch before the model loads):

    build_train_loader -> build_model -> build_collator -> build_plan -> build_engine

None of them reads or writes the stage directory; resuming and saving are `checkpointer.py`'s.
"""

from __future__ import annotations

import dataclasses
import logging

import deepspeed
import torch
from transformers import get_cosine_schedule_with_warmup

from .. import export, segments
from ..config import ConfigError, ExperimentConfig
from ..data.collate import LivrCollator
from ..data.loader import LivrLoader
from ..data.sources import ShardSource
from ..modeling import Backbone, build_backbone, resolve_model_path
from ..models import get_adapter
from .. import distributed as dist
from .schedule import StepPlan, step_plan

log = logging.getLogger(__name__)

# Parameters whose names contain one of these do not decay: the latent rows, embeddings, norms, biases.
NO_DECAY = ("latent_rows", "embed_tokens", "norm", "bias")


def build_train_loader(cfg: ExperimentConfig) -> LivrLoader:
    """The training loader, its shard indexes built (each rank its share), and the validation
    sources checked to exist. Its collate_fn is set once the model (and so the tokenizer) exists."""
    if not cfg.data.train:
        raise ConfigError("data.train is empty: name at least one shard directory")
    loader = LivrLoader(
        [ShardSource(s.path, weight=s.weight, split=cfg.data.train_split) for s in cfg.data.train],
        rank=dist.rank(), world_size=dist.world_size(), batch_size=cfg.optim.micro_batch_size,
        num_workers=cfg.data.num_workers, seed=cfg.seed, shuffle=True, on_error=cfg.data.on_error,
    )
    loader.index_shards(barrier=dist.barrier)
    for s in cfg.data.val:
        ShardSource(s.path, weight=s.weight, split=cfg.data.val_split).resolve()
    return loader


@dataclasses.dataclass
class BuiltModel:
    backbone: Backbone
    zero3: bool
    # The export --init-from loaded (Stage 1's, for Stage 2), or None.
    init_from: str | None
    # transformers' handle that makes from_pretrained build partitioned (deepspeed.zero.Init);
    # it acts only while referenced, so the trainer holds it.
    zero3_init: object | None


def build_model(cfg: ExperimentConfig, ds: dict, device: torch.device, init_from: str | None) -> BuiltModel:
    """The backbone with LoRA and latent rows, on `device`, optionally starting from an export
    (Stage 2 from Stage 1). Under ZeRO-3 it is built partitioned from the start: no rank ever holds
    the whole backbone (a 72B one is 145 GB in bf16, per rank)."""
    zero3 = ds.get("zero_optimization", {}).get("stage", 0) == 3
    zero3_init = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        resolve_model_path(cfg, get_adapter(cfg.model.family))  # a tiny model is written first, unpartitioned
        zero3_init = HfDeepSpeedConfig(ds)
    backbone = build_backbone(cfg, policy=cfg.policy(), device=device, packed=cfg.data.packing)
    if zero3:
        frozen = [p for p in backbone.model.parameters() if not p.requires_grad]
        held = sum(p.ds_tensor.numel() if dist.is_partitioned(p) else p.numel() for p in frozen)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in frozen)
        log.info("ZeRO-3: the backbone was built partitioned; this rank holds %.1f%% of its %d frozen parameters",
                 100.0 * held / max(total, 1), total)
    loaded = export.init_from_export(backbone, cfg, init_from) if init_from else None
    backbone.model.to(device)
    return BuiltModel(backbone=backbone, zero3=zero3, init_from=loaded, zero3_init=zero3_init)


def build_collator(cfg: ExperimentConfig, backbone: Backbone) -> LivrCollator:
    return LivrCollator(backbone.adapter, backbone.processor, backbone.latent_ids,
                        cfg.data.max_tokens, cfg.data.too_long, packing=cfg.data.packing,
                        pad_to_multiple=segments.pad_multiple(backbone.model.backend))


def build_plan(cfg: ExperimentConfig, loader: LivrLoader) -> StepPlan:
    """The stage's step plan at this world size, with warnings for recipes that will surprise."""
    plan = step_plan(cfg, dist.world_size(), len(loader), cfg.epochs())
    log.info("stage %d recipe: %s", cfg.stage, plan.describe())
    if cfg.optim.warmup_ratio > 0 and plan.total_steps < 20:
        log.warning("only %d optimizer steps in this stage: warmup is %d of them; the global batch (%d) is "
                    "large for %d samples", plan.total_steps, plan.warmup_steps, plan.global_batch_size,
                    loader.num_samples)
    if not cfg.optim.global_batch_size:
        log.warning("optim.global_batch_size is 0: the global batch is micro x accumulation x world size "
                    "= %d and changes with the number of ranks", plan.global_batch_size)
    return plan


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


def build_engine(cfg: ExperimentConfig, model: BuiltModel, ds: dict, plan: StepPlan):
    """(engine, scheduler): the DeepSpeed engine over the model's trainable parameters, AdamW from
    the DeepSpeed config, and the plan's warmup + cosine schedule."""
    engine, _, _, scheduler = deepspeed.initialize(
        model=model.backbone.model,
        model_parameters=param_groups(model.backbone.model, cfg.optim.weight_decay),
        config=ds,
        lr_scheduler=lambda opt: get_cosine_schedule_with_warmup(opt, plan.warmup_steps, plan.total_steps),
    )
    # ZeRO-3: every forward gathers partitioned weights, so all ranks run the same forwards.
    model.backbone.model.lockstep = model.zero3
    if getattr(engine, "managed_gradient_accumulation", lambda: True)():
        raise ConfigError(f"DeepSpeed {deepspeed.__version__} steps on its own micro-step counter "
                          "(no managed_gradient_accumulation: false); livr-ds owns the step boundary and is "
                          "tested with the version setup.py pins")
    return engine, scheduler


def release_engine(engine) -> None:
    """Undo what build_engine's DeepSpeed holds beyond the engine's own references, so that a
    later stage in this process does not build beside all of this one. `engine.destroy()` removes
    the gradient hooks on autograd's C++ AccumulateGrad nodes (the garbage collector cannot
    traverse them; they hold the optimizer, and through it the engine and model)."""
    engine.destroy()
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
