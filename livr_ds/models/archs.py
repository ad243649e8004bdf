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

# Text and vision fields of the released config.json files (Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct,
# Qwen/Qwen3-VL-{4B,8B,32B}-Instruct on huggingface.co), in transformers 5 naming (rope_parameters).
# Token ids are not listed: they come from the tokenizer in use. `params` is the released
# checkpoint's size: the `metadata.total_size` of its model.safetensors.index.json (bytes, all
# tensors bf16) / 2, except where a comment says otherwise. Fields that do not change the modules
# or shapes (max_position_embeddings, rope theta) are transcribed too but are not checked by the
# parameter count. tests/test_archs.py builds each entry on the meta device and compares.
_QWEN2_5_VL_VISION = dict(  # one ViT for the whole Qwen2.5-VL family; out_hidden_size = the LM's hidden
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
    temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
    hidden_act="silu",
)
_QWEN2_5_VL_ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
_QWEN3_VL_VISION = dict(  # the 8B and 32B (and larger) Qwen3-VL share this 27-block ViT
    depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, spatial_merge_size=2,
    temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
    hidden_act="gelu_pytorch_tanh",
)
_QWEN3_VL_ROPE = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True}

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
    # Qwen/Qwen2.5-VL-7B-Instruct. config.json: https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json
    # (read as rendered at .../blame/main/config.json; the same text and vision fields appear in Qwen's own
    # https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct-AWQ/blob/main/config.json). params: total_size
    # 16,584,333,312 B of https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/model.safetensors.index.json
    # (read as quoted by public code in the stored GitHub index, which checks a merged 7B checkpoint against it).
    "qwen2_5_vl_7b": {
        "family": "qwen2_5_vl",
        "params": 8_292_166_656,
        "text": dict(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
            rope_parameters=dict(_QWEN2_5_VL_ROPE), tie_word_embeddings=False, hidden_act="silu",
        ),
        "vision": dict(_QWEN2_5_VL_VISION, out_hidden_size=3584),
    },
    # Qwen/Qwen2.5-VL-32B-Instruct, https://huggingface.co/Qwen/Qwen2.5-VL-32B-Instruct/blob/main/config.json.
    # The text fields are the Qwen2.5-32B language model's (hidden 5120, intermediate 27648, 64 layers, 40
    # heads, 8 KV heads, vocab 152064, untied head), read from public transcriptions of that config (the
    # official page itself is not in the stored sources). Vision: the family's ViT with intermediate_size
    # 3456 (not the 3B/7B's 3420) and out_hidden_size 5120. params: total_size 66,905,436,672 B (/2 =
    # 33,452,718,336) as quoted by public code in the stored GitHub index for a full fine-tune of
    # Qwen2.5-VL-32B-Instruct (same tensors); the count built here equals it only with intermediate 3456
    # (3420 gives 33,448,292,352), which is what settles that field. max_position_embeddings, rope and
    # rms_norm_eps were not read for the 32B: taken as the 7B's and 72B's (they change no shapes).
    "qwen2_5_vl_32b": {
        "family": "qwen2_5_vl",
        "params": 33_452_718_336,
        "text": dict(
            vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
            num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=128000, rms_norm_eps=1e-6,
            rope_parameters=dict(_QWEN2_5_VL_ROPE), tie_word_embeddings=False, hidden_act="silu",
        ),
        "vision": dict(_QWEN2_5_VL_VISION, intermediate_size=3456, out_hidden_size=5120),
    },
    # Qwen/Qwen2.5-VL-72B-Instruct, https://huggingface.co/Qwen/Qwen2.5-VL-72B-Instruct/blob/main/config.json.
    # Read from Qwen's own AWQ export of it, https://huggingface.co/Qwen/Qwen2.5-VL-72B-Instruct-AWQ/blob/
    # 666b8f5f61eebf73e8deff3e33a0f8934038d69f/config.json ("_name_or_path": "Qwen/Qwen2.5-VL-72B-Instruct";
    # hidden 8192, 80 layers, 64 heads, 8 KV heads, max positions 128000, eps 1e-6, untied, vocab 152064;
    # vision intermediate_size 3456, out_hidden_size 8192, the vision tower left unquantized). One field
    # differs from the bf16 release: the AWQ export pads the LM's intermediate_size to 29696; the bf16
    # checkpoint's is 29568 (the Qwen2 / Qwen2.5 72B language model's, as in configs derived from
    # Qwen/Qwen2-VL-72B-Instruct, e.g. https://huggingface.co/neuralmagic/Qwen2-VL-72B-Instruct-quantized.w4a16/
    # blob/refs%2Fpr%2F1/config.json).
    # params, checked by parts (tests/test_archs.py): the language model builds exactly Qwen2.5-72B-Instruct's
    # released size, 72,706,203,648 (its index's total_size 145,412,407,296 B / 2, quoted in public code),
    # and the vision tower exactly the Qwen2.5-VL-32B's (verified through that model's total) plus the
    # merger's wider output (5,120 x 3,072 + 3,072). Not checked as a whole: the 72B's own total_size is
    # not in the stored sources (searched for both candidates, 146,821,554,688 and 146,812,702,720 B); only
    # rounded sizes were found ("73B" for its quantized derivatives on huggingface.co/models?other=
    # base_model:quantized:Qwen/Qwen2.5-VL-72B-Instruct), which both match. The count below is what this
    # transcription builds (tests/test_archs.py pins it); confirm it against
    # https://huggingface.co/Qwen/Qwen2.5-VL-72B-Instruct/blob/main/model.safetensors.index.json (expect
    # total_size 146,821,554,688) when that file can be read.
    "qwen2_5_vl_72b": {
        "family": "qwen2_5_vl",
        "params": 73_410_777_344,
        "params_verified": False,
        "text": dict(
            vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
            num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=128000, rms_norm_eps=1e-6,
            rope_parameters=dict(_QWEN2_5_VL_ROPE), tie_word_embeddings=False, hidden_act="silu",
        ),
        "vision": dict(_QWEN2_5_VL_VISION, intermediate_size=3456, out_hidden_size=8192),
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
    # Qwen/Qwen3-VL-8B-Instruct, https://huggingface.co/Qwen/Qwen3-VL-8B-Instruct/blob/main/config.json
    # (text: hidden 4096, intermediate 12288, 36 layers, 32 heads, 8 KV heads, head_dim 128, vocab 151936,
    # untied; vision: the 27-block ViT, out_hidden_size 4096), read from public transcriptions of it in the
    # stored sources. params: total_size 17,534,247,392 B of
    # https://huggingface.co/Qwen/Qwen3-VL-8B-Instruct/blob/main/model.safetensors.index.json, as quoted by
    # public documentation in the stored GitHub index ("the local 8B config is identical to the official
    # one; BF16 weight index total_size=17534247392").
    "qwen3_vl_8b": {
        "family": "qwen3_vl",
        "params": 8_767_123_696,
        "text": dict(
            vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
            rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", rope_parameters=dict(_QWEN3_VL_ROPE),
        ),
        "vision": dict(_QWEN3_VL_VISION, out_hidden_size=4096),
    },
    # Qwen/Qwen3-VL-32B-Instruct, https://huggingface.co/Qwen/Qwen3-VL-32B-Instruct/blob/main/config.json
    # (text: hidden 5120, intermediate 25600, 64 layers, 64 heads, 8 KV heads, head_dim 128 (not
    # hidden / heads = 80), vocab 151936, rope theta 5e6, untied; vision out_hidden_size 5120), read from a
    # public transcription of the shipped config.json in the stored GitHub index. params: total_size
    # 66,714,780,128 B of https://huggingface.co/Qwen/Qwen3-VL-32B-Instruct/blob/main/model.safetensors.index.json
    # ("at snapshot 939557dc"), quoted by public code in the stored GitHub index, which also gives the
    # element count 33,357,390,064.
    "qwen3_vl_32b": {
        "family": "qwen3_vl",
        "params": 33_357_390_064,
        "text": dict(
            vocab_size=151936, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
            num_attention_heads=64, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
            rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", rope_parameters=dict(_QWEN3_VL_ROPE),
        ),
        "vision": dict(_QWEN3_VL_VISION, out_hidden_size=5120),
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
    n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: shards hold a part
    log.info("built %s with random weights on %s: %.2fB parameters (%s)", path, device, n / 1e9, dtype)
    return processor, model
