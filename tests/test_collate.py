"""The collator: template, latents right after the prompt, labels on answer tokens only."""

import pytest
import torch

from livr_ds import segments
from livr_ds.data.collate import LivrCollator, SampleTooLong, pack_rows
from livr_ds.data.schema import Sample
from livr_ds.models import get_adapter


@pytest.fixture(scope="module")
def qwen(tiny_dirs):
    adapter = get_adapter("qwen2_5_vl")
    return adapter, adapter.load_processor(tiny_dirs["qwen2_5_vl"])


def sample(photos, key="k", n_images=1, choices=("red", "blue"), answer="B"):
    return Sample(key=key, task="t", question="Which colour is the square?", choices=list(choices),
                  answer=answer, images=photos[:n_images], meta={})


def test_layout_labels_and_segments(qwen, photos):
    adapter, processor = qwen
    latents = [7, 8, 9]
    batch = LivrCollator(adapter, processor, latents)([sample(photos, "a", 2), sample(photos, "b", 1)])
    tok = processor.tokenizer
    for row in range(2):
        ids, seg, labels = batch["input_ids"][row], batch["segment_ids"][row], batch["labels"][row]
        real = seg != segments.PAD
        text = tok.decode(ids[real & (seg == segments.PROMPT)])
        assert "Which colour is the square?" in text and "(A) red\n(B) blue" in text
        lat = (seg == segments.LATENT).nonzero().flatten()
        ans = (seg == segments.ANSWER).nonzero().flatten()
        assert ids[lat].tolist() == latents
        assert lat[0] == (seg == segments.PROMPT).nonzero().max() + 1  # right after the prompt
        assert ans[0] == lat[-1] + 1 and ans[-1] == real.sum() - 1
        assert tok.decode(ids[ans]) == "(B)<|im_end|>"
        assert torch.equal(labels != -100, seg == segments.ANSWER)  # loss on answer tokens only
        assert (ids[seg == segments.IMAGE] == adapter.image_token_id(processor)).all()
    assert batch["image_grid_thw"].shape[0] == 3 and batch["image_counts"].tolist() == [[2], [1]]
    assert 0 < batch["meta"]["pad_fraction"] < 1


@pytest.mark.parametrize("packing", [False, True])
def test_flex_batches_pad_to_the_block_size_and_nothing_else_changes(qwen, photos, packing):
    adapter, processor = qwen
    samples = [sample(photos, "a", 2), sample(photos, "b", 1)]
    plain = LivrCollator(adapter, processor, [7, 8], packing=packing)(samples)
    padded = LivrCollator(adapter, processor, [7, 8], packing=packing,
                          pad_to_multiple=segments.pad_multiple("flex"))(samples)
    L, Lp = plain["input_ids"].shape[1], padded["input_ids"].shape[1]
    assert Lp % segments.FLEX_BLOCK == 0 and L <= Lp < L + segments.FLEX_BLOCK and L % segments.FLEX_BLOCK
    for key in ("input_ids", "segment_ids", "doc_ids", "labels"):
        assert torch.equal(padded[key][:, :L], plain[key]), key
    assert (padded["segment_ids"][:, L:] == segments.PAD).all() and (padded["labels"][:, L:] == -100).all()
    for row in range(padded["input_ids"].shape[0]):  # the padding is its row's own last document
        real = plain["segment_ids"][row] != segments.PAD
        assert (padded["doc_ids"][row, L:] == plain["doc_ids"][row][real].max() + 1).all()
    assert segments.pad_multiple("sdpa") == segments.pad_multiple("eager") == 1


def test_padding_samples_carry_no_loss(qwen, photos):
    adapter, processor = qwen
    s = sample(photos)
    s.meta["_pad"] = True
    batch = LivrCollator(adapter, processor, [])([sample(photos, "real"), s])
    assert (batch["labels"][0] != -100).any() and (batch["labels"][1] == -100).all()
    assert batch["meta"]["pad"] == [False, True]


