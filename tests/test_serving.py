"""Exports served by stock tools behave as trained: the chat template adds the latents, the
generation config decodes as `livr-ds eval`, the card is the run's.

For each family (tied and untied heads, the released quirks: rows beyond the tokenizer, the default
system prompt), a tiny model with random LoRA and latent rows is exported and merged once; then
plain transformers (the export's own tokenizer, image processor and template, `generate` with its
own generation_config, the `image-text-to-text` pipeline) and PEFT (the adapter export on its base)
must give `livr-ds eval --mode standard`'s answers on every test sample of the demo shards. The
processor is built from the export's files with transformers' own classes: `AutoProcessor` needs
torchvision for these families' video processors, which this CPU machine does not install (the
`AutoProcessor` test runs where it is).
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

from livr_ds.config import load_config
from livr_ds.data.collate import LivrCollator, format_question
from livr_ds.evaluation.loop import iter_samples
from livr_ds.models import get_adapter
from tests.conftest import TINY_SPARE_ROWS

K = 4
# (family, tied head, spare table rows, default system prompt)
CASES = [("qwen2_5_vl", True, TINY_SPARE_ROWS, True), ("qwen2_5_vl", False, TINY_SPARE_ROWS, True),
         ("qwen3_vl", True, TINY_SPARE_ROWS, False), ("qwen3_vl", False, 0, False), ("llava_onevision", False, 0, False)]
IDS = [f"{c[0]}-{'tied' if c[1] else 'untied'}" for c in CASES]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Every demo task (one- and multi-image prompts), two test samples each."""
    out = tmp_path_factory.mktemp("serving_demo")
    subprocess.run([sys.executable, "-m", "livr_ds.cli", "shards", "demo", "--out", str(out), "--n-train", "1",
                    "--n-val", "1", "--n-test", "2", "--no-progress"], check=True, capture_output=True)
    samples = [s for _, batch in iter_samples(str(out), "test", 0, 1, 8) for s in batch]
    assert len({s.task for s in samples}) == 4 and any(len(s.images) > 1 for s in samples)
    return SimpleNamespace(path=str(out), samples=samples)


