"""Published architectures with random weights: train steps (tokens/s, MFU, memory) and evaluation cost."""

from __future__ import annotations

import time

import torch

from .fixtures import demo_samples
from .timing import interleaved_medians, median_seconds, synced

# Dense bf16 tensor-core peak, FLOP/s, by device name (vendor datasheets); --peak-tflops overrides.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12,
             "RTX 6000 Ada": 364e12}


def peak_flops(device_name: str | None) -> float | None:
    for key, peak in PEAK_BF16.items():  # the more specific names come first
        if device_name and key in device_name:
            return peak
    return None


def step_flops(hf_model, adapter, batch: dict) -> dict:
    """FLOPs one LoRA train step must do, counted from the shapes (not measured by a profiler).

    LM matmuls: forward 2N and the input-gradient backward 2N per real token; the frozen weights
    take no weight gradient, LoRA's are negligible ("4N"). `6N` is the full-fine-tuning convention
    (PaLM's MFU), reported alongside for comparison with other tools. Attention: 2 x 2 S^2 d per
    layer per document forward, causal half, times 3 with backward. N excludes the embedding and
    output head (livr-ds computes logits only where answers are predicted). Vision tower: forward
    only (frozen, run without a graph), 2 N_vis per patch.
    """
    from ... import segments

    text = adapter.text_config(hf_model)
    vision = {id(p) for m in adapter.vision_modules(hf_model) for p in m.parameters()}
    embed = {id(p) for m in (hf_model.get_input_embeddings(), hf_model.get_output_embeddings()) for p in m.parameters()}
    n_lm = sum(p.numel() for p in hf_model.parameters() if id(p) not in vision and id(p) not in embed)
    n_vis = sum(p.numel() for p in hf_model.parameters() if id(p) in vision)
    real = batch["segment_ids"] != segments.PAD
    tokens = int(real.sum())
    doc_sq = 0
    for row in range(batch["doc_ids"].shape[0]):
        docs = batch["doc_ids"][row][real[row]]
        doc_sq += int((torch.bincount(docs).double() ** 2).sum())
    d_attn = text.num_attention_heads * (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    attn = 3 * 2 * 2 * doc_sq * d_attn * text.num_hidden_layers / 2
    patches = int(batch["pixel_values"].shape[0]) if "pixel_values" in batch else 0
    vis = 2 * n_vis * patches
    return {"tokens": tokens, "lm_params": n_lm, "vision_params": n_vis, "image_patches": patches,
            "flops_4n": 4 * n_lm * tokens + attn + vis, "flops_6n": 6 * n_lm * tokens + attn + vis}


def bench_arch(model_path: str, family: str, data_dir: str, batch_size: int = 8, repeats: int = 5,
               image_pixels: int = 448 * 448, backends=None, peak_tflops: float | None = None,
               packed_tokens: int = 8192) -> list[dict]:
    """Stage 1 vs Stage 2 train steps (forward, backward, AdamW on LoRA + latent rows) of a real-size
    architecture (`arch:<name>` or a checkpoint), bf16 on a GPU, fp32 on CPU (smoke runs only).

    Backends: on a GPU flex (both stages, padded and packed rows) and, for Stage 2 on padded rows,
    flash-attn when installed, else sdpa; on CPU sdpa. Tokens/s count real (non-pad) tokens; memory
    is what a step adds on top of everything resident (all backends' models)."""
    from ...config import load_config
    from ...data.collate import LivrCollator
    from ...generate import to_device
    from ...modeling import build_backbone

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if backends is None:
        try:
            import flash_attn  # noqa: F401
            standard = "flash"
        except ImportError:
            standard = "sdpa"
        backends = ("flex", standard) if cuda else ("sdpa",)
    samples = demo_samples(data_dir, batch_size)
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops(torch.cuda.get_device_name() if cuda else None)
    steps, info = {}, {}
    for backend in backends:
        cfg = load_config(None, [f"model.family={family}", f"model.path={model_path}", "latents.num=16",
                                 f"model.attn_backend={backend}", f"model.dtype={'bfloat16' if cuda else 'float32'}",
                                 f"model.min_pixels={image_pixels}", f"model.max_pixels={image_pixels}"])
        bb = build_backbone(cfg, policy="standard" if backend == "flash" else "bottleneck", device=device)
        model = bb.model.to(device).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        layouts = {"padded": LivrCollator(bb.adapter, bb.processor, bb.latent_ids, max_tokens=packed_tokens)}
        if backend != "flash":  # flash-attn cannot keep packed documents apart
            layouts["packed"] = LivrCollator(bb.adapter, bb.processor, bb.latent_ids, max_tokens=packed_tokens,
                                             packing=True)
        for layout, collate in layouts.items():
            batch = collate(samples)
            info[(backend, layout)] = {**step_flops(bb.model.hf_model, bb.adapter, batch),
                                       "rows": tuple(batch["input_ids"].shape)}
            batch = to_device(batch, device)
            for policy in ("bottleneck", "standard"):
                if backend == "flash" and policy == "bottleneck":  # flash cannot apply the mask
                    continue

                def step(policy=policy, model=model, opt=opt, batch=batch):
                    opt.zero_grad(set_to_none=True)
                    model(batch, policy).backward()
                    opt.step()

                steps[(backend, layout, policy)] = synced(step)
    t = interleaved_medians(steps, repeats)
    memory = {}
    if cuda:
        for key, fn in steps.items():
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            memory[key] = {"resident_gib": resident / 2**30,
                           "step_peak_gib": (torch.cuda.max_memory_allocated() - resident) / 2**30}
    rows = []
    for (backend, layout, policy), sec in t.items():
        f = info[(backend, layout)]
        rows.append({"model": model_path, "backend": backend, "layout": f"{layout} {f['rows'][0]}x{f['rows'][1]}",
                     "stage": 1 if policy == "bottleneck" else 2, "step_s": sec, "tokens": f["tokens"],
                     "tokens_per_s": f["tokens"] / sec, "tflops_4n": f["flops_4n"] / sec / 1e12,
                     "mfu_4n": f["flops_4n"] / sec / peak if peak else None,
                     "mfu_6n": f["flops_6n"] / sec / peak if peak else None,
                     **memory.get((backend, layout, policy), {})})
    return rows


def bench_eval(model_path: str, family: str, data_dir: str, repeats: int = 3, image_pixels: int = 448 * 448,
               max_new_tokens: int = 8, mode: str = "standard", reference: bool = True) -> dict:
    """Seconds per evaluated sample vs seconds per training optimizer step, one sample each.

    Eval: `generate.greedy_answers` on one sample (batch 1) under `mode`, KV-cached (prefill once,
    then one cached step per token; random weights never say <eos>, so every call generates all
    `max_new_tokens`: the worst case, a real "(B)" <eos> answer is 4). With `reference`, also the
    recompute-per-token loop (greedy_answers(use_cache=False)). Train: forward + backward + AdamW
    step of the plain LivrModel (no DeepSpeed) on the same sample with its answer, micro batch 1,
    Stage 2 (standard mask). bf16 on a GPU, fp32 on CPU; sdpa on both sides; train, then eval
    (inside one latent-row merge, as evaluation.loop.evaluate runs), medians of `repeats` calls each."""
    from ...evaluation import generate
    from ...config import load_config
    from ...data.collate import LivrCollator
    from ...inference import get_mode
    from ...modeling import build_backbone

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = load_config(None, [f"model.family={family}", f"model.path={model_path}", "latents.num=16",
                             "model.attn_backend=sdpa", f"model.dtype={'bfloat16' if cuda else 'float32'}",
                             f"model.min_pixels={image_pixels}", f"model.max_pixels={image_pixels}",
                             "lora.dropout=0.0"])
    bb = build_backbone(cfg, policy="standard", device=device)
    model = bb.model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    sample = demo_samples(data_dir, 1)[0]
    m = get_mode(mode)
    gen_collator = LivrCollator(bb.adapter, bb.processor, bb.latent_ids if m.keep_latents else [], max_tokens=8192,
                                with_answer=False)
    batch = generate.to_device(LivrCollator(bb.adapter, bb.processor, bb.latent_ids, max_tokens=8192)([sample]),
                               device)
    prompt_tokens = len(gen_collator.encode(sample).input_ids)

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        model(batch, "standard").backward()
        opt.step()

    def evaluate(use_cache):
        def run():
            model.eval()
            return generate.greedy_ids(model, gen_collator, [sample], m.policy, max_new_tokens, use_cache=use_cache)
        return run

    # The eval loop (evaluation.loop.evaluate) runs inside modeling.merged_latent_rows, as timed here. For
    # an export loaded through PEFT that writes the trained rows into the table once per run
    # instead of PEFT copying the table at every call; the training model's LatentRows hooks touch
    # only the latent positions, so for it the merge is a no-op (merge_s ~ 0).
    from ...modeling import merged_latent_rows

    t = {"train": median_seconds(synced(train_step), repeats)}
    t0 = time.perf_counter()
    with merged_latent_rows(model.hf_model):
        merge_s = time.perf_counter() - t0
        new_tokens = len(evaluate(True)()[0])
        t["eval"] = median_seconds(synced(evaluate(True)), repeats)
        if reference:
            t["eval_recompute"] = median_seconds(synced(evaluate(False)), repeats)
    row = {"model": model_path, "device": device.type, "dtype": "bfloat16" if cuda else "float32",
           "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "eval_s_per_sample": t["eval"],
           "train_s_per_step": t["train"], "eval_per_train_step": t["eval"] / t["train"],
           "latent_row_merge_s_once": merge_s}
    if reference:
        row["eval_recompute_s_per_sample"] = t["eval_recompute"]
        row["recompute_per_cached"] = t["eval_recompute"] / t["eval"]
    # What every decode step pays outside the layers: one input-embedding and one LM-head call for a
    # single token. With latent rows trained through PEFT's trainable_token_indices, each call
    # rebuilds the merged vocab x hidden table (TrainableTokensWrapper.get_merged_weights).
    hf = model.hf_model
    one = torch.tensor([[bb.processor.tokenizer.eos_token_id]], device=device)
    hidden = torch.zeros(1, 1, hf.lm_head.weight.shape[1], device=device, dtype=hf.dtype)
    with torch.no_grad():
        row["embed_call_s"] = median_seconds(synced(lambda: hf.get_input_embeddings()(one)), 3)
        row["head_call_s"] = median_seconds(synced(lambda: hf.lm_head(hidden)), 3)
    return row
