"""`livr-ds plan`: per-GPU memory of a LIVR run under each DeepSpeed config, before renting GPUs.

Parameters are counted exactly: the model is built on the meta device (no memory, no weights)
from the published spec (`arch:<name>[:<layers>]`) or a checkpoint's config.json, and LoRA is
counted from the shapes of the Linear layers its target regex reaches (r x (in + out) each, as
PEFT adds them), plus the K latent rows (K x hidden, livr_ds/latents.py).

Why not DeepSpeed's estimators alone: `estimate_zero2_model_states_mem_needs` and
`estimate_zero3_model_states_mem_needs` (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py)
take ONE parameter count and assume every parameter trains (16-bit params + grads, fp32 master
+ Adam m, v for all of it: 2 + 2 + 12 bytes per parameter, offload aside). In LIVR almost all
parameters are frozen (no gradient, no optimizer state) and only ~0.5% train, so those formulas
would overstate the model states ~8x. The LoRA split (frozen base vs trainable) is computed here;
DeepSpeed's functions are not called.

Per-GPU memory, W = gpus x nodes ranks, b = bytes of model.dtype, P frozen + T trainable:
  params       ZeRO-2: (P + T) b (replicated);  ZeRO-3: (P + T) b / W + the two largest LM
               layers gathered (the layer running and the one prefetched)
  grads        T b (full 16-bit grads while backward runs; ZeRO-2 reduces them into partitions)
  optimizer    fp32 master + Adam m + v = 12 T / W on the GPU, 0 with the optimizer on CPU
  activations  see activation_bytes
  mask         see attention_mask_bytes (the larger of the two stages' masks)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

GIB = 2**30
DS_CONFIGS = {(2, False): "ds_configs/zero2.json", (2, True): "ds_configs/zero2_offload.json",
              (3, False): "ds_configs/zero3.json", (3, True): "ds_configs/zero3_offload.json"}


@dataclasses.dataclass
class Shapes:
    """What the memory model needs from a built (meta) model."""

    total_params: int  # every parameter of the base model
    vision_params: int
    lora_params: int
    latent_params: int
    lora_modules: list  # (name, in_features, out_features) of each adapted Linear
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layer_params: int  # one LM decoder layer
    vision: dict  # depth, hidden, intermediate, heads, spatial_merge_size, patch_size

    @property
    def trainable(self) -> int:
        return self.lora_params + self.latent_params


def build_meta(cfg):
    """(adapter, hf_model on the meta device) for cfg.model.path."""
    import torch

    from ..models import get_adapter
    from ..models.archs import ARCH_PREFIX, arch_config

    adapter = get_adapter(cfg.model.family)
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    path = cfg.model.path
    if path.startswith(ARCH_PREFIX):
        config = arch_config(path, adapter, adapter.build_tiny_processor())
    elif path.startswith("tiny:"):
        raise ValueError("plan: give a checkpoint directory or arch:<name>, not tiny:")
    else:
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}/config.json not found")
        config = adapter.model_class.config_class.from_pretrained(path)
    with torch.device("meta"):
        model = adapter.model_class._from_config(config, dtype=dtype)
    return adapter, model


def count_shapes(cfg, adapter, model) -> Shapes:
    import torch

    text = adapter.text_config(model)
    vis_cfg = model.config.vision_config
    vision_ids = {id(p) for m in adapter.vision_modules(model) for p in m.parameters()}
    total = sum(p.numel() for p in model.parameters())
    n_vis = sum(p.numel() for p in model.parameters() if id(p) in vision_ids)
    regex = cfg.lora.target_regex or adapter.lora_target_regex
    mods = [(n, m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and re.fullmatch(regex, n)]
    r = cfg.lora.r
    lora = sum(r * (i + o) for _, i, o in mods)
    k = (1 if cfg.latents.shared else cfg.latents.num) if cfg.latents.num else 0
    layer = next(m for n, m in model.named_modules() if re.fullmatch(r".*language_model\.layers\.0", n))
    heads = text.num_attention_heads
    return Shapes(
        total_params=total, vision_params=n_vis, lora_params=lora, latent_params=k * text.hidden_size,
        lora_modules=mods, layers=text.num_hidden_layers, hidden=text.hidden_size, heads=heads,
        kv_heads=text.num_key_value_heads, head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=text.intermediate_size, vocab=text.vocab_size,
        layer_params=sum(p.numel() for p in layer.parameters()),
        vision=dict(depth=vis_cfg.depth, hidden=vis_cfg.hidden_size, intermediate=vis_cfg.intermediate_size,
                    heads=vis_cfg.num_heads, merge=vis_cfg.spatial_merge_size, out=vis_cfg.out_hidden_size),
    )


def activation_bytes(s: Shapes, *, tokens: int, micro_batch: int = 1, checkpointing: bool = False,
                     dtype_bytes: int = 2, answer_tokens: int = 32, image_tokens: int | None = None,
                     lora_dropout: float = 0.0, detail: bool = False):
    """Peak activation memory of one micro-batch's forward + backward, bytes.

    Per LM layer per token, the tensors autograd saves (b = dtype bytes):
      RMSNorm in/out x2 (4h), q, k, v after rope, attention output (2 nh hd + 2 nkv hd), the attention
      kernel's logsumexp (4 nh, fp32), SiLU-gated MLP (gate, silu(gate), up, product: 4 I), plus for
      each adapted Linear with lora dropout > 0 the dropped-out input copy (b) and its mask (1 byte).
    Without checkpointing every layer keeps that; with it, each layer keeps only its input (h b)
    and one layer is recomputed at a time (one layer's worth on top).
    Plus, per token: the embedding output and final norm (2h b), and the backward's transient
    gradient of the hidden states (2h b, fp32-free). The LM head runs only at answer positions:
    answer_tokens x vocab x (b logits + 4 fp32 logits + 4 their gradient).
    Frozen vision tower (no graph): the patches (4 per image token at merge 2) through one block at
    a time: hidden in/out, qkv, attention out and MLP intermediate (x2), in b, plus the merged output.
    Latent rows (livr_ds/latents.py): the hook's gathered rows and its output (2 h b per token), and
    for a tied head the logits copy that carries the latent columns (answer tokens x vocab x b).
    (PEFT's trainable tokens, used before, rebuilt the whole vocab x h table on each call and kept
    a copy and a full-size gradient for the tied head, 2 vocab h b, 2.3 GiB at 3B: measured on CPU
    it dominated small-token runs, launch/plan_check.py.)
    """
    b = dtype_bytes
    L = tokens * micro_batch
    h, nh, nkv, hd, inter = s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate
    per_layer = b * (4 * h + 2 * nh * hd + 2 * nkv * hd + 4 * inter) + 4 * nh
    if lora_dropout > 0:
        per_layer += sum((b + 1) * i for _, i, _ in s.lora_modules) / max(s.layers, 1)
    if checkpointing:
        layers = s.layers * h * b * L + per_layer * L
    else:
        layers = s.layers * per_layer * L
    edges = 4 * h * b * L
    head = answer_tokens * micro_batch * s.vocab * (b + 8)
    img = (L // 2 if image_tokens is None else image_tokens * micro_batch)
    v = s.vision
    patches = img * v["merge"] ** 2
    vision = b * patches * (3 * v["hidden"] + 3 * v["hidden"] + 2 * v["intermediate"]) + b * img * v["out"]
    latent = (2 * h * b * L + answer_tokens * micro_batch * s.vocab * b) if s.latent_params else 0
    parts = {"lm_layers": layers, "embed_norm_grad": edges, "lm_head": head, "vision": vision,
             "latent_rows": latent}
    total = sum(parts.values())
    return (total, parts) if detail else total


def attention_mask_bytes(backend: str, *, tokens: int, micro_batch: int = 1, dtype_bytes: int = 2) -> dict:
    """What one micro-batch's attention mask costs on `backend` (livr_ds/segments.py), bytes.

    held:  kept from the forward to the backward. sdpa: the (B, 1, L, L) bool mask (1 byte per
           entry; sdpa saves it for its backward); eager: that plus the additive copy in the model
           dtype; flex: the compiled BlockMask's block tables (kv/q x partial/full: four int32
           (B, 1, n, n) index tables and four (B, 1, n) counts, n = L / 128); flash: the (B, L)
           padding mask only.
    build: transient, before the forward. The dense rule is evaluated on L x L broadcasts: the
           int64 policy-table index (8 bytes per entry) beside the bool result, 9 bytes per entry
           (measured: 2.42 GB at L = 16384, `livr-ds bench --only mask`); the compiled BlockMask
           builder fuses the rule into its per-block reduction (measured: nothing L x L).
    """
    from ..segments import FLEX_BLOCK

    B, L = micro_batch, tokens
    dense = B * L * L
    if backend in ("sdpa", "eager"):
        held = dense * (1 + (dtype_bytes if backend == "eager" else 0))
        return {"held": held, "build": dense * 9}
    if backend == "flex":
        n = -(-L // FLEX_BLOCK)
        tables = 4 * 4 * B * n * n + 4 * 4 * B * n
        return {"held": tables, "build": tables}
    return {"held": 8 * B * L, "build": 8 * B * L}  # flash: the padding mask


def planned_backends(cfg) -> dict[int, str]:
    """The attention backend each stage would run on a CUDA node with this environment's kernels
    (an explicit model.attn_backend is taken as installed there): modeling.pick_backend's table."""
    import torch

    from ..modeling import installed_kernels, pick_backend

    kernels = installed_kernels() | ({cfg.model.attn_backend} - {"auto", "sdpa", "eager"})
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    return {stage: pick_backend(cfg.model.attn_backend, cfg.policy(stage), cfg.data.packing,
                                torch.device("cuda"), dtype, kernels)[0] for stage in (1, 2)}


