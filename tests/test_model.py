"""The LIVR model core on tiny real transformers models: masks reach the attention, only the
right parameters train, standard == the model's own forward."""

import pytest
import torch

from livr_ds import segments
from livr_ds.config import load_config
from livr_ds.data.collate import LivrCollator
from livr_ds.data.schema import Sample
from livr_ds.modeling import build_backbone

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "llava_onevision"]


def make_backbone(tiny_dirs, family, k=4, policy="bottleneck", **over):
    sets = [f"model.family={family}", f"model.path={tiny_dirs[family]}", f"latents.num={k}",
            "lora.dropout=0.0"] + [f"{a}={b}" for a, b in over.items()]
    cfg = load_config(None, sets)
    bb = build_backbone(cfg, policy=policy)
    # LoRA B starts at zero; give it values so the adapters take part in every check.
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in bb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return bb


def sample(images, key="s", question="Which image is brighter?", choices=("left", "right"), answer="A"):
    return Sample(key=key, task="t", question=question, choices=list(choices), answer=answer,
                  images=list(images), meta={})


@pytest.mark.parametrize("family", FAMILIES)
def test_standard_policy_equals_default_forward(tiny_dirs, photos, family):
    bb = make_backbone(tiny_dirs, family)
    col = LivrCollator(bb.adapter, bb.processor, bb.latent_ids)
    batch = col([sample(photos[:1], "a"), sample(photos[1:3], "b", choices=())])
    m = bb.model.eval()
    with torch.no_grad():
        ours = m.logits(batch, "standard")
        real = batch["segment_ids"] != segments.PAD
        vision = {k: batch[k] for k in bb.adapter.vision_keys if k in batch}
        ref = m.hf_model(input_ids=batch["input_ids"], attention_mask=real.long(),
                         mm_token_type_ids=(batch["input_ids"] == m.image_token_id).int(), **vision).logits
    assert real.sum() < real.numel()  # the batch really is padded
    assert torch.equal(ours[real], ref[real])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_bottleneck_routes_all_vision_through_latents(tiny_dirs, tiny_tied_dirs, photos, family, tied):
    # tied: the released 3B/4B layout (lm_head is embed_tokens, spare rows, system prompt)
    with_latents = make_backbone(tiny_tied_dirs if tied else tiny_dirs, family, k=4)
    col_l = LivrCollator(with_latents.adapter, with_latents.processor, with_latents.latent_ids)
    col_0 = LivrCollator(with_latents.adapter, with_latents.processor, [])
    m = with_latents.model.eval()

    def text_logits(col, image, policy):
        batch = col([sample([image])])
        seg = batch["segment_ids"][0]
        text = (seg == segments.PROMPT) | (seg == segments.ANSWER)
        with torch.no_grad():
            return m.logits(batch, policy)[0][text]

    a, b = photos[0], photos[1]
    # Latents removed: prompt and answer never see the image, bit for bit.
    assert torch.equal(text_logits(col_0, a, "bottleneck"), text_logits(col_0, b, "bottleneck"))
    # Latents present: the answer sees the image through them.
    assert not torch.equal(text_logits(col_l, a, "bottleneck"), text_logits(col_l, b, "bottleneck"))
    # Standard mask: the image reaches prompt and answer directly.
    assert not torch.equal(text_logits(col_0, a, "standard"), text_logits(col_0, b, "standard"))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_only_lora_and_latent_rows_train(tiny_dirs, photos, family):
    bb = make_backbone(tiny_dirs, family, k=4)
    m = bb.model.train()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    embed_before = bb.model.hf_model.get_input_embeddings().weight.detach().clone()
    trainable = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    col = LivrCollator(bb.adapter, bb.processor, bb.latent_ids)
    batch = col([sample(photos[:1], "a"), sample(photos[2:3], "b", answer="B")])
    for _ in range(3):
        opt.zero_grad()
        loss = m(batch, "bottleneck")
        loss.backward()
        for n, p in m.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
            if p.requires_grad:
                assert p.grad.abs().sum() > 0, f"{n} got no gradient"
        opt.step()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in m.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n == "latent_rows.weight" for n in changed)
    vision = {id(p) for mod in bb.adapter.vision_modules(bb.model.hf_model) for p in mod.parameters()}
    assert not any(id(p) in vision for p in trainable)
    # The effective embedding table: only the K latent rows moved.
    ids = torch.arange(embed_before.shape[0])
    with torch.no_grad():
        effective = bb.model.hf_model.get_input_embeddings()(ids)
    moved = (effective != embed_before).any(-1).nonzero().flatten().tolist()
    assert moved == sorted(set(bb.latent_ids))


