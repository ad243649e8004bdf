"""The mask rule: one function, a dense and a flex rendering that must agree exactly."""

import subprocess
import sys
import warnings

import pytest
import torch

from livr_ds import segments
from livr_ds.segments import ANSWER, IMAGE, LATENT, PAD, POLICIES, PROMPT


def random_layout(gen, batch=2, length=300):
    """Rows of real LIVR-shaped documents (prompt/image runs, latents, answers), packed, then padded."""
    seg = torch.full((batch, length), PAD)
    doc = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        pos, d = 0, 0
        while pos < length - 40:
            parts = []
            for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
                parts += [PROMPT] * int(torch.randint(1, 6, (1,), generator=gen))
                parts += [IMAGE] * int(torch.randint(4, 30, (1,), generator=gen))
            parts += [PROMPT] * int(torch.randint(2, 10, (1,), generator=gen))
            parts += [LATENT] * int(torch.randint(0, 9, (1,), generator=gen))
            parts += [ANSWER] * int(torch.randint(1, 5, (1,), generator=gen))
            parts = parts[: length - pos]
            seg[b, pos:pos + len(parts)] = torch.tensor(parts)
            doc[b, pos:pos + len(parts)] = d
            pos += len(parts)
            d += 1
    return seg, doc


def materialise(attend_fn, B, L):
    """Which keys a kernel really lets each query see: zero scores + one-hot values."""
    q = torch.zeros(B, 1, L, 8)
    v = torch.eye(L).expand(B, 1, L, L).contiguous()
    return attend_fn(q, q.clone(), v)[:, 0] > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_dense_equals_flex_blockmask(policy):
    from torch.nn.attention.flex_attention import flex_attention

    gen = torch.Generator().manual_seed(POLICIES.index(policy))
    for _ in range(3):
        seg, doc = random_layout(gen)
        B, L = seg.shape
        dense = segments.dense_mask(seg, doc, policy)
        bm = segments.block_mask(seg, doc, policy, block_size=64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seen_flex = materialise(lambda q, k, v: flex_attention(q, k, v, block_mask=bm), B, L)
        seen_sdpa = materialise(
            lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense), B, L)
        additive = segments.additive_mask(dense, torch.float32)
        seen_eager = materialise(
            lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) + additive, -1) @ v, B, L)
        assert torch.equal(seen_flex, dense[:, 0])
        assert torch.equal(seen_sdpa, dense[:, 0])
        assert torch.equal(seen_eager, dense[:, 0])


def test_compiled_blockmask_equals_the_reference_and_compiles_a_bounded_number_of_times():
    """Training builds the BlockMask compiled (no dense L x L grid) on batches padded to the block
    size; a new batch length or batch size must not recompile once shapes went dynamic."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(7)
    for blocks, batch in ((3, 1), (5, 1), (2, 2), (8, 1), (4, 3), (6, 2), (7, 1)):
        seg, doc = random_layout(gen, batch=batch, length=blocks * segments.FLEX_BLOCK)
        for policy in ("bottleneck", "standard"):
            got = segments.block_mask(seg, doc, policy)
            ref = segments.block_mask(seg, doc, policy, compiled=False)
            tables = [(a, b) for a, b in zip(got.as_tuple(), ref.as_tuple()) if torch.is_tensor(a)]
            assert len(tables) >= 4 and all(torch.equal(a, b) for a, b in tables)
    # static first length, then a symbolic length, then a symbolic batch size: 7 shapes, 3 graphs
    assert 1 <= counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])


def test_rule_semantics():
    seg = segments.parse_segments("P I I P L L A A X")
    m = {p: segments.dense_mask(seg[None], torch.zeros(1, 9, dtype=torch.long), p)[0, 0] for p in POLICIES}
    P2, I1, L4, L5, A6, X8 = 3, 1, 4, 5, 6, 8
    assert m["standard"][A6, I1] and m["standard"][P2, I1]
    assert not m["bottleneck"][A6, I1] and not m["bottleneck"][P2, I1] and m["bottleneck"][L4, I1]
    assert m["bottleneck"][A6, L5] and m["bottleneck"][L4, P2 - 3]
    assert not m["answer_only"][A6, I1] and m["answer_only"][P2, I1]
    assert not m["bottleneck_no_latent_to_prompt"][L4, 0] and m["bottleneck_no_latent_to_prompt"][L4, I1]
    for p in POLICIES:  # causal, padding isolated but never an empty row (no NaN)
        assert not m[p].triu(1).any()
        assert m[p][X8].tolist() == [False] * 8 + [True]
        assert not m[p][:8, X8].any()


def test_documents_never_see_each_other():
    seg = segments.parse_segments("P I L A P I L A")[None]
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    m = segments.dense_mask(seg, doc, "standard")[0, 0]
    assert not m[4:, :4].any() and m[7, 4:].all()


def test_mask_cli_prints_matrix():
    out = subprocess.run([sys.executable, "-m", "livr_ds.cli", "mask", "--policy", "bottleneck",
                          "--segments", "P I I I P P L L A A"], capture_output=True, text=True, check=True).stdout
    rows = [line.split()[2:] for line in out.splitlines()[2:]]
    assert rows[4] == "1 0 0 0 1 0 0 0 0 0".split()  # prompt after the image: no image
    assert rows[6] == "1 1 1 1 1 1 1 0 0 0".split()  # latent: sees everything before it
    assert rows[9] == "1 0 0 0 1 1 1 1 1 1".split()  # answer: prompt + latents, no image


def test_bad_policy_and_segments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown mask policy 'botleneck'"):
        segments.policy_table("botleneck")
    r = subprocess.run([sys.executable, "-m", "livr_ds.cli", "mask", "--segments", "P Q"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "segments must be letters" in r.stderr
