"""Segments and the LIVR attention rule: the one place that decides who may attend to whom.

Every token of a sequence belongs to a segment (IMAGE, PROMPT, LATENT, ANSWER, PAD) and to a
document (a packed row holds several). The rule is

    allowed(q, k) = k <= q  and  doc[q] == doc[k]  and  POLICY[seg[q], seg[k]]
                    (or q == k, so padding rows still attend to something and never give NaN)

where POLICY is a 5 x 5 table per mask policy. The same `allowed` function, written only with
tensor indexing and boolean operators, is evaluated densely (a bool mask for sdpa, an additive
one for eager, which silently ignores bool masks) and as a flex-attention `mask_mod` (a
BlockMask for the compiled GPU kernel). Nothing else in livr-ds builds attention masks.
"""

from __future__ import annotations

import torch

IMAGE, PROMPT, LATENT, ANSWER, PAD = range(5)
SEGMENT_LETTERS = "IPLAX"  # index = segment id
NUM_SEGMENTS = len(SEGMENT_LETTERS)

POLICIES = ("standard", "bottleneck", "answer_only", "bottleneck_no_latent_to_prompt")


def policy_table(policy: str) -> torch.Tensor:
    """(query segment, key segment) -> may attend, before causality and documents."""
    if policy not in POLICIES:
        raise ValueError(f"unknown mask policy {policy!r}; choose one of {', '.join(POLICIES)}")
    table = torch.ones(NUM_SEGMENTS, NUM_SEGMENTS, dtype=torch.bool)
    table[PAD, :] = False  # padding attends only to itself (the diagonal rule)
    table[:, PAD] = False
    if policy in ("bottleneck", "bottleneck_no_latent_to_prompt"):
        # Every text token that is not a latent is cut off from the image: anything that can
        # see the image and is seen by the answer would leak it around the bottleneck.
        table[PROMPT, IMAGE] = False
        table[ANSWER, IMAGE] = False
    if policy == "answer_only":
        table[ANSWER, IMAGE] = False
    if policy == "bottleneck_no_latent_to_prompt":
        table[LATENT, PROMPT] = False
    return table


def allowed(table: torch.Tensor, seg_q, seg_k, doc_q, doc_k, q_idx, k_idx):
    """The rule. Works elementwise on broadcastable tensors (dense) and inside flex's vmap."""
    flat = table.reshape(-1)
    by_policy = flat[seg_q * NUM_SEGMENTS + seg_k]
    return ((k_idx <= q_idx) & (doc_q == doc_k) & by_policy) | (q_idx == k_idx)


def dense_mask(segment_ids: torch.Tensor, doc_ids: torch.Tensor, policy: str, q_start: int = 0) -> torch.Tensor:
    """Bool mask (B, 1, L - q_start, L), True = may attend: the format sdpa takes.

    q_start > 0 keeps only the query rows from position q_start on, against every key: a
    KV-cached decode step (the new tokens are the last positions, the cache holds the rest)."""
    table = policy_table(policy).to(segment_ids.device)
    L = segment_ids.shape[-1]
    idx = torch.arange(L, device=segment_ids.device)
    mask = allowed(
        table,
        segment_ids[:, q_start:, None], segment_ids[:, None, :],
        doc_ids[:, q_start:, None], doc_ids[:, None, :],
        idx[None, q_start:, None], idx[None, None, :],
    )
    return mask[:, None]


def additive_mask(bool_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, the dtype's minimum where blocked: the format eager attention adds."""
    out = torch.zeros(bool_mask.shape, dtype=dtype, device=bool_mask.device)
    return out.masked_fill_(~bool_mask, torch.finfo(dtype).min)


def mask_mod(segment_ids: torch.Tensor, doc_ids: torch.Tensor, policy: str):
    """The rule as a flex-attention mask_mod(b, h, q_idx, kv_idx)."""
    table = policy_table(policy).to(segment_ids.device)

    def mod(b, h, q_idx, kv_idx):
        return allowed(table, segment_ids[b, q_idx], segment_ids[b, kv_idx],
                       doc_ids[b, q_idx], doc_ids[b, kv_idx], q_idx, kv_idx)

    return mod


# The flex kernel's tile: a BlockMask records, per (query block, key block), none/some/all allowed.
FLEX_BLOCK = 128


def pad_multiple(backend: str) -> int:
    """What the collator pads a batch's length to on `backend`: the flex block size, so that the
    compiled BlockMask builder sees few distinct lengths (one compile each, then dynamic shapes)."""
    return FLEX_BLOCK if backend == "flex" else 1


_compiled_builder = None


def _create_block_mask_compiled():
    # Uncompiled, create_block_mask evaluates mask_mod over the whole (B, 1, L, L) grid in vmap
    # with int64 index temporaries (about 0.5 GB at L = 8192, more than the mask itself); compiled,
    # inductor fuses the rule into the per-block reduction and only the block tables are stored.
    # torchtitan compiles it the same way (one module-level torch.compile, reused by every batch).
    global _compiled_builder
    if _compiled_builder is None:
        from torch.nn.attention.flex_attention import create_block_mask

        # Default (automatic) dynamic shapes: the first length compiles static, the second one
        # recompiles with a symbolic length, and no later length compiles again.
        _compiled_builder = torch.compile(create_block_mask)
    return _compiled_builder


def block_mask(segment_ids: torch.Tensor, doc_ids: torch.Tensor, policy: str, block_size: int = FLEX_BLOCK,
               compiled: bool = True):
    """A flex-attention BlockMask, built once per batch and shared by all layers. `compiled=False`
    is the uncompiled reference (tests and the benchmark compare the two)."""
    from torch.nn.attention.flex_attention import create_block_mask

    build = _create_block_mask_compiled() if compiled else create_block_mask
    B, L = segment_ids.shape
    return build(mask_mod(segment_ids, doc_ids, policy), B, None, L, L,
                 device=segment_ids.device, BLOCK_SIZE=block_size)


def parse_segments(text: str) -> torch.Tensor:
    """'P I I L A' -> segment ids; the letters of SEGMENT_LETTERS, spaces optional."""
    letters = [c for c in text.upper() if not c.isspace()]
    bad = sorted({c for c in letters if c not in SEGMENT_LETTERS})
    if bad or not letters:
        raise ValueError(f"segments must be letters from {' '.join(SEGMENT_LETTERS)} "
                         f"(I image, P prompt, L latent, A answer, X pad); got {text!r}")
    return torch.tensor([SEGMENT_LETTERS.index(c) for c in letters])


def format_mask(segment_ids: torch.Tensor, policy: str) -> str:
    """The allowed matrix of one unpacked sequence, one row per query: 1 = may attend."""
    seg = segment_ids.reshape(1, -1)
    mask = dense_mask(seg, torch.zeros_like(seg), policy)[0, 0]
    letters = [SEGMENT_LETTERS[s] for s in seg[0].tolist()]
    lines = [f"policy: {policy}", "    " + " ".join(letters)]
    for i, row in enumerate(mask.tolist()):
        lines.append(f"{i:>2} {letters[i]} " + " ".join("1" if v else "0" for v in row))
    return "\n".join(lines)
