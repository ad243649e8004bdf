"""livr.json: what an export records about the run that wrote it, and where exports live.

`livr_metadata` is the one place the record is built; `handoff.HANDOFF_KEYS` names which of its
keys Stage 2 must share with Stage 1, the model card and the serving files read the rest.
"""

from __future__ import annotations

import hashlib
import json
import os

from ..latents import full_shape

FORMAT = "livr-ds/1"


def base_fingerprint(hf_model, num_latent_rows: int, num_tokens: int | None = None) -> dict:
    """What identifies the backbone a checkpoint belongs to (vocabulary size before latents).

    The tokenizer's length, not the table's rows: released Qwen tables have spare rows beyond
    the tokenizer (151,936 rows for ~151,665 tokens), and the latents take spare rows first."""
    text = hf_model.config.get_text_config()
    rows = full_shape(hf_model.get_input_embeddings().weight)[0]
    return {
        "model_type": hf_model.config.model_type,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "base_vocab_size": (num_tokens if num_tokens is not None else rows) - num_latent_rows,
    }


def weights_fingerprint(path: str) -> str:
    """What tells two checkpoints of one architecture apart (Qwen2.5-VL-7B base vs Instruct have the
    same config.json): a sha256 over each weight file's size, its safetensors header and the first
    and last MiB of its tensor bytes. Reads about 2 MiB a file, so a 72B checkpoint costs little, and
    does not depend on where the directory lives. `arch:` random weights are named by their spec."""
    if not os.path.isdir(path):
        return path  # arch:<name> (random weights from the seed) or a hub-style name
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    if not files:
        return "no-weight-files"
    digest = hashlib.sha256()
    chunk = 1 << 20
    for name in files:
        size = os.path.getsize(os.path.join(path, name))
        digest.update(f"{name}:{size}".encode())
        with open(os.path.join(path, name), "rb") as f:
            digest.update(f.read(chunk))
            if size > 2 * chunk:
                f.seek(size - chunk)
                digest.update(f.read(chunk))
    return "sha256:" + digest.hexdigest()[:32]


def livr_metadata(cfg, backbone, stage: int) -> dict:
    tok = backbone.processor.tokenizer
    return {
        "format": FORMAT,
        "family": cfg.model.family,
        "base_model": backbone.path,
        "base_weights": weights_fingerprint(backbone.path),
        "backbone": base_fingerprint(backbone.model.hf_model, len(set(backbone.latent_ids)), len(tok)),
        "latents": {"num": cfg.latents.num, "shared": cfg.latents.shared,
                    "tokens": tok.convert_ids_to_tokens(backbone.latent_ids), "ids": backbone.latent_ids},
        "trainable": cfg.model.trainable,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                 "target_regex": cfg.lora.target_regex or backbone.adapter.lora_target_regex},
        "dtype": cfg.model.dtype,
        "stage": stage,
        "policy": cfg.policy(stage),
        "max_tokens": cfg.data.max_tokens,
        "min_pixels": cfg.model.min_pixels,
        "max_pixels": cfg.model.max_pixels,
    }


# Keys an export's livr.json holds that describe it rather than constrain Stage 2: the record
# itself, where the export sits in its run (the trainer's `extra`), the card's `training` record
# and what `export --merge` adds. Everything else is compared by handoff.HANDOFF_KEYS.
INFORMATIONAL_KEYS = ("format", "base_model", "stage", "policy", "dtype", "epoch", "global_step", "val_accuracy",
                      "training", "merged", "merged_from", "merged_dtype")


def resolve_export(path: str, which: str = "final") -> str:
    """An export directory, or a stage run directory (its export/<which>), or a run dir with stages."""
    for candidate in (path, os.path.join(path, "export", which)):
        if os.path.exists(os.path.join(candidate, "livr.json")):
            return candidate
    raise FileNotFoundError(
        f"{path} is neither a livr-ds export (no livr.json) nor a stage run directory with export/{which}/"
    )


def read_livr_metadata(export_dir: str) -> dict:
    with open(os.path.join(export_dir, "livr.json")) as f:
        return json.load(f)
