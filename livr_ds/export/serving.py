"""What an export carries so that stock tools run it as trained: the chat template adds the K latent
tokens after the generation prompt, generation_config.json decodes as `livr-ds eval` does.

A LIVR model only behaves as trained when its prompt ends with the K latents right after the
assistant header (without them it runs in the paper's "latents dropped" condition). livr-ds's
own collator appends their ids; every other tool (transformers' `apply_chat_template` and
`image-text-to-text` pipeline, vLLM, SGLang, lmms-eval, VLMEvalKit) builds the prompt from the
checkpoint's chat template, so the template of every export says it too.

The rule, rendered by the template:
    add_generation_prompt=True                  -> <the base template's prompt><latent_0>...<latent_K-1>
    add_generation_prompt=True, add_latents=False -> the base template's prompt (no latents)
    add_generation_prompt=False                 -> the base template's output, unchanged (finished
                                                   conversations, training-style use: no latents)
The generation prompt is the last thing any chat template emits, so the latents are appended after
the whole template's output. livr-ds renders its own prompts with add_latents=False and appends the
ids itself, whichever template a checkpoint has.
"""

from __future__ import annotations

import os

from transformers import GenerationConfig

from ..inference import DEFAULT_MAX_NEW_TOKENS, LATENT_SWITCH, banned_token_ids

_MARK = "{# livr-ds: the K latent tokens follow the generation prompt #}"


def template_without_latents(template: str) -> str:
    """The base template a livr-ds template was made from (itself when it is not one)."""
    head, sep, _ = template.partition("{{ '' }}" + _MARK)
    return head if sep else template


def template_with_latents(template: str, latent_tokens: list[str]) -> str:
    """`template` that ends every generation prompt with `latent_tokens` (see the module docstring).

    The `{{ '' }}` before the added block keeps the base template's output byte for byte: with
    transformers' lstrip_blocks a block tag at the start of a line would eat the whitespace before
    it. Applying it to a template that already has latents replaces them."""
    base = template_without_latents(template)
    if not latent_tokens:
        return base
    latents = "".join(latent_tokens).replace("'", "\\'")
    return (base + "{{ '' }}" + _MARK
            + f"{{% if add_generation_prompt and ({LATENT_SWITCH} is not defined or {LATENT_SWITCH}) %}}"
            + f"{{{{ '{latents}' }}}}{{% endif %}}")


def generation_config(tokenizer, latent_ids: list[int], vocab_rows: int) -> GenerationConfig:
    """`livr-ds eval`'s decoding as a GenerationConfig: greedy, at most DEFAULT_MAX_NEW_TOKENS new
    tokens, ending at the eos the model was trained to end with, never emitting a latent, another
    special token or a table row beyond the tokenizer. Built fresh rather than from the base's file:
    the released Qwen files sample (temperature 0.1, top_k 1) with repetition_penalty 1.05, which
    changes greedy answers."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, repetition_penalty=1.0,
        eos_token_id=eos, pad_token_id=pad,
        suppress_tokens=banned_token_ids(tokenizer, latent_ids, eos, vocab_rows),
    )


def write_serving_files(out_dir: str, processor, latent_ids: list[int], vocab_rows: int) -> None:
    """chat_template.jinja (the processor's and the tokenizer's: transformers reads this one file for
    both) and generation_config.json."""
    tok = processor.tokenizer
    if processor.chat_template:
        template = template_with_latents(processor.chat_template, tok.convert_ids_to_tokens(latent_ids))
        with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
            f.write(template)
    generation_config(tok, latent_ids, vocab_rows).save_pretrained(out_dir)
