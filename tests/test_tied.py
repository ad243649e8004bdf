"""Tied output heads: Qwen2.5-VL-3B and Qwen3-VL-4B share lm_head with embed_tokens (7B+ do not).

Every case runs tied and untied, both with the released small checkpoints' other quirks (embedding
rows beyond the tokenizer's length, the default system prompt): one AdamW step moves only LoRA and
the K latent rows (of the input table, and of the head exactly when it is the same table), and the
export, its reload, `--init-from` and `livr-ds export --merge` all keep what was trained.

In training the latent rows are their own parameter (`latent_rows.weight`, livr_ds/latents.py),
placed into the embedding output by a hook and, for a tied head, into the latent tokens' logits:
the table itself stays frozen and shared. An export stores them as PEFT trainable tokens; PEFT,
loading it on a tied table, wraps lm_head in a TrainableTokensWrapper tied to the embedding's
adapter (`lm_head.token_adapter.trainable_tokens_delta.default` is the embedding's own tensor),
so the reloaded model applies the same rows to the input and the head.
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from livr_ds import segments
from livr_ds.config import load_config
from livr_ds.data.collate import LivrCollator
from livr_ds.data.schema import Sample
from livr_ds.models import get_adapter
from livr_ds.modeling import build_backbone
from livr_ds import export
from tests.conftest import TIED_FAMILIES, TINY_SPARE_ROWS

K = 4
CASES = [(f, tied) for f in TIED_FAMILIES for tied in (False, True)]
IDS = [f"{f}-{'tied' if tied else 'untied'}" for f, tied in CASES]


@pytest.fixture(scope="module")
def quirk_dirs(tiny_tied_dirs, tmp_path_factory):
    """(family, tied) -> tiny checkpoint; the untied ones carry the same quirks but their own head."""
    root = tmp_path_factory.mktemp("tiny_untied_quirks")
    out = {(f, True): d for f, d in tiny_tied_dirs.items()}
    for f in TIED_FAMILIES:
        out[(f, False)] = get_adapter(f).write_tiny(str(root / f), seed=0, spare_rows=TINY_SPARE_ROWS,
                                                    system_prompt=True)
    return out


def sample(images, key, answer="A", choices=("left", "right")):
    return Sample(key=key, task="t", question="Which image is brighter?", choices=list(choices), answer=answer,
                  images=list(images), meta={})


def config(path, family):
    return load_config(None, [f"model.family={family}", f"model.path={path}", f"latents.num={K}", "lora.dropout=0.0"])


def embed_layer(hf):
    """The frozen nn.Embedding (under PEFT's wrapper in a loaded export)."""
    layer = hf.get_input_embeddings()
    return layer.token_adapter.base_layer if hasattr(layer, "token_adapter") else layer


def tables(hf):
    """(effective input table, effective output head) as the forward sees them, in (vocab, hidden)."""
    ids = torch.arange(embed_layer(hf).weight.shape[0])
    with torch.no_grad():
        embed = hf.get_input_embeddings()(ids).clone()
        head = hf.lm_head(torch.eye(embed.shape[1])).T.contiguous()  # x @ W.T with x = I is exact
    return embed, head


def assert_head_layout(hf, tied, loaded=False):
    """Tied: the head's weight is the table (in a loaded export PEFT wraps lm_head around it, tied
    to the embedding's adapter); untied: a plain frozen Linear."""
    if tied and loaded:
        assert hf.lm_head.token_adapter.base_layer.weight is embed_layer(hf).weight
        assert hf.lm_head.token_adapter.tied_adapter is hf.get_input_embeddings().token_adapter
    elif tied:
        assert hf.lm_head.weight is hf.get_input_embeddings().weight and not hf.lm_head.weight.requires_grad
    else:
        assert isinstance(hf.lm_head, torch.nn.Linear) and not hf.lm_head.weight.requires_grad


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def trained(request, quirk_dirs, photos, tmp_path_factory):
    """A backbone after one AdamW step (weight decay on), its export, and what the checks compare."""
    family, tied = request.param
    path = quirk_dirs[(family, tied)]
    cfg = config(path, family)
    bb = build_backbone(cfg, policy="bottleneck")
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero: give it values so LoRA shows in every check
        for name, p in bb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    m = bb.model.train()
    hf = m.hf_model
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    embed0, head0 = tables(hf)
    table0 = embed_layer(hf).weight.detach().clone()
    col = LivrCollator(bb.adapter, bb.processor, bb.latent_ids)
    batch = col([sample(photos[:1], "a"), sample(photos[1:3], "b", answer="B")])
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    opt.zero_grad()
    m(batch, "bottleneck").backward()
    opt.step()
    m.eval()
    with torch.no_grad():
        logits = m.logits(batch, "bottleneck")
    export_dir = export.save_export(bb, cfg, 1, str(tmp_path_factory.mktemp("export") / "final"))
    return SimpleNamespace(family=family, tied=tied, path=path, cfg=cfg, bb=bb, before=before, embed0=embed0,
                           head0=head0, table0=table0, batch=batch, logits=logits, export=export_dir)


@pytest.mark.parametrize("family,tied", CASES, ids=IDS)
def test_tiny_checkpoint_has_the_released_layout(quirk_dirs, family, tied):
    adapter = get_adapter(family)
    path = quirk_dirs[(family, tied)]
    model = adapter.load_model(path)
    processor = adapter.load_processor(path)
    assert model.config.tie_word_embeddings == tied
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer) + TINY_SPARE_ROWS
    text = adapter.prompt_text(processor, "Q?", 1)
    if family == "qwen2_5_vl":  # Qwen3-VL's released template has no default system prompt
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    else:
        assert text.startswith("<|im_start|>user\n")


