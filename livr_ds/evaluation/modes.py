"""The evaluation modes: the paper's test-time variants (Section 5), each an input and a mask.

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
