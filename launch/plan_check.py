"""Check `livr-ds plan`'s activation model against peak memory measured on CPU.

    python launch/plan_check.py [--layers 4] [--pixels 200704]

Builds `arch:qwen2_5_vl_3b:<layers>` (fp32, random weights, LoRA + 16 latent rows, dropout 0, sdpa),
makes one synthetic sample (one image of --pixels pixels, a multiple-choice question, its answer),
runs a warm-up forward + backward of the plain LivrModel, then measures a forward + backward with
gradient checkpointing off and on: peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the
RSS before the step, with glibc's mmap threshold fixed (see main) so the RSS follows the live tensors.
Prints predicted vs measured bytes and the relative error, one JSON line each.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from livr_ds import segments  # noqa: E402
from livr_ds.config import load_config  # noqa: E402
from livr_ds.data.collate import LivrCollator  # noqa: E402
from livr_ds.data.schema import Sample  # noqa: E402
from livr_ds.modeling import build_backbone, enable_gradient_checkpointing  # noqa: E402
from livr_ds.tools.memory_plan import activation_bytes, build_meta, count_shapes  # noqa: E402


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(step) -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    step()
    return _status("VmHWM") - before


def main() -> None:
    # glibc serves large allocations with mmap and returns them on free, but raises that threshold
    # to the size of each large block freed (up to 32 MiB), after which such blocks come from the
    # heap and are reused without the RSS growing: a step after a warm-up then reads low (measured:
    # 83 MiB for a step that holds ~300 MiB of activations). A fixed threshold keeps every block
    # over 64 KiB mmapped, so the RSS follows the live tensors. glibc reads it at start-up: re-exec.
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pixels", type=int, default=448 * 448)
    a = ap.parse_args()
    torch.set_num_threads(1)
    overrides = [f"model.path=arch:qwen2_5_vl_3b:{a.layers}", "model.dtype=float32", "latents.num=16",
                 "lora.dropout=0.0", "model.attn_backend=sdpa", f"model.min_pixels={a.pixels}",
                 f"model.max_pixels={a.pixels}"]
    cfg = load_config(None, overrides)
    bb = build_backbone(cfg, policy="bottleneck")
    model = bb.model.train()
    rng = np.random.default_rng(0)
    side = int(a.pixels ** 0.5)
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    sample = Sample(key="s0", task="t", question="Which colour is the square?",
                    choices=["red", "green", "blue", "yellow"], answer="A", images=[image])
    batch = LivrCollator(bb.adapter, bb.processor, bb.latent_ids, max_tokens=8192)([sample])
    tokens = int((batch["segment_ids"] != segments.PAD).sum())
    image_tokens = int((batch["segment_ids"] == segments.IMAGE).sum())
    answers = int((batch["labels"] != -100).sum())
    shapes = count_shapes(cfg, *build_meta(cfg))

    def step():
        model.zero_grad(set_to_none=True)
        model(batch, "bottleneck").backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: one-off allocations (thread pools, caches)
    for ckpt in (False, True):
        if ckpt:
            enable_gradient_checkpointing(model.peft_model, model.hf_model)  # as build_backbone does
            step()
        measured = min(measure(step) for _ in range(3))
        predicted, parts = activation_bytes(shapes, tokens=tokens, checkpointing=ckpt, dtype_bytes=4,
                                            answer_tokens=answers, image_tokens=image_tokens, detail=True)
        print(json.dumps({"arch": cfg.model.path, "tokens": tokens, "image_tokens": image_tokens,
                          "answer_tokens": answers, "gradient_checkpointing": ckpt,
                          "measured_mib": round(measured / 2**20, 1), "predicted_mib": round(predicted / 2**20, 1),
                          "error": round(predicted / measured - 1, 3),
                          "parts_mib": {k: round(v / 2**20, 1) for k, v in parts.items()}}), flush=True)


if __name__ == "__main__":
    main()
