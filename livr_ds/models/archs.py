"""Published architectures with random weights: `model.path: arch:<name>`.

For benchmarks and memory planning where the checkpoints cannot be downloaded: the modules,
shapes and FLOPs of the released model (its config.json, transcribed below), random weights
built directly on the target device, the family's offline tiny tokenizer (ids < 512, so most of
the published 151,936-row embedding is simply never looked up) and an image processor at the
real patch size. Nothing here is meant to produce sensible text.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

ARCH_PREFIX = "arch:"

# Text and vision fields of the released config.json files (Qwen/Qwen2.5-VL-3B-Instruct,
# Qwen/Qwen3-VL-4B-Instruct), in transformers 5 naming (rope_parameters). Token ids are not
# listed: they come from the tokenizer in use. `params` is the released checkpoint's size.
PUBLISHED = {
    "qwen2_5_vl_3b": {
        "family": "qwen2_5_vl",
        "params": 3_754_622_976,
        "text": dict(
            vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            tie_word_embeddings=True, hidden_act="silu",
        ),
        "vision": dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu",
        ),
    },
    "qwen3_vl_4b": {
        "family": "qwen3_vl",
        "params": 4_437_815_808,
        "text": dict(
            vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
            rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                             "mrope_interleaved": True},
        ),
        "vision": dict(
            depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
            patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
            deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh",
        ),
    },
}


def arch_spec(path: str) -> tuple[dict, int | None]:
    """`arch:<name>` or `arch:<name>:<n>`: the published spec, and n LM layers instead of all
    (a smoke run of the same code on a small machine)."""
    name, _, layers = path[len(ARCH_PREFIX):].partition(":")
    if name not in PUBLISHED:
        raise ValueError(f"unknown architecture {name!r} in model.path {path!r}; known: {sorted(PUBLISHED)}")
    if layers and not (layers.isdigit() and int(layers) > 0):
        raise ValueError(f"model.path {path!r}: the layer count after the name must be a positive integer")
    return PUBLISHED[name], int(layers) if layers else None


def arch_config(path: str, adapter, processor):
    """The published config with this tokenizer's special-token ids."""
    spec, num_hidden_layers = arch_spec(path)
    if spec["family"] != adapter.family:
        raise ValueError(f"model.path {path!r} is a {spec['family']} architecture but model.family is {adapter.family!r}")
    tok = processor.tokenizer
    special = {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
    text = dict(spec["text"], pad_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"],
                bos_token_id=None)
    if num_hidden_layers:
        text["num_hidden_layers"] = num_hidden_layers
    config_class = adapter.model_class.config_class
    return config_class(text_config=text, vision_config=dict(spec["vision"]),
                        tie_word_embeddings=spec["text"]["tie_word_embeddings"], **adapter.special_token_ids(special))


def build_random(path: str, adapter, *, dtype: torch.dtype, attn_implementation: str,
                 device: torch.device | str = "cpu", image_kwargs=None):
    """(processor, model): the published architecture, random weights, built on `device`."""
    processor = adapter.build_tiny_processor(**(image_kwargs or {}))
    config = arch_config(path, adapter, processor)
    with torch.device(device):
        model = adapter.model_class._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    n = sum(p.numel() for p in model.parameters())
    log.info("built %s with random weights on %s: %.2fB parameters (%s)", path, device, n / 1e9, dtype)
    return processor, model
