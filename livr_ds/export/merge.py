"""`livr-ds export --merge`: fold LoRA and the latent rows into the base weights, giving a plain
transformers checkpoint that keeps the export's serving files (chat template with the latents,
generation_config.json) and a model card rendered again for the merged model."""

from __future__ import annotations

import logging
import os
import shutil

import torch

from ..atomic import replace_dir, write_json_atomic
from ..config import ConfigError
from .card import render_card
from .load import load_export
from .metadata import read_livr_metadata, resolve_export
from .serving import write_serving_files

log = logging.getLogger(__name__)

MERGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Files of the adapter export a merged checkpoint replaces (its own weights, config and card).
_NOT_COPIED = ("livr.json", "README.md", "generation_config.json")


def merge_dtype(meta: dict, requested: str = "auto") -> torch.dtype:
    """The dtype a merged checkpoint is written in: the run's (livr.json `dtype`, what the base
    was loaded as for training) unless `--dtype` names another. Exports older than the `dtype`
    key fall back to float32, as they were merged before."""
    name = meta.get("dtype", "float32") if requested == "auto" else requested
    if name not in MERGE_DTYPES:
        raise ConfigError(f"--dtype {name!r}: pick one of auto, {', '.join(MERGE_DTYPES)}")
    return MERGE_DTYPES[name]


def merge_export(path: str, out_dir: str, which: str = "final", dtype: str = "auto",
                 max_shard_size: str = "5GB") -> str:
    """Fold LoRA and the latent rows into the base weights: a plain transformers checkpoint.

    The base is loaded in the merge dtype and LoRA's update is added in it, so a bf16 run gives a
    bf16 checkpoint of the released size; the weights are written as safetensors shards of at
    most `max_shard_size` with an index (transformers' save_pretrained). The whole model is held
    in memory once (about 2 bytes a parameter in bf16)."""
    export_dir = resolve_export(path, which)
    meta = read_livr_metadata(export_dir)
    torch_dtype = merge_dtype(meta, dtype)
    backbone = load_export(export_dir, dtype=torch_dtype)
    merged = backbone.model.peft_model.merge_and_unload()
    merged.to(torch_dtype)  # the LoRA-free model keeps no fp32 leftovers (latent rows, adapters' casts)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, max_shard_size=max_shard_size)
    for name in os.listdir(export_dir):
        if (not name.startswith("adapter_") and name not in _NOT_COPIED
                and os.path.isfile(os.path.join(export_dir, name))):
            shutil.copy(os.path.join(export_dir, name), tmp)
    # The export's decoding and template, not the base's generation config that save_pretrained
    # wrote (written again, so that an export from before they existed gets them too).
    write_serving_files(tmp, backbone.processor, backbone.latent_ids,
                        merged.get_input_embeddings().weight.shape[0])
    merged_meta = {**meta, "merged": True, "merged_from": export_dir,
                   "merged_dtype": str(torch_dtype).removeprefix("torch.")}
    write_json_atomic(os.path.join(tmp, "livr.json"), merged_meta)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(render_card(merged_meta))
    replace_dir(tmp, out_dir)
    log.info("merged %s into %s (%s, shards of at most %s)", export_dir, out_dir, torch_dtype, max_shard_size)
    return out_dir
