"""Exports: written by training (`export/best`, `export/final`), checked and loaded by `--init-from`,
loaded for evaluation (no DeepSpeed), folded into a plain checkpoint by `livr-ds export --merge`.

An export holds a PEFT adapter (LoRA + the K latent rows, in PEFT's own format whatever the ZeRO
stage of the run), the tokenizer with the latent tokens,
the processor files and livr.json, which names the base checkpoint. Loading one needs only
transformers + PEFT: base model -> resize embeddings to the saved tokenizer -> PeftModel.
Resume checkpoints (what the optimizer needs to continue) are train/checkpoint.py's.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .atomic import replace_dir, write_json_atomic
from .config import ConfigError
from .latents import full_shape, peft_rows_key, resize_embeddings, split_adapter_tensors
from .modeling import Backbone, LivrModel
from .train import distributed as dist
from .models import get_adapter

log = logging.getLogger(__name__)


# ---- trainable tensors ----------------------------------------------------------------------

def is_peft(model) -> bool:
    return isinstance(model, PeftModel)


def trainable_state(model: LivrModel) -> dict[str, torch.Tensor]:
    """The tensors that train, as an export stores them: with LoRA, PEFT's adapter tensors (LoRA,
    and the latent rows under PEFT's trainable-token name); a full fine-tune, every trainable
    weight. On CPU, the same on every rank. Collective under ZeRO-3 (gathers the shards)."""
    peft_model = model.peft_model
    trainable = [p for p in model.parameters() if p.requires_grad]
    with dist.gathered(trainable):
        named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        if is_peft(peft_model):
            state = get_peft_model_state_dict(peft_model, state_dict=named, save_embedding_layers=False)
            if model.latent_rows is not None:
                state[peft_rows_key(peft_model)] = model.latent_rows.weight
        else:
            state = named
        return {k: v.detach().cpu().clone() for k, v in state.items()}


def load_trainable_state(model: LivrModel, tensors: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Put an export's trainable tensors (trainable_state's names) into a model not yet handed to
    DeepSpeed."""
    peft_model = model.peft_model
    if not is_peft(peft_model):
        result = peft_model.load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise ConfigError(f"{where}: tensors did not match the model: {result.unexpected_keys[:3]}")
        return
    lora, rows = split_adapter_tensors(tensors)
    if (rows is None) != (model.latent_rows is None):
        raise ConfigError(f"{where}: {'no' if rows is None else 'has'} latent rows, the model "
                         f"{'has' if rows is None else 'none'}")
    if rows is not None:
        if tuple(rows.shape) != tuple(model.latent_rows.weight.shape):
            raise ConfigError(f"{where}: latent rows of shape {tuple(rows.shape)}, the model's are "
                             f"{tuple(model.latent_rows.weight.shape)}")
        with torch.no_grad():
            model.latent_rows.weight.copy_(rows)
    result = set_peft_model_state_dict(peft_model, lora)
    bad = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if bad:
        raise ConfigError(f"{where}: tensors did not match the model: {bad[:3]}")
    # A LoRA matrix the checkpoint does not hold would silently start from its fresh init.
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ConfigError(f"{where}: holds no tensor for {len(missing)} LoRA matrices of this model (e.g. "
                          f"{missing[0]}): other lora.target_regex? They would start from zero")


def write_adapter(model: LivrModel, tensors: dict[str, torch.Tensor], out_dir: str, latent_ids: list[int],
                  embeddings_name: str) -> None:
    """PEFT's saved-adapter files (adapter_config.json, adapter_model.safetensors): LoRA, and the
    latent rows as trainable tokens, so that PeftModel.from_pretrained applies them to the
    embedding (and a tied head) as training did."""
    config = copy.deepcopy(model.peft_model.peft_config["default"])
    if model.latent_rows is not None:
        config.trainable_token_indices = {embeddings_name: sorted(set(latent_ids))}
    config.inference_mode = True
    config.save_pretrained(out_dir)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})


# ---- exports --------------------------------------------------------------------------------

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
    import hashlib

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
        "format": "livr-ds/1",
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


def save_export(backbone, cfg, stage: int, out_dir: str, extra: dict | None = None) -> str | None:
    """Collective (every rank calls it: ZeRO-3 gathers the trainable shards); rank 0 writes the
    PEFT adapter + tokenizer + processor files + livr.json and swaps them in atomically."""
    model = backbone.model
    if not is_peft(model.peft_model):
        # A full fine-tune is a whole transformers checkpoint (ZeRO-3 is refused for it at start-up).
        extra = {**(extra or {}), "merged": True}
        tensors = None
    else:
        tensors = trainable_state(model)
    if not dist.is_main():
        return None
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if tensors is None:
        model.peft_model.save_pretrained(tmp)
    else:
        write_adapter(model, tensors, tmp, backbone.latent_ids, backbone.adapter.input_embeddings_name())
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


def _lookup(meta: dict, path: tuple):
    for key in path:
        if not isinstance(meta, dict) or key not in meta:
            return _MISSING
        meta = meta[key]
    return meta


_MISSING = object()


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


MERGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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
        if not name.startswith("adapter_") and name != "livr.json" and os.path.isfile(os.path.join(export_dir, name)):
            shutil.copy(os.path.join(export_dir, name), tmp)
    write_json_atomic(os.path.join(tmp, "livr.json"), {**meta, "merged": True, "merged_from": export_dir,
                                                        "merged_dtype": str(torch_dtype).removeprefix("torch.")})
    replace_dir(tmp, out_dir)
    log.info("merged %s into %s (%s, shards of at most %s)", export_dir, out_dir, torch_dtype, max_shard_size)
    return out_dir


def _export_cmd(args) -> int:
    if not args.merge:
        print("livr-ds export: nothing to do; pass --merge (exports are written by training)")
        return 2
    try:
        out = merge_export(args.ckpt, args.out, which=args.which, dtype=args.dtype, max_shard_size=args.max_shard_size)
    except ConfigError as e:
        print(f"livr-ds export: {e}")
        return 2
    print(f"wrote merged model to {out}")
    return 0


def add_export_command(sub) -> None:
    p = sub.add_parser("export", help="merge a trained adapter into a plain transformers checkpoint")
    p.add_argument("--ckpt", required=True, help="an export dir or a stage run dir")
    p.add_argument("--which", default="final", choices=["final", "best"], help="for a run dir")
    p.add_argument("--merge", action="store_true", help="fold LoRA + latent rows into the weights")
    p.add_argument("--dtype", default="auto", choices=["auto", *MERGE_DTYPES],
                   help="dtype of the merged weights (auto: the run's model.dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (an index lists them)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_export_cmd)