def test_latents_fill_spare_rows_then_grow_a_still_tied_table(trained):
    hf = trained.bb.model.hf_model
    tok = trained.bb.processor.tokenizer
    base_tokens = len(tok) - K
    # The first TINY_SPARE_ROWS latents take the spare rows, the rest grow the table to the tokenizer.
    assert sorted(set(trained.bb.latent_ids)) == list(range(base_tokens, base_tokens + K))
    assert embed_layer(hf).weight.shape[0] == len(tok) > base_tokens + TINY_SPARE_ROWS
    assert_head_layout(hf, trained.tied)
    if not trained.tied:  # rows the resize added to an untied head are zero
        assert not trained.head0[base_tokens + TINY_SPARE_ROWS:].any()


def test_one_step_moves_only_lora_and_latent_rows(trained):
    m, hf = trained.bb.model, trained.bb.model.hf_model
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, trained.before[n])}
    assert changed == {n for n, p in m.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n == "latent_rows.weight" for n in changed)
    latents = sorted(set(trained.bb.latent_ids))
    embed, head = tables(hf)
    moved = (embed != trained.embed0).any(-1).nonzero().flatten().tolist()
    assert moved == latents  # every other row bit-identical, weight decay included
    assert torch.equal(embed[latents], m.latent_rows.weight)
    head_moved = (head != trained.head0).any(-1).nonzero().flatten().tolist()
    if trained.tied:  # the head is the table: same rows, same values
        assert head_moved == latents
        torch.testing.assert_close(head, embed, rtol=0, atol=1e-6)  # x @ rows.T: its own matmul
    else:
        assert head_moved == []
    assert torch.equal(embed_layer(hf).weight, trained.table0)  # the stored table never changes
    # The export stores the rows in PEFT's format: one trainable-token tensor for the embedding.
    saved = load_file(os.path.join(trained.export, "adapter_model.safetensors"))
    key = "base_model.model.model.language_model.embed_tokens.token_adapter.trainable_tokens_delta"
    assert [k for k in saved if "lora_" not in k] == [key]
    assert torch.equal(saved[key], m.latent_rows.weight.detach())
    with open(os.path.join(trained.export, "adapter_config.json")) as f:
        assert json.load(f)["trainable_token_indices"] == {"embed_tokens": latents}


def test_export_reloads_to_equal_logits(trained):
    from livr_ds.export import load_export

    loaded = load_export(trained.export)
    assert_head_layout(loaded.model.hf_model, trained.tied, loaded=True)
    assert loaded.latent_ids == trained.bb.latent_ids
    with torch.no_grad():
        got = loaded.model.logits(trained.batch, "bottleneck")
    latents = sorted(set(trained.bb.latent_ids))
    others = [i for i in range(got.shape[-1]) if i not in latents]
    assert torch.equal(got[..., others], trained.logits[..., others])
    # a tied head's latent columns: PEFT's one matmul with the merged table vs the hook's own
    tol = 1e-6 if trained.tied else 0  # float rounding of a different summation order
    torch.testing.assert_close(got[..., latents], trained.logits[..., latents], rtol=tol, atol=tol)


