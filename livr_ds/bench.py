"""`livr-ds bench`: measured ratios, printed as a table and written as JSON (not timed tests).

Benchmarks (each compares two things in the same process, same batch, interleaved repeats):
- stage:    train-step time, Stage 1 (bottleneck mask) vs Stage 2 (standard), per attention backend
- mask:     construction time and bytes, dense bool mask vs flex BlockMask, L = 1k, 4k, 16k
- packing:  real-token fraction and tokens/s, packed vs padded rows, on the demo multi-task mix
- loader:   loader samples/s (decode + processor, per worker count) vs what a train step consumes;
            and stream vs indexed shard reads (samples/s, bytes read per sample) on the same shards
- trainer:  livr-ds's loop vs transformers Trainer + PEFT + DeepSpeed, same model, batches, global batch
- arch:     a published architecture (Qwen2.5-VL-3B, Qwen3-VL-4B) with random weights, bf16 on GPU:
            Stage 1 vs 2 per backend, tokens/s, MFU, memory
- eval:     on the same architectures: evaluation seconds per sample (KV-cached greedy generation,
            batch 1; and the recompute-per-token reference) vs seconds per training optimizer step
            (micro batch 1, forward + backward + AdamW on the plain LivrModel)
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import tempfile
import time

import torch

log = logging.getLogger(__name__)


def _timeit(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median time of each fn, calls interleaved so drift in machine load hits all alike; the
    order reverses every round, so whatever a call inherits from the one before (caches, another
    model's weights) is shared out evenly too."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(repeats):
        for k in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _backbone(model_path: str, family: str, backend: str, k: int):
    from .config import load_config
    from .modeling import build_backbone

    cfg = load_config(None, [f"model.family={family}", f"model.path={model_path}", f"latents.num={k}",
                             f"model.attn_backend={backend}", "lora.dropout=0.0"])
    return build_backbone(cfg, policy="bottleneck")


def _demo_samples(data_dir: str, n: int):
    from .data.reader import LivrLoader, ShardSource

    loader = LivrLoader([ShardSource(data_dir)], 0, 1, batch_size=n, seed=0)
    return next(iter(loader))


def bench_stage(model_path, family, data_dir, batch_size=8, repeats=10, backends=("sdpa", "eager")):
    """Every (backend, stage) pair is timed in one interleaved loop, so load drift hits all alike."""
    from .data.collate import LivrCollator

    samples = _demo_samples(data_dir, batch_size)
    steps, tokens = {}, {}
    for backend in backends:
        bb = _backbone(model_path, family, backend, 4)
        batch = LivrCollator(bb.adapter, bb.processor, bb.latent_ids)(samples)
        model = bb.model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        tokens[backend] = int(batch["input_ids"].numel())

        def step(policy, model=model, opt=opt, batch=batch):
            def run():
                opt.zero_grad(set_to_none=True)
                model(batch, policy).backward()
                opt.step()
            return run

        steps[(backend, "stage1")] = step("bottleneck")
        steps[(backend, "stage2")] = step("standard")
    t = _interleaved(steps, repeats)
    return [{"backend": b, "stage1_s": t[(b, "stage1")], "stage2_s": t[(b, "stage2")],
             "ratio": t[(b, "stage1")] / t[(b, "stage2")], "tokens": tokens[b]} for b in backends]


def _synced(fn):
    """fn, then wait for the GPU (if any), so wall-clock timing sees the kernels' time."""
    def run():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out
    return run


