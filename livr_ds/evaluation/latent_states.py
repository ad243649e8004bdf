"""Interventions on the K latents' states: read them from one sample's prefill, write other
states in their place, and decode the answer greedily against the edited KV cache.

A sample's *latent states* (`LatentStates`) are what the rest of the sequence can read of the
latents:

    kv      every layer's keys and values at the K latent positions of the KV cache (what the
            answer tokens attend to);
    out     the last latent's final hidden state (after the final norm): the answer's first token
            is predicted from it, since the latents end the prompt ([prompt][K latents] -> answer).

An intervention replaces both. `decode` then continues exactly as generate._greedy_cached does
for one row (the same mask rule for each new ANSWER token, the same positions, the same banned
ids), so with the sample's own states it gives the same tokens and logits bit for bit
(tests/test_latent_analysis.py).

Positions. Cached keys carry their rope rotation, so spliced keys keep the donor's positions;
the recipient's answer tokens keep the recipient's. Latents end the prompt, so both sit at the
last K prompt slots, and when the two prompts have the same length and the same position ids at
the latents (same question length, same image grid) the splice is exact: every relative distance
between an answer token and a latent key is the one the donor's own answer saw. Otherwise the
relative distance is off by the difference of the last prompt positions; pairs are chosen to
align whenever a donor allows it (`positions_aligned`), and the analysis reports how many did.

One sample per forward (batch size 1: no padding, so nothing depends on the batch).
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from .. import segments
from . import generate
from ..inference import DEFAULT_MAX_NEW_TOKENS


@dataclasses.dataclass
class LatentStates:
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), (1, heads, K, head_dim)
    out: torch.Tensor  # (1, hidden): the last latent's final hidden state

    def map(self, fn) -> "LatentStates":
        """fn applied to every tensor (keys, values, out), in that order per layer, `out` last."""
        return LatentStates([(fn(k), fn(v)) for k, v in self.kv], fn(self.out))

    def to(self, device, dtype=None) -> "LatentStates":
        return self.map(lambda t: t.to(device=device, dtype=dtype or t.dtype))


@dataclasses.dataclass
class Prefill:
    """One sample's prompt [prompt][K latents] run once, under a mask policy."""
    cache: object  # transformers DynamicCache after the prompt
    states: LatentStates
    hidden: list[torch.Tensor]  # per layer (embeddings first): (K, hidden) states at the latents
    latent_slots: torch.Tensor  # indices of the latent positions in the prompt
    latent_positions: torch.Tensor  # their rope position ids (axes, K)
    seg: torch.Tensor
    doc: torch.Tensor
    next_pos: torch.Tensor  # (axes, 1): the first answer token's position
    rope_axes: int  # 1, or 3 for M-RoPE


def positions_aligned(a: Prefill, b: Prefill) -> bool:
    """True when swapping a's and b's latents keeps every answer-to-latent rope distance."""
    return a.seg.shape == b.seg.shape and torch.equal(a.latent_positions, b.latent_positions) \
        and torch.equal(a.next_pos, b.next_pos)


@torch.no_grad()
def prefill(model, collator, sample, policy: str) -> Prefill:
    """The prompt of `sample` (collator built with with_answer=False and the latents) under `policy`."""
    from transformers import DynamicCache

    from ..modeling import merged_latent_rows

    model = generate.unwrap(model)
    hf = model.hf_model
    device = next(model.parameters()).device
    encoded = collator.encode(sample)
    batch = generate.to_device(collator.pad([encoded]), device)
    seg, doc, input_ids = batch["segment_ids"], batch["doc_ids"], batch["input_ids"]
    slots = (seg[0] == segments.LATENT).nonzero()[:, 0]
    if len(slots) == 0:
        raise ValueError("the latent analysis needs a checkpoint with latents and a mode that keeps them")
    last = len(encoded.input_ids) - 1
    if int(slots[-1]) != last:
        raise ValueError("internal: the latents do not end the prompt")
    positions = model.position_ids(batch)
    axes = positions if positions.dim() == 3 else positions[None]
    vision = {k: batch[k] for k in model.adapter.vision_keys if k in batch}
    if "pixel_values" in vision:
        vision["pixel_values"] = vision["pixel_values"].to(hf.dtype)
    cache = DynamicCache(config=model.adapter.text_config(hf))
    with merged_latent_rows(hf), generate._dense_attention(model):
        out = hf.model(input_ids=input_ids, attention_mask=generate._mask(model, seg, doc, policy),
                       position_ids=positions, mm_token_type_ids=(input_ids == model.image_token_id).to(torch.int32),
                       cache=cache, use_cache=True, output_hidden_states=True, **vision)
    kv = [(layer.keys[:, :, slots].clone(), layer.values[:, :, slots].clone()) for layer in cache.layers]
    states = LatentStates(kv, out.last_hidden_state[:, last].clone())
    hidden = [h[0, slots].float() for h in out.hidden_states]
    return Prefill(cache, states, hidden, slots, axes[:, 0, slots], seg, doc, axes[:, 0, last:last + 1] + 1,
                   positions.shape[0] if positions.dim() == 3 else 1)