def plan(cfg, gpus: int, nodes: int = 1, gpu_mem_gib: float = 80.0, answer_tokens: int = 32,
         image_tokens: int | None = None, shapes: Shapes | None = None) -> dict:
    """Rows per (ZeRO stage, offload) with GiB per GPU, and the recommended DeepSpeed config."""
    if shapes is None:
        adapter, model = build_meta(cfg)
        shapes = count_shapes(cfg, adapter, model)
    s = shapes
    world = gpus * nodes
    b = 2 if cfg.model.dtype == "bfloat16" else 4
    act = activation_bytes(s, tokens=cfg.data.max_tokens, micro_batch=cfg.optim.micro_batch_size,
                           checkpointing=cfg.model.gradient_checkpointing, dtype_bytes=b,
                           answer_tokens=answer_tokens, image_tokens=image_tokens,
                           lora_dropout=cfg.lora.dropout)
    backends = planned_backends(cfg)
    masks = {stage: attention_mask_bytes(backend, tokens=cfg.data.max_tokens, micro_batch=cfg.optim.micro_batch_size,
                                         dtype_bytes=b) for stage, backend in backends.items()}
    mask_held = max(m["held"] for m in masks.values())
    mask_build = max(m["build"] for m in masks.values())
    n_params = s.total_params + s.trainable
    rows = []
    for stage in (2, 3):
        for offload in (False, True):
            params = n_params * b if stage == 2 else n_params * b / world + 2 * s.layer_params * b
            grads = s.trainable * b
            optim = 0 if offload else 12 * s.trainable / world
            # The dense mask is built before the forward, when no activation exists yet.
            total = params + grads + optim + max(act + mask_held, mask_build)
            rows.append({"stage": stage, "offload": offload, "ds_config": DS_CONFIGS[(stage, offload)],
                         "params_gib": params / GIB, "grads_gib": grads / GIB, "optim_gib": optim / GIB,
                         "activations_gib": act / GIB, "mask_gib": mask_held / GIB, "total_gib": total / GIB,
                         "fits": total <= gpu_mem_gib * GIB})
    fitting = [r for r in rows if r["fits"] and r["ds_config"]]
    best = fitting[0] if fitting else None  # order: zero2, zero2_offload, zero3, zero3_offload (cheapest first)
    return {"model": cfg.model.path, "dtype": cfg.model.dtype, "world": world, "gpu_mem_gib": gpu_mem_gib,
            "max_tokens": cfg.data.max_tokens, "micro_batch": cfg.optim.micro_batch_size,
            "gradient_checkpointing": cfg.model.gradient_checkpointing,
            "attention": {f"stage{st}": {"backend": backends[st], "mask_gib": masks[st]["held"] / GIB,
                                         "mask_build_gib": masks[st]["build"] / GIB} for st in (1, 2)},
            "params": s.total_params, "vision_params": s.vision_params, "lora_params": s.lora_params,
            "latent_params": s.latent_params, "rows": rows, "recommended": best["ds_config"] if best else None,
            "recommended_stage": best["stage"] if best else None}