def bench_mask(lengths=(1024, 4096, 16384), repeats=3):
    """Dense bool mask vs flex BlockMask for one row, on the GPU when there is one."""
    from . import segments

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for L in lengths:
        seg = torch.full((1, L), segments.PROMPT, device=device)
        seg[0, 16:16 + L // 2] = segments.IMAGE
        seg[0, -64:-16] = segments.LATENT
        seg[0, -16:] = segments.ANSWER
        doc = torch.zeros_like(seg)
        dense = _synced(lambda seg=seg, doc=doc: segments.dense_mask(seg, doc, "bottleneck"))
        flex = _synced(lambda seg=seg, doc=doc: segments.block_mask(seg, doc, "bottleneck"))
        row = {"L": L, "device": device, "dense_s": _timeit(dense, repeats),
               "dense_bytes": dense().element_size() * L * L, "additive_fp32_bytes": 4 * L * L}
        try:
            bm = flex()
            row["flex_s"] = _timeit(flex, repeats)
            row["flex_bytes"] = sum(t.numel() * t.element_size() for t in bm.as_tuple() if torch.is_tensor(t))
        except (RuntimeError, MemoryError) as e:  # uncompiled create_block_mask materialises L x L
            row["flex_error"] = str(e)[:200]
        rows.append(row)
    return rows


def bench_packing(model_path, family, data_dir, batch_size=16, repeats=5, max_tokens=(512, 1024)):
    """The same samples as padded rows and as packed rows of at most each max_tokens."""
    from .data.collate import LivrCollator

    bb = _backbone(model_path, family, "sdpa", 4)
    samples = _demo_samples(data_dir, batch_size)
    model = bb.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    batches = {"padded": LivrCollator(bb.adapter, bb.processor, bb.latent_ids, max(max_tokens))(samples)}
    for n in max_tokens:
        batches[f"packed {n}"] = LivrCollator(bb.adapter, bb.processor, bb.latent_ids, n, packing=True)(samples)

    def step(batch):
        def run():
            opt.zero_grad(set_to_none=True)
            model(batch, "bottleneck").backward()
            opt.step()
        return run

    t = _interleaved({k: step(b) for k, b in batches.items()}, repeats)
    rows = []
    for k, b in batches.items():
        real = b["meta"]["tokens"]
        rows.append({"layout": k, "rows": b["input_ids"].shape[0], "row_len": b["input_ids"].shape[1],
                     "real_token_fraction": real / b["input_ids"].numel(), "step_s": t[k],
                     "real_tokens_per_s": real / t[k], "vs_padded": t["padded"] / t[k]})
    return rows


def bench_loader(model_path, family, data_dir, batch_size=8, batches=12, workers=(0, 1, 2)):
    from .data.collate import LivrCollator
    from .data.reader import LivrLoader, ShardSource

    bb = _backbone(model_path, family, "sdpa", 4)
    collator = LivrCollator(bb.adapter, bb.processor, bb.latent_ids)
    rows = []
    for w in workers:
        loader = LivrLoader([ShardSource(data_dir)], 0, 1, batch_size=batch_size, num_workers=w, seed=0,
                            collate_fn=collator)
        it = iter(loader)
        next(it)  # worker start-up is paid once per epoch, not per sample
        t = time.perf_counter()
        n = 0
        for _ in range(batches):
            try:
                n += len(next(it)["meta"]["keys"])
            except StopIteration:
                break
        rows.append({"num_workers": w, "samples_per_s": n / (time.perf_counter() - t)})
    return rows


def bench_loader_io(world_size=8, rounds=5, n_shards=16, per_shard=64, image_size=160, batch_size=8):
    """Stream vs indexed shard reads, same synthetic shards (n_shards x per_shard samples, 2 random
    JPEGs of image_size^2 each): rank 0 of ``world_size``, one process (num_workers=0), decode only.
    The two modes alternate for ``rounds`` epochs, order reversed every round; median samples/s,
    and bytes read from the shards per sample / per epoch (the same every round)."""
    import io

    import numpy as np
    from PIL import Image

    from .data.reader import LivrLoader
    from .data.writer import write_shards

    def samples():
        rng = np.random.default_rng(0)
        for i in range(n_shards * per_shard):
            ims = []
            for _ in range(2):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(
                    buf, format="JPEG", quality=90)
                ims.append(buf.getvalue())
            yield {"key": f"b{i:06d}", "task": "t", "question": "q?", "choices": ["x", "y"], "answer": "A",
                   "images": ims}

    d = os.path.join(tempfile.mkdtemp(prefix="livr-bench-io-"), "shards")
    write_shards(samples(), d, "train", shard_size=per_shard, progress=False)
    data_bytes = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".tar"))
    times: dict[str, list[float]] = {"stream": [], "indexed": []}
    got: dict[str, tuple[int, int]] = {}
    order = list(times)
    for r in range(rounds + 1):  # round 0: warm-up (page cache, imports), not timed
        for mode in order if r % 2 == 0 else order[::-1]:
            loader = LivrLoader(d, rank=0, world_size=world_size, batch_size=batch_size, seed=0)
            loader._read_mode = mode
            t = time.perf_counter()
            n = sum(len(b) for b in loader)
            if r:
                times[mode].append(time.perf_counter() - t)
            got[mode] = (n, loader.stats["bytes_read"])
    return [{"read": mode, "world_size": world_size, "samples_per_epoch": got[mode][0],
             "samples_per_s": got[mode][0] / statistics.median(times[mode]),
             "MiB_read_per_epoch": got[mode][1] / 2**20, "bytes_read_per_sample": got[mode][1] / got[mode][0],
             "read_vs_dataset": got[mode][1] / data_bytes} for mode in order]


