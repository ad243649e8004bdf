"""Peak memory of `livr-ds export --merge` on the Qwen2.5-VL-7B architecture (docs/performance.md,
"Merging: peak memory").

    python launch/merge_check.py --work /tmp/merge-check [--in-memory] [--keep] [--arch arch:qwen2_5_vl_7b]

Steps, each its own process (so that this one stays small and each child's ru_maxrss is its own):
  1. the published 7B architecture (`arch:qwen2_5_vl_7b`, models/archs.py) with random bf16 weights,
     saved as safetensors shards of at most 5 GB with the family's tiny tokenizer and processor files;
  2. an adapter export of it through livr-ds's own training code path (build_backbone on that
     directory, K=16 latents, LoRA r16 on the usual targets, LoRA B and the latent rows randomised
     so that both change the weights, save_export);
  3. `livr-ds export --merge` on the export (the streaming merge), timed, ru_maxrss from wait4;
  4. with --in-memory, the old in-memory merge (merge_export(..., streaming=False)) the same way.
The files are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BUILD = """
import json, os, sys, torch
from livr_ds.models import get_adapter
from livr_ds.models.archs import build_random
out, arch = sys.argv[1:3]
adapter = get_adapter("qwen2_5_vl")
torch.manual_seed(0)
processor, model = build_random(arch, adapter, dtype=torch.bfloat16, attn_implementation="sdpa")
model.save_pretrained(out, max_shard_size="5GB")
processor.tokenizer.save_pretrained(out)
processor.image_processor.save_pretrained(out)
with open(os.path.join(out, "chat_template.jinja"), "w") as f:
    f.write(processor.chat_template)
with open(os.path.join(out, "processor_config.json"), "w") as f:
    json.dump({"processor_class": type(processor).__name__}, f)
"""

EXPORT = """
import sys, torch
from livr_ds.config import load_config
from livr_ds.export import save_export
from livr_ds.modeling import build_backbone
base, out = sys.argv[1:3]
cfg = load_config(None, ["model.family=qwen2_5_vl", f"model.path={base}", "model.dtype=bfloat16",
                         "latents.num=16", "lora.r=16", "lora.dropout=0.0"])
bb = build_backbone(cfg, policy="standard")
torch.manual_seed(1)
with torch.no_grad():
    for name, p in bb.model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.01)
        elif name == "latent_rows.weight":
            p.normal_(0, 0.02)
save_export(bb, cfg, 1, out)
"""

IMPORTS = "import livr_ds.cli, livr_ds.export.merge"
IN_MEMORY = "import sys; from livr_ds.export.merge import merge_export; merge_export(sys.argv[1], sys.argv[2], streaming=False)"


def run(argv: list[str], may_fail: bool = False) -> dict:
    """Run a child to completion: its wall time and peak RSS (ru_maxrss of wait4, KiB on Linux)."""
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and may_fail:  # e.g. the in-memory merge killed for memory (-9)
        return {"exit_code": code, "wall_s": round(time.time() - t0, 1), "peak_rss_bytes": usage.ru_maxrss * 1024}
    if code != 0:
        sys.exit(f"{argv[:3]} failed ({status}):\n{stderr.decode()[-3000:]}")
    return {"wall_s": round(time.time() - t0, 1), "peak_rss_bytes": usage.ru_maxrss * 1024}


def weights_bytes(path: str) -> int:
    """The tensors' bytes in a directory of safetensors files (their headers' last offsets)."""
    total = 0
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            total += max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/merge-check")
    p.add_argument("--arch", default="arch:qwen2_5_vl_7b", help="e.g. arch:qwen2_5_vl_7b:2 for a smoke run")
    p.add_argument("--in-memory", action="store_true", help="also measure the old in-memory merge")
    p.add_argument("--keep", action="store_true", help="keep the files")
    args = p.parse_args()
    base, export, merged, old = (os.path.join(args.work, n) for n in ("base", "final", "merged", "merged-in-memory"))
    os.makedirs(args.work, exist_ok=True)
    py = sys.executable
    report = {}
    try:
        if not os.path.isfile(os.path.join(base, "processor_config.json")):
            report["build"] = run([py, "-c", BUILD, base, args.arch])
        if not os.path.isfile(os.path.join(export, "livr.json")):
            report["export"] = run([py, "-c", EXPORT, base, export])
        report["weights_bytes"] = weights_bytes(base)
        report["imports"] = run([py, "-c", IMPORTS])
        cli = [py, "-m", "livr_ds.cli", "export", "--merge", "--ckpt", export, "--out", merged]
        report["command"] = " ".join(["livr-ds", *cli[3:]])
        report["streaming"] = run(cli)
        report["streaming"]["shards"] = len([f for f in os.listdir(merged) if f.endswith(".safetensors")])
        report["merged_weights_bytes"] = weights_bytes(merged)
        if args.in_memory:
            report["in_memory"] = run([py, "-c", IN_MEMORY, export, old], may_fail=True)
            index = "model.safetensors.index.json"
            if os.path.isfile(os.path.join(merged, index)) and os.path.isfile(os.path.join(old, index)):
                with open(os.path.join(merged, index)) as a, open(os.path.join(old, index)) as b:
                    report["same_index"] = json.load(a) == json.load(b)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    gib = 1 << 30
    for key in ("imports", "streaming", "in_memory"):
        if key in report:
            report[key]["peak_rss_gib"] = round(report[key]["peak_rss_bytes"] / gib, 2)
    report["weights_gib"] = round(report["weights_bytes"] / gib, 2)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