def test_init_from_export_restores_the_trained_tensors(trained):
    fresh = build_backbone(trained.cfg, policy="bottleneck")
    want = export.trainable_state(trained.bb.model)
    assert not all(torch.equal(v, export.trainable_state(fresh.model)[k]) for k, v in want.items())
    export.init_from_export(fresh, trained.cfg, trained.export)
    got = export.trainable_state(fresh.model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(fresh.model.eval().logits(trained.batch, "bottleneck"), trained.logits)
        assert torch.equal(torch.cat(tables(fresh.model.hf_model)), torch.cat(tables(trained.bb.model.hf_model)))


def test_merged_export_is_a_plain_transformers_checkpoint(trained, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from livr_ds.cli import main

    out = str(tmp_path / "merged")
    assert main(["export", "--ckpt", trained.export, "--merge", "--out", out]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert (merged.lm_head.weight is merged.get_input_embeddings().weight) == trained.tied
    tok = AutoTokenizer.from_pretrained(out)
    strings = trained.bb.processor.tokenizer.convert_ids_to_tokens(trained.bb.latent_ids)
    assert tok.convert_tokens_to_ids(strings) == trained.bb.latent_ids
    embed, head = tables(trained.bb.model.hf_model)
    assert torch.equal(merged.get_input_embeddings().weight, embed)  # latent rows folded in, exactly
    assert torch.equal(merged.lm_head.weight, head)
    batch, m = trained.batch, trained.bb.model
    real = batch["segment_ids"] != segments.PAD
    vision = {k: batch[k] for k in trained.bb.adapter.vision_keys if k in batch}
    with torch.no_grad():
        ours = m.logits(batch, "standard")
        theirs = merged(input_ids=batch["input_ids"], attention_mask=real.long(),
                        mm_token_type_ids=(batch["input_ids"] == m.image_token_id).int(), **vision).logits
    assert real.sum() < real.numel()  # padded rows: only real tokens compare
    torch.testing.assert_close(theirs[real], ours[real], rtol=1e-4, atol=1e-5)  # LoRA folded: not bitwise


def test_merged_latent_rows_give_the_same_logits_and_leave_the_table_exact(trained):
    """Generation writes the trained latent rows into the table for the loop (PEFT otherwise copies
    the whole table on every embedding and tied-head call) and restores it bit for bit after."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    from livr_ds.export import load_export
    from livr_ds.modeling import merged_latent_rows

    loaded = load_export(trained.export)
    hf = loaded.model.hf_model
    with torch.no_grad():
        want = loaded.model.logits(trained.batch, "bottleneck")
    table = embed_layer(hf).weight.detach().clone()
    copies = []
    originals = TrainableTokensLayer.get_merged_weights
    TrainableTokensLayer.get_merged_weights = lambda self, a: copies.append(1) or originals(self, a)
    try:
        copies.clear()
        with torch.no_grad(), merged_latent_rows(hf):
            merged_logits = loaded.model.logits(trained.batch, "bottleneck")
            assert not copies  # no per-call table copy while merged
            # the merged table carries the trained latent rows (the effective table of before)
            rows = sorted(set(trained.bb.latent_ids))
            delta = hf.get_input_embeddings().token_adapter.trainable_tokens_delta["default"]
            assert torch.equal(embed_layer(hf).weight[rows], delta.to(table.dtype))
        with torch.no_grad():
            loaded.model.logits(trained.batch, "bottleneck")
        assert copies  # unmerged again: PEFT's own path
    finally:
        TrainableTokensLayer.get_merged_weights = originals
    assert torch.equal(merged_logits, want)
    assert torch.equal(embed_layer(hf).weight, table)
    assert_head_layout(hf, trained.tied, loaded=True)


def test_generation_never_picks_rows_beyond_the_tokenizer():
    from livr_ds.evaluation.generate import banned_ids

    collator = SimpleNamespace(processor=SimpleNamespace(tokenizer=type("T", (), {
        "all_special_ids": [5, 7], "__len__": lambda self: 10})()), latent_ids=[8, 9], eos_id=7)
    assert banned_ids(collator) == [5, 8, 9]
    assert banned_ids(collator, vocab_rows=13) == [5, 8, 9, 10, 11, 12]