def test_too_long_is_a_clear_error_or_skipped(qwen, photos):
    adapter, processor = qwen
    strict = LivrCollator(adapter, processor, [], max_tokens=40)
    with pytest.raises(SampleTooLong, match=r"sample 'big' \(t\) has \d+ tokens > data.max_tokens=40"):
        strict([sample(photos, "big", 3)])
    lenient = LivrCollator(adapter, processor, [], max_tokens=60, too_long="skip")
    batch = lenient([sample(photos, "big", 3), sample(photos, "small", 1, choices=(), answer="3")])
    assert batch["meta"]["keys"] == ["small"] and batch["meta"]["skipped"] == 1
    assert processor.tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != -100]) == "3<|im_end|>"


def test_a_batch_of_only_too_long_samples_keeps_one_loss_free_placeholder(qwen, photos):
    """micro batch 1, its sample skipped: the batch is not empty (every rank must still step) but a
    padding stand-in with no labels, within max_tokens."""
    adapter, processor = qwen
    latents = [7, 8]
    batch = LivrCollator(adapter, processor, latents, max_tokens=30, too_long="skip")([sample(photos, "big", 3)])
    meta = batch["meta"]
    assert meta["skipped"] == 1 and meta["pad"] == [True] and meta["keys"] == [LivrCollator.PLACEHOLDER_KEY]
    assert batch["input_ids"].shape[0] == 1 and 0 < batch["input_ids"].shape[1] <= 30
    assert (batch["labels"] == -100).all()
    seg = batch["segment_ids"][0]
    assert (seg != segments.PAD).all() and batch["input_ids"][0][seg == segments.LATENT].tolist() == latents
    # one small image: its grid matches its tokens, so an unfrozen vision tower runs as well
    assert batch["image_counts"].tolist() == [[1]] and batch["image_grid_thw"].shape[0] == 1
    assert int((seg == segments.IMAGE).sum()) == int(batch["image_grid_thw"].prod()) // 4
    # not even the image fits: text only
    tiny = LivrCollator(adapter, processor, [], max_tokens=8, too_long="skip")([sample(photos, "big", 1)])
    assert tiny["input_ids"].shape == (1, 8) and "pixel_values" not in tiny and tiny["image_counts"].sum() == 0


def _padded_fraction(rows, lengths):
    return sum(lengths) / (len(rows) * max(sum(lengths[i] for i in r) for r in rows))


@pytest.mark.parametrize("seed", range(20))
def test_pack_rows_plan(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(60, 400, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
    rows = pack_rows(lengths, 1024)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))  # every sample once
    assert all(sum(lengths[i] for i in r) <= 1024 for r in rows)
    assert len(rows) <= -(-sum(lengths) // 1024) + 1  # never more rows than the bound allows...
    if len(lengths) >= 8:  # ...and balanced: the rows a batch is padded to are nearly full
        assert _padded_fraction(rows, lengths) >= 0.9, (lengths, rows)


def test_pack_rows_balances_instead_of_leaving_a_half_empty_row():
    lengths = [300] * 9  # first fit: 3 + 3 + 3 rows of 900; 10 samples: 3 + 3 + 3 + 1
    assert [len(r) for r in pack_rows(lengths, 1024)] == [3, 3, 3]
    lengths = [200] * 11  # 2,200 tokens: first fit gives 5 + 5 + 1 (padded to 1,000: 0.73 real)
    rows = pack_rows(lengths, 1024)
    assert sorted(len(r) for r in rows) == [3, 4, 4] and _padded_fraction(rows, lengths) > 0.9
    assert pack_rows([], 1024) == []


def test_prompt_text_passes_the_latent_switch_only_to_a_template_that_has_it(qwen, tiny_dirs):
    """A base template renders without transformers' per-call warning about unknown keywords; an
    export's template (which adds the latents itself) gets add_latents=False and adds none."""
    import copy
    import logging

    from livr_ds.export import template_with_latents

    adapter, processor = qwen
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        base = adapter.prompt_text(processor, "How many?", 1)
        exported = copy.deepcopy(processor)
        exported.chat_template = template_with_latents(processor.chat_template, ["<|latent_0|>", "<|latent_1|>"])
        served = adapter.prompt_text(exported, "How many?", 1)
    finally:
        hf_logger.removeHandler(handler)
    assert not [r for r in records if "processor_kwargs" in r.getMessage()], [r.getMessage() for r in records]
    assert "<|latent_0|>" in exported.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "x"}]}], add_generation_prompt=True, tokenize=False)
    assert served == base and "<|latent_0|>" not in served
