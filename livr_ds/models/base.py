"""The backbone adapter interface: everything family-specific lives behind it.

The rest of livr-ds never names a model family. An adapter knows how to load the model and an
image-only processor from a local directory, which token ids are image tokens, how the family
computes position ids, which modules LoRA may touch, which modules are the frozen vision side,
and how to write a tiny random checkpoint for tests and the demo.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..inference import LATENT_SWITCH

log = logging.getLogger(__name__)

# LoRA goes on the language model's attention and MLP projections, never on the vision tower
# (a plain list of names, q_proj ... down_proj, also matches Qwen2.5-VL's vision MLPs in PEFT).
LM_LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@dataclass
class EncodedPrompt:
    """One sample's prompt after the real processor expanded its image placeholders."""

    input_ids: list[int]
    vision: dict[str, torch.Tensor]  # per-sample vision tensors (pixel_values, grid / sizes)
    num_images: int


class BackboneAdapter:
    family: str = ""
    model_class: type = None
    processor_class: type = None
    image_token: str = ""

    # ---- loading -------------------------------------------------------------------------
    def load_processor(self, path: str, *, trust_remote_code: bool = False, image_kwargs=None):
        raise NotImplementedError

    def load_model(self, path: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                   trust_remote_code: bool = False) -> torch.nn.Module:
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"model.path {path!r} is not a local directory: livr-ds loads checkpoints offline "
                "(download them first, e.g. with `huggingface-cli download`, on a machine with network)"
            )
        model = self.model_class.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
        log.info("loaded %s from %s (%s, %s)", type(model).__name__, path, dtype, attn_implementation)
        return model

    # ---- tokens and positions ------------------------------------------------------------
    def image_token_id(self, processor) -> int:
        return processor.tokenizer.convert_tokens_to_ids(self.image_token)

    def prompt_text(self, processor, question: str, num_images: int) -> str:
        """The chat-templated user turn with one image placeholder per image, ending with the
        assistant header: the latents follow it (the collator appends their ids), then the answer.
        `add_latents=False`: an export's template would add the latents itself (export/serving.py)."""
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
        # Only a template that knows the switch gets it: transformers hands any other keyword to the
        # processor and logs a warning per call (one per sample in an evaluation).
        template = processor.chat_template
        switch = {LATENT_SWITCH: False} if LATENT_SWITCH in (template if isinstance(template, str)
                                                             else repr(template)) else {}
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False, **switch
        )

    def encode_prompt(self, processor, question: str, images: list[Image.Image]) -> EncodedPrompt:
        text = self.prompt_text(processor, question, len(images))
        out = processor(text=[text], images=images or None, return_tensors="pt")
        vision = {k: out[k] for k in self.vision_keys if k in out}
        return EncodedPrompt(out["input_ids"][0].tolist(), vision, len(images))

    vision_keys: tuple[str, ...] = ()

    def collate_vision(self, per_sample: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Concatenate per-sample vision tensors in sample order."""
        out = {}
        for key in self.vision_keys:
            parts = [v[key] for v in per_sample if key in v]
            if parts:
                out[key] = torch.cat(parts, dim=0)
        return out

    def mm_token_type_ids(self, input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
        return (input_ids == image_token_id).to(torch.int32)

    def position_ids(self, model, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                     vision: dict[str, torch.Tensor]) -> torch.Tensor:
        """Position ids for ONE unpadded document, shape (P, L) where P is the number of rope
        axes (3 for M-RoPE, 1 otherwise). Callers concatenate documents and pad."""
        return torch.arange(input_ids.shape[-1]).unsqueeze(0)

    # ---- modules -------------------------------------------------------------------------
    lora_target_regex: str = LM_LORA_TARGETS

    def vision_modules(self, model) -> list[torch.nn.Module]:
        """The vision tower and projector: frozen and run without building a graph."""
        raise NotImplementedError

    def blank_vision_inputs(self, processor) -> dict[str, torch.Tensor]:
        """The vision inputs of one small blank image, as the model's get_image_features takes them
        (run on a batch without images so that every ZeRO-3 rank enters the vision tower)."""
        out = processor.image_processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt")
        return {k: out[k] for k in self.vision_keys if k in out}

    def text_config(self, model):
        return model.config.get_text_config()

    def input_embeddings_name(self) -> str:
        return "embed_tokens"

    # ---- tiny models ---------------------------------------------------------------------
    def tiny_config(self, vocab_size: int, special_ids: dict[str, int], tied: bool = False):
        raise NotImplementedError

    def build_tiny_processor(self, system_prompt: str | None = None):
        raise NotImplementedError

    tiny_processor_kwargs: dict[str, Any] = {}
    # The released chat template's default system prompt (emitted when a conversation has none).
    default_system_prompt: str | None = None

    def write_tiny(self, out_dir: str, seed: int = 0, *, tied: bool = False, spare_rows: int = 0,
                   system_prompt: bool = False) -> str:
        """Write a tiny random checkpoint (config, weights, tokenizer, image processor) that
        loads through the same local-path code as a real one.

        The released small checkpoints' quirks, each opt-in: `tied` shares the output head with
        the embedding table (`tie_word_embeddings`, as Qwen2.5-VL-3B / Qwen3-VL-4B); `spare_rows`
        gives the table that many rows beyond the tokenizer's length (151,936 rows for ~151,665
        tokens in the released Qwen checkpoints); `system_prompt` puts the family's default
        system prompt (if its released template has one) in the chat template."""
        processor = self.build_tiny_processor(
            **({"system_prompt": self.default_system_prompt} if system_prompt and self.default_system_prompt else {}))
        tok = processor.tokenizer
        special = {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
        config = self.tiny_config(len(tok) + spare_rows, special, tied=tied)
        torch.manual_seed(seed)
        model = self.model_class(config)
        if tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise RuntimeError(f"{type(model).__name__}: tie_word_embeddings did not tie the head")
        with torch.no_grad():
            # A trained output head maps hidden states to confident logits; a random one at the
            # default 0.02 caps them near +-1.3 (hidden 64), so a LoRA-only demo could never fit
            # an answer. Give the frozen head the scale of a trained one (tied: the shared table).
            model.get_output_embeddings().weight.normal_(0.0, 0.15)
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        # The processor itself is rebuilt by load_processor; its parts are what a checkpoint ships.
        tok.save_pretrained(out_dir)
        processor.image_processor.save_pretrained(out_dir)
        with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
            f.write(processor.chat_template)
        with open(os.path.join(out_dir, "processor_config.json"), "w") as f:
            json.dump({"processor_class": type(processor).__name__, **self.tiny_processor_kwargs}, f, indent=1)
        with open(os.path.join(out_dir, "livr_tiny.json"), "w") as f:
            json.dump({"family": self.family, "seed": seed, "tied": tied, "spare_rows": spare_rows,
                       "system_prompt": bool(system_prompt and self.default_system_prompt)}, f)
        return out_dir


def image_only_processor(processor_class):
    """A processor subclass that accepts video_processor=None.

    The Qwen-VL processors insist on a video processor, and the video processors need
    torchvision; PyPI's torchvision is a CUDA build that breaks every transformers image processor
    import on a CPU-only install. livr-ds never feeds videos.
    """

    class ImageOnlyProcessor(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnlyProcessor.__name__ = processor_class.__name__
    ImageOnlyProcessor.__qualname__ = processor_class.__qualname__
    return ImageOnlyProcessor


def read_processor_kwargs(path: str, accepted: tuple[str, ...]) -> dict[str, Any]:
    """Processor settings a checkpoint's processor_config.json carries (e.g. LLaVA's token count)."""
    cfg = os.path.join(path, "processor_config.json")
    if not os.path.exists(cfg):
        return {}
    with open(cfg) as f:
        data = json.load(f)
    return {k: v for k, v in data.items() if k in accepted}


def read_chat_template(path: str, tokenizer) -> str | None:
    """Chat templates live in chat_template.jinja / chat_template.json or on the tokenizer."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja) as f:
            return f.read()
    js = os.path.join(path, "chat_template.json")
    if os.path.exists(js):
        with open(js) as f:
            return json.load(f)["chat_template"]
    return getattr(tokenizer, "chat_template", None)