def splice(pre: Prefill, states: LatentStates):
    """A copy of pre's cache with `states`' keys and values at pre's latent slots."""
    cache = copy.deepcopy(pre.cache)
    if len(states.kv) != len(cache.layers):
        raise ValueError(f"latent states of {len(states.kv)} layers for a cache of {len(cache.layers)}")
    for layer, (k, v) in zip(cache.layers, states.kv):
        layer.keys[:, :, pre.latent_slots] = k.to(layer.keys.dtype)
        layer.values[:, :, pre.latent_slots] = v.to(layer.values.dtype)
    return cache


@torch.no_grad()
def decode(model, collator, pre: Prefill, policy: str, states: LatentStates | None = None,
           max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, force: list[int] | None = None):
    """(generated ids without <eos>, the logits of every step) after pre's prompt, with `states`
    in place of the latents' own (None: the sample's own, the cache untouched but copied).

    force: feed these tokens instead of the greedy choice (teacher forcing, every step's logits
    returned); the answer tokens' logits under an intervention."""
    from ..modeling import merged_latent_rows

    model = generate.unwrap(model)
    hf = model.hf_model
    banned = generate.banned_ids(collator, hf.config.get_text_config().vocab_size)
    states = pre.states if states is None else states
    cache = splice(pre, states)
    key_seg, key_doc = pre.seg, pre.doc
    gen_doc = pre.doc[:, -1]
    next_pos = pre.next_pos.clone()
    steps = len(force) if force is not None else max_new_tokens
    generated, all_logits = [], []
    with merged_latent_rows(hf), generate._dense_attention(model):
        logits = hf.lm_head(states.out.to(hf.dtype)).float()
        for step in range(steps):
            logits[:, banned] = float("-inf")
            all_logits.append(logits[0])
            tok = int(force[step]) if force is not None else int(logits.argmax(-1))
            if force is None and tok == collator.eos_id:
                break
            generated.append(tok)
            if step == steps - 1:
                break
            key_seg = torch.cat([key_seg, torch.full_like(key_seg[:, :1], segments.ANSWER)], dim=1)
            key_doc = torch.cat([key_doc, gen_doc[:, None]], dim=1)
            pos = next_pos[:, None, :]  # (axes, 1, 1)
            out = hf.model(input_ids=torch.tensor([[tok]], device=key_seg.device),
                           attention_mask=generate._mask(model, key_seg, key_doc, policy, q_start=key_seg.shape[1] - 1),
                           position_ids=pos if pre.rope_axes > 1 else pos[0], cache=cache, use_cache=True)
            logits = hf.lm_head(out.last_hidden_state[:, -1]).float()
            next_pos = next_pos + 1
    return generated, torch.stack(all_logits) if all_logits else torch.empty(0)


def answer_text(collator, ids: list[int]) -> str:
    return collator.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()


# ---- the replacements ----------------------------------------------------------------------
def zeroed(states: LatentStates) -> LatentStates:
    return states.map(torch.zeros_like)


def mean_states(all_states: list[LatentStates]) -> LatentStates:
    """The element-wise mean over samples (float32, on the CPU)."""
    n = len(all_states)
    kv = [(sum(s.kv[i][0].float().cpu() for s in all_states) / n, sum(s.kv[i][1].float().cpu() for s in all_states) / n)
          for i in range(len(all_states[0].kv))]
    return LatentStates(kv, sum(s.out.float().cpu() for s in all_states) / n)


def matched_noise(states: LatentStates, generator: torch.Generator) -> LatentStates:
    """Gaussian noise scaled so that every vector (a head's key or value at one latent, the final
    hidden state) has the norm of the one it replaces."""
    def noise(t):
        z = torch.randn(t.shape, generator=generator, dtype=torch.float32)
        z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12) * t.float().cpu().norm(dim=-1, keepdim=True)
        return z.to(device=t.device, dtype=t.dtype)
    return states.map(noise)
