"""Exports: written by training (`export/best`, `export/final`), checked and loaded by `--init-from`,
loaded for evaluation (no DeepSpeed), folded into a plain checkpoint by `livr-ds export --merge`.

An export holds a PEFT adapter (LoRA + the K latent rows), the tokenizer with the latent tokens,
the processor files and livr.json, which names the base checkpoint. Loading one needs only
transformers + PEFT: base model -> resize embeddings to the saved tokenizer -> PeftModel.
Resume checkpoints (what the optimizer needs to continue) are train/checkpoint.py's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from .atomic import replace_dir, write_json_atomic
from .modeling import Backbone, LivrModel, resize_embeddings
from .models import get_adapter

log = logging.getLogger(__name__)


# ---- trainable tensors ----------------------------------------------------------------------

def is_peft(model) -> bool:
    return isinstance(model, PeftModel)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The tensors that train: PEFT's adapter state, or every trainable weight of a full fine-tune."""
    if is_peft(model):
        state = get_peft_model_state_dict(model)
    else:
        state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def load_trainable_state(model, tensors: dict[str, torch.Tensor]) -> None:
    if is_peft(model):
        result = set_peft_model_state_dict(model, tensors)
        bad = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k or "trainable_tokens" in k]
    else:
        result = model.load_state_dict(tensors, strict=False)
        bad = list(result.unexpected_keys)
    if bad:
        raise ValueError(f"checkpoint tensors did not match the model: {bad[:3]}")


# ---- exports --------------------------------------------------------------------------------

def base_fingerprint(hf_model, num_latent_rows: int, num_tokens: int | None = None) -> dict:
    """What identifies the backbone a checkpoint belongs to (vocabulary size before latents).

    The tokenizer's length, not the table's rows: released Qwen tables have spare rows beyond
    the tokenizer (151,936 rows for ~151,665 tokens), and the latents take spare rows first."""
    text = hf_model.config.get_text_config()
    rows = hf_model.get_input_embeddings().weight.shape[0]
    return {
        "model_type": hf_model.config.model_type,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "base_vocab_size": (num_tokens if num_tokens is not None else rows) - num_latent_rows,
    }


def livr_metadata(cfg, backbone, stage: int) -> dict:
    tok = backbone.processor.tokenizer
    return {
        "format": "livr-ds/1",
        "family": cfg.model.family,
        "base_model": backbone.path,
        "backbone": base_fingerprint(backbone.model.hf_model, len(set(backbone.latent_ids)), len(tok)),
        "latents": {"num": cfg.latents.num, "shared": cfg.latents.shared,
                    "tokens": tok.convert_ids_to_tokens(backbone.latent_ids), "ids": backbone.latent_ids},
        "stage": stage,
        "policy": cfg.policy(stage),
        "max_tokens": cfg.data.max_tokens,
        "min_pixels": cfg.model.min_pixels,
        "max_pixels": cfg.model.max_pixels,
    }


def save_export(backbone, cfg, stage: int, out_dir: str, extra: dict | None = None) -> str:
    """Rank 0 only. PEFT adapter + tokenizer + processor files + livr.json, swapped in atomically."""
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    trained = backbone.model.peft_model
    trained.save_pretrained(tmp)  # PEFT: the adapter; full fine-tuning: the whole model
    if not is_peft(trained):
        extra = {**(extra or {}), "merged": True}
    processor = backbone.processor
    processor.tokenizer.save_pretrained(tmp)
    processor.image_processor.save_pretrained(tmp)
    if processor.chat_template:
        with open(os.path.join(tmp, "chat_template.jinja"), "w") as f:
            f.write(processor.chat_template)
    src_proc = os.path.join(backbone.path, "processor_config.json")
    if os.path.exists(src_proc):
        shutil.copy(src_proc, tmp)
    write_json_atomic(os.path.join(tmp, "livr.json"), {**livr_metadata(cfg, backbone, stage), **(extra or {})})
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    replace_dir(tmp, out_dir)
    log.info("exported %s", out_dir)
    return out_dir


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


def check_compatible(meta: dict, cfg, backbone) -> None:
    """Refuse to continue from a checkpoint of another backbone or latent set, naming why."""
    mine = livr_metadata(cfg, backbone, cfg.stage)
    problems = []
    if meta["family"] != mine["family"]:
        problems.append(f"model.family {meta['family']!r} vs {mine['family']!r}")
    if meta["backbone"] != mine["backbone"]:
        problems.append(f"backbone {meta['backbone']} vs {mine['backbone']}")
    if meta["latents"]["num"] != mine["latents"]["num"]:
        problems.append(f"latents.num (K) {meta['latents']['num']} vs {mine['latents']['num']}")
    if meta["latents"]["shared"] != mine["latents"]["shared"]:
        problems.append(f"latents.shared {meta['latents']['shared']} vs {mine['latents']['shared']}")
    elif meta["latents"]["tokens"] != mine["latents"]["tokens"]:
        problems.append(f"latent tokens {meta['latents']['tokens']} vs {mine['latents']['tokens']}")
    if problems:
        raise ValueError("--init-from checkpoint does not match this experiment: " + "; ".join(problems))


def init_from_export(backbone, cfg, path: str) -> str:
    """Load Stage 1's LoRA + latent rows into a fresh backbone (fresh optimizer and schedule)."""
    export_dir = resolve_export(path)
    meta = read_livr_metadata(export_dir)
    check_compatible(meta, cfg, backbone)
    model = backbone.model.peft_model
    if is_peft(model) != (not meta.get("merged")):
        raise ValueError("--init-from: the checkpoint's model.trainable (LoRA adapter vs full weights) "
                         "differs from this experiment's")
    if is_peft(model):
        # save_pretrained drops the adapter name from keys; set_peft_model_state_dict adds it back.
        tensors = load_file(os.path.join(export_dir, "adapter_model.safetensors"))
    else:
        # A full export is a transformers checkpoint, saved under transformers' own key names:
        # load it the way transformers does and take its state dict.
        tensors = backbone.adapter.load_model(export_dir, dtype=model.dtype).state_dict()
    load_trainable_state(model, tensors)
    log.info("initialised from %s (stage %s, %s)", export_dir, meta["stage"], meta["policy"])
    return export_dir


# ---- loading ---------------------------------------------------------------------------------

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
    write_json_atomic(os.path.join(tmp, "livr.json"), {**meta, "merged": True, "merged_from": export_dir})
    replace_dir(tmp, out_dir)
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
