"""Exports: what a run produces for use. Written by training (`export/best`, `export/final`),
checked and loaded by `--init-from`, loaded for evaluation (no DeepSpeed), folded into a plain
checkpoint by `livr-ds export --merge`, served by stock tools.

An export directory holds

    adapter_config.json, adapter_model.safetensors   LoRA + the K latent rows, in PEFT's format
                                                     (a merged export: the whole model's shards)
    tokenizer files                                  with the latent tokens (special tokens)
    preprocessor_config.json, processor_config.json  the base's image processor settings
    chat_template.jinja                              the base's template, adding the latents
                                                     after every generation prompt (serving.py)
    generation_config.json                           `livr-ds eval`'s greedy decoding
    livr.json                                        the record: base, latents, LoRA, recipe,
                                                     data counts, validations (metadata.py, card.py)
    README.md                                        the model card, rendered from livr.json

Loading one needs only transformers + PEFT: base model -> resize embeddings to the saved
tokenizer -> PeftModel. Resume checkpoints (what the optimizer needs to continue) are
train/checkpoint.py's.

    tensors.py   the trainable tensors in PEFT's format     handoff.py  Stage 1 -> Stage 2
    metadata.py  livr.json                                  serving.py  template, generation config
    card.py      the model card                             save.py     writing an export
    load.py      loading for evaluation                     merge.py    --merge
    cli.py       `livr-ds export`
"""

from .card import render_card, training_record
from .handoff import HANDOFF_KEYS, check_compatible, init_from_export
from .load import load_base, load_export
from .merge import MERGE_DTYPES, merge_dtype, merge_export
from .metadata import (INFORMATIONAL_KEYS, base_fingerprint, livr_metadata, read_livr_metadata, resolve_export,
                       weights_fingerprint)
from .save import save_export
from .serving import LATENT_SWITCH, generation_config, template_with_latents, template_without_latents
from .tensors import is_peft, load_trainable_state, trainable_state, write_adapter

__all__ = [
    "HANDOFF_KEYS", "INFORMATIONAL_KEYS", "LATENT_SWITCH", "MERGE_DTYPES", "base_fingerprint", "check_compatible",
    "generation_config", "init_from_export", "is_peft", "livr_metadata", "load_base", "load_export",
    "load_trainable_state", "merge_dtype", "merge_export", "read_livr_metadata", "render_card", "resolve_export",
    "save_export", "template_with_latents", "template_without_latents", "trainable_state", "training_record",
    "weights_fingerprint", "write_adapter",
]
