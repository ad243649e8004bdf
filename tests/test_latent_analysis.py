"""`livr-ds analyze latents` (livr_ds/evaluation/latent_analysis.py, latent_states.py): the
interventions are exact where they should change nothing, reach the answer where they should,
and the command writes the schema the report reads."""

import json
import math
import os

import numpy as np
import pytest
import torch

from livr_ds.evaluation import generate, latent_states as ls, loop
from livr_ds.evaluation.latent_analysis import perturb_images, proportion, wilson_interval
from livr_ds.inference import get_mode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from livr_ds.data.demo import make_demo

    out = str(tmp_path_factory.mktemp("latent_demo"))
    make_demo(out, seed=0, n_train=0, n_val=0, n_test=4, tasks=["counting", "localization"])
    return out


@pytest.fixture(scope="module")
def export(tiny_dirs, tmp_path_factory):
    """An untrained LoRA export of the tiny Qwen2.5-VL (random latent rows): as test_eval.py's."""
    from livr_ds.config import load_config
    from livr_ds.export import save_export
    from livr_ds.modeling import build_backbone

    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                      [f"model.path={tiny_dirs['qwen2_5_vl']}", f"latents.num={K}", "model.trainable=lora", "stage=2"])
    backbone = build_backbone(cfg, policy="standard")
    return save_export(backbone, cfg, 2, str(tmp_path_factory.mktemp("latent_exp") / "lora"),
                       extra={"epoch": 1, "global_step": 1})


@pytest.fixture(scope="module")
def loaded(export, demo):
    backbone = loop.load_model(export)
    backbone.model.eval()
    samples = [s for _, ss in loop.iter_samples([demo], "test", 0, 1, 8) for s in ss]
    return backbone, samples


def _collator(backbone, mode):
    return loop.make_collator(backbone, get_mode(mode), with_answer=False)


@pytest.mark.parametrize("mode", ["standard", "bottleneck"])
def test_swapping_in_a_samples_own_states_changes_nothing(loaded, mode):
    """Own states spliced into the cache: the same tokens as no intervention and as the eval
    loop's greedy decoding, and the same logits at every step, bit for bit."""
    backbone, samples = loaded
    col, policy = _collator(backbone, mode), get_mode(mode).policy
    for s in samples[:3]:
        pre = ls.prefill(backbone.model, col, s, policy)
        own = pre.states.map(torch.clone)
        ids, logits = ls.decode(backbone.model, col, pre, policy, None, max_new_tokens=6)
        ids2, logits2 = ls.decode(backbone.model, col, pre, policy, own, max_new_tokens=6)
        assert ids == ids2 and torch.equal(logits, logits2)
        assert ids == generate.greedy_ids(backbone.model, col, [s], policy, 6)[0]
        # a second prefill gives the same states (the analysis re-makes caches in its second pass)
        again = ls.prefill(backbone.model, col, s, policy)
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(pre.states.kv, again.states.kv))
        assert torch.equal(pre.states.out, again.states.out)


def _forced(backbone, col, pre, policy, states, tokens):
    return ls.decode(backbone.model, col, pre, policy, states, force=tokens)[1]


