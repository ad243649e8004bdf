"""Greedy answer generation under any mask policy.

Latents are input: the prompt is [prompt][latents] and the model generates the answer. Each new
token joins the ANSWER segment, so the test-time bottleneck masks it exactly as in training.
Answers are a few tokens long, so this recomputes the whole sequence per token instead of
keeping a KV cache: one code path for every policy, with the same mask rule as training.
"""

from __future__ import annotations

import dataclasses

import torch

from . import segments
from .answers import is_correct


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def greedy_answers(model, collator, samples, policy: str, max_new_tokens: int = 8) -> list[str]:
    """Decoded answers for `samples`; `collator` must be built with with_answer=False."""
    device = next(model.parameters()).device
    tokenizer = collator.processor.tokenizer
    encoded = [collator.encode(s) for s in samples]
    generated: list[list[int]] = [[] for _ in encoded]
    done = [False] * len(encoded)
    # Latents are never generated, nor image/video placeholders or any other special token
    # (an image token in the answer would make the model look for an image that is not there).
    banned = sorted((set(collator.latent_ids) | set(tokenizer.all_special_ids)) - {collator.eos_id})
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
    return [tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated]


def score(samples, predictions: list[str]) -> list[dict]:
    """One record per sample: key, task, answer, prediction, parsed, correct."""
    out = []
    for s, pred in zip(samples, predictions):
        ok, parsed = is_correct(pred, str(s.answer), list(s.choices))
        out.append({"key": s.key, "task": s.task, "answer": str(s.answer), "prediction": pred,
                    "parsed": parsed, "correct": bool(ok)})
    return out


def accuracy_by_task(records: list[dict]) -> dict:
    """{"per_task": {task: {"accuracy": %, "n": int}}, "mean": % over tasks}."""
    per_task: dict[str, list[bool]] = {}
    for r in records:
        per_task.setdefault(r["task"], []).append(r["correct"])
    table = {t: {"accuracy": 100.0 * sum(v) / len(v), "n": len(v)} for t, v in sorted(per_task.items())}
    mean = sum(t["accuracy"] for t in table.values()) / len(table) if table else 0.0
    return {"per_task": table, "mean": mean}
