"""Qwen2.5-VL and Qwen3-VL: dynamic-resolution ViT + merger, M-RoPE language model."""

from __future__ import annotations

from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .base import BackboneAdapter, image_only_processor, read_chat_template
from .tokenizer import build_tiny_tokenizer

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]

# Small images keep tiny-model tests fast: 112 x 112 -> 8 x 8 patches of 14 -> 16 merged tokens.
TINY_PIXELS = {"min_pixels": 28 * 28 * 4, "max_pixels": 112 * 112}


class QwenVLAdapter(BackboneAdapter):
    image_token = "<|image_pad|>"
    vision_keys = ("pixel_values", "image_grid_thw")
    patch_size = 14

    def load_processor(self, path, *, trust_remote_code=False, image_kwargs=None):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        image_processor = AutoImageProcessor.from_pretrained(path, **(image_kwargs or {}))
        return self.processor_class(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
            chat_template=read_chat_template(path, tokenizer),
        )

    def position_ids(self, model, input_ids, mm_token_type_ids, vision):
        core = model.model if hasattr(model, "model") else model
        pos, _ = core.get_rope_index(
            input_ids.unsqueeze(0), mm_token_type_ids.unsqueeze(0),
            image_grid_thw=vision.get("image_grid_thw"),
        )
        return pos[:, 0]

    def vision_modules(self, model):
        return [model.model.visual]

    def build_tiny_processor(self, system_prompt=None, **image_kwargs):
        tok = build_tiny_tokenizer(
            QWEN_SPECIAL_TOKENS, self.image_token,
            image_placeholder="<|vision_start|><|image_pad|><|vision_end|>", system_prompt=system_prompt,
        )
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=self.patch_size, merge_size=2, temporal_patch_size=2, **{**TINY_PIXELS, **image_kwargs}
        )
        return self.processor_class(image_processor=image_processor, tokenizer=tok, video_processor=None,
                                    chat_template=tok.chat_template)

    def special_token_ids(self, special):
        return dict(
            image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
            vision_start_token_id=special["<|vision_start|>"], vision_end_token_id=special["<|vision_end|>"],
        )


class Qwen2_5_VLAdapter(QwenVLAdapter):
    family = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = image_only_processor(Qwen2_5_VLProcessor)
    default_system_prompt = "You are a helpful assistant."  # the released chat template's

    def tiny_config(self, vocab_size, special, tied=False):
        # transformers 5 ties on the top-level flag; the released config.json also sets it in
        # text_config (which Qwen2_5_VLConfig forwards to the top level): both, as released.
        return Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
                pad_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"], bos_token_id=None,
                tie_word_embeddings=tied,
            ),
            vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                patch_size=self.patch_size, spatial_merge_size=2, temporal_patch_size=2,
                window_size=56, fullatt_block_indexes=[1], tokens_per_second=2,
            ),
            tie_word_embeddings=tied,
            **self.special_token_ids(special),
        )


class Qwen3_VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    model_class = Qwen3VLForConditionalGeneration
    processor_class = image_only_processor(Qwen3VLProcessor)
    patch_size = 16
    # Qwen3-VL's released template has no default system prompt.

    def tiny_config(self, vocab_size, special, tied=False):
        # Qwen3VLConfig reads only the top-level flag; the released config.json has it in both.
        return Qwen3VLConfig(
            text_config=dict(
                vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True},
                pad_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"], bos_token_id=None,
                tie_word_embeddings=tied,
            ),
            vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                patch_size=self.patch_size, spatial_merge_size=2, temporal_patch_size=2,
                num_position_embeddings=64, deepstack_visual_indexes=[1],
            ),
            tie_word_embeddings=tied,
            **self.special_token_ids(special),
        )
