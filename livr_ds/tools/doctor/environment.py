"""The interpreter, torch and its build, the GPUs with their memory, bf16 and NCCL: what every
later check depends on (`torch_build` and `gpus_visible` set `self.torch` and `self.gpus`)."""

from __future__ import annotations

import os
import shutil
import sys

from .report import Findings

GiB = 1 << 30


class EnvironmentChecks(Findings):
    def python(self) -> None:
        v = sys.version_info
        ok = v >= (3, 10)
        self.add("ok" if ok else "FAIL", "python", f"{sys.version.split()[0]} ({sys.executable})",
                 "" if ok else "livr-ds needs Python >= 3.10")

    def torch_build(self) -> None:
        try:
            import torch
        except Exception as e:  # noqa: BLE001
            self.add("FAIL", "torch", f"does not import: {e}",
                     "pip install torch (CPU machine: pip install torch==2.13.0 first, README)")
            return
        self.torch = torch
        if torch.version.cuda:
            self.add("ok", "torch", f"{torch.__version__}, CUDA {torch.version.cuda} build")
        elif getattr(torch.version, "hip", None):
            self.add("warn", "torch", f"{torch.__version__}, ROCm {torch.version.hip} build (untested with livr-ds)")
        else:
            self.add("ok", "torch", f"{torch.__version__}, CPU build (no CUDA)")

    def gpus_visible(self) -> None:
        torch = self.torch
        if torch is None:
            return
        self.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        slurm_gpus = os.environ.get("SLURM_GPUS_ON_NODE") or os.environ.get("SLURM_JOB_GPUS")
        if not self.gpus:
            if slurm_gpus and slurm_gpus != "0":
                self.add("FAIL", "GPUs", f"the allocation has GPUs ({slurm_gpus}) but torch sees none"
                         + ("" if torch.version.cuda else ": torch is a CPU build"),
                         "install the CUDA build of torch; check CUDA_VISIBLE_DEVICES and the driver (nvidia-smi)")
            elif shutil.which("nvidia-smi") and not torch.version.cuda:
                self.add("warn", "GPUs", "nvidia-smi is here but torch is a CPU build: training would use the CPU",
                         "install the CUDA build of torch, then pip install -e '.[gpu]'")
            else:
                self.add("note", "GPUs", "no GPU visible: runs use the CPU and gloo (fine for the demo and the tests)")
            return
        parts = []
        for i in range(self.gpus):
            p = torch.cuda.get_device_properties(i)
            try:
                free, total = torch.cuda.mem_get_info(i)
                mem = f"{free / GiB:.0f}/{total / GiB:.0f} GiB free"
            except Exception:  # noqa: BLE001
                mem = f"{p.total_memory / GiB:.0f} GiB"
            parts.append(f"{i}: {p.name} ({mem}, sm_{p.major}{p.minor})")
        self.add("ok", "GPUs", f"{self.gpus} visible: " + "; ".join(parts))

    def bf16(self) -> None:
        torch = self.torch
        if torch is None:
            return
        wants = self.cfg is not None and self.cfg.model.dtype == "bfloat16"
        if self.gpus:
            ok = torch.cuda.is_bf16_supported()
            status = "ok" if ok else ("FAIL" if wants else "warn")
            self.add(status, "bf16", "supported on the GPU" if ok else "not supported on this GPU (pre-Ampere)",
                     "" if ok else "model.dtype=float32 (the GPU has no bf16)")
            return
        try:
            x = torch.ones(4, 4, dtype=torch.bfloat16)
            ok = bool(((x @ x).float() == 4).all())
        except Exception:  # noqa: BLE001
            ok = False
        if ok:
            self.add("ok", "bf16", "bf16 matmul works on the CPU (model.dtype float32 is the CPU default)")
        else:
            self.add("FAIL" if wants else "note", "bf16", "no bf16 on this CPU", "model.dtype=float32")

    def nccl(self) -> None:
        torch = self.torch
        if torch is None:
            return
        dist = torch.distributed  # capability queries only; collectives go through livr_ds/distributed.py

        if not dist.is_available():
            self.add("FAIL", "torch.distributed", "this torch has no torch.distributed",
                     "install a standard torch build")
            return
        if dist.is_nccl_available():
            try:
                v = ".".join(map(str, torch.cuda.nccl.version()))
            except Exception:  # noqa: BLE001
                v = "version unknown"
            self.add("ok", "NCCL", f"available ({v})")
        elif self.gpus:
            self.add("FAIL", "NCCL", "not in this torch build: several GPUs cannot train together",
                     "install the CUDA build of torch from pytorch.org")
        else:
            gloo = "gloo available" if dist.is_gloo_available() else "and no gloo either"
            self.add("note" if dist.is_gloo_available() else "FAIL", "NCCL",
                     f"not in this build: not needed without a GPU ({gloo})")
