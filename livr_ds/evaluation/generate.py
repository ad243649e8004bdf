"""Greedy answer generation under any mask policy: one prefill, then one cached step per token.

Latents are input: the prompt is [prompt][latents] and the model generates the answer. Each new
token joins the ANSWER segment, so the test-time bottleneck masks it exactly as in training.

    prefill  the right-padded prompt batch (images, latents) runs once through the backbone with a
             transformers DynamicCache, under the policy's mask (segments.dense_mask: a bool mask
             for sdpa, additive for eager) and the model's own position ids (M-RoPE from each
             sample's image grid for Qwen). The vision tower runs here and only here (Qwen3-VL's
             deepstack features are added at the image tokens, all of which are in the prefill).
    decode   one token per row per step, against the cache: its mask row is the segment rule for
             an ANSWER token at the end of the cached keys (segments.dense_mask with q_start:
             under 'bottleneck' it cannot see the image, under 'standard' it sees every real
             token before it, never padding), its positions continue the row's own last position
             (+1 per step on every rope axis, as M-RoPE gives text after the image). Rows are
             right-padded, so a row's generated tokens sit after its padding in the cache; the
             explicit mask and positions make that the same computation as the unpadded row.

The LM head runs on one position per row per step; rows that emit <eos> are dropped from the
cache (under ZeRO-3, `LivrModel.lockstep`, they stay and every rank steps until all are done). `greedy_answers(..., use_cache=False)` is the reference: the whole padded sequence
recomputed per token (vision tower included), with the same mask rule. tests/test_eval.py checks
that both give the same tokens for every eval mode and family.

flex / flash backends (training on a GPU): generation runs on sdpa with dense masks, the text
model's attention implementation switched for the call; the weights and the KV cache do not
depend on the kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from .. import segments
from .. import distributed as dist
from ..inference import DEFAULT_MAX_NEW_TOKENS, banned_token_ids


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def unwrap(model):
    """The LivrModel itself, also when given the DeepSpeed engine around it (engine.module)."""
    from ..modeling import LivrModel

    while not isinstance(model, LivrModel) and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def banned_ids(collator, vocab_rows: int | None = None) -> list[int]:
    return banned_token_ids(collator.processor.tokenizer, collator.latent_ids, collator.eos_id, vocab_rows)


def greedy_answers(model, collator, samples, policy: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, *,
                   use_cache: bool = True) -> list[str]:
    """Decoded answers for `samples`; `collator` must be built with with_answer=False.

    `model` is a LivrModel (or a DeepSpeed engine around one). use_cache=False: the reference
    loop that recomputes the whole sequence per token."""
    tokenizer = collator.processor.tokenizer
    ids = greedy_ids(model, collator, samples, policy, max_new_tokens, use_cache=use_cache)
    return [tokenizer.decode(g, skip_special_tokens=True).strip() for g in ids]


@torch.no_grad()
def greedy_ids(model, collator, samples, policy: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, *,
               use_cache: bool = True) -> list[list[int]]:
    """The generated token ids per sample (<eos> excluded), cached or (use_cache=False) recomputed."""
    if not samples:
        return []
    from ..modeling import merged_latent_rows

    model = unwrap(model)
    if model.lockstep and not use_cache:
        raise ValueError("use_cache=False (the reference loop) does not keep ZeRO-3 ranks in step")
    run = _greedy_cached if use_cache else _greedy_recompute
    with merged_latent_rows(model.hf_model):
        return run(model, collator, samples, policy, max_new_tokens)


def _next_tokens(hf_model, hidden: torch.Tensor, banned: list[int]) -> torch.Tensor:
    """Greedy pick from (B, H) last hidden states: the LM head on those positions only."""
    logits = hf_model.lm_head(hidden).float()
    logits[:, banned] = float("-inf")
    return logits.argmax(-1)


def _mask(model, segment_ids, doc_ids, policy: str, q_start: int = 0) -> torch.Tensor:
    mask = segments.dense_mask(segment_ids, doc_ids, policy, q_start=q_start)
    return segments.additive_mask(mask, model.hf_model.dtype) if model.backend == "eager" else mask


@contextlib.contextmanager
def _dense_attention(model):
    """sdpa for the text model while generating when it was built for flex or flash (neither takes
    a dense 4D mask row); eager and sdpa are left as they are."""
    config = model.adapter.text_config(model.hf_model)
    before = config._attn_implementation
    if model.backend in ("flex", "flash"):
        config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = before


def _greedy_cached(model, collator, samples, policy: str, max_new_tokens: int) -> list[list[int]]:
    from transformers import DynamicCache

    hf = model.hf_model
    device = next(model.parameters()).device
    banned = banned_ids(collator, model.hf_model.config.get_text_config().vocab_size)
    if model.lockstep:  # a sample one rank cannot encode must stop every rank, not leave them waiting
        try:
            encoded, failure = [collator.encode(s) for s in samples], None
        except Exception as e:  # noqa: BLE001 (re-raised below, on this rank and the others)
            encoded, failure = None, e
        if dist.any_rank(failure is not None):
            raise RuntimeError("a validation sample could not be encoded on some rank (its log names it); "
                               "stopping every rank") from failure
    else:
        encoded = [collator.encode(s) for s in samples]
    batch = to_device(collator.pad(encoded), device)
    seg, doc, input_ids = batch["segment_ids"], batch["doc_ids"], batch["input_ids"]
    B = seg.shape[0]
    rows = torch.arange(B, device=device)
    last = torch.tensor([len(e.input_ids) - 1 for e in encoded], device=device)
    positions = model.position_ids(batch)  # (B, L), or (axes, B, L) for M-RoPE
    axes = positions if positions.dim() == 3 else positions[None]
    next_pos = axes[:, rows, last] + 1  # (axes, B): each row continues from its own last position
    gen_doc = doc[rows, last]  # the document the answer belongs to
    vision = {k: batch[k] for k in model.adapter.vision_keys if k in batch}
    if "pixel_values" in vision:
        vision["pixel_values"] = vision["pixel_values"].to(hf.dtype)
    elif model.lockstep:
        model.blank_vision_next(device)
    cache = DynamicCache(config=model.adapter.text_config(hf))
    generated: list[list[int]] = [[] for _ in encoded]
    active = list(range(B))  # original row of each row still in the cache
    with _dense_attention(model):
        out = hf.model(input_ids=input_ids, attention_mask=_mask(model, seg, doc, policy), position_ids=positions,
                       mm_token_type_ids=(input_ids == model.image_token_id).to(torch.int32), cache=cache,
                       use_cache=True, **vision)
        tokens = _next_tokens(hf, out.last_hidden_state[rows, last], banned)
        del out
        key_seg, key_doc = seg, doc
        finished = [False] * B  # lockstep only: rows stay in the cache, feeding tokens nobody reads
        for step in range(max_new_tokens):
            keep = []
            for j, tok in enumerate(tokens.tolist()):
                if model.lockstep and finished[active[j]]:
                    continue
                if tok != collator.eos_id:
                    generated[active[j]].append(tok)
                    keep.append(j)
                else:
                    finished[active[j]] = True
            if step == max_new_tokens - 1:
                break
            if model.lockstep:
                # Every rank decodes until the last row on any rank is done (each forward gathers
                # ZeRO-3 shards that all ranks must join): one small all-reduce per token.
                if not dist.any_rank(bool(keep)):
                    break
            elif not keep:
                break
            elif len(keep) < len(active):  # finished rows leave the cache
                idx = torch.tensor(keep, device=device)
                cache.batch_select_indices(idx)
                key_seg, key_doc, next_pos, gen_doc, tokens = (key_seg[idx], key_doc[idx], next_pos[:, idx],
                                                               gen_doc[idx], tokens[idx])
                active = [active[j] for j in keep]
            # The token just chosen is fed now: an ANSWER token after everything in the cache.
            key_seg = torch.cat([key_seg, torch.full_like(key_seg[:, :1], segments.ANSWER)], dim=1)
            key_doc = torch.cat([key_doc, gen_doc[:, None]], dim=1)
            pos = next_pos[:, :, None]
            out = hf.model(input_ids=tokens[:, None], attention_mask=_mask(model, key_seg, key_doc, policy,
                                                                           q_start=key_seg.shape[1] - 1),
                           position_ids=pos if positions.dim() == 3 else pos[0], cache=cache, use_cache=True)
            tokens = _next_tokens(hf, out.last_hidden_state[:, -1], banned)
            next_pos = next_pos + 1
    return generated


def _greedy_recompute(model, collator, samples, policy: str, max_new_tokens: int) -> list[list[int]]:
    """The reference: every step recomputes the whole padded sequence (and the vision tower)."""
    device = next(model.parameters()).device
    banned = banned_ids(collator, model.hf_model.config.get_text_config().vocab_size)
    encoded = [collator.encode(s) for s in samples]
    generated: list[list[int]] = [[] for _ in encoded]
    done = [False] * len(encoded)
    for _ in range(max_new_tokens):
        rows = [
            dataclasses.replace(e, input_ids=e.input_ids + g, segment_ids=e.segment_ids + [segments.ANSWER] * len(g))
            for e, g in zip(encoded, generated)
        ]
        batch = to_device(collator.pad(rows), device)
        logits = model.logits(batch, policy)
        last = torch.tensor([len(r.input_ids) - 1 for r in rows], device=device)
        next_logits = logits[torch.arange(len(rows), device=device), last]
        next_logits[:, banned] = float("-inf")
        next_ids = next_logits.argmax(-1).tolist()
        for i, tok in enumerate(next_ids):
            if done[i]:
                continue
            if tok == collator.eos_id:
                done[i] = True
            else:
                generated[i].append(tok)
        if all(done):
            break
    return generated