def test_under_the_bottleneck_a_swap_reaches_the_answer_and_zeroed_latents_cut_the_image(loaded):
    backbone, samples = loaded
    col, policy = _collator(backbone, "bottleneck"), "bottleneck"
    tokens = col.processor.tokenizer("(A)", add_special_tokens=False)["input_ids"] + [col.eos_id]
    rec, donor = samples[0], samples[1]
    pre, pre_d = (ls.prefill(backbone.model, col, s, policy) for s in (rec, donor))
    base = _forced(backbone, col, pre, policy, None, tokens)
    # The donor's keys and values only (the recipient's own last-latent output kept): the first
    # token's logits are the recipient's, every answer token's after it changes.
    kv_only = ls.LatentStates(pre_d.states.kv, pre.states.out)
    swapped = _forced(backbone, col, pre, policy, kv_only, tokens)
    assert torch.equal(swapped[0], base[0])
    for step in range(1, len(tokens)):
        assert not torch.allclose(swapped[step], base[step])
    # The full swap also replaces the first token's source.
    assert not torch.allclose(_forced(backbone, col, pre, policy, pre_d.states, tokens)[0], base[0])

    # The same prompt with a different image (same size, so the same positions).
    other = perturb_images(rec, 0.3, np.random.default_rng(0))
    pre_o = ls.prefill(backbone.model, col, other, policy)
    assert torch.equal(pre_o.seg, pre.seg)
    # With their own latents the image reaches the answer through them...
    assert not torch.allclose(_forced(backbone, col, pre_o, policy, None, tokens), base)
    # ...zeroed, nothing of the image does: every logit identical.
    zero_a = _forced(backbone, col, pre, policy, ls.zeroed(pre.states), tokens)
    zero_b = _forced(backbone, col, pre_o, policy, ls.zeroed(pre_o.states), tokens)
    assert torch.equal(zero_a, zero_b)
    # Under the standard mask the answer sees the image directly: zeroed latents do not cut it.
    col_s = _collator(backbone, "standard")
    std_a, std_b = (ls.prefill(backbone.model, col_s, s, "standard") for s in (rec, other))
    assert not torch.allclose(_forced(backbone, col_s, std_a, "standard", ls.zeroed(std_a.states), tokens),
                              _forced(backbone, col_s, std_b, "standard", ls.zeroed(std_b.states), tokens))


def test_matched_noise_keeps_every_vectors_norm(loaded):
    backbone, samples = loaded
    pre = ls.prefill(backbone.model, _collator(backbone, "standard"), samples[0], "standard")
    noisy = ls.matched_noise(pre.states, torch.Generator().manual_seed(0))
    for (k, v), (nk, nv) in zip(pre.states.kv, noisy.kv):
        assert torch.allclose(k.norm(dim=-1), nk.norm(dim=-1), rtol=1e-4)
        assert torch.allclose(v.norm(dim=-1), nv.norm(dim=-1), rtol=1e-4)
        assert not torch.allclose(k, nk)
    mean = ls.mean_states([pre.states, ls.zeroed(pre.states)])
    assert torch.allclose(mean.out, pre.states.out.float() / 2)


