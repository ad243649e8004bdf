"""The LIVR model: a backbone with K latent tokens, LoRA on the LM, and a masked forward.

Only LoRA adapters and the K latent embedding rows train (livr_ds.latents: the rows are a
parameter of their own, the embedding table stays frozen); the vision tower and projector are
frozen. The forward builds the attention mask for the requested policy from the batch's
segment and document ids (livr_ds.segments) in the format the attention backend needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

from . import segments
from .config import ConfigError, ExperimentConfig
from .latents import LatentRows, add_latent_tokens, build_latent_rows
from .models import BackboneAdapter, get_adapter
from .models.archs import ARCH_PREFIX, arch_spec, build_random

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"


def resolve_model_path(cfg: ExperimentConfig, adapter: BackboneAdapter) -> str:
    """`tiny:<dir>` names a tiny random checkpoint, written once (atomically) if missing;
    `arch:<name>` a published architecture with random weights (models/archs.py)."""
    path = cfg.model.path
    if path.startswith(ARCH_PREFIX):
        arch_spec(path)
        return path
    if not path.startswith(TINY_PREFIX):
        if not path:
            raise ValueError("model.path is empty: give a local checkpoint directory or tiny:<dir>")
        return path
    target = os.path.abspath(path[len(TINY_PREFIX):])
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    # One writer (save_pretrained skips the weights on non-main ranks), then everyone reads.
    if (not distributed or torch.distributed.get_rank() == 0) and not os.path.exists(
            os.path.join(target, "livr_tiny.json")):
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
        adapter.write_tiny(tmp, seed=0)
        try:
            os.rename(tmp, target)
        except OSError:  # another job wrote it first; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    if distributed:
        torch.distributed.barrier()
    return target


@dataclass
class Backbone:
    """Everything built from `model:`, `latents:` and `lora:`, ready to train or evaluate."""

    model: "LivrModel"
    processor: object
    adapter: BackboneAdapter
    latent_ids: list[int]
    path: str


def installed_kernels() -> frozenset[str]:
    """The optional attention kernels this process can use: "flash" (flash-attn importable) and
    "flex" (torch's flex_attention)."""
    found = set()
    try:
        import flash_attn  # noqa: F401

        found.add("flash")
    except ImportError:
        pass
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        found.add("flex")
    except ImportError:
        pass
    return frozenset(found)


# flash-attn computes in fp16/bf16 only (it raises on fp32 inputs) and takes no 4D mask.
FLASH_DTYPES = (torch.bfloat16, torch.float16)


def pick_backend(requested: str, policy: str, packed: bool, device: torch.device,
                 dtype: torch.dtype = torch.float32, kernels: frozenset[str] | None = None) -> tuple[str, str]:
    """The attention backend for (device, dtype, mask, installed kernels) and why: one table.

    auto picks:
      CPU (any dtype, any mask)                    -> sdpa   (dense 4D mask)
      CUDA, Stage 1 mask or packed rows            -> flex   (block mask), sdpa if flex is missing
      CUDA, standard mask, bf16/fp16, flash-attn   -> flash
      CUDA, standard mask, fp32 or no flash-attn   -> sdpa
    An explicit choice is kept, or refused with the reason (ConfigError naming model.attn_backend)."""
    kernels = installed_kernels() if kernels is None else kernels
    custom_mask = policy != "standard" or packed
    what = f"the {policy!r} mask{' on packed rows' if packed else ''}"
    if requested != "auto":
        problem = None
        if requested == "flash":
            if custom_mask:
                problem = f"cannot apply {what}: flash-attn ignores 4D masks. Use flex (GPU), sdpa or eager"
            elif device.type != "cuda":
                problem = f"flash-attn runs on CUDA only (this is {device.type}); use sdpa"
            elif dtype not in FLASH_DTYPES:
                problem = f"flash-attn rejects {str(dtype).removeprefix('torch.')} inputs; use model.dtype=bfloat16 or sdpa"
            elif "flash" not in kernels:
                problem = "flash-attn is not installed (pip install -e '.[gpu]'); or use auto"
        elif requested == "flex" and "flex" not in kernels:
            problem = "this torch has no torch.nn.attention.flex_attention; use sdpa"
        if problem:
            raise ConfigError(f"model.attn_backend={requested}: {problem}")
        return requested, "model.attn_backend names it"
    if device.type != "cuda":
        return "sdpa", f"auto: {device.type} device"
    if custom_mask:
        if "flex" in kernels:
            return "flex", f"auto: CUDA and {what} (block mask)"
        return "sdpa", f"auto: CUDA and {what}, but no flex_attention in this torch (dense mask)"
    if dtype not in FLASH_DTYPES:
        return "sdpa", f"auto: CUDA, {str(dtype).removeprefix('torch.')} (flash-attn needs bf16/fp16)"
    if "flash" in kernels:
        return "flash", "auto: CUDA, standard mask, half precision, flash-attn installed"
    return "sdpa", "auto: CUDA, standard mask, flash-attn not installed"


_HF_IMPL = {"sdpa": "sdpa", "eager": "eager", "flex": "sdpa", "flash": "flash_attention_2"}


def build_backbone(cfg: ExperimentConfig, *, policy: str, device: torch.device | None = None,
                   packed: bool = False) -> Backbone:
    """Load the backbone, add latents, freeze the vision side and wrap the LM in LoRA.

    Deterministic given the config: LoRA's initialisation draws from the global RNG, seeded just
    before it (and random `arch:` weights from the same seed before loading)."""
    device = device or torch.device("cpu")
    adapter = get_adapter(cfg.model.family)
    path = resolve_model_path(cfg, adapter)  # may write a tiny model, drawing from the global RNG
    torch.manual_seed(cfg.seed)  # after it: the process that wrote the model must init LoRA alike
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    backend, why = pick_backend(cfg.model.attn_backend, policy, packed, device, dtype)
    log.info("attention backend: %s (%s)", backend, why)
    image_kwargs = {k: getattr(cfg.model, k) for k in ("min_pixels", "max_pixels") if getattr(cfg.model, k)}
    if path.startswith(ARCH_PREFIX):  # published architecture, random weights, built in place
        processor, hf_model = build_random(path, adapter, dtype=dtype, attn_implementation=_HF_IMPL[backend],
                                           device=device, image_kwargs=image_kwargs)
    else:
        processor = adapter.load_processor(path, trust_remote_code=cfg.model.trust_remote_code,
                                           image_kwargs=image_kwargs)
        hf_model = adapter.load_model(path, dtype=dtype, attn_implementation=_HF_IMPL[backend],
                                      trust_remote_code=cfg.model.trust_remote_code)
    if backend == "flex":
        # The VL classes refuse flex_attention at load time (transformers 5.24); the text model
        # honours it when set on its config, and with a BlockMask its forward equals sdpa's (2e-7).
        adapter.text_config(hf_model)._attn_implementation = "flex_attention"
    latent_ids = add_latent_tokens(processor.tokenizer, hf_model, cfg.latents.num, cfg.latents.shared, cfg.seed)
    latent_rows = None
    if cfg.model.trainable == "lora":
        # Seeded again here: how many draws loading took depends on the path (a partitioned ZeRO-3
        # build, a resized tied table initialise differently), LoRA's initialisation must not.
        torch.manual_seed(cfg.seed)
        peft_model = wrap_lora(hf_model, adapter, cfg)
        latent_rows = build_latent_rows(hf_model, latent_ids)
    else:  # full fine-tuning trains the whole table, latent rows included
        peft_model = unfreeze_full(hf_model, adapter, cfg.model.trainable)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(peft_model, hf_model)
    model = LivrModel(peft_model, adapter, processor, backend, latent_rows=latent_rows)
    cast_trainable(model, dtype)
    return Backbone(model, processor, adapter, latent_ids, path)


def cast_trainable(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The dtype policy's first half (docs/training.md, "Precision"): every trainable tensor's
    working copy is in the compute dtype, like the frozen weights around it.

    Why here and not left to DeepSpeed: under ZeRO-1/2 DeepSpeed's bf16 mode casts every
    parameter of the module itself (engine._cast_module_mixed_precision), but under ZeRO-3 a model
    built partitioned (deepspeed.zero.Init) is not cast at all, while PEFT creates LoRA in fp32 on a
    bf16 base (its autocast_adapter_dtype) and the latent rows come from the bf16 table: ZeRO-3's
    flatten then asserts one dtype per group, and a run that did start would train LoRA as fp32
    copies under one stage and bf16 under another. Casting before deepspeed.initialize makes every
    stage train the same working copies; the optimizer's fp32 masters and Adam moments (ZeRO keeps
    them for bf16 at every stage) are built from these."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != dtype and not hasattr(p, "ds_id"):
                p.data = p.data.to(dtype)


def enable_gradient_checkpointing(peft_model, hf_model) -> None:
    """Non-reentrant checkpointing of the decoder layers, and the LM's input embeddings marked as
    needing grad. Not transformers' enable_input_require_grads (gradient_checkpointing_enable
    calls it, so its hooks are removed again): in 5.24 it hooks the input
    embeddings of every sub-model, the vision tower's patch embedding included, which makes the
    frozen tower build a graph, be recomputed and backpropagated for nothing (and, under ZeRO-3,
    all-gathered again in every backward)."""
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for model in (hf_model, *[m for m in hf_model.modules() if hasattr(m, "_require_grads_hooks")]):
        if hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()  # gradient_checkpointing_enable set them on every sub-model
    hf_model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))


