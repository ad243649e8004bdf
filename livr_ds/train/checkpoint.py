"""Checkpoints, three kinds, each written to a temporary directory and renamed into place.

- resume checkpoints  `<stage dir>/checkpoints/step-XXXXXXXX/` + `checkpoints/latest`:
  DeepSpeed engine state (module, ZeRO optimizer partitions, LR schedule), a world-size-free copy
  of the trainable tensors, per-rank RNG state as JSON, and the trainer state (data position,
  counters, best metric, wandb run id). `latest` is replaced only after the new directory is
  complete, so a crash mid-save leaves the previous checkpoint valid and pointed at.
- exports  `<stage dir>/export/{best,final}/`: PEFT adapter (LoRA + latent rows), tokenizer with
  the latent tokens, processor files, and livr.json; loadable with transformers + PEFT alone.
- merged exports (`livr-ds export --merge`): a plain transformers checkpoint.

Nothing here unpickles: our own files are JSON and safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from . import distributed as dist

log = logging.getLogger(__name__)

LATEST = "latest"
# Test hook: "<point>:<n>[:<SIGNAL>]" sends rank 0 the signal (default KILL) the n-th time it
# passes <point>. Lets tests kill or preempt a real run at an exact place.
FAULT_ENV = "LIVR_DS_FAULT"
_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get(FAULT_ENV, "").split(":")
    if spec[0] != name or not dist.is_main():
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == (int(spec[1]) if len(spec) > 1 else 1):
        sig = getattr(signal, "SIG" + (spec[2] if len(spec) > 2 else "KILL"))
        log.error("fault injected: %s at %s (%s)", sig.name, name, ":".join(spec))
        os.kill(os.getpid(), sig)


def _write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _replace_dir(tmp: str, final: str) -> None:
    """Swap a finished directory into place; the old one is removed only after the swap."""
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ---- RNG ------------------------------------------------------------------------------------

def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


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


# ---- resume checkpoints ---------------------------------------------------------------------

def latest_checkpoint(ckpt_root: str) -> str | None:
    pointer = os.path.join(ckpt_root, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        tag = json.load(f)["tag"]
    path = os.path.join(ckpt_root, tag)
    if not os.path.exists(os.path.join(path, "trainer_state.json")):
        raise RuntimeError(f"{pointer} names {tag}, which is incomplete; this should not happen")
    return path


def save_resume(engine, ckpt_root: str, tag: str, trainer_state: dict, keep_last: int) -> str:
    """Collective: every rank calls it."""
    tmp_root = os.path.join(ckpt_root, f".tmp-{tag}")
    if dist.is_main():
        shutil.rmtree(tmp_root, ignore_errors=True)
        os.makedirs(tmp_root)
    dist.barrier()
    engine.save_checkpoint(tmp_root, tag=tag, save_latest=False, exclude_frozen_parameters=True)
    staged = os.path.join(tmp_root, tag)
    with open(os.path.join(staged, f"rng_rank{dist.rank()}.json"), "w") as f:
        json.dump(rng_state(), f)
    fault_point("checkpoint_mid_save")
    dist.barrier()
    final = os.path.join(ckpt_root, tag)
    if dist.is_main():
        save_file(trainable_state(engine.module.peft_model), os.path.join(staged, "trainable.safetensors"))
        _write_json_atomic(os.path.join(staged, "trainer_state.json"), trainer_state)
        _replace_dir(staged, final)
        shutil.rmtree(tmp_root)  # DeepSpeed also drops helper scripts (zero_to_fp32.py) there
        _write_json_atomic(os.path.join(ckpt_root, LATEST), {"tag": tag})
        _prune(ckpt_root, keep_last)
        log.info("saved resume checkpoint %s", final)
    dist.barrier()
    return final


def _prune(ckpt_root: str, keep_last: int) -> None:
    tags = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step-"))
    for tag in tags[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(os.path.join(ckpt_root, tag), ignore_errors=True)


def load_resume(engine, path: str) -> dict:
    """Restore a resume checkpoint. Returns the trainer state; at a changed world size only
    the trainable weights come back (ZeRO partitions do not reshard) and it says so."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if state["world_size"] == dist.world_size():
        engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path), load_module_strict=False)
        with open(os.path.join(path, f"rng_rank{dist.rank()}.json")) as f:
            state["rng"] = json.load(f)  # the caller restores it once set-up is over
        state["optimizer_restored"] = True
    else:
        load_trainable_state(engine.module.peft_model, load_file(os.path.join(path, "trainable.safetensors")))
        log.warning(
            "resuming %s at world size %d (saved at %d): LoRA weights and latent rows restored; optimizer "
            "moments and RNG re-initialised (ZeRO optimizer state does not reshard)",
            path, dist.world_size(), state["world_size"],
        )
        state["optimizer_restored"] = False
    return state


# ---- exports --------------------------------------------------------------------------------

def base_fingerprint(hf_model, num_latent_rows: int) -> dict:
    """What identifies the backbone a checkpoint belongs to (vocabulary size before latents)."""
    text = hf_model.config.get_text_config()
    return {
        "model_type": hf_model.config.model_type,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "base_vocab_size": hf_model.get_input_embeddings().weight.shape[0] - num_latent_rows,
    }


def livr_metadata(cfg, backbone, stage: int) -> dict:
    tok = backbone.processor.tokenizer
    return {
        "format": "livr-ds/1",
        "family": cfg.model.family,
        "base_model": backbone.path,
        "backbone": base_fingerprint(backbone.model.hf_model, len(set(backbone.latent_ids))),
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
    _write_json_atomic(os.path.join(tmp, "livr.json"), {**livr_metadata(cfg, backbone, stage), **(extra or {})})
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    _replace_dir(tmp, out_dir)
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
