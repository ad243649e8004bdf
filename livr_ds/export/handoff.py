"""Stage 1 -> Stage 2: `--init-from` loads Stage 1's adapter into a fresh backbone, after refusing
every setting that would make Stage 2 silently continue something else."""

from __future__ import annotations

import logging
import os

from safetensors.torch import load_file

from ..config import ConfigError
from .metadata import livr_metadata, read_livr_metadata, resolve_export
from .tensors import is_peft, load_trainable_state

log = logging.getLogger(__name__)

# What must be equal for Stage 2 to continue Stage 1's training, as (livr.json key path, config key).
# The backbone (family, architecture fingerprint, the weights themselves), the latent token set,
# what trains and how LoRA scales it (a changed alpha silently rescales Stage 1's adapter, a changed
# r does not fit, other targets start from zero), and the inputs' shape (pixels, token budget).
HANDOFF_KEYS = (
    (("family",), "model.family"),
    (("base_weights",), "model.path (the base checkpoint's weights)"),
    (("backbone",), "model.path (the backbone's architecture)"),
    (("latents", "num"), "latents.num"),
    (("latents", "shared"), "latents.shared"),
    (("latents", "tokens"), "latents (the latent token strings)"),
    (("trainable",), "model.trainable"),
    (("lora", "r"), "lora.r"),
    (("lora", "alpha"), "lora.alpha"),
    (("lora", "dropout"), "lora.dropout"),
    (("lora", "target_regex"), "lora.target_regex"),
    (("max_tokens",), "data.max_tokens"),
    (("min_pixels",), "model.min_pixels"),
    (("max_pixels",), "model.max_pixels"),
)

_MISSING = object()


def _lookup(meta: dict, path: tuple):
    for key in path:
        if not isinstance(meta, dict) or key not in meta:
            return _MISSING
        meta = meta[key]
    return meta


def check_compatible(meta: dict, cfg, backbone, where: str = "--init-from") -> None:
    """Refuse to continue from a checkpoint that differs in anything Stage 2 inherits, naming each
    key with both values. An export written before a key was recorded is not refused for it."""
    mine = livr_metadata(cfg, backbone, cfg.stage)
    problems, unknown = [], []
    for path, key in HANDOFF_KEYS:
        theirs, ours = _lookup(meta, path), _lookup(mine, path)
        if theirs is _MISSING:
            unknown.append(key)
        elif theirs != ours:
            problems.append(f"{key} is {theirs!r} there, {ours!r} here")
    if problems:
        raise ConfigError(f"{where}: the checkpoint does not match this experiment: " + "; ".join(problems)
                          + ". Start Stage 2 with Stage 1's settings (its config.yaml), or train Stage 1 again")
    if unknown:
        log.warning("%s: written by an older livr-ds, it does not record %s; not checked", where, ", ".join(unknown))


def init_from_export(backbone, cfg, path: str) -> str:
    """Load Stage 1's LoRA + latent rows into a fresh backbone (fresh optimizer and schedule)."""
    export_dir = resolve_export(path)
    meta = read_livr_metadata(export_dir)
    check_compatible(meta, cfg, backbone, where=f"--init-from {export_dir}")
    model = backbone.model.peft_model
    if is_peft(model) != (not meta.get("merged")):
        raise ConfigError("--init-from: the checkpoint's model.trainable (LoRA adapter vs full weights) "
                         "differs from this experiment's")
    if is_peft(model):
        # PEFT's saved names (adapter name dropped); set_peft_model_state_dict adds it back.
        tensors = load_file(os.path.join(export_dir, "adapter_model.safetensors"))
    else:
        # A full export is a transformers checkpoint, saved under transformers' own key names:
        # load it the way transformers does and take its state dict.
        tensors = backbone.adapter.load_model(export_dir, dtype=model.dtype).state_dict()
    load_trainable_state(backbone.model, tensors, where=f"--init-from {export_dir}")
    log.info("initialised from %s (stage %s, %s)", export_dir, meta["stage"], meta["policy"])
    return export_dir
