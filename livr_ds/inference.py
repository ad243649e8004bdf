"""How a LIVR model is asked a question at test time: the mode (which input, which mask) and the
decoding (greedy, a small answer budget, ids never emitted).

One contract for `livr-ds eval` (evaluation/) and for the serving files of an export (export/:
generation_config.json, the model card), so that stock transformers decodes as `livr-ds eval` does.

The modes are the paper's test-time variants (Section 5):

| mode                    | input                         | mask       |
|-------------------------|-------------------------------|------------|
| standard                | [prompt][K latents] -> answer | standard   |
| no_latents              | [prompt] -> answer            | standard   |
| bottleneck              | [prompt][K latents] -> answer | bottleneck |
| bottleneck_no_latents   | [prompt] -> answer            | bottleneck |

"bottleneck" is the Stage 1 mask at test time: prompt and answer tokens cannot see the image, so
the answer can only use what the latents carry. Latents are input, never generated.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalMode:
    name: str
    policy: str  # the mask policy at test time
    keep_latents: bool  # False: the K latent tokens are removed from the input
    about: str = ""  # what the mode measures (exports' model cards list them)


MODES = {m.name: m for m in (
    EvalMode("standard", "standard", True,
             "the model as trained and served: causal attention, the K latents after the prompt"),
    EvalMode("no_latents", "standard", False,
             "causal attention, the latents removed: what the latents add (the paper's 'latents dropped')"),
    EvalMode("bottleneck", "bottleneck", True,
             "Stage 1's mask at test time: the answer sees the image only through the latents"),
    EvalMode("bottleneck_no_latents", "bottleneck", False,
             "the bottleneck mask without latents: the answer cannot see the image at all (a floor)"),
)}


def get_mode(name: str) -> EvalMode:
    if name not in MODES:
        raise ValueError(f"unknown eval mode {name!r}; choose one of {', '.join(MODES)}")
    return MODES[name]


# The chat-template variable of an export's template that turns the latents off
# (`apply_chat_template(..., add_latents=False)`; vLLM: `chat_template_kwargs={"add_latents": false}`).
LATENT_SWITCH = "add_latents"

# `livr-ds eval`'s answer budget; exports' generation_config.json carries the same default.
DEFAULT_MAX_NEW_TOKENS = 8


def banned_token_ids(tokenizer, latent_ids, eos_id: int, vocab_rows: int | None = None) -> list[int]:
    """Latents are never generated, nor image/video placeholders or any other special token
    (an image token in the answer would make the model look for an image that is not there),
    nor the rows beyond the tokenizer that released Qwen tables carry (151,936 rows for about
    151,665 tokens): they decode to nothing and were never trained. Exports suppress the same ids
    in their generation_config.json, so stock `generate` decodes as `livr-ds eval` does."""
    spare = set(range(len(tokenizer), vocab_rows)) if vocab_rows else set()
    return sorted((set(latent_ids) | set(tokenizer.all_special_ids) | spare) - {eos_id})