def wrap_lora(hf_model, adapter: BackboneAdapter, cfg: ExperimentConfig):
    """LoRA on the language model; everything else frozen (the latent rows are LatentRows')."""
    for p in hf_model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_regex or adapter.lora_target_regex,
        bias="none",
    )
    model = get_peft_model(hf_model, lora)
    vision_params = {id(p) for m in adapter.vision_modules(hf_model) for p in m.parameters()}
    bad = [n for n, p in model.named_parameters() if p.requires_grad and id(p) in vision_params]
    if bad:
        raise ValueError(f"LoRA target regex reached the vision side: {bad[:3]}; anchor it on the language model")
    return model


def unfreeze_full(hf_model, adapter: BackboneAdapter, trainable: str):
    """Full fine-tuning without PEFT: the LM (and the vision side too for `all`)."""
    vision = {id(p) for m in adapter.vision_modules(hf_model) for p in m.parameters()}
    for p in hf_model.parameters():
        p.requires_grad_(trainable == "all" or id(p) not in vision)
    return hf_model


class LivrModel(torch.nn.Module):
    """forward(batch, policy) -> mean NLL over answer tokens.

    Under ZeRO-3 every rank must enter every partitioned module on every forward (each entry is
    an all-gather that all ranks join), so the forward never skips one: the LM head runs even on
    a batch without answer tokens, and with `lockstep` (set by the trainer under ZeRO-3) the
    vision tower runs on a small blank image when a batch has no image, and evaluation keeps
    every rank's forwards in step (evaluation/loop.py, evaluation/generate.py)."""

    def __init__(self, peft_model, adapter: BackboneAdapter, processor, backend: str,
                 latent_rows: LatentRows | None = None):
        super().__init__()
        self.peft_model = peft_model
        self.adapter = adapter
        self.backend = backend
        self.image_token_id = adapter.image_token_id(processor)
        self.latent_rows = latent_rows
        if latent_rows is not None:
            latent_rows.to(self.hf_model.get_input_embeddings().weight.device)
            latent_rows.attach(self.hf_model)
        self.lockstep = False
        self._blank_vision = adapter.blank_vision_inputs(processor)
        self._blank_due: torch.device | None = None
        # The real path runs the vision tower inside the VL model's forward, right after the token
        # embedding: a blank pass is run at that same point (so every rank's all-gathers come in
        # the same order, and inside the VL model's own forward, whose direct parameters, e.g.
        # LLaVA-OneVision's image_newline, ZeRO-3 has gathered by then).
        self.hf_model.get_input_embeddings().register_forward_hook(self._blank_vision_hook)

    @property
    def hf_model(self):
        # The transformers model, with LoRA layers injected when there is an adapter.
        inner = self.peft_model
        return inner.get_base_model() if hasattr(inner, "get_base_model") else inner

    def position_ids(self, batch: dict) -> torch.Tensor:
        """Rope positions per document (M-RoPE needs each sample's own image grid), right-padded."""
        input_ids, seg, doc = batch["input_ids"], batch["segment_ids"], batch["doc_ids"]
        per_image = batch.get("image_counts")  # images per (row, doc), in order
        grids = batch.get("image_grid_thw")
        out = None
        image_cursor = 0
        for row in range(input_ids.shape[0]):
            for d, (start, end) in enumerate(_doc_spans(doc[row], seg[row])):
                ids = input_ids[row, start:end]
                mm = (ids == self.image_token_id).to(torch.int32)
                n_img = int(per_image[row][d]) if per_image is not None else 0
                vision = {}
                if grids is not None:
                    vision["image_grid_thw"] = grids[image_cursor:image_cursor + n_img]
                image_cursor += n_img
                pos = self.adapter.position_ids(self.hf_model, ids, mm, vision)
                if out is None:
                    out = torch.zeros(pos.shape[0], *input_ids.shape, dtype=torch.long, device=input_ids.device)
                out[:, row, start:end] = pos.to(input_ids.device)
        if out is None:  # no real token anywhere (the collator never sends this): all-zero positions
            one = torch.zeros(1, dtype=torch.long)
            axes = self.adapter.position_ids(self.hf_model, one, one.to(torch.int32), {}).shape[0]
            out = torch.zeros(axes, *input_ids.shape, dtype=torch.long, device=input_ids.device)
        return out if out.shape[0] > 1 else out[0]

    def attention_mask(self, batch: dict, policy: str):
        seg, doc = batch["segment_ids"], batch["doc_ids"]
        if self.backend == "flash":
            return (seg != segments.PAD).long()
        if self.backend == "flex":
            return segments.block_mask(seg, doc, policy)
        mask = segments.dense_mask(seg, doc, policy)
        if self.backend == "eager":
            return segments.additive_mask(mask, self.hf_model.dtype)
        return mask

    def backbone_outputs(self, batch: dict, policy: str, **kwargs):
        """The transformers backbone (no LM head) on a batch under `policy`'s mask."""
        vision = {k: batch[k] for k in self.adapter.vision_keys if k in batch}
        if "pixel_values" in vision:
            vision["pixel_values"] = vision["pixel_values"].to(self.hf_model.dtype)
        elif self.lockstep:
            self.blank_vision_next(batch["input_ids"].device)
        return self.hf_model.model(
            input_ids=batch["input_ids"],
            attention_mask=self.attention_mask(batch, policy),
            position_ids=self.position_ids(batch),
            mm_token_type_ids=(batch["input_ids"] == self.image_token_id).to(torch.int32),
            use_cache=False,
            **vision,
            **kwargs,
        )

    def blank_vision_next(self, device: torch.device) -> None:
        """Run the vision tower on a blank image during the next forward (lockstep, no image)."""
        self._blank_due = device

    def _blank_vision_hook(self, module, args, out):
        if self._blank_due is not None:
            device, self._blank_due = self._blank_due, None
            self.run_vision_blank(device)

    def run_vision_blank(self, device: torch.device) -> None:
        """The vision tower (and projector) on a blank image, output discarded: keeps a rank whose
        batch has no image in step with the others' all-gathers under ZeRO-3."""
        blank = {k: v.to(device) for k, v in self._blank_vision.items()}
        blank["pixel_values"] = blank["pixel_values"].to(self.hf_model.dtype)
        with torch.no_grad():
            self.hf_model.model.get_image_features(**blank)

    def hidden_states(self, batch: dict, policy: str) -> torch.Tensor:
        return self.backbone_outputs(batch, policy).last_hidden_state

    def logits(self, batch: dict, policy: str) -> torch.Tensor:
        return self.hf_model.lm_head(self.hidden_states(batch, policy)).float()

    def forward(self, batch: dict, policy: str = "standard") -> torch.Tensor:
        hidden = self.hidden_states(batch, policy)
        # Only positions that predict an answer token go through the LM head: the full
        # (B, L, vocab) logits would cost far more than the loss needs.
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        logits = self.hf_model.lm_head(hidden[:, :-1][keep]).float()  # run even when empty (ZeRO-3)
        if not keep.any():  # only padding samples (equal batch counts across ranks): no signal
            return hidden.sum() * 0.0 + logits.sum() * 0.0
        return F.cross_entropy(logits, targets[keep])