def test_cli_writes_analysis_json_and_the_report_shows_it(export, demo, tmp_path):
    from livr_ds.cli import main
    from livr_ds.report.write import write_report

    run = tmp_path / "run"
    (run / "stage2").mkdir(parents=True)
    (run / "stage2" / "metrics.jsonl").write_text("")
    out = run / "analysis"
    assert main(["analyze", "latents", "--ckpt", export, "--data", demo, "--max-samples", "6", "--seed", "1",
                 "--max-new-tokens", "4", "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert data["kind"] == "latent_analysis" and data["n"] == 6 and data["num_latents"] == K
    assert set(data["modes"]) == {"standard", "bottleneck"}
    for m in data["modes"].values():
        assert set(m["accuracy"]) == {"none", "zeroed", "mean", "noise"}
        for a in m["accuracy"].values():
            assert a["n"] == 6 and 0 <= a["ci95"][0] <= a["accuracy"] <= a["ci95"][1] <= 1
        sw = m["swap"]
        assert sw["n"] == 6 and math.isclose(sw["follow_donor"] + sw["follow_recipient"] + sw["neither"], 1.0)
        assert 0 <= sw["aligned"] <= sw["n"]
        sens = m["sensitivity"]
        assert len(sens["cross_sample_cosine"]) == len(sens["perturbed_cosine"]) == len(sens["layers"]) >= 2
        assert all(-1 - 1e-9 <= c <= 1 + 1e-9 for c in sens["cross_sample_cosine"] + sens["perturbed_cosine"])
        assert m["probe"]["n_test"] + m["probe"]["n_train"] == 6
        assert len(m["predictions"]) == 6
    assert data["provenance"]["seed"] == 1
    assert (out / "sensitivity.png").is_file()
    paths = write_report([str(run)], str(tmp_path / "report"))
    md = open(paths["md"]).read()
    assert "## Latent analysis" in md and "| bottleneck | 6 |" in md


def test_cli_refuses_a_mode_without_latents(export, demo, tmp_path):
    from livr_ds.cli import main

    with pytest.raises(SystemExit):
        main(["analyze", "latents", "--ckpt", export, "--data", demo, "--mode", "no_latents", "--out", str(tmp_path)])


@pytest.mark.parametrize("k,n,lo,hi", [(5, 10, 0.2365931, 0.7634069), (0, 10, 0.0, 0.2775328),
                                       (10, 10, 0.7224672, 1.0), (50, 100, 0.4038315, 0.5961685),
                                       (1, 3, None, None), (81, 263, None, None)])
def test_wilson_interval_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    if lo is None:  # the bounds are the roots of (k/n - p)^2 = z^2 p (1 - p) / n in p
        z2 = 1.959963984540054 ** 2
        a, b, c = 1 + z2 / n, -(2 * k / n + z2 / n), (k / n) ** 2
        lo, hi = sorted(np.roots([a, b, c]).real)
    assert got[0] == pytest.approx(lo, abs=1e-4) and got[1] == pytest.approx(hi, abs=1e-4)
    # symmetric: the interval of the failures is the mirror image
    mirror = wilson_interval(n - k, n)
    assert got[0] == pytest.approx(1 - mirror[1], abs=1e-12) and got[1] == pytest.approx(1 - mirror[0], abs=1e-12)
    assert proportion(k, n)["ci95"] == list(got)


@pytest.mark.parametrize("family,tied", [("qwen3_vl", False), ("llava_onevision", False), ("qwen3_vl", True)],
                         ids=["qwen3_vl", "llava_onevision", "qwen3_vl-tied"])
def test_own_states_change_nothing_in_every_family(family, tied, tiny_dirs, tiny_tied_dirs, demo, tmp_path):
    """The splice-and-decode path of the other families (M-RoPE of Qwen3-VL, LLaVA-OneVision's
    1-D positions, a tied head with rows beyond the tokenizer): the sample's own states reproduce
    the eval loop's greedy tokens and logits bit for bit, under both masks."""
    from livr_ds.config import load_config
    from livr_ds.export import save_export
    from livr_ds.modeling import build_backbone

    path = (tiny_tied_dirs if tied else tiny_dirs)[family]
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                      [f"model.path={path}", f"model.family={family}", f"latents.num={K}", "model.trainable=lora",
                       "stage=2"])
    export = save_export(build_backbone(cfg, policy="standard"), cfg, 2, str(tmp_path / "lora"),
                         extra={"epoch": 1, "global_step": 1})
    backbone = loop.load_model(export)
    backbone.model.eval()
    sample = next(s for _, ss in loop.iter_samples([demo], "test", 0, 1, 8) for s in ss)
    for mode in ("standard", "bottleneck"):
        col, policy = _collator(backbone, mode), get_mode(mode).policy
        pre = ls.prefill(backbone.model, col, sample, policy)
        ids, logits = ls.decode(backbone.model, col, pre, policy, None, max_new_tokens=6)
        ids2, logits2 = ls.decode(backbone.model, col, pre, policy, pre.states.map(torch.clone), max_new_tokens=6)
        assert ids == ids2 and torch.equal(logits, logits2)
        assert ids == generate.greedy_ids(backbone.model, col, [sample], policy, 6)[0]


def test_linear_probe_reads_a_label_that_is_in_the_states_and_not_one_that_is_not():
    """The probe finds a label written linearly into the features (held-out accuracy near 1) and
    stays near the majority baseline for labels drawn independently of them."""
    from livr_ds.evaluation.latent_analysis import linear_probe

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    labels = ["ABC"[int(i)] for i in x[:, :3].argmax(1)]
    found = linear_probe(x, labels, seed=0)
    assert found["n_test"] == 60 and found["n_train"] == 140 and found["accuracy"] >= 0.9
    rng = np.random.default_rng(1)
    noise = linear_probe(x, [str(rng.integers(3)) for _ in range(200)], seed=0)
    assert noise["accuracy"] <= noise["majority_baseline"] + 0.2 and noise["ci95"][0] < 0.5
    few = linear_probe(x[:2], ["A", "B"], seed=0)
    assert few["accuracy"] is None and "too few" in few["reason"]
