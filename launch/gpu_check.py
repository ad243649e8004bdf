"""GPU first contact: the real entry points on a GPU node, offline, in a few minutes, one JSON.

    python launch/gpu_check.py --out gpu_check/            # on a GPU node (1+ GPUs)
    python launch/gpu_check.py --out gpu_check/ --cpu      # the same pipeline on CPU (the test suite)

What it runs, in order (each step is recorded with ok / seconds / details; a failed step does
not stop the later ones unless they need its output):
  1. env        torch / CUDA / GPU / bf16 / flash-attn / DeepSpeed / transformers / peft versions
  2. data       `livr-ds shards demo` (two tasks, small)
  3. reference  Stage 1 on CPU, fp32, sdpa, 1 rank: the loss curve everything is compared with
  4. stage1     `launch/train.py --stage 1` on the device (bf16 and flex attention for the
                bottleneck mask on a GPU), killed with SIGKILL after step 2, then `--resume auto`
  5. compare    the device's Stage 1 losses vs the CPU fp32 reference, step by step
                (loss and gradient norm; --loss-rtol, default 5% (grad norm 10%) on a GPU for bf16 +
                flex vs fp32 + sdpa; 0 on CPU, where the two runs must agree bit for bit)
  6. zero3      Stage 1 under ds_configs/zero3.json on up to 2 devices; its losses vs step 4's
  7. stage2     `launch/train.py --stage 2 --init-from <stage1>` (flash-attn if installed, else sdpa)
  8. eval       `launch/eval.py` on the Stage 2 export in all four modes (device and dtype: auto)
  9. bench      `livr-ds bench --only mask arch eval` on the released 3B/4B architectures (GPU only),
                and the compiled BlockMask's device memory at L = 16k vs the dense mask
Summary: <out>/gpu_check.json; exit 1 if any step failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("standard", "no_latents", "bottleneck", "bottleneck_no_latents")


class Check:
    def __init__(self, out: str, env: dict):
        self.out, self.env = out, env
        self.steps: list[dict] = []

    def run(self, name: str, cmd: list[str], timeout: float, env: dict | None = None, expect_fail: bool = False):
        """A subprocess whose output goes to <out>/logs/<name>.log; recorded as a step."""
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        logfile = os.path.join(self.out, "logs", f"{name}.log")
        t0 = time.time()
        try:
            with open(logfile, "w") as f:
                r = subprocess.run(cmd, cwd=ROOT, env={**self.env, **(env or {})}, stdout=f, stderr=subprocess.STDOUT,
                                   timeout=timeout)
            code = r.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        ok = (code != 0 and code != "timeout") if expect_fail else code == 0
        step = {"step": name, "ok": ok, "seconds": round(time.time() - t0, 1), "returncode": code, "log": logfile}
        if not ok:
            with open(logfile) as f:
                step["tail"] = f.read()[-2000:]
        self.steps.append(step)
        print(f"[gpu_check] {name}: {'ok' if ok else 'FAILED'} ({step['seconds']} s)", flush=True)
        return step

    def record(self, name: str, ok: bool, **details):
        self.steps.append({"step": name, "ok": ok, **details})
        print(f"[gpu_check] {name}: {'ok' if ok else 'FAILED'} {json.dumps(details)[:300]}", flush=True)


def environment(cpu: bool) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "device_requested": "cpu" if cpu else "cuda"}
    if torch.cuda.is_available():
        info["gpus"] = [{"name": torch.cuda.get_device_name(i),
                         "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                        for i in range(torch.cuda.device_count())]
        info["bf16"] = torch.cuda.is_bf16_supported()
        info["nccl"] = torch.distributed.is_nccl_available()
    for mod in ("deepspeed", "transformers", "peft", "webdataset", "flash_attn"):
        try:
            info[mod] = importlib.import_module(mod).__version__
        except Exception as e:  # flash-attn may be installed against another torch build
            info[mod] = f"not importable ({type(e).__name__}: {str(e)[:120]})"
    return info


def metrics_rows(stage_dir: str) -> list[dict]:
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(stage_dir: str) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad norm)."""
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in metrics_rows(stage_dir) if "loss" in r}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--cpu", action="store_true", help="run the device steps on CPU (fp32, sdpa): the CI form")
    p.add_argument("--n-train", type=int, default=16, help="demo samples per task")
    p.add_argument("--loss-rtol", type=float, default=None, help="device vs CPU reference, per step")
    p.add_argument("--compare-steps", type=int, default=3)
    p.add_argument("--bench", default="auto", choices=["auto", "yes", "no"], help="auto: only on a GPU")
    p.add_argument("--bench-archs", nargs="+", default=["qwen2_5_vl_3b", "qwen3_vl_4b"])
    p.add_argument("--timeout", type=float, default=600, help="per step, seconds")
    args = p.parse_args(argv)

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    base_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    cpu_env = {"CUDA_VISIBLE_DEVICES": ""}
    device_env = cpu_env if args.cpu else {}
    check = Check(out, base_env)
    t_start = time.time()

    env = environment(args.cpu)
    on_gpu = env["cuda_available"] and not args.cpu
    check.record("env", args.cpu or on_gpu, **env)
    rtol = args.loss_rtol if args.loss_rtol is not None else (0.05 if on_gpu else 0.0)

    data = os.path.join(out, "demo_data")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        check.run("data", [py, "-m", "livr_ds.cli", "shards", "demo", "--out", data, "--n-train", str(args.n_train),
                           "--n-val", "4", "--n-test", "4", "--tasks", "counting", "localization", "--no-progress"],
                  args.timeout)
    tiny = os.path.join(out, "tiny-qwen2_5_vl")

    def train_cmd(run_dir: str, stage: str, dtype: str, extra=(), ds: str = "zero2", nproc: int = 1):
        sets = [f"model.path=tiny:{tiny}", f"data.train=[{data}]", f"data.val=[{data}]", f"output.dir={run_dir}",
                f"model.dtype={dtype}", "logging.wandb=disabled", "logging.every_steps=1", "logging.progress_bar=false",
                "schedule.stage1_epochs=2", "schedule.stage2_epochs=1", "optim.micro_batch_size=2",
                "optim.global_batch_size=8", "lora.dropout=0.0", "data.num_workers=1", "data.val_max_samples=8",
                "output.save_every_steps=1", "output.keep_last=2"]
        cmd = [py, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
               str(29400 + os.getpid() % 500), os.path.join(ROOT, "launch", "train.py"),
               "--ds", os.path.join(ROOT, "ds_configs", f"{ds}.json"),
               "--config", os.path.join(ROOT, "configs", "demo.yaml"), "--stage", stage]
        for s in sets:
            cmd += ["--set", s]
        return cmd + list(extra)

    ref_dir, dev_dir = os.path.join(out, "reference"), os.path.join(out, "device")
    for d in (ref_dir, dev_dir):
        shutil.rmtree(d, ignore_errors=True)
    dtype = "bfloat16" if on_gpu else "float32"
    check.run("reference_stage1_cpu_fp32", train_cmd(ref_dir, "1", "float32"), args.timeout, env=cpu_env)
    check.run("stage1_killed", train_cmd(dev_dir, "1", dtype), args.timeout,
              env={**device_env, "LIVR_DS_FAULT": "after_step:2"}, expect_fail=True)
    resumed = check.run("stage1_resume_auto", train_cmd(dev_dir, "1", dtype, ["--resume", "auto"]), args.timeout,
                        env=device_env)
    if resumed["ok"]:
        with open(resumed["log"]) as f:
            text = f.read()
        check.record("stage1_resumed_from_checkpoint", "resumed from" in text,
                     done=os.path.exists(os.path.join(dev_dir, "stage1", "DONE")))
        started = [line.split("INFO livr_ds.train.trainer: ")[1] for line in text.splitlines()
                   if "INFO livr_ds.train.trainer: stage 1 (" in line]
        check.record("stage1_backend", bool(started), trainer=started[:1])

    # A tiny random model's loss sits near ln(vocab) whatever it computes, so the gradient norm
    # (which moves with every logit) is compared too, at twice the loss tolerance.
    ref, dev = losses(os.path.join(ref_dir, "stage1")), losses(os.path.join(dev_dir, "stage1"))
    compared = []
    for step in sorted(ref)[: args.compare_steps]:
        if step in dev:
            rel = [abs(d - r) / max(abs(r), 1e-12) for d, r in zip(dev[step], ref[step])]
            compared.append({"step": step, "cpu_fp32": ref[step], "device": dev[step], "rel_diff_loss": rel[0],
                             "rel_diff_grad_norm": rel[1]})
    check.record("stage1_loss_vs_cpu_reference",
                 bool(compared) and all(c["rel_diff_loss"] <= rtol and c["rel_diff_grad_norm"] <= 2 * rtol
                                        for c in compared),
                 rtol=rtol, steps=compared, device_steps=len(dev), reference_steps=len(ref))

    # ZeRO-3 (parameters partitioned; every rank enters every module on every forward) on up to
    # 2 devices, against the device's ZeRO-2 Stage 1: the same recipe (global batch 8).
    z3_dir = os.path.join(out, "zero3")
    shutil.rmtree(z3_dir, ignore_errors=True)
    z3_ranks = min(2, len(env.get("gpus", [])) or 1) if on_gpu else 1
    z3 = check.run("stage1_zero3", train_cmd(z3_dir, "1", dtype, ds="zero3", nproc=z3_ranks), args.timeout,
                   env=device_env)
    if z3["ok"]:
        z2_losses, z3_losses = losses(os.path.join(dev_dir, "stage1")), losses(os.path.join(z3_dir, "stage1"))
        z3_tol = rtol if on_gpu else 1e-5  # CPU fp32: only the order of float sums differs
        rel = [abs(z3_losses[k][0] - z2_losses[k][0]) / max(abs(z2_losses[k][0]), 1e-12)
               for k in sorted(z2_losses) if k in z3_losses]
        check.record("stage1_zero3_vs_zero2", bool(rel) and max(rel) <= z3_tol, ranks=z3_ranks, rtol=z3_tol,
                     max_rel_diff_loss=max(rel) if rel else None, steps=len(rel))

    stage2 = check.run("stage2_init_from_stage1",
                       train_cmd(dev_dir, "2", dtype, ["--init-from", os.path.join(dev_dir, "stage1")]),
                       args.timeout, env=device_env)
    evals = {}
    if stage2["ok"]:
        for mode in MODES:
            res = os.path.join(out, "eval", f"{mode}.json")
            step = check.run(f"eval_{mode}", [py, os.path.join(ROOT, "launch", "eval.py"), "--ckpt",
                                               os.path.join(dev_dir, "stage2"), "--data", data, "--split", "test",
                                               "--mode", mode, "--out", res], args.timeout, env=device_env)
            if step["ok"]:
                with open(res) as f:
                    r = json.load(f)
                evals[mode] = {"mean": r["mean"], "n": r["n"], "device": r["provenance"].get("device"),
                               "dtype": r["provenance"].get("dtype"), "wall_s": r["provenance"].get("wall_s")}
        check.record("eval_results", len(evals) == len(MODES), results=evals)

    if args.bench == "yes" or (args.bench == "auto" and on_gpu):
        bench_out = os.path.join(out, "bench.json")
        check.run("bench", [py, "-m", "livr_ds.cli", "bench", "--only", "mask", "arch", "eval", "--repeats", "3",
                            "--arch", *args.bench_archs, "--out", bench_out], args.timeout)
        if os.path.exists(bench_out):
            # Training builds the BlockMask compiled: nothing L x L on the device, unlike the
            # uncompiled reference (livr_ds/segments.py block_mask).
            with open(bench_out) as f:
                longest = (json.load(f).get("mask") or [{}])[-1]
            check.record("flex_blockmask_compiled", longest.get("flex_compiled_peak_bytes", 1 << 62)
                         < longest.get("dense_bytes", 0) / 100, **longest)

    summary = {"ok": all(s["ok"] for s in check.steps), "seconds": round(time.time() - t_start, 1),
               "device": "cpu" if not on_gpu else env.get("gpus"), "steps": check.steps}
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: summary[k] for k in ("ok", "seconds", "device")}))
    print(f"[gpu_check] summary: {os.path.join(out, 'gpu_check.json')}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