def test_shared_latents_and_k0(tiny_dirs, photos):
    shared = make_backbone(tiny_dirs, "qwen2_5_vl", k=4, **{"latents.shared": "true"})
    assert len(shared.latent_ids) == 4 and len(set(shared.latent_ids)) == 1
    none = make_backbone(tiny_dirs, "qwen2_5_vl", k=0, policy="standard", **{"schedule.stage1_epochs": 0})
    assert none.latent_ids == []
    assert none.model.latent_rows is None and all("lora_" in n for n, p in none.model.named_parameters() if p.requires_grad)
    col = LivrCollator(none.adapter, none.processor, [])
    loss = none.model(col([sample(photos[:1])]), "standard")
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_a_batch_whose_only_sample_is_skipped_still_steps(tiny_dirs, photos, family):
    """data.too_long: skip at micro batch 1: the collator's placeholder gives a finite zero loss whose
    backward reaches every trainable weight (all-zero gradients), as a pad-only batch does."""
    bb = make_backbone(tiny_dirs, family, k=4)
    m = bb.model.train()
    col = LivrCollator(bb.adapter, bb.processor, bb.latent_ids, max_tokens=30, too_long="skip")
    batch = col([sample(photos[:3], "big")])
    assert batch["meta"]["skipped"] == 1 and batch["meta"]["pad"] == [True]
    loss = m(batch, "bottleneck")
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0 and loss.requires_grad
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and not p.grad.any() for _, p in trainable), \
        [n for n, p in trainable if p.grad is None]


def test_eager_backend_matches_sdpa(tiny_dirs, photos):
    sd = make_backbone(tiny_dirs, "qwen2_5_vl")
    eg = make_backbone(tiny_dirs, "qwen2_5_vl", **{"model.attn_backend": "eager"})
    assert eg.model.backend == "eager"
    col = LivrCollator(sd.adapter, sd.processor, sd.latent_ids)
    batch = col([sample(photos[:1])])
    with torch.no_grad():
        a = sd.model.eval().logits(batch, "bottleneck")
        b = eg.model.eval().logits(batch, "bottleneck")
    assert torch.allclose(a, b, atol=1e-5)


CPU, CUDA = torch.device("cpu"), torch.device("cuda")
BF16, FP32 = torch.bfloat16, torch.float32
BOTH, FLEX_ONLY, NONE = frozenset({"flash", "flex"}), frozenset({"flex"}), frozenset()


