"""LLaVA-OneVision: SigLIP tower + MLP projector + Qwen2 LM, AnyRes tiles, 1-D positions.

LLaVA-OneVision-1.5 checkpoints ship their own modelling code (not in transformers 5.24). They
load through the same path with `model.trust_remote_code: true`; that route is untested here
because no such checkpoint can be downloaded on the build machines.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from .base import BackboneAdapter, EncodedPrompt, image_only_processor, read_chat_template, read_processor_kwargs
from .tokenizer import build_tiny_tokenizer

LLAVA_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
TINY_TILE = 56


class LlavaOnevisionAdapter(BackboneAdapter):
    family = "llava_onevision"
    model_class = LlavaOnevisionForConditionalGeneration
    processor_class = image_only_processor(LlavaOnevisionProcessor)
    image_token = "<image>"
    # batch_num_images: how many images each prompt has. LLaVA-OneVision tiles (AnyRes) only the
    # image of a single-image prompt; each image of a multi-image prompt is one base tile
    # (num_image_tokens + 1 newline token). The processor decides from the images' nesting, the
    # model from this tensor, so both must see it, as transformers' chat template path does.
    vision_keys = ("pixel_values", "image_sizes", "batch_num_images")
    processor_settings = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")
    tiny_processor_kwargs = {"num_image_tokens": (TINY_TILE // 14) ** 2, "vision_feature_select_strategy": "full",
                             "vision_aspect_ratio": "anyres_max_4"}

    def load_processor(self, path, *, trust_remote_code=False, image_kwargs=None):
        if trust_remote_code:
            return AutoProcessor.from_pretrained(path, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path, **(image_kwargs or {}))
        return self.processor_class(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
            chat_template=read_chat_template(path, tokenizer),
            **read_processor_kwargs(path, self.processor_settings),
        )

    def load_model(self, path, *, dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=False):
        if trust_remote_code:  # LLaVA-OneVision-1.5: remote code, untested here
            self.model_class = AutoModelForImageTextToText
        return super().load_model(path, dtype=dtype, attn_implementation=attn_implementation,
                                  trust_remote_code=trust_remote_code)

    def encode_prompt(self, processor, question, images):
        text = self.prompt_text(processor, question, len(images))
        out = processor(text=[text], images=[list(images)] if images else None, return_tensors="pt")
        vision = {k: out[k] for k in self.vision_keys if k in out}
        return EncodedPrompt(out["input_ids"][0].tolist(), vision, len(images))

    def collate_vision(self, per_sample):
        # AnyRes gives each image a different number of tiles: pad the tile axis (the model
        # unpads by image_sizes).
        pixels = [v["pixel_values"] for v in per_sample if "pixel_values" in v]
        if not pixels:
            return {}
        tiles = max(p.shape[1] for p in pixels)
        padded = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1])) for p in pixels]
        sizes = torch.cat([v["image_sizes"] for v in per_sample if "image_sizes" in v], dim=0)
        counts = torch.cat([v.get("batch_num_images", torch.ones(len(v["image_sizes"]), dtype=torch.long))
                            for v in per_sample if "image_sizes" in v])
        return {"pixel_values": torch.cat(padded, dim=0), "image_sizes": sizes, "batch_num_images": counts}

    def vision_modules(self, model):
        return [model.model.vision_tower, model.model.multi_modal_projector]

    def build_tiny_processor(self, system_prompt=None):
        tok = build_tiny_tokenizer(LLAVA_SPECIAL_TOKENS, self.image_token, system_prompt=system_prompt)
        t = TINY_TILE
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": t, "width": t}, crop_size={"height": t, "width": t},
            image_grid_pinpoints=[[t, t], [t, 2 * t], [2 * t, t], [2 * t, 2 * t]],
        )
        return self.processor_class(
            image_processor=image_processor, tokenizer=tok, video_processor=None,
            chat_template=tok.chat_template, **self.tiny_processor_kwargs,
        )

    def tiny_config(self, vocab_size, special, tied=False):
        t = TINY_TILE
        return LlavaOnevisionConfig(
            text_config=dict(
                model_type="qwen2", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, pad_token_id=special["<|endoftext|>"],
                eos_token_id=special["<|im_end|>"], bos_token_id=None, tie_word_embeddings=tied,
            ),
            vision_config=dict(
                model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=t, patch_size=14,
            ),
            image_token_index=special["<image>"], video_token_index=special["<video>"],
            vision_feature_select_strategy="full", vision_feature_layer=-1,
            image_grid_pinpoints=[[t, t], [t, 2 * t], [2 * t, t], [2 * t, 2 * t]],
            vision_aspect_ratio="anyres_max_4", tie_word_embeddings=tied,
        )