def run_all(out: str, model_path: str | None, family: str, data_dir: str | None, only=None, repeats=10,
            archs=("qwen2_5_vl_3b", "qwen3_vl_4b"), arch_batch: int = 8, image_pixels: int = 448 * 448,
            peak_tflops: float | None = None) -> dict:
    from .data.demo import make_demo
    from .models import get_adapter

    tmp = tempfile.mkdtemp(prefix="livr-bench-")
    model_path = model_path or get_adapter(family).write_tiny(os.path.join(tmp, "tiny"))
    if data_dir is None:
        data_dir = os.path.join(tmp, "demo")
        make_demo(data_dir, seed=0, n_train=32, n_val=4, n_test=4)
    torch.manual_seed(0)
    result = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
              "model": model_path, "family": family}
    todo = only or ["stage", "mask", "packing", "loader", "trainer"] + (["arch", "eval"] if torch.cuda.is_available()
                                                                       else [])
    if "stage" in todo:
        result["stage"] = bench_stage(model_path, family, data_dir, repeats=repeats)
    if "mask" in todo:
        result["mask"] = bench_mask()
    if "packing" in todo:
        result["packing"] = bench_packing(model_path, family, data_dir, repeats=max(3, repeats // 2))
    if "loader" in todo:
        result["loader"] = bench_loader(model_path, family, data_dir)
        result["loader_io"] = bench_loader_io()
        if "stage" in result:
            step = min(r["stage1_s"] for r in result["stage"])
            result["loader_vs_consumption"] = {"train_samples_per_s": 8 / step,
                                               "best_loader_samples_per_s": max(r["samples_per_s"] for r in result["loader"])}
    if "trainer" in todo:
        result["trainer"] = bench_vs_trainer(model_path, family, data_dir)
    if "arch" in todo:
        from .models.archs import arch_spec

        result["arch"] = []
        for arch in archs:
            path = arch if arch.startswith("arch:") else f"arch:{arch}"
            result["arch"] += bench_arch(path, arch_spec(path)[0]["family"], data_dir, batch_size=arch_batch,
                                         repeats=max(3, repeats // 2), image_pixels=image_pixels,
                                         peak_tflops=peak_tflops)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            with open(out, "w") as f:  # a long run keeps what it has measured so far
                json.dump(result, f, indent=1)
    if "eval" in todo:
        from .models.archs import arch_spec

        result["eval"] = []
        for arch in archs:
            path = arch if arch.startswith("arch:") else f"arch:{arch}"
            result["eval"].append(bench_eval(path, arch_spec(path)[0]["family"], data_dir, repeats=max(2, repeats // 3),
                                             image_pixels=image_pixels))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return result


def format_tables(result: dict) -> str:
    lines = []

    def table(title, rows):
        if not rows:
            return
        keys = list(rows[0].keys())
        lines.append(f"\n### {title}\n")
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        for r in rows:
            lines.append("| " + " | ".join(f"{r.get(k):.4g}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                                           for k in keys) + " |")

    table("Train step: Stage 1 (bottleneck) vs Stage 2 (standard)", result.get("stage"))
    table("Mask construction (bottleneck, B = 1)", result.get("mask"))
    table("Packed vs padded rows", result.get("packing"))
    table("Loader throughput (decode + processor + collate)", result.get("loader"))
    table("Loader shard reads: stream vs indexed (rank 0 of W, decode only, same shards)", result.get("loader_io"))
    table("livr-ds vs transformers Trainer + PEFT + DeepSpeed (Direct SFT, same batches)", result.get("trainer"))
    table("Published architectures, random weights: Stage 1 vs Stage 2 per backend", result.get("arch"))
    table("Evaluation (cached greedy, batch 1) vs a training step (micro batch 1)", result.get("eval"))
    if "loader_vs_consumption" in result:
        lc = result["loader_vs_consumption"]
        lines.append(f"\nloader / training consumption: {lc['best_loader_samples_per_s'] / lc['train_samples_per_s']:.2f}x")
    return "\n".join(lines)


def _bench_cmd(args) -> int:
    result = run_all(args.out, args.model_path, args.family, args.data, args.only, args.repeats, archs=args.arch,
                     arch_batch=args.arch_batch, image_pixels=args.image_pixels, peak_tflops=args.peak_tflops)
    print(format_tables(result))
    print(f"\nwrote {args.out}")
    return 0


def add_bench_command(sub) -> None:
    p = sub.add_parser("bench", help="benchmark masks, stages, packing and the loader (prints ratios)")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--model-path", default=None, help="a local checkpoint (default: a tiny random one)")
    p.add_argument("--family", default="qwen2_5_vl")
    p.add_argument("--data", default=None, help="shard dir (default: a small demo set)")
    p.add_argument("--only", nargs="+", choices=["stage", "mask", "packing", "loader", "trainer", "arch", "eval"],
                   help="default: all (arch and eval only when a GPU is present)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--arch", nargs="+", default=["qwen2_5_vl_3b", "qwen3_vl_4b"],
                   help="published architectures for `arch` and `eval` (random weights; NAME:N keeps N LM layers)")
    p.add_argument("--arch-batch", type=int, default=8, help="samples per step in `arch`")
    p.add_argument("--image-pixels", type=int, default=448 * 448,
                   help="pixels per image in `arch` and `eval` (sets token count)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU when the GPU is not in the table")
    p.set_defaults(func=_bench_cmd)


def bench_vs_trainer(model_path, family, data_dir, rounds=3, steps=5, batch_size=8):
    """livr-ds's loop vs transformers Trainer + PEFT + DeepSpeed ZeRO-2 on the same tiny model,
    the same pre-collated batches and global batch, Direct SFT (no latents, standard mask): both
    sides train the same LoRA. The two alternate in `rounds` rounds of `steps` optimizer steps
    (load drift hits both); the first step of each round is warm-up. Median seconds per step."""
    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from .config import load_config
    from .data.collate import LivrCollator
    from .data.reader import LivrLoader, ShardSource
    from .modeling import build_backbone
    from .segments import PAD
    from .train import distributed as dist
    from .train.ds_config import build_ds_config

    dist.init("cpu")
    cfg = load_config(None, [f"model.family={family}", f"model.path={model_path}", "latents.num=0",
                             "schedule.stage1_epochs=0", "lora.dropout=0.0", "stage=2",
                             f"optim.micro_batch_size={batch_size}", f"optim.global_batch_size={batch_size}"])
    loader = LivrLoader([ShardSource(data_dir)], 0, 1, batch_size=batch_size, seed=0)
    bb = build_backbone(cfg, policy="standard")
    collator = LivrCollator(bb.adapter, bb.processor, [])
    batches = []
    for samples in loader:
        batches.append(collator(samples))
        if len(batches) == steps:
            break
    root = os.path.dirname(os.path.abspath(__file__))
    ds = build_ds_config(os.path.join(root, "..", "ds_configs", "zero2.json"), cfg, world_size=1)
    engine, *_ = deepspeed.initialize(model=bb.model, model_parameters=[p for p in bb.model.parameters()
                                                                       if p.requires_grad], config=ds)
    hf_batches = [{"input_ids": b["input_ids"], "attention_mask": (b["segment_ids"] != PAD).long(),
                   "labels": b["labels"], "mm_token_type_ids": (b["input_ids"] == bb.model.image_token_id).int(),
                   **{k: b[k] for k in bb.adapter.vision_keys if k in b}} for b in batches]
    hf_ds = json.loads(json.dumps(ds))
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        hf_ds[key] = "auto"
    ours, theirs = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

    for _ in range(rounds):
        times = []
        for batch in batches:  # livr-ds: the trainer's micro-step (mask rule, engine backward, step)
            t = time.perf_counter()
            engine.backward(engine(batch, policy="standard"))
            engine.step()
            times.append(time.perf_counter() - t)
        ours += times[1:]
        # The baseline: HF model + PEFT LoRA (same targets), HF Trainer with the same DeepSpeed JSON.
        torch.manual_seed(cfg.seed)
        hf = get_peft_model(bb.adapter.load_model(bb.path), LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0, target_modules=bb.adapter.lora_target_regex))
        args = TrainingArguments(
            output_dir=tempfile.mkdtemp(prefix="livr-bench-hf-"), per_device_train_batch_size=1, max_steps=steps,
            learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, lr_scheduler_type="cosine",
            warmup_steps=1, max_grad_norm=cfg.optim.grad_clip, deepspeed=hf_ds, report_to=[], save_strategy="no",
            logging_steps=10**6, disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
            use_cpu=True)
        timer = Timer()
        timer.times = []
        Trainer(model=hf, args=args, train_dataset=hf_batches, data_collator=lambda items: items[0],
                callbacks=[timer]).train()
        theirs += timer.times[1:]
    tokens = statistics.median(int((b["segment_ids"] != PAD).sum()) for b in batches)
    a, b = statistics.median(ours), statistics.median(theirs)
    return [{"stack": "livr-ds (DeepSpeed engine loop)", "step_s": a, "tokens_per_s": tokens / a},
            {"stack": "transformers Trainer + PEFT + DeepSpeed", "step_s": b, "tokens_per_s": tokens / b},
            {"stack": "ratio livr-ds / Trainer (steps/s)", "step_s": b / a, "tokens_per_s": None}]


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
    from . import segments

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
    from .config import load_config
    from .data.collate import LivrCollator
    from .generate import to_device
    from .modeling import build_backbone

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if backends is None:
        try:
            import flash_attn  # noqa: F401
            standard = "flash"
        except ImportError:
            standard = "sdpa"
        backends = ("flex", standard) if cuda else ("sdpa",)
    samples = _demo_samples(data_dir, batch_size)
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

                steps[(backend, layout, policy)] = _synced(step)
    t = _interleaved(steps, repeats)
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
    (inside one latent-row merge, as evaluate.evaluate runs), medians of `repeats` calls each."""
    from . import generate
    from .config import load_config
    from .data.collate import LivrCollator
    from .evaluate import get_mode
    from .modeling import build_backbone

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = load_config(None, [f"model.family={family}", f"model.path={model_path}", "latents.num=16",
                             "model.attn_backend=sdpa", f"model.dtype={'bfloat16' if cuda else 'float32'}",
                             f"model.min_pixels={image_pixels}", f"model.max_pixels={image_pixels}",
                             "lora.dropout=0.0"])
    bb = build_backbone(cfg, policy="standard", device=device)
    model = bb.model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    sample = _demo_samples(data_dir, 1)[0]
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

    # The eval loop (evaluate.evaluate) runs inside modeling.merged_latent_rows, as timed here. For
    # an export loaded through PEFT that writes the trained rows into the table once per run
    # instead of PEFT copying the table at every call; the training model's LatentRows hooks touch
    # only the latent positions, so for it the merge is a no-op (merge_s ~ 0).
    from .modeling import merged_latent_rows

    t = {"train": _timeit(_synced(train_step), repeats)}
    t0 = time.perf_counter()
    with merged_latent_rows(model.hf_model):
        merge_s = time.perf_counter() - t0
        new_tokens = len(evaluate(True)()[0])
        t["eval"] = _timeit(_synced(evaluate(True)), repeats)
        if reference:
            t["eval_recompute"] = _timeit(_synced(evaluate(False)), repeats)
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
        row["embed_call_s"] = _timeit(_synced(lambda: hf.get_input_embeddings()(one)), 3)
        row["head_call_s"] = _timeit(_synced(lambda: hf.lm_head(hidden)), 3)
    return row
