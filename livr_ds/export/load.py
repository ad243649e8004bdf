"""Loading a trained model for evaluation (no DeepSpeed): an adapter export onto its base, a
merged export as it is, or a base model alone (zero-shot)."""

from __future__ import annotations

import torch
from peft import PeftModel

from ..latents import resize_embeddings
from ..modeling import Backbone, LivrModel
from ..models import get_adapter
from .metadata import read_livr_metadata, resolve_export


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
