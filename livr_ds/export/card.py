"""The model card (README.md) of every export, in the hub's format (YAML front matter, then
Markdown), generated from the run and never written by hand.

What a card says comes from livr.json: `training_record` collects it when the export is written
(the recipe from the config, the data's sample counts from the shard manifests, every validation
from metrics.jsonl, and, for Stage 2, Stage 1's record from the export it started from), and
`render_card` turns livr.json into the card. A merge renders the same record again, so an adapter
export and its merged model describe one training.
"""

from __future__ import annotations

import json
import os
import re

import yaml

from ..inference import MODES
from .serving import LATENT_SWITCH



# ---- what a run records -----------------------------------------------------------------------

def _source_counts(path: str, split: str) -> dict:
    """A data source as the card lists it: its samples per task in `split` (from manifest.json)."""
    manifest = os.path.join(path, "manifest.json")
    entry = {"path": path, "split": split}
    if os.path.isfile(manifest):
        with open(manifest) as f:
            info = (json.load(f).get("splits") or {}).get(split) or {}
        entry.update(samples=info.get("total"), tasks=info.get("tasks") or {})
    return entry


def best_validation(history: list[dict]) -> dict | None:
    """The first epoch with the highest mean: the one training kept as export/best."""
    best = None
    for entry in history:
        if best is None or entry["mean"] > best["mean"]:
            best = entry
    return best


def training_record(cfg, stage: int, validation: list[dict], init_from: str | None) -> dict:
    """livr.json's `training`: every stage so far (Stage 1's own record comes from the export Stage 2
    started from), each with its recipe, data and `validation` (report.run.validation_history)."""
    earlier = []
    if init_from and os.path.isfile(os.path.join(init_from, "livr.json")):
        with open(os.path.join(init_from, "livr.json")) as f:
            earlier = (json.load(f).get("training") or {}).get("stages") or []
    o = cfg.optim
    this = {
        "stage": stage, "mask": cfg.policy(stage), "epochs": cfg.epochs(stage),
        "recipe": {"optimizer": "AdamW", "lr": o.lr, "weight_decay": o.weight_decay, "betas": list(o.betas),
                   "warmup_ratio": o.warmup_ratio, "schedule": "linear warmup + cosine", "grad_clip": o.grad_clip,
                   "global_batch_size": o.global_batch_size, "micro_batch_size": o.micro_batch_size,
                   "dtype": cfg.model.dtype, "deepspeed": os.path.basename(cfg.deepspeed), "seed": cfg.seed},
        "train_data": [_source_counts(s.path, cfg.data.train_split) for s in cfg.data.train],
        "val_data": [_source_counts(s.path, cfg.data.val_split) for s in cfg.data.val],
        "validation": validation,
        "init_from": init_from,
    }
    return {"experiment": cfg.name, "stages": [s for s in earlier if s.get("stage") != stage] + [this]}


# ---- the card -----------------------------------------------------------------------------------

# Licenses of the released bases, by the directory / repository name a checkpoint is usually kept
# under (each release's model card on the hub): used when the base's own README.md has none.
KNOWN_LICENSES = (
    (r"Qwen2\.5-VL-(7B|32B)", "apache-2.0"),
    (r"Qwen2\.5-VL-3B", "other"),  # Qwen RESEARCH LICENSE
    (r"Qwen2\.5-VL-72B", "other"),  # Qwen LICENSE AGREEMENT
    (r"Qwen3-VL-", "apache-2.0"),
    (r"llava-onevision", "apache-2.0"),
)


def _front_matter(path: str) -> dict:
    readme = os.path.join(path, "README.md")
    if not os.path.isfile(readme):
        return {}
    with open(readme) as f:
        text = f.read()
    if not text.startswith("---"):
        return {}
    try:
        data = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def hub_id(base_path: str) -> str | None:
    """The hub repository of a local base checkpoint, where its path tells it (the hub cache's
    models--ORG--NAME/snapshots/REV layout)."""
    m = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", base_path)
    return f"{m.group(1)}/{m.group(2)}" if m else None


