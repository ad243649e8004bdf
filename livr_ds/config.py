"""Typed experiment configuration: one YAML per experiment, validated at start-up.

A YAML may name a `base:` file (relative to itself) whose values it overrides, so ablations are
small override files, not copies. `--set a.b=c` overrides come last; values are parsed as YAML
(`--set latents.num=8`, `--set data.train=[{path: x}]`). Unknown keys and bad values raise
ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from .segments import POLICIES


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    family: Literal["qwen2_5_vl", "qwen3_vl", "llava_onevision"] = "qwen2_5_vl"
    path: str = ""  # a local checkpoint dir; "tiny:<dir>" a tiny random model; "arch:<name>" a published arch, random
    dtype: Literal["float32", "bfloat16"] = "float32"
    # auto: flex on GPU when a mask needs it, flash-attn for unpacked standard masks if installed,
    # sdpa otherwise. eager is the slow reference.
    attn_backend: Literal["auto", "sdpa", "eager", "flex", "flash"] = "auto"
    trust_remote_code: bool = False  # needed for LLaVA-OneVision-1.5 (untested here)
    gradient_checkpointing: bool = False
    # lora: LoRA on the LM + the K latent rows (LIVR). lm: the whole language model (the paper's
    # Mirage comparison; vision frozen). all: every weight (tiny models trained from scratch).
    trainable: Literal["lora", "lm", "all"] = "lora"
    min_pixels: int = 0  # 0 = the checkpoint's own processor settings
    max_pixels: int = 0


@dataclass
class LatentConfig:
    num: int = 16  # K; 0 = no latents (Direct SFT, mask-only ablations)
    shared: bool = False  # ablation: one latent token repeated K times


@dataclass
class MaskConfig:
    stage1: str = "bottleneck"
    stage2: str = "standard"


@dataclass
class ScheduleConfig:
    stage1_epochs: int = 4
    stage2_epochs: int = 6


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    micro_batch_size: int = 1
    # Samples per optimizer step over all ranks: the paper's 8. Accumulation is derived as
    # global / (micro x world size), so the recipe does not change with the GPU count; a global
    # batch that does not divide is refused at start-up. 0 = micro x grad_accum x world size.
    global_batch_size: int = 8
    grad_accum: int = 0  # 0 = derived from global_batch_size; set with global_batch_size: 0


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_regex: str = ""  # "" = the adapter's LM attention + MLP regex


@dataclass
class DataSource:
    path: str = ""  # a shard directory with manifest.json, or a brace pattern of .tar files
    weight: float = 1.0


@dataclass
class DataConfig:
    train: list[DataSource] = field(default_factory=list)
    val: list[DataSource] = field(default_factory=list)
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int = 2
    max_tokens: int = 4096  # per sample, and per row when packing
    packing: bool = False  # several samples per row (no attention across them)
    too_long: Literal["error", "skip"] = "error"  # answers are never cut
    on_error: Literal["raise", "skip"] = "raise"
    val_max_samples: int = 0  # 0 = the whole validation split


@dataclass
class LoggingConfig:
    every_steps: int = 10
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "livr-ds"
    progress_bar: bool = True


@dataclass
class OutputConfig:
    dir: str = "runs/experiment"
    save_every_steps: int = 0  # 0 = none between epoch ends (an epoch end always saves)
    save_every_minutes: float = 30.0  # 0 = off; bounds the work a crash can lose
    keep_last: int = 2


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 42
    stage: Literal[1, 2] = 1
    # The DeepSpeed JSON this experiment needs (a 72B config names ZeRO-3, so it cannot start on
    # ZeRO-2 by accident); a relative path is looked up from the working directory, then from the
    # livr-ds checkout. launch/train.py --ds wins.
    deepspeed: str = "ds_configs/zero2.json"
    model: ModelConfig = field(default_factory=ModelConfig)
    latents: LatentConfig = field(default_factory=LatentConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def policy(self, stage: int | None = None) -> str:
        return self.mask.stage1 if (stage or self.stage) == 1 else self.mask.stage2

    def epochs(self, stage: int | None = None) -> int:
        return self.schedule.stage1_epochs if (stage or self.stage) == 1 else self.schedule.stage2_epochs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- loading --------------------------------------------------------------------------------

def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"config {path}: `base:` chain loops back to itself")
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = _read_yaml(os.path.join(os.path.dirname(path), base), seen + (path,))
    return _merge(parent, data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, dict)) and dataclasses.is_dataclass(inner):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls, data: Any, prefix: str):
    if cls is DataSource and isinstance(data, str):
        data = {"path": data}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint}; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    for key in ("stage1", "stage2"):
        policy = getattr(cfg.mask, key)
        if policy not in POLICIES:
            raise ConfigError(f"mask.{key}: unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    checks = [
        (cfg.latents.num >= 0, "latents.num", "must be >= 0 (0 = no latents)"),
        (cfg.schedule.stage1_epochs >= 0 and cfg.schedule.stage2_epochs >= 0, "schedule", "epochs must be >= 0"),
        (math.isfinite(cfg.optim.lr) and cfg.optim.lr > 0, "optim.lr", "must be a finite number > 0"),
        (0 <= cfg.optim.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)"),
        (cfg.optim.micro_batch_size >= 1, "optim.micro_batch_size", "must be >= 1"),
        (cfg.optim.grad_accum >= 0, "optim.grad_accum", "must be >= 0 (0 = derived from global_batch_size)"),
        (cfg.optim.global_batch_size >= 0, "optim.global_batch_size", "must be >= 0 (0 = micro x grad_accum x ranks)"),
        (len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas",
         "must be two numbers in [0, 1)"),
        (math.isfinite(cfg.optim.eps) and cfg.optim.eps > 0, "optim.eps", "must be a finite number > 0"),
        (math.isfinite(cfg.optim.weight_decay) and cfg.optim.weight_decay >= 0, "optim.weight_decay",
         "must be a finite number >= 0"),
        (math.isfinite(cfg.optim.grad_clip) and cfg.optim.grad_clip >= 0, "optim.grad_clip",
         "must be a finite number >= 0 (0 = no clipping)"),
        (cfg.lora.r >= 1, "lora.r", "must be >= 1"),
        (cfg.lora.alpha > 0, "lora.alpha", "must be > 0"),
        (0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)"),
        (cfg.model.min_pixels >= 0 and cfg.model.max_pixels >= 0, "model.min_pixels/max_pixels", "must be >= 0"),
        (not (cfg.model.min_pixels and cfg.model.max_pixels) or cfg.model.min_pixels <= cfg.model.max_pixels,
         "model.min_pixels/max_pixels", f"min_pixels {cfg.model.min_pixels} is above max_pixels {cfg.model.max_pixels}"),
        (cfg.output.keep_last >= 1, "output.keep_last", "must be >= 1 (the newest checkpoint is always kept)"),
        (cfg.output.save_every_steps >= 0, "output.save_every_steps", "must be >= 0 (0 = off)"),
        (math.isfinite(cfg.output.save_every_minutes) and cfg.output.save_every_minutes >= 0,
         "output.save_every_minutes", "must be a finite number >= 0 (0 = off)"),
        (cfg.data.val_max_samples >= 0, "data.val_max_samples", "must be >= 0 (0 = the whole validation split)"),
        (cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0"),
        (cfg.data.max_tokens >= 16, "data.max_tokens", "must be >= 16"),
        (cfg.logging.every_steps >= 1, "logging.every_steps", "must be >= 1"),
        (all(math.isfinite(s.weight) and s.weight > 0 for s in cfg.data.train), "data.train[].weight",
         "must be a finite number > 0"),
        (all(math.isfinite(s.weight) and s.weight > 0 for s in cfg.data.val), "data.val[].weight",
         "must be a finite number > 0"),
    ]
    for ok, key, why in checks:
        if not ok:
            raise ConfigError(f"{key}: {why}")
    if cfg.optim.global_batch_size and cfg.optim.global_batch_size % cfg.optim.micro_batch_size:
        raise ConfigError(f"optim.global_batch_size {cfg.optim.global_batch_size} is not a multiple of "
                          f"optim.micro_batch_size {cfg.optim.micro_batch_size}")
    if cfg.latents.num == 0 and "bottleneck" in cfg.policy(1) and cfg.schedule.stage1_epochs > 0:
        raise ConfigError("mask.stage1: a bottleneck with latents.num = 0 cuts the answer off from the "
                          "image entirely; use answer_only for the mask-only ablation or set latents.num > 0")
    return cfg


def load_config(path: str | None, overrides: list[str] = ()) -> ExperimentConfig:
    data = _read_yaml(path) if path else {}
    for assignment in overrides:
        _apply_override(data, assignment)
    # Relative data and model paths are relative to the working directory, as with every
    # launcher; only `base:` is resolved against the file that names it.
    return validate(_build(ExperimentConfig, data, ""))


PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_deepspeed_config(cfg: ExperimentConfig, override: str | None = None) -> str:
    """The DeepSpeed JSON of a launch: `--ds` if given, else the experiment's `deepspeed` key."""
    path, key = (override, "--ds") if override else (cfg.deepspeed, "deepspeed")
    for candidate in (path, os.path.join(PROJECT_ROOT, path)):
        if os.path.isfile(candidate):
            return candidate
    raise ConfigError(f"{key}: no DeepSpeed config at {path!r} (looked in {os.getcwd()} and {PROJECT_ROOT})")