def _name(row) -> str:
    return f"ZeRO-{row['stage']}" + (" + optimizer on CPU" if row["offload"] else "")


def format_plan(p: dict) -> str:
    lines = [f"{p['model']} ({p['dtype']}), {p['world']} rank(s) x {p['gpu_mem_gib']:g} GiB, max_tokens "
             f"{p['max_tokens']}, micro batch {p['micro_batch']}, gradient checkpointing "
             f"{'on' if p['gradient_checkpointing'] else 'off'}",
             f"parameters {p['params']:,} (vision {p['vision_params']:,}); trainable: LoRA {p['lora_params']:,} "
             f"+ latent rows {p['latent_params']:,}", "",
             "attention (on CUDA): " + ", ".join(
                 f"stage {st[-1]} {a['backend']} (mask {a['mask_gib'] * 1024:.1f} MiB held, "
                 f"{a['mask_build_gib'] * 1024:.1f} MiB to build)" for st, a in p["attention"].items()), "",
             "| config | params GiB | grads GiB | optimizer GiB | activations GiB | mask GiB | total GiB/GPU | fits |",
             "|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        lines.append(f"| {_name(r)} ({r['ds_config'] or 'no config shipped'}) | {r['params_gib']:.2f} | "
                     f"{r['grads_gib']:.3f} | {r['optim_gib']:.3f} | {r['activations_gib']:.2f} | "
                     f"{r['mask_gib']:.3f} | {r['total_gib']:.2f} | {'yes' if r['fits'] else 'no'} |")
    lines.append("")
    rec = p["recommended"]
    if rec is None:
        lines.append("recommended: nothing fits; raise --gpus, turn on model.gradient_checkpointing or lower "
                     "data.max_tokens")
    elif p["recommended_stage"] == 3:
        z2 = min(r["total_gib"] for r in p["rows"] if r["stage"] == 2)
        lines.append(f"recommended: {rec}: ZeRO-3; ZeRO-2 does not fit (at least {z2:.2f} GiB/GPU, "
                     f"{p['gpu_mem_gib']:g} available)")
    else:
        lines.append(f"recommended: {rec}")
    return "\n".join(lines)


def _plan_cmd(args) -> int:
    from ..config import load_config

    cfg = load_config(args.config, args.set or [])
    p = plan(cfg, args.gpus, args.nodes, args.gpu_mem_gib, answer_tokens=args.answer_tokens,
             image_tokens=args.image_tokens)
    print(json.dumps(p, indent=1) if args.json else format_plan(p))
    return 0


def add_plan_command(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory under ZeRO-2/3 (+ offload); which DeepSpeed config fits")
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-mem-gib", type=float, default=80.0)
    p.add_argument("--answer-tokens", type=int, default=32, help="answer positions per sample (LM head)")
    p.add_argument("--image-tokens", type=int, default=None,
                   help="image tokens per sample (vision working set); default max_tokens / 2")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plan_cmd)
