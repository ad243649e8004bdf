"""The tensors that train, as an export stores them: PEFT's adapter format whatever the ZeRO stage.

LoRA matrices under PEFT's saved names, the K latent rows as PEFT's trainable-token tensor (with
`trainable_token_indices` in adapter_config.json), so `PeftModel.from_pretrained` applies them to
the embedding (and a tied head) as training did. A full fine-tune stores every trainable weight.
"""

from __future__ import annotations

import copy
import os

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

from ..config import ConfigError
from ..latents import peft_rows_key, split_adapter_tensors
from ..modeling import LivrModel
from .. import distributed as dist


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
    """PEFT's saved-adapter files (adapter_config.json, adapter_model.safetensors)."""
    config = copy.deepcopy(model.peft_model.peft_config["default"])
    if model.latent_rows is not None:
        config.trainable_token_indices = {embeddings_name: sorted(set(latent_ids))}
    config.inference_mode = True
    config.save_pretrained(out_dir)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
