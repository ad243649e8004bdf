"""The attention kernels: flash-attn (importable, so built for this torch) and flex attention
compiling on this device."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

from .report import Findings

FLEX_TIMEOUT_S = 300

# A tiny flex-attention call under torch.compile, in a subprocess (a broken Triton or compiler
# can hang or crash the process). argv: device, backward (0/1).
FLEX_PROBE = r"""
import sys, torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
dev, backward = sys.argv[1], sys.argv[2] == "1"
dtype = torch.bfloat16 if dev == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
q = torch.randn(1, 2, 128, 64, device=dev, dtype=dtype, requires_grad=backward)
mask = create_block_mask(lambda b, h, i, j: i >= j, 1, 1, 128, 128, device=dev)
out = torch.compile(flex_attention)(q, q, q, block_mask=mask)
ref = torch.nn.functional.scaled_dot_product_attention(q.float(), q.float(), q.float(), is_causal=True)
if backward:
    out.float().sum().backward()
print("FLEX_OK %.1e %s" % ((out.float() - ref).abs().max().item(), dtype))
"""


class KernelChecks(Findings):
    def flash_attn(self) -> None:
        backend = self.cfg.model.attn_backend if self.cfg is not None else "auto"
        if importlib.util.find_spec("flash_attn") is None:
            if backend == "flash":
                self.add("FAIL", "flash-attn", "not installed but model.attn_backend=flash",
                         "pip install -e '.[gpu]' (a GPU machine), or model.attn_backend=auto")
            elif self.gpus:
                self.add("note", "flash-attn", "not installed: Stage 2 uses sdpa (flash-attn is faster)",
                         "pip install -e '.[gpu]' --no-build-isolation")
            else:
                self.add("note", "flash-attn", "not installed: GPU only, not needed here")
            return
        try:
            import flash_attn
            from flash_attn import flash_attn_func  # noqa: F401 - loads the compiled extension
        except Exception as e:  # noqa: BLE001
            msg = str(e).splitlines()[0][:160]
            self.add("FAIL" if backend == "flash" else "warn", "flash-attn",
                     f"installed but does not import ({msg}): built for another torch or CUDA; "
                     "model.attn_backend=auto falls back to sdpa",
                     "pip install --force-reinstall --no-build-isolation flash-attn (built against this torch)")
            return
        self.add("ok", "flash-attn", f"{flash_attn.__version__} imports with this torch (its CUDA extension loads)")

    def flex(self) -> None:
        torch = self.torch
        if torch is None:
            return
        dev = "cuda" if self.gpus else "cpu"
        if dev == "cpu" and self.quick:
            self.add("note", "flex attention", "compile not tried (--quick; CPU training uses sdpa, never flex)")
            return
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except Exception as e:  # noqa: BLE001
            self.add("FAIL" if self.gpus else "note", "flex attention", f"not in this torch ({e})",
                     "torch >= 2.6 (setup.py)" if self.gpus else "")
            return
        try:
            r = subprocess.run([sys.executable, "-c", FLEX_PROBE, dev, "1" if dev == "cuda" else "0"],
                               capture_output=True, text=True, timeout=FLEX_TIMEOUT_S)
            out, err = r.stdout, r.stderr
        except subprocess.TimeoutExpired:
            out, err = "", f"no result within {FLEX_TIMEOUT_S} s"
        m = re.search(r"FLEX_OK (\S+) (\S+)", out)
        if m:
            what = ("forward + backward compile and run on the GPU" if dev == "cuda" else
                    "forward compiles and runs on the CPU (CPU training uses sdpa; flex is the GPU path)")
            self.add("ok" if dev == "cuda" else "note", "flex attention",
                     f"torch.compile(flex_attention) {what}; {m.group(2).removeprefix('torch.')}, "
                     f"max error vs sdpa {m.group(1)}")
            return
        last = next((ln for ln in reversed(err.strip().splitlines()) if ln.strip()), "no output")[:200]
        if dev == "cuda":
            self.add("FAIL", "flex attention", f"does not compile on the GPU: {last}",
                     "the Stage 1 mask needs it with model.attn_backend=auto/flex: fix Triton / the C compiler, "
                     "or set model.attn_backend=sdpa (dense masks: more memory)")
        else:
            self.add("note", "flex attention", f"does not compile on this CPU ({last}); not used for CPU training")
