"""From decoded samples to a model batch: template, latents, labels, segments, padding.

One sequence is

    [chat-templated user turn with expanded image tokens + assistant header] [K latents] [answer <eos>]
     PROMPT / IMAGE segments                                                   LATENT      ANSWER

Latents sit right after the prompt, so at inference they are simply appended to the prompt and
the model generates the answer (latents are input, never generated). Labels are the answer
tokens only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .. import segments
from ..models import BackboneAdapter
from .schema import DataError

log = logging.getLogger(__name__)

CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer with a single number."


class SampleTooLong(ValueError):
    pass


class SampleRefused(DataError):
    """The processor (or the prompt encoding) failed on one sample of a batch: `slot` is its place
    in the list collated and `sample` the sample itself, so that the loader and the evaluation
    loop can replace or drop it (on_error: skip) and collate again. In a DataLoader worker it
    never leaves the worker as such (the loader re-raises a plain DataError)."""

    def __init__(self, message: str, slot: int | None = None, sample=None):
        super().__init__(message)
        self.slot, self.sample = slot, sample


def format_question(question: str, choices: list[str]) -> str:
    """BLINK-style prompt: the question, then '(A) ...' lines, then the instruction."""
    if not choices:
        return question if OPEN_INSTRUCTION in question else f"{question}\n{OPEN_INSTRUCTION}"
    lines = [question]
    if "(A)" not in question:
        lines += [f"({chr(65 + i)}) {c}" for i, c in enumerate(choices)]
    lines.append(CHOICE_INSTRUCTION)
    return "\n".join(lines)


def format_answer(answer: str, choices: list[str]) -> str:
    return f"({answer})" if choices else str(answer)


def pack_rows(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of the samples in each packed row: the fewest rows of at most max_tokens, balanced.

    A batch is padded to its longest row, so rows should be full AND equally long: take as many
    rows as first-fit-decreasing needs (or fewer, down to the total / max_tokens bound), then spread
    the samples over them longest first into the emptiest row. 16 demo samples become 3 rows of
    ~900 tokens rather than two full rows and a half-empty one padded to full length.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def balanced(n_rows: int) -> list[list[int]] | None:
        rows: list[list[int]] = [[] for _ in range(n_rows)]
        load = [0] * n_rows
        for i in order:
            r = min(range(n_rows), key=load.__getitem__)
            if load[r] + lengths[i] > max_tokens:
                return None
            rows[r].append(i)
            load[r] += lengths[i]
        return rows

    first_fit: list[list[int]] = []
    room: list[int] = []
    for i in order:
        r = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if r is None:
            first_fit.append([])
            room.append(max_tokens)
            r = len(room) - 1
        first_fit[r].append(i)
        room[r] -= lengths[i]
    for n_rows in range(max(1, -(-sum(lengths) // max_tokens)), len(first_fit) + 1):
        rows = balanced(n_rows)
        if rows is not None:
            return rows
    return first_fit


@dataclass
class EncodedSample:
    key: str
    task: str
    input_ids: list[int]
    segment_ids: list[int]
    vision: dict
    num_images: int
    answer: str
    choices: list[str]
    prompt_len: int  # tokens before the answer (prompt + latents): what generation is fed
    meta: dict = field(default_factory=dict)


class LivrCollator:
    """Callable on a list of samples; picklable, so it runs inside DataLoader workers."""

    def __init__(self, adapter: BackboneAdapter, processor, latent_ids: list[int], max_tokens: int = 4096,
                 too_long: str = "error", with_answer: bool = True, packing: bool = False,
                 pad_to_multiple: int = 1):
        self.adapter = adapter
        self.processor = processor
        self.latent_ids = list(latent_ids)
        self.max_tokens = max_tokens
        self.too_long = too_long
        self.with_answer = with_answer
        self.packing = packing
        # The flex path pads every batch to a multiple of its block size: the compiled BlockMask
        # builder then sees a handful of lengths, not one per batch (each new one recompiles).
        self.pad_to_multiple = max(int(pad_to_multiple), 1)
        tok = processor.tokenizer
        self.image_token_id = adapter.image_token_id(processor)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos_id = tok.eos_token_id

    def encode(self, sample) -> EncodedSample:
        question = format_question(sample.question, sample.choices)
        try:
            prompt = self.adapter.encode_prompt(self.processor, question, sample.images)
        except Exception as exc:  # noqa: BLE001 - whatever the processor raises is about this sample
            where = f"{sample.shard}:{sample.key}" if getattr(sample, "shard", "") else sample.key
            raise SampleRefused(f"{where}: the processor refused the sample ({type(exc).__name__}: "
                                f"{str(exc)[:300]})", sample=sample) from exc
        ids = prompt.input_ids + self.latent_ids
        seg = [segments.IMAGE if t == self.image_token_id else segments.PROMPT for t in prompt.input_ids]
        seg += [segments.LATENT] * len(self.latent_ids)
        prompt_len = len(ids)
        answer = format_answer(sample.answer, sample.choices)
        if self.with_answer:
            answer_ids = self.processor.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eos_id]
            ids += answer_ids
            seg += [segments.ANSWER] * len(answer_ids)
        if len(ids) > self.max_tokens:
            raise SampleTooLong(
                f"sample {sample.key!r} ({sample.task}) has {len(ids)} tokens > data.max_tokens={self.max_tokens} "
                f"({seg.count(segments.IMAGE)} image tokens); raise max_tokens, lower model.max_pixels, "
                "or set data.too_long: skip"
            )
        return EncodedSample(sample.key, sample.task, ids, seg, prompt.vision, prompt.num_images,
                             str(sample.answer), list(sample.choices), prompt_len, dict(sample.meta or {}))

    def __call__(self, samples) -> dict:
        encoded, skipped = [], 0
        for slot, s in enumerate(samples):
            try:
                encoded.append(self.encode(s))
            except SampleTooLong:
                if self.too_long != "skip":
                    raise
                skipped += 1
                log.warning("skipping too-long sample %s", s.key)
            except SampleRefused as exc:
                exc.slot = slot
                raise
        if skipped and not encoded:
            # Every sample was skipped: the step still runs forward and backward on every rank
            # (the same collectives everywhere), on a stand-in that carries no loss.
            encoded = [self.placeholder()]
        return self.pad(encoded, skipped=skipped)

    PLACEHOLDER_KEY = "<skipped>"

    def placeholder(self) -> EncodedSample:
        """A padding sample (no labels: a zero loss that still reaches every trainable weight) for a
        batch whose samples were all too long: the shortest prompt the processor makes, with one
        small blank image when that fits max_tokens (so an unfrozen vision tower takes part too)."""
        from PIL import Image

        for images in ([Image.new("RGB", (28, 28))], []):
            prompt = self.adapter.encode_prompt(self.processor, "", images)
            ids = prompt.input_ids + self.latent_ids
            if len(ids) <= self.max_tokens or not images:
                break
        ids = ids[: max(self.max_tokens, 1)]
        seg = [segments.IMAGE if t == self.image_token_id else segments.PROMPT for t in prompt.input_ids]
        seg = (seg + [segments.LATENT] * len(self.latent_ids))[: len(ids)]
        return EncodedSample(self.PLACEHOLDER_KEY, "", ids, seg, prompt.vision if prompt.num_images else {},
                             prompt.num_images, "", [], len(ids), {"_pad": True})

    def rows(self, encoded: list[EncodedSample]) -> list[list[EncodedSample]]:
        if not self.packing:
            return [[e] for e in encoded]
        return [[encoded[i] for i in row] for row in pack_rows([len(e.input_ids) for e in encoded], self.max_tokens)]

    def pad(self, encoded: list[EncodedSample], skipped: int = 0) -> dict:
        rows = self.rows(encoded)
        B = len(rows)
        L = max((sum(len(e.input_ids) for e in row) for row in rows), default=1)
        L = -(-L // self.pad_to_multiple) * self.pad_to_multiple
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        segment_ids = torch.full((B, L), segments.PAD, dtype=torch.long)
        doc_ids = torch.zeros((B, L), dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        image_counts = torch.zeros((B, max((len(r) for r in rows), default=1)), dtype=torch.long)
        for i, row in enumerate(rows):
            start = 0
            for d, e in enumerate(row):
                end = start + len(e.input_ids)
                input_ids[i, start:end] = torch.tensor(e.input_ids)
                segment_ids[i, start:end] = torch.tensor(e.segment_ids)
                doc_ids[i, start:end] = d
                image_counts[i, d] = e.num_images
                if not e.meta.get("_pad"):  # padding repeats a sample to even out ranks: no loss
                    answer = segment_ids[i, start:end] == segments.ANSWER
                    labels[i, start:end][answer] = input_ids[i, start:end][answer]
                start = end
            doc_ids[i, start:] = len(row)  # padding is its own document
        ordered = [e for row in rows for e in row]
        real = int((segment_ids != segments.PAD).sum())
        return {
            "input_ids": input_ids,
            "segment_ids": segment_ids,
            "doc_ids": doc_ids,
            "labels": labels,
            "image_counts": image_counts,
            **self.adapter.collate_vision([e.vision for e in ordered]),
            "meta": {
                "keys": [e.key for e in ordered],
                "tasks": [e.task for e in ordered],
                "answers": [e.answer for e in ordered],
                "choices": [e.choices for e in ordered],
                "prompt_lens": [e.prompt_len for e in ordered],
                "pad": [bool(e.meta.get("_pad")) for e in ordered],
                "tokens": real,
                "pad_fraction": 1.0 - real / max(B * L, 1),
                "skipped": skipped,
            },
        }