@contextlib.contextmanager
def merged_latent_rows(module: torch.nn.Module):
    """Write the trained latent rows into the embedding table (and a tied head) for the duration,
    exactly undone after. For exports loaded with PEFT (trainable tokens); the training model's
    LatentRows (livr_ds/latents.py) need no merge, and for it this does nothing.

    PEFT's trainable-token layer otherwise builds a fresh copy of the whole table on every call
    (`index_copy` of 151,936 x 2,048 for Qwen2.5-VL-3B), once for the embedding and once for a
    tied head: generation calls both once per token. Merging and unmerging only swap rows (the
    originals are kept by PEFT), so the table is bit-identical afterwards, and the forward with
    merged rows computes the same numbers. Only layers not already merged are touched."""
    try:
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    except ImportError:  # a PEFT without trainable tokens has nothing to merge
        yield
        return
    layers = [m for m in module.modules() if isinstance(m, TrainableTokensLayer) and not m.merged
              and m.active_adapters and not m.disable_adapters]
    done = []
    try:
        with torch.no_grad():
            for layer in layers:
                layer.merge()
                done.append(layer)
        yield
    finally:
        with torch.no_grad():
            for layer in reversed(done):
                layer.unmerge()


def _doc_spans(doc_row: torch.Tensor, seg_row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each document in a row, padding excluded."""
    real = (seg_row != segments.PAD).nonzero().flatten()
    if real.numel() == 0:
        return []
    docs = doc_row[real]
    change = (docs[1:] != docs[:-1]).nonzero().flatten() + 1
    bounds = [0, *change.tolist(), real.numel()]
    return [(int(real[a]), int(real[b - 1]) + 1) for a, b in zip(bounds[:-1], bounds[1:])]


def load_peft_adapter(hf_model, adapter_dir: str):
    """Attach a saved LoRA + latent-row adapter to a freshly loaded backbone (no DeepSpeed)."""
    return PeftModel.from_pretrained(hf_model, adapter_dir)