@pytest.mark.parametrize("requested,policy,packed,device,dtype,kernels,want", [
    ("auto", "bottleneck", False, CPU, FP32, BOTH, "sdpa"),
    ("auto", "standard", False, CPU, BF16, BOTH, "sdpa"),
    ("auto", "bottleneck", False, CUDA, BF16, BOTH, "flex"),
    ("auto", "standard", True, CUDA, BF16, BOTH, "flex"),  # packed rows need a block-diagonal mask
    ("auto", "bottleneck", False, CUDA, BF16, NONE, "sdpa"),
    ("auto", "standard", False, CUDA, BF16, BOTH, "flash"),
    ("auto", "standard", False, CUDA, FP32, BOTH, "sdpa"),  # the README's GPU route with the fp32 demo config
    ("auto", "standard", False, CUDA, BF16, FLEX_ONLY, "sdpa"),
    ("sdpa", "bottleneck", False, CUDA, BF16, BOTH, "sdpa"),
    ("eager", "standard", False, CPU, FP32, NONE, "eager"),
    ("flex", "bottleneck", False, CUDA, BF16, FLEX_ONLY, "flex"),
    ("flash", "standard", False, CUDA, BF16, BOTH, "flash"),
])
def test_attention_backend_table(requested, policy, packed, device, dtype, kernels, want):
    from livr_ds.modeling import pick_backend

    backend, why = pick_backend(requested, policy, packed, device, dtype, kernels)
    assert backend == want and why


@pytest.mark.parametrize("requested,policy,device,dtype,kernels,reason", [
    ("flash", "bottleneck", CUDA, BF16, BOTH, "flash-attn ignores 4D masks"),
    ("flash", "standard", CPU, BF16, BOTH, "CUDA only"),
    ("flash", "standard", CUDA, FP32, BOTH, "rejects float32"),
    ("flash", "standard", CUDA, BF16, FLEX_ONLY, "not installed"),
    ("flex", "bottleneck", CUDA, BF16, NONE, "no torch.nn.attention.flex_attention"),
])
def test_attention_backend_refusals_name_the_key(requested, policy, device, dtype, kernels, reason):
    from livr_ds.config import ConfigError
    from livr_ds.modeling import pick_backend

    with pytest.raises(ConfigError, match=f"model.attn_backend={requested}: .*{reason}"):
        pick_backend(requested, policy, False, device, dtype, kernels)


def test_attention_backend_is_logged_at_build(tiny_dirs, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="livr_ds.modeling"):
        make_backbone(tiny_dirs, "qwen2_5_vl")
    assert "attention backend: sdpa (auto: cpu device)" in caplog.text


