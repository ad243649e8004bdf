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
from ..models import get_adapter
from .card import render_card
from .metadata import read_livr_metadata, resolve_export
from .serving import write_serving_files
from .streaming import Unsupported, stream_merge

log = logging.getLogger(__name__)

MERGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Files of the export a merged checkpoint replaces (its own weights, config and card).
_NOT_COPIED = ("livr.json", "README.md", "generation_config.json", "config.json", "model.safetensors.index.json")


def merge_dtype(meta: dict, requested: str = "auto") -> torch.dtype:
    """The dtype a merged checkpoint is written in: the run's (livr.json `dtype`, what the base
    was loaded as for training) unless `--dtype` names another. Exports older than the `dtype`
    key fall back to float32, as they were merged before."""
    name = meta.get("dtype", "float32") if requested == "auto" else requested
    if name not in MERGE_DTYPES:
        raise ConfigError(f"--dtype {name!r}: pick one of auto, {', '.join(MERGE_DTYPES)}")
    return MERGE_DTYPES[name]


def merge_export(path: str, out_dir: str, which: str = "final", dtype: str = "auto",
                 max_shard_size: str = "5GB", streaming: bool = True) -> str:
    """Fold LoRA and the latent rows into the base weights: a plain transformers checkpoint.

    Streamed (export/streaming.py): the base's safetensors are read one tensor at a time, LoRA's
    update added in float32 and cast once to the merge dtype (the run's, so a bf16 run gives a
    bf16 checkpoint of the released size), and written as shards of at most `max_shard_size`
    with an index; memory holds the adapter and about one tensor, never the model. A full
    fine-tune export is re-cast and re-sharded the same way. The tensor names, config.json and
    index are those transformers' save_pretrained writes for the in-memory merge.

    Falls back to the in-memory merge (the whole model in memory, about 2 bytes a parameter in
    bf16; PEFT's merge_and_unload), with the reason logged, where the base is not a local
    directory of safetensors (a hub name, .bin weights) or the adapter uses what the streaming
    merge does not reproduce (DoRA, rank patterns, a converted checkpoint format, ...);
    `streaming=False` asks for it."""
    export_dir = resolve_export(path, which)
    meta = read_livr_metadata(export_dir)
    torch_dtype = merge_dtype(meta, dtype)
    family = get_adapter(meta["family"])
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    processor = family.load_processor(export_dir)
    vocab_rows = None
    if streaming:
        full = bool(meta.get("merged"))  # a full fine-tune: the export is the checkpoint
        base = export_dir if full else meta["base_model"]
        try:
            if not os.path.isdir(base):
                raise Unsupported(f"base_model {base!r} is not a local directory")
            vocab_rows = stream_merge(family.model_class, base, None if full else export_dir,
                                      len(processor.tokenizer), torch_dtype, max_shard_size, tmp)
        except Unsupported as e:
            log.warning("merging in memory, not streamed: %s", e)
            shutil.rmtree(tmp)
            os.makedirs(tmp)
    if vocab_rows is None:
        vocab_rows = _merge_in_memory(export_dir, torch_dtype, max_shard_size, tmp)
    for name in os.listdir(export_dir):
        if (not name.startswith(("adapter_", "model.", "model-")) and name not in _NOT_COPIED
                and os.path.isfile(os.path.join(export_dir, name))):
            shutil.copy(os.path.join(export_dir, name), tmp)
    # The export's decoding and template, not the base's generation config that save_pretrained
    # wrote (written again, so that an export from before they existed gets them too).
    write_serving_files(tmp, processor, meta["latents"]["ids"], vocab_rows)
    merged_meta = {**meta, "merged": True, "merged_from": export_dir,
                   "merged_dtype": str(torch_dtype).removeprefix("torch.")}
    write_json_atomic(os.path.join(tmp, "livr.json"), merged_meta)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(render_card(merged_meta))
    replace_dir(tmp, out_dir)
    log.info("merged %s into %s (%s, shards of at most %s)", export_dir, out_dir, torch_dtype, max_shard_size)
    return out_dir


def _merge_in_memory(export_dir: str, torch_dtype: torch.dtype, max_shard_size, tmp: str) -> int:
    """The base loaded whole in the merge dtype, PEFT's merge_and_unload, save_pretrained."""
    from .load import load_export

    backbone = load_export(export_dir, dtype=torch_dtype)
    peft_model = backbone.model.peft_model
    merged = peft_model.merge_and_unload() if hasattr(peft_model, "merge_and_unload") else peft_model
    merged.to(torch_dtype)  # the LoRA-free model keeps no fp32 leftovers (latent rows, adapters' casts)
    merged.save_pretrained(tmp, max_shard_size=max_shard_size)
    return merged.get_input_embeddings().weight.shape[0]