def base_license(base_path: str) -> str | None:
    license_ = _front_matter(base_path).get("license") if os.path.isdir(base_path) else None
    if license_:
        return license_
    for pattern, name in KNOWN_LICENSES:
        if re.search(pattern, base_path, re.IGNORECASE):
            return name
    return None


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _validation_table(history: list[dict]) -> list[str]:
    tasks = sorted({t for h in history for t in h["per_task"]})
    lines = ["| epoch | step | mean | " + " | ".join(tasks) + " |", "|---" * (3 + len(tasks)) + "|"]
    for h in history:
        lines.append(f"| {h['epoch']} | {h['step']} | {_pct(h['mean'])} | "
                     + " | ".join(_pct(h["per_task"].get(t)) for t in tasks) + " |")
    return lines


def _data_lines(sources: list[dict]) -> list[str]:
    out = []
    for s in sources:
        if s.get("samples") is None:
            out.append(f"- `{s['path']}` ({s['split']}; no manifest.json, counts unknown)")
        else:
            tasks = ", ".join(f"{t} {n}" for t, n in sorted(s["tasks"].items()))
            out.append(f"- `{s['path']}` ({s['split']}): {s['samples']} samples ({tasks})")
    return out


def render_card(meta: dict) -> str:
    merged = bool(meta.get("merged"))
    training = meta.get("training") or {"stages": []}
    latents = meta["latents"]
    base = meta["base_model"]
    front = {"base_model": hub_id(base), "library_name": "transformers" if merged else "peft",
             "pipeline_tag": "image-text-to-text", "license": base_license(base),
             "tags": ["livr-ds", "livr", "latent-visual-reasoning", meta["family"]]
             + ([] if merged else ["lora"])}
    front = {k: v for k, v in front.items() if v is not None}
    name = training.get("experiment") or "livr-ds model"
    tokens = "".join(latents["tokens"])
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        f"A {'merged model' if merged else 'LoRA adapter'} trained with livr-ds: Latent Implicit Visual Reasoning "
        f"on `{base}` ({meta['family']}), {latents['num']} latent tokens"
        f"{' (one shared token)' if latents.get('shared') else ''}, stage {meta['stage']} ({meta['policy']} mask). "
        "Generated from the run by livr-ds; livr.json holds the same record.", "",
        "## The one rule: latents after the prompt", "",
        f"The model was trained with its prompt ending in the {latents['num']} latent tokens right after the "
        "assistant header, and only behaves as trained when it does. This export's chat template adds them "
        "whenever `add_generation_prompt=True` (and never to earlier turns or to a finished conversation), so "
        "every tool that uses the template gets them. A prompt built by hand must end with them too:", "",
        f"    {tokens}", "",
        f"`apply_chat_template(..., add_generation_prompt=True, {LATENT_SWITCH}=False)` leaves them out (the "
        "paper's 'latents dropped' condition). They are special tokens: `decode(..., skip_special_tokens=True)` "
        "never shows them.", "",
        "generation_config.json decodes as `livr-ds eval` does: greedy, at most "
        f"{meta.get('generation', {}).get('max_new_tokens', 8)} new tokens, stopping at the trained eos, with "
        "the latent tokens, the other special tokens and the table rows beyond the tokenizer suppressed "
        "(`suppress_tokens`). Pass `max_new_tokens=` for longer answers.", "",
        "## What was trained", "",
    ]
    lora = meta.get("lora") or {}
    lines.append(f"Trainable: {meta.get('trainable')}"
                 + (f" (LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, on "
                    f"`{lora.get('target_regex')}`) and the {len(set(latents['ids']))} latent embedding rows; "
                    "the vision tower and projector frozen" if meta.get("trainable") == "lora" else "")
                 + f". Compute dtype {meta.get('dtype')}; at most {meta.get('max_tokens')} tokens a sample.")
    lines.append("")
    for st in training["stages"]:
        r = st["recipe"]
        lines += [f"### Stage {st['stage']} ({st['mask']} mask, {st['epochs']} epochs)", "",
                  f"AdamW lr {r['lr']}, weight decay {r['weight_decay']}, betas {tuple(r['betas'])}, "
                  f"{r['warmup_ratio']:.0%} warmup then cosine, grad clip {r['grad_clip']}, global batch "
                  f"{r['global_batch_size']} (micro-batch {r['micro_batch_size']}), {r['dtype']}, DeepSpeed "
                  f"`{r['deepspeed']}`, seed {r['seed']}.", "", "Training data:"]
        lines += _data_lines(st["train_data"]) or ["- (none recorded)"]
        if st["val_data"]:
            lines += ["", "Validation data:"] + _data_lines(st["val_data"])
        lines.append("")
        history = st["validation"]
        if history:
            best = best_validation(history)
            final = history[-1]
            lines += [f"Validation accuracy (%, standard mode; mean over tasks): best {_pct(best['mean'])} at "
                      f"epoch {best['epoch']}, final {_pct(final['mean'])} at epoch {final['epoch']}.", ""]
            lines += _validation_table(history) + [""]
        else:
            lines += ["No validation was run in this stage.", ""]
    if meta.get("val_accuracy") is not None:
        lines += [f"This export is the best validation checkpoint (epoch {meta.get('epoch')}, "
                  f"mean {_pct(meta['val_accuracy'])}).", ""]
    elif meta.get("global_step") is not None:
        lines += [f"This export is the stage's final checkpoint (epoch {meta.get('epoch')}, "
                  f"step {meta['global_step']}).", ""]
    lines += ["## Evaluation modes (`livr-ds eval --mode`)", ""]
    lines += [f"- `{m.name}`: {m.about}" for m in MODES.values()]
    lines += ["", "## How to use", ""]
    lines += _usage(meta, merged)
    return "\n".join(lines) + "\n"