def livr_eval(ckpt: str, demo, out: str) -> dict:
    """`livr-ds eval --mode standard` as users run it: key -> prediction."""
    from livr_ds.cli import main

    assert main(["eval", "--ckpt", ckpt, "--data", demo.path, "--mode", "standard", "--out", out]) == 0
    with open(out.removesuffix(".json") + ".predictions.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == len(demo.samples)
    return {r["key"]: r["prediction"] for r in records}


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def served(request, demo, tmp_path_factory):
    """A tiny model with random LoRA and latent rows: its adapter export, the merged export, and what
    `livr-ds eval` answers with each."""
    from livr_ds.export import merge_export, save_export
    from livr_ds.modeling import build_backbone

    family, tied, spare, system_prompt = request.param
    tmp = tmp_path_factory.mktemp(f"serving_{family}_{tied}")
    base = get_adapter(family).write_tiny(str(tmp / "base"), seed=0, tied=tied, spare_rows=spare,
                                          system_prompt=system_prompt)
    cfg = load_config(None, [f"model.family={family}", f"model.path={base}", f"latents.num={K}", "lora.dropout=0.0"])
    bb = build_backbone(cfg, policy="standard")
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero and latent rows at the mean: make both matter
        for name, p in bb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif name == "latent_rows.weight":
                p.normal_(0, 0.5)
    adapter_dir = save_export(bb, cfg, 1, str(tmp / "final"))
    merged_dir = merge_export(adapter_dir, str(tmp / "merged"))
    return SimpleNamespace(family=family, tied=tied, base=base, bb=bb, adapter_dir=adapter_dir, merged_dir=merged_dir,
                           latents="".join(bb.processor.tokenizer.convert_ids_to_tokens(bb.latent_ids)),
                           want_merged=livr_eval(merged_dir, demo, str(tmp / "merged.json")),
                           want_adapter=livr_eval(adapter_dir, demo, str(tmp / "adapter.json")))


def stock_processor(family: str, path: str):
    """What `AutoProcessor.from_pretrained(path)` builds, from transformers' classes and the files
    alone (the tokenizer reads chat_template.jinja), minus the video processor."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    settings = {}
    if os.path.isfile(os.path.join(path, "processor_config.json")):  # e.g. LLaVA's image token count
        with open(os.path.join(path, "processor_config.json")) as f:
            settings = {k: v for k, v in json.load(f).items() if k != "processor_class"}
    return get_adapter(family).processor_class(image_processor=AutoImageProcessor.from_pretrained(path),
                                               tokenizer=tokenizer, video_processor=None,
                                               chat_template=tokenizer.chat_template, **settings)


def messages(sample, with_images=True):
    images = [{"type": "image", "image": im} if with_images else {"type": "image"} for im in sample.images]
    return [{"role": "user", "content": images + [{"type": "text", "text": format_question(sample.question,
                                                                                            sample.choices)}]}]


def chat(processor, conversation, **kwargs):
    return processor.apply_chat_template(conversation, tokenize=False, **kwargs)


def generate_answers(model, processor, samples, **template_kwargs) -> dict:
    out = {}
    for s in samples:
        inputs = processor.apply_chat_template(messages(s), add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt", **template_kwargs)
        with torch.no_grad():
            ids = model.generate(**inputs)  # the export's generation_config.json: no arguments
        out[s.key] = processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return out


@pytest.mark.parametrize("which", ["adapter_dir", "merged_dir"])
def test_template_adds_latents_after_the_generation_prompt_only(served, which):
    base = get_adapter(served.family).load_processor(served.base)
    export = stock_processor(served.family, getattr(served, which))
    assert os.path.isfile(os.path.join(getattr(served, which), "chat_template.jinja"))
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which is brighter?"}]}]
    turns = user + [{"role": "assistant", "content": [{"type": "text", "text": "(A)"}]},
                    {"role": "user", "content": [{"type": "text", "text": "Are you sure?"}]}]
    for conversation in (user, turns):
        prompt = chat(export, conversation, add_generation_prompt=True)
        assert prompt == chat(base, conversation, add_generation_prompt=True) + served.latents
        assert prompt.count(served.latents) == 1  # the last assistant turn only
        # a finished conversation, and the latents turned off: the base template's output, byte for byte
        assert chat(export, conversation) == chat(base, conversation)
        assert served.latents not in chat(export, conversation)
        dropped = chat(export, conversation, add_generation_prompt=True, add_latents=False)
        assert dropped == chat(base, conversation, add_generation_prompt=True)
    # the tokenizer alone (no processor) renders the same
    assert export.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) \
        == chat(export, user, add_generation_prompt=True)


def test_latents_are_special_tokens_never_decoded(served):
    tok = stock_processor(served.family, served.merged_dir).tokenizer
    ids = served.bb.latent_ids
    assert tok.convert_ids_to_tokens(ids) == served.bb.processor.tokenizer.convert_ids_to_tokens(ids)
    assert set(ids) <= set(tok.all_special_ids)
    assert tok.decode(ids, skip_special_tokens=True) == ""
    assert tok.decode([*tok.encode("7", add_special_tokens=False), *ids], skip_special_tokens=True) == "7"


def test_rendered_prompt_is_the_collators_token_for_token(served, demo):
    """The export's processor + template give exactly the ids livr-ds feeds: prompt, then latents."""
    processor = stock_processor(served.family, served.merged_dir)
    collator = LivrCollator(served.bb.adapter, served.bb.processor, served.bb.latent_ids, with_answer=False)
    for s in demo.samples:
        encoded = collator.encode(s)
        ours = encoded.input_ids[:encoded.prompt_len]
        assert ours[-K:] == served.bb.latent_ids
        theirs = processor.apply_chat_template(messages(s), add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        assert theirs["input_ids"][0].tolist() == ours, s.key
        for key, value in encoded.vision.items():
            assert torch.equal(theirs[key], value), (s.key, key)


def test_generation_config_is_livr_ds_evals_decoding(served):
    from transformers import GenerationConfig

    from livr_ds.evaluation.generate import DEFAULT_MAX_NEW_TOKENS, banned_ids

    collator = LivrCollator(served.bb.adapter, served.bb.processor, served.bb.latent_ids, with_answer=False)
    rows = served.bb.model.hf_model.get_input_embeddings().weight.shape[0]
    for path in (served.adapter_dir, served.merged_dir):
        gen = GenerationConfig.from_pretrained(path)
        assert (gen.do_sample, gen.num_beams, gen.max_new_tokens, gen.repetition_penalty) == \
            (False, 1, DEFAULT_MAX_NEW_TOKENS, 1.0)
        assert gen.eos_token_id == collator.eos_id
        assert gen.suppress_tokens == banned_ids(collator, rows)
        assert set(served.bb.latent_ids) <= set(gen.suppress_tokens)
        if served.family != "llava_onevision":  # released Qwen tables: rows beyond the tokenizer
            assert rows - 1 in gen.suppress_tokens or rows == len(served.bb.processor.tokenizer)


def test_merged_export_answers_as_livr_ds_eval_through_plain_transformers(served, demo):
    from transformers import AutoModelForImageTextToText, pipeline

    model = AutoModelForImageTextToText.from_pretrained(served.merged_dir).eval()
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == served.tied
    processor = stock_processor(served.family, served.merged_dir)
    assert generate_answers(model, processor, demo.samples) == served.want_merged
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    for s in demo.samples:
        (out,) = pipe(text=messages(s), return_full_text=False)
        assert out["generated_text"].strip() == served.want_merged[s.key], s.key
    # The check can fail: without the latents the same model answers otherwise.
    dropped = generate_answers(model, processor, demo.samples, add_latents=False)
    assert dropped != served.want_merged


def test_adapter_export_answers_as_livr_ds_eval_through_peft(served, demo):
    """The card's PEFT recipe: the base, its table grown to the export's tokenizer, the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, GenerationConfig

    base = AutoModelForImageTextToText.from_pretrained(served.base)
    processor = stock_processor(served.family, served.adapter_dir)
    if base.get_input_embeddings().weight.shape[0] < len(processor.tokenizer):
        base.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    base.generation_config = GenerationConfig.from_pretrained(served.adapter_dir)  # PeftModel.generate uses the base's
    model = PeftModel.from_pretrained(base, served.adapter_dir).eval()
    assert generate_answers(model, processor, demo.samples) == served.want_adapter


def test_merged_export_loads_with_auto_processor(served, demo):
    pytest.importorskip("torchvision")  # these families' AutoProcessor builds a video processor
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(served.merged_dir)
    ours = stock_processor(served.family, served.merged_dir)
    for s in demo.samples:
        assert chat(processor, messages(s, with_images=False), add_generation_prompt=True) == \
            chat(ours, messages(s, with_images=False), add_generation_prompt=True)


def test_card_is_the_hub_format_and_names_how_to_serve(served):
    for path, library in ((served.adapter_dir, "peft"), (served.merged_dir, "transformers")):
        text = open(os.path.join(path, "README.md")).read()
        assert text.startswith("---\n")
        front = yaml.safe_load(text.split("---", 2)[1])
        assert front["library_name"] == library and front["pipeline_tag"] == "image-text-to-text"
        assert {"livr-ds", served.family} <= set(front["tags"])
        assert served.latents in text  # the one rule, with this export's tokens
        with open(os.path.join(path, "livr.json")) as f:
            meta = json.load(f)
        from livr_ds.export import render_card

        assert text == render_card(meta)  # generated from the record, nothing by hand
    merged_meta = json.load(open(os.path.join(served.merged_dir, "livr.json")))
    assert merged_meta["training"] == json.load(open(os.path.join(served.adapter_dir, "livr.json")))["training"]