@pytest.mark.parametrize("mode", ["lm", "all"])
def test_full_finetune_modes(tiny_dirs, photos, mode):
    bb = make_backbone(tiny_dirs, "qwen2_5_vl", **{"model.trainable": mode})
    vision = {id(p) for mod in bb.adapter.vision_modules(bb.model.hf_model) for p in mod.parameters()}
    params = list(bb.model.parameters())
    assert all(p.requires_grad == (mode == "all" or id(p) not in vision) for p in params)
    assert not any("lora_" in n for n, _ in bb.model.named_parameters())
    col = LivrCollator(bb.adapter, bb.processor, bb.latent_ids)
    bb.model(col([sample(photos[:1])]), "bottleneck").backward()
    assert all((p.grad is not None) == p.requires_grad for p in params)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_packed_rows_equal_unpacked(tiny_dirs, photos, family):
    bb = make_backbone(tiny_dirs, family)
    samples = [sample(photos[:1], "a"), sample(photos[1:3], "b", choices=(), answer="12"),
               sample([photos[3].resize((84, 112))], "c", answer="B")]
    plain = LivrCollator(bb.adapter, bb.processor, bb.latent_ids)
    packer = LivrCollator(bb.adapter, bb.processor, bb.latent_ids, max_tokens=512, packing=True)
    unpacked, packed = plain(samples), packer(samples)
    assert packed["input_ids"].shape[0] == 1 and packed["doc_ids"].max() >= 2
    assert packed["meta"]["pad_fraction"] < unpacked["meta"]["pad_fraction"]
    m = bb.model.train()

    def loss_and_grads(batch):
        m.zero_grad()
        loss = m(batch, "bottleneck")
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    l_u, g_u = loss_and_grads(unpacked)
    l_p, g_p = loss_and_grads(packed)
    torch.testing.assert_close(l_p, l_u, rtol=1e-5, atol=1e-6)
    for n in g_u:
        torch.testing.assert_close(g_p[n], g_u[n], rtol=1e-4, atol=1e-6)
    # and each document's logits equal its own unpacked forward
    with torch.no_grad():
        lp, lu = m.logits(packed, "bottleneck"), m.logits(unpacked, "bottleneck")
    keys = packed["meta"]["keys"]
    for d, key in enumerate(keys):
        row = unpacked["meta"]["keys"].index(key)
        mine = (packed["doc_ids"][0] == d) & (packed["segment_ids"][0] != segments.PAD)
        ref = unpacked["segment_ids"][row] != segments.PAD
        torch.testing.assert_close(lp[0][mine], lu[row][ref], rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_changes_nothing(tiny_dirs, photos):
    """Mirage's reproduction gap came from gradient checkpointing: same loss, same gradients."""
    grads = []
    for ckpt in (False, True):
        bb = make_backbone(tiny_dirs, "qwen2_5_vl", **{"model.gradient_checkpointing": str(ckpt).lower()})
        m = bb.model.train()
        col = LivrCollator(bb.adapter, bb.processor, bb.latent_ids)
        loss = m(col([sample(photos[:1]), sample(photos[1:2], "b", answer="B")]), "bottleneck")
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and all(g1[n] is not None for n in g1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["qwen2_5_vl_3b", "qwen3_vl_4b"])
def test_published_architectures_have_the_released_size(name):
    """arch:<name> (the bench's real-size models) rebuilds the released config.json: built on the meta
    device, its parameter count equals the released checkpoint's, to the parameter."""
    from livr_ds.models import get_adapter
    from livr_ds.models.archs import PUBLISHED, build_random

    spec = PUBLISHED[name]
    adapter = get_adapter(spec["family"])
    processor, model = build_random(f"arch:{name}", adapter, dtype=torch.bfloat16, attn_implementation="sdpa",
                                    device="meta")
    assert sum(p.numel() for p in model.parameters()) == spec["params"]
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(adapter.image_token)
    assert processor.image_processor.patch_size == spec["vision"]["patch_size"]
    _, two = build_random(f"arch:{name}:2", adapter, dtype=torch.bfloat16, attn_implementation="sdpa",
                          device="meta")
    assert adapter.text_config(two).num_hidden_layers == 2


def test_published_architecture_errors():
    from livr_ds.models import get_adapter
    from livr_ds.models.archs import arch_config, arch_spec

    with pytest.raises(ValueError, match="unknown architecture 'qwen9'"):
        arch_spec("arch:qwen9")
    with pytest.raises(ValueError, match="positive integer"):
        arch_spec("arch:qwen3_vl_4b:zero")
    adapter = get_adapter("qwen2_5_vl")
    with pytest.raises(ValueError, match="is a qwen3_vl architecture but model.family is 'qwen2_5_vl'"):
        arch_config("arch:qwen3_vl_4b", adapter, adapter.build_tiny_processor())


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_flex_backend_forward_equals_sdpa(tiny_dirs, photos, family):
    """The GPU path's wiring, run forward-only on CPU (flex has no CPU backward): the BlockMask reaches
    every text layer through transformers' flex integration, and logits equal the sdpa path's under
    both policies, on padded and packed rows; the flex batch padded to the block size as training
    pads it (the sdpa one is not), which changes no real position's logits."""
    torch._dynamo.reset()  # transformers compiles flex; a recompile for a 2nd model hits an inductor CPU bug
    samples = [sample(photos[:1], "a"), sample(photos[1:3], "b", choices=(), answer="12"),
               sample([photos[3]], "c", answer="B")]
    logits = {}
    for backend in ("sdpa", "flex"):
        bb = make_backbone(tiny_dirs, family, **{"model.attn_backend": backend})
        assert bb.model.backend == backend
        m = bb.model.eval()
        for packing in (False, True):
            batch = LivrCollator(bb.adapter, bb.processor, bb.latent_ids, max_tokens=512, packing=packing,
                                 pad_to_multiple=segments.pad_multiple(backend))(samples)
            assert (batch["input_ids"].shape[1] % segments.FLEX_BLOCK == 0) is (backend == "flex")
            real = batch["segment_ids"] != segments.PAD
            with torch.no_grad():
                for policy in ("bottleneck", "standard"):
                    logits[(backend, packing, policy)] = m.logits(batch, policy)[real]
    for packing in (False, True):
        for policy in ("bottleneck", "standard"):
            torch.testing.assert_close(logits[("flex", packing, policy)], logits[("sdpa", packing, policy)],
                                       rtol=1e-4, atol=1e-5)
        assert not torch.allclose(logits[("flex", packing, "bottleneck")], logits[("flex", packing, "standard")])


# ---- ZeRO-3 lockstep: every rank enters every partitioned module on every forward --------------

@pytest.mark.parametrize("family", FAMILIES)
def test_lockstep_runs_the_vision_tower_on_a_batch_without_images(tiny_dirs, photos, family):
    """A rank whose batch holds no image still enters the vision tower and projector (on a blank
    image, output discarded) under lockstep, and computes the same loss; without lockstep it skips
    them. Under ZeRO-3 a skipped module is an all-gather the other ranks wait on forever."""
    bb = make_backbone(tiny_dirs, family)
    col = LivrCollator(bb.adapter, bb.processor, bb.latent_ids)
    text_only = col([sample([], "a", question="Is 2 more than 1?"), sample([], "b", question="Is 3 odd?")])
    assert "pixel_values" not in text_only
    calls = []
    hooks = [mod.register_forward_hook(lambda *_: calls.append(1)) for mod in bb.adapter.vision_modules(bb.model.hf_model)]
    m = bb.model.train()
    free = m(text_only, "bottleneck")
    assert not calls
    m.lockstep = True
    locked = m(text_only, "bottleneck")
    assert len(calls) == len(hooks) > 0
    assert torch.equal(free, locked)
    with_images = col([sample(photos[:1], "c")])
    calls.clear()
    m(with_images, "bottleneck")  # the batch's own images: no extra blank-image pass
    assert len(calls) == len(hooks)


def test_a_batch_without_answer_tokens_still_runs_the_lm_head(tiny_dirs, photos):
    """Padding-only micro-batches (equal batch counts across ranks): zero loss, zero gradients,
    and the LM head entered all the same."""
    bb = make_backbone(tiny_dirs, "qwen2_5_vl")
    col = LivrCollator(bb.adapter, bb.processor, bb.latent_ids)
    batch = col([sample(photos[:1], "a")])
    batch["labels"][:] = -100
    heads = []
    bb.model.hf_model.lm_head.register_forward_hook(lambda *_: heads.append(1))
    loss = bb.model.train()(batch, "bottleneck")
    loss.backward()
    assert heads and loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in bb.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_leaves_the_frozen_vision_tower_without_a_graph(tiny_dirs, photos, family):
    """transformers' enable_input_require_grads would also hook the vision tower's patch embedding:
    the frozen tower would then be recomputed and backpropagated (and under ZeRO-3 gathered again)."""
    bb = make_backbone(tiny_dirs, family, **{"model.gradient_checkpointing": "true"})
    graphs = []
    for mod in bb.adapter.vision_modules(bb.model.hf_model):
        mod.register_forward_hook(lambda m, a, out: graphs.append(
            any(t.requires_grad for t in (out if isinstance(out, (tuple, list)) else [getattr(out, "last_hidden_state", out)])
                if torch.is_tensor(t))))
    col = LivrCollator(bb.adapter, bb.processor, bb.latent_ids)
    loss = bb.model.train()(col([sample(photos[:1], "a")]), "bottleneck")
    loss.backward()
    assert graphs and not any(graphs)
    assert bb.model.latent_rows.weight.grad is not None and bb.model.latent_rows.weight.grad.any()