def _usage(meta: dict, merged: bool) -> list[str]:
    here = "path/to/this/export"
    out = []
    if merged:
        out += ["With plain transformers (the processor, its chat template and generation_config.json do the rest):",
                "", "```python",
                "from transformers import AutoModelForImageTextToText, AutoProcessor",
                f'model = AutoModelForImageTextToText.from_pretrained("{here}", dtype="auto")',
                f'processor = AutoProcessor.from_pretrained("{here}")',
                'messages = [{"role": "user", "content": [{"type": "image", "image": image},',
                '                                         {"type": "text", "text": question}]}]',
                "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,",
                '                                       return_dict=True, return_tensors="pt")',
                "out = model.generate(**inputs)",
                "print(processor.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
                "```", "",
                "Or `pipeline(\"image-text-to-text\", model=\"" + here + "\")` with the same messages.", "",
                "With vLLM (the chat template adds the latents):", "", "```bash",
                f"vllm serve {here} --generation-config auto",
                "```", "",
                "vLLM reads the greedy defaults and max_new_tokens from generation_config.json but not "
                "`suppress_tokens`; a well-trained model rarely needs them, and `logit_bias` can set them per "
                "request.", ""]
    else:
        out += ["With transformers + PEFT (the base model, its embeddings grown to this tokenizer, then the "
                "adapter):", "", "```python",
                "from peft import PeftModel",
                "from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, GenerationConfig",
                f'base = AutoModelForImageTextToText.from_pretrained("{meta["base_model"]}", dtype="auto")',
                f'tokenizer = AutoTokenizer.from_pretrained("{here}")',
                "if base.get_input_embeddings().weight.shape[0] < len(tokenizer):",
                "    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)",
                f'base.generation_config = GenerationConfig.from_pretrained("{here}")  # not the base\'s',
                f'model = PeftModel.from_pretrained(base, "{here}")',
                f'processor = AutoProcessor.from_pretrained("{here}")  # its chat template adds the latents',
                "```", "",
                "Then prompt and generate as with any transformers model (`processor.apply_chat_template(..., "
                "add_generation_prompt=True)`, `model.generate(**inputs)`).", "",
                f"Or merge it into a plain checkpoint: `livr-ds export --merge --ckpt {here} --out merged/`.", ""]
    out += ["With livr-ds itself:", "", "```bash",
            f"livr-ds eval --ckpt {here} --data SHARDS --mode standard --out results.json", "```"]
    return out
