"""DeepSpeed JSON configs: fill "auto" fields from the experiment YAML, refuse inconsistencies."""

from __future__ import annotations

import copy
import json

from ..config import ConfigError, ExperimentConfig
from .schedule import resolve_accumulation


def _fill(section: dict, key: str, value, where: str) -> None:
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise ConfigError(
            f"{where}.{key} = {current!r} in the DeepSpeed config but the experiment says {value!r}; "
            f'set it to "auto" to take the experiment value'
        )


def build_ds_config(path: str, cfg: ExperimentConfig, world_size: int) -> dict:
    with open(path) as f:
        ds = json.load(f)
    ds = copy.deepcopy(ds)
    micro = cfg.optim.micro_batch_size
    gas, _ = resolve_accumulation(cfg, world_size)
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "ds")
    _fill(ds, "gradient_accumulation_steps", gas, "ds")
    _fill(ds, "gradient_clipping", cfg.optim.grad_clip, "ds")
    total = ds.get("train_batch_size", "auto")
    if total == "auto":
        ds["train_batch_size"] = micro * gas * world_size
    elif total != micro * gas * world_size:
        raise ConfigError(
            f"inconsistent batch sizes: train_batch_size={total} but micro_batch_size ({micro}) x grad_accum "
            f"({gas}) x world size ({world_size}) = {micro * gas * world_size}; set train_batch_size to \"auto\""
        )
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    _fill(params, "lr", cfg.optim.lr, "ds.optimizer.params")
    _fill(params, "weight_decay", cfg.optim.weight_decay, "ds.optimizer.params")
    _fill(params, "betas", list(cfg.optim.betas), "ds.optimizer.params")
    _fill(params, "eps", cfg.optim.eps, "ds.optimizer.params")
    params.setdefault("torch_adam", True)  # no extension build; FusedAdam crashed at exit on CPU
    bf16 = ds.setdefault("bf16", {"enabled": "auto"})
    _fill(bf16, "enabled", cfg.model.dtype == "bfloat16", "ds.bf16")
    if bf16["enabled"]:
        # The dtype policy's second half (docs/training.md, "Precision"): micro-batch gradients are
        # summed and reduced across ranks in fp32. DeepSpeed's default for bf16 is both in bf16
        # (get_data_types: grad_accum_dtype = the model dtype; communication_data_type = bf16), so
        # the paper's 1 x 8 accumulation on one GPU would add 8 bf16 gradients. What trains is LoRA
        # and K rows: fp32 buffers for them cost little.
        # An explicit other value is the user's choice (the measurement in docs/training.md uses it).
        types = ds.setdefault("data_types", {})
        if types.get("grad_accum_dtype", "auto") == "auto":
            types["grad_accum_dtype"] = "fp32"
        if ds.get("communication_data_type", "auto") == "auto":
            ds["communication_data_type"] = "fp32"
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError("fp16 is not supported by livr-ds; use model.dtype: bfloat16")
    # The trainer owns the step boundary (train/trainer.py: grad_accum micro-batches, or fewer at
    # an epoch's end, then engine.step()); DeepSpeed's own micro-step counter would otherwise
    # decide when to step, and a short last step would never be applied.
    if ds.get("managed_gradient_accumulation", False) is not False:
        raise ConfigError("managed_gradient_accumulation must be false (or absent): livr-ds decides when "
                          "the optimizer steps")
    ds["managed_gradient_accumulation"] = False
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ConfigError(f"zero_optimization.stage {stage}: livr-ds trains with ZeRO stage 1, 2 or 3 "
                          "(ds_configs/zero2.json, zero2_offload.json, zero3.json, zero3_offload.json); its "
                          "world-size-free checkpoints read the ZeRO optimizer's fp32 partitions")
    if stage == 3 and cfg.model.trainable != "lora":
        raise ConfigError(f"model.trainable={cfg.model.trainable!r} with ZeRO-3: a full fine-tune's export is the "
                          "whole model, which livr-ds writes from one rank; use ZeRO-2, or model.trainable: lora")
    ds.setdefault("steps_per_print", 10**9)  # our own logging
    ds.setdefault("wall_clock_breakdown", False)
    return ds
