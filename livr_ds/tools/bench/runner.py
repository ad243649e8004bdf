"""Running the benchmarks: which ran, the JSON they write, the tables they print, the CLI."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile

import torch

from ... import distributed as dist
from .archs import bench_arch, bench_eval
from .loader import bench_loader, bench_loader_io
from .masks import bench_mask
from .precision import bench_grad_accum
from .steps import bench_packing, bench_stage
from .trainer import bench_vs_trainer


def run_all(out: str, model_path: str | None, family: str, data_dir: str | None, only=None, repeats=10,
            archs=("qwen2_5_vl_3b", "qwen3_vl_4b"), arch_batch: int = 8, image_pixels: int = 448 * 448,
            peak_tflops: float | None = None) -> dict:
    tmp = tempfile.mkdtemp(prefix="livr-bench-")  # every file the benchmarks write; removed at the end
    try:
        return _run_all(tmp, out, model_path, family, data_dir, only, repeats, archs, arch_batch, image_pixels,
                        peak_tflops)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        dist.shutdown()


def _run_all(tmp, out, model_path, family, data_dir, only, repeats, archs, arch_batch, image_pixels,
             peak_tflops) -> dict:
    from ...data.demo import make_demo
    from ...models import get_adapter

    model_path = model_path or get_adapter(family).write_tiny(os.path.join(tmp, "tiny"))
    if data_dir is None:
        data_dir = os.path.join(tmp, "demo")
        make_demo(data_dir, seed=0, n_train=32, n_val=4, n_test=4)
    torch.manual_seed(0)
    result = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
              "model": model_path, "family": family}
    todo = only or ["stage", "mask", "packing", "loader", "trainer", "precision"] + (["arch", "eval"] if torch.cuda.is_available()
                                                                       else [])
    if "stage" in todo:
        result["stage"] = bench_stage(model_path, family, data_dir, repeats=repeats)
    if "mask" in todo:
        result["mask"] = bench_mask()
    if "packing" in todo:
        result["packing"] = bench_packing(model_path, family, data_dir, repeats=max(3, repeats // 2))
    if "loader" in todo:
        result["loader"] = bench_loader(model_path, family, data_dir)
        result["loader_io"] = bench_loader_io(work_dir=tmp)
        if "stage" in result:
            step = min(r["stage1_s"] for r in result["stage"])
            result["loader_vs_consumption"] = {"train_samples_per_s": 8 / step,
                                               "best_loader_samples_per_s": max(r["samples_per_s"] for r in result["loader"])}
    if "trainer" in todo:
        result["trainer"] = bench_vs_trainer(model_path, family, data_dir, work_dir=tmp)
    if "precision" in todo:
        result["precision"] = bench_grad_accum(model_path, family, data_dir)
    if "arch" in todo:
        from ...models.archs import arch_spec

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
        from ...models.archs import arch_spec

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
    table("bf16 gradient accumulation: relative L2 error of the gradient the optimizer gets", result.get("precision"))
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
    p.add_argument("--only", nargs="+", choices=["stage", "mask", "packing", "loader", "trainer", "precision", "arch", "eval"],
                   help="default: all (arch and eval only when a GPU is present)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--arch", nargs="+", default=["qwen2_5_vl_3b", "qwen3_vl_4b"],
                   help="published architectures for `arch` and `eval` (random weights; NAME:N keeps N LM layers)")
    p.add_argument("--arch-batch", type=int, default=8, help="samples per step in `arch`")
    p.add_argument("--image-pixels", type=int, default=448 * 448,
                   help="pixels per image in `arch` and `eval` (sets token count)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU when the GPU is not in the table")
    p.set_defaults(func=_bench_cmd)
