"""Loading exports for evaluation (no DeepSpeed), and `livr-ds export --merge`.

An export holds a PEFT adapter (LoRA + the K latent rows), the tokenizer with the latent tokens,
the processor files and livr.json, which names the base checkpoint. Loading one needs only
transformers + PEFT: base model -> resize embeddings to the saved tokenizer -> PeftModel.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch
from peft import PeftModel

from .modeling import Backbone, LivrModel, resize_embeddings
from .models import get_adapter
from .train.checkpoint import _replace_dir, _write_json_atomic, read_livr_metadata, resolve_export

log = logging.getLogger(__name__)


def load_export(path: str, *, which: str = "final", device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, attn_backend: str = "sdpa",
                base_model: str | None = None) -> Backbone:
    """A trained LIVR model from an export (or a stage run dir, or a merged export)."""
    export_dir = resolve_export(path, which)
    meta = read_livr_metadata(export_dir)
    adapter = get_adapter(meta["family"])
    processor = adapter.load_processor(export_dir)
    if meta.get("merged"):
        hf_model = adapter.load_model(export_dir, dtype=dtype, attn_implementation=attn_backend)
        model = hf_model
    else:
        base = base_model or meta["base_model"]
        hf_model = adapter.load_model(base, dtype=dtype, attn_implementation=attn_backend)
        resize_embeddings(hf_model, len(processor.tokenizer))
        model = PeftModel.from_pretrained(hf_model, export_dir)
    model.eval().to(device)
    return Backbone(LivrModel(model, adapter, processor, attn_backend), processor, adapter,
                    meta["latents"]["ids"], export_dir)


def load_base(family: str, path: str, *, device="cpu", dtype=torch.float32, attn_backend="sdpa") -> Backbone:
    """A base model without any LIVR checkpoint: zero-shot evaluation."""
    adapter = get_adapter(family)
    processor = adapter.load_processor(path)
    hf_model = adapter.load_model(path, dtype=dtype, attn_implementation=attn_backend).eval().to(device)
    return Backbone(LivrModel(hf_model, adapter, processor, attn_backend), processor, adapter, [], path)


def merge_export(path: str, out_dir: str, which: str = "final") -> str:
    """Fold LoRA and the latent rows into the base weights: a plain transformers checkpoint."""
    backbone = load_export(path, which=which)
    merged = backbone.model.peft_model.merge_and_unload()
    export_dir = backbone.path
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    for name in os.listdir(export_dir):
        if not name.startswith("adapter_") and name != "livr.json" and os.path.isfile(os.path.join(export_dir, name)):
            shutil.copy(os.path.join(export_dir, name), tmp)
    meta = read_livr_metadata(export_dir)
    _write_json_atomic(os.path.join(tmp, "livr.json"), {**meta, "merged": True, "merged_from": export_dir})
    _replace_dir(tmp, out_dir)
    log.info("merged %s into %s", export_dir, out_dir)
    return out_dir


def _export_cmd(args) -> int:
    if not args.merge:
        print("livr-ds export: nothing to do; pass --merge (exports are written by training)")
        return 2
    out = merge_export(args.ckpt, args.out, which=args.which)
    print(f"wrote merged model to {out}")
    return 0


def add_export_command(sub) -> None:
    p = sub.add_parser("export", help="merge a trained adapter into a plain transformers checkpoint")
    p.add_argument("--ckpt", required=True, help="an export dir or a stage run dir")
    p.add_argument("--which", default="final", choices=["final", "best"], help="for a run dir")
    p.add_argument("--merge", action="store_true", help="fold LoRA + latent rows into the weights")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_export_cmd)
