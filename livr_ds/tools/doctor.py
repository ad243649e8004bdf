"""`livr-ds doctor [--config C] [--set k=v ...]`: one screen on whether this machine can run a job.

Checks torch and its CUDA build, the GPUs and their memory, bf16, NCCL, flash-attn (importable,
so built for this torch), flex attention compiling on this device (a tiny compiled call, in a
subprocess; forward only on CPU, where training never uses it), DeepSpeed and whether its ops
need a build, the versions of the stack against setup.py's pins, torchvision (which breaks the
image processors on a CPU build), SLURM commands and the current allocation, and free disk where
output.dir goes. With --config: the model path (a local checkpoint with config.json, weights and
processor files, or tiny:/arch:), and every shard source (`ShardSource(...).resolve()`).

Each line is `ok`, `note` (fine here, worth knowing: no GPU on a CPU machine), `warn` (may matter:
a version other than the tested one) or `FAIL` (the run would stop: fix it first). Exit 1 when
anything FAILs, else 0. `--quick` (slurm/train.sbatch) skips the flex compile where no GPU is
visible and the shard scan (the trainer resolves the shards first, before loading the model,
and stops with exit 2).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

from ..config import PROJECT_ROOT

TESTED = ("torch", "deepspeed", "transformers", "tokenizers", "peft", "accelerate", "webdataset")
GiB = 1 << 30
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


@dataclass
class Check:
    status: str  # ok | note | warn | FAIL
    what: str
    detail: str
    fix: str = ""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def tested_pins() -> dict[str, str]:
    """package -> the requirement setup.py pins (installed metadata, else setup.py itself)."""
    try:
        reqs = metadata.requires("livr-ds") or []
    except metadata.PackageNotFoundError:
        reqs = []
        setup = os.path.join(PROJECT_ROOT, "setup.py")
        if os.path.exists(setup):
            with open(setup) as f:
                reqs = re.findall(r'"([A-Za-z0-9_.-]+\s*[<>=!~][^"]*)"', f.read())
    pins = {}
    for r in reqs:
        if ";" in r:
            continue
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(.*)", r)
        if m:
            pins[m.group(1).lower()] = m.group(2).strip()
    return pins


def _satisfies(version: str, spec: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return Version(version) in SpecifierSet(spec)
    except Exception:  # noqa: BLE001 - no packaging, or an odd version string: compare pins literally
        return not spec.startswith("==") or version == spec[2:]


# ---- the checks --------------------------------------------------------------------------------

class Doctor:
    def __init__(self, cfg=None, ds_path: str | None = None, quick: bool = False):
        self.cfg = cfg
        self.ds_path = ds_path
        self.quick = quick
        self.checks: list[Check] = []
        self.gpus = 0
        self.torch = None

    def add(self, status: str, what: str, detail: str, fix: str = "") -> None:
        self.checks.append(Check(status, what, detail, fix))

    def run(self) -> list[Check]:
        for step in (self.python, self.torch_build, self.gpus_visible, self.bf16, self.nccl, self.flash_attn,
                     self.flex, self.deepspeed, self.versions, self.torchvision, self.slurm, self.disk,
                     self.model, self.data):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - a check that crashes is itself the finding
                self.add("FAIL", step.__name__, f"the check itself failed: {type(e).__name__}: {e}")
        return self.checks

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
        dist = torch.distributed  # capability queries only; collectives go through train/distributed.py

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

    def deepspeed(self) -> None:
        v = _version("deepspeed")
        if v is None:
            self.add("FAIL", "DeepSpeed", "not installed", "pip install -e . (setup.py pins deepspeed)")
            return
        try:
            import deepspeed  # noqa: F401
        except Exception as e:  # noqa: BLE001
            self.add("FAIL", "DeepSpeed", f"{v} does not import: {str(e).splitlines()[0][:160]}",
                     "reinstall deepspeed against this torch (pip install --force-reinstall deepspeed==<pin>)")
            return
        ds = self.ds_path or (os.path.join(PROJECT_ROOT, self.cfg.deepspeed) if self.cfg is not None
                              else os.path.join(PROJECT_ROOT, "ds_configs", "zero2.json"))
        opt = {}
        if os.path.exists(ds):
            with open(ds) as f:
                opt = json.load(f).get("optimizer") or {}
        torch_adam = bool((opt.get("params") or {}).get("torch_adam"))
        shown = os.path.relpath(ds) if not os.path.relpath(ds).startswith("..") else ds
        if torch_adam:
            ops = f"imports; no op build needed: torch_adam ({shown})"
        elif opt:
            ops = (f"imports; optimizer {opt.get('type')} ({shown}) is JIT-built at start "
                   "(needs nvcc + ninja, about a minute); torch_adam needs no build")
        else:
            ops = "no optimizer section found: livr-ds's ds_configs use torch_adam, which needs no build"
        if not self.gpus:
            cxx = shutil.which("c++") or shutil.which("g++")
            ops += ("; CPU ranks build a shared-memory comm op once with " + (cxx or "a C++ compiler (none found!)")
                    + " (cached)")
        status = "ok" if torch_adam or not opt else "note"
        if not self.gpus and not (shutil.which("c++") or shutil.which("g++")):
            status = "warn"
        self.add(status, "DeepSpeed", f"{v} {ops}")

    def versions(self) -> None:
        pins = tested_pins()
        bad, missing, good = [], [], []
        for pkg in TESTED:
            v = _version(pkg)
            spec = pins.get(pkg, "")
            if v is None:
                missing.append(pkg)
            elif spec and not _satisfies(v, spec):
                bad.append(f"{pkg} {v} (tested: {spec})")
            elif pkg not in ("torch", "deepspeed"):  # those two have their own lines
                good.append(f"{pkg} {v}")
        if missing:
            self.add("FAIL", "packages", f"not installed: {', '.join(missing)}", 'pip install -e ".[dev]"')
        if bad:
            self.add("warn", "versions", "differ from setup.py's tested pins: " + "; ".join(bad),
                     'pip install -e . restores them (docs/training.md: what to re-check on a DeepSpeed upgrade)')
        if good:
            self.add("ok", "versions", ", ".join(good) + " (as setup.py pins)")

    def torchvision(self) -> None:
        if importlib.util.find_spec("torchvision") is None:
            return
        try:
            import torchvision
        except Exception as e:  # noqa: BLE001
            self.add("FAIL", "torchvision", f"installed but broken ({str(e).splitlines()[0][:120]}): it breaks every "
                     "transformers image processor import", "pip uninstall -y torchvision (livr-ds does not need it)")
            return
        self.add("ok", "torchvision", f"{torchvision.__version__} imports")

    def slurm(self) -> None:
        cmds = [c for c in ("sbatch", "srun", "scontrol", "squeue") if shutil.which(c)]
        job = os.environ.get("SLURM_JOB_ID")
        names = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NUM_NODES", "SLURM_JOB_NODELIST",
                 "SLURM_GPUS_ON_NODE", "SLURM_CPUS_PER_TASK", "SLURM_PROCID", "SLURM_RESTART_COUNT",
                 "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
        env = ", ".join(f"{k}={os.environ[k]}" for k in names if os.environ.get(k))
        if job:
            missing = [c for c in ("srun", "scontrol") if c not in cmds]
            self.add("FAIL" if missing else "ok", "SLURM", f"inside allocation: {env}",
                     f"{', '.join(missing)} not on PATH: slurm/train.sbatch needs them" if missing else "")
        elif cmds:
            self.add("ok", "SLURM", f"{', '.join(cmds)} found; not inside an allocation" + (f" ({env})" if env else ""))
        else:
            self.add("note", "SLURM", "no sbatch/srun here: launch with deepspeed or torchrun (slurm/ needs a cluster)"
                     + (f"; {env}" if env else ""))

    def disk(self) -> None:
        out = self.cfg.output.dir if self.cfg is not None else "runs"
        probe = os.path.abspath(out)
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        free = shutil.disk_usage(probe).free
        where = f"output.dir {out}" + ("" if probe == os.path.abspath(out) else f" (to be created under {probe})")
        if not os.access(probe, os.W_OK):
            self.add("FAIL", "disk", f"{where}: not writable", "set output.dir to a writable directory")
        elif free < GiB:
            self.add("FAIL", "disk", f"{where}: {free / GiB:.1f} GiB free", "free space or move output.dir")
        elif free < 10 * GiB:
            self.add("warn", "disk", f"{where}: {free / GiB:.1f} GiB free (checkpoints, exports and a merged model "
                     "of a 3B backbone need several GiB)")
        else:
            self.add("ok", "disk", f"{where}: {free / GiB:.0f} GiB free")

    def model(self) -> None:
        cfg = self.cfg
        if cfg is None:
            return
        from ..models.archs import ARCH_PREFIX, arch_spec

        path = cfg.model.path
        if not path:
            self.add("FAIL", "model.path", "empty", "--set model.path=DIR (a local checkpoint) or tiny:DIR")
            return
        if path.startswith("tiny:"):
            d = os.path.abspath(path[len("tiny:"):])
            if os.path.exists(os.path.join(d, "livr_tiny.json")):
                self.add("ok", "model.path", f"{path}: tiny random {cfg.model.family} model at {d}")
            else:
                parent = d
                while not os.path.exists(parent):
                    parent = os.path.dirname(parent)
                ok = os.access(parent, os.W_OK)
                self.add("ok" if ok else "FAIL", "model.path",
                         f"{path}: a tiny random model, written on first use at {d}",
                         "" if ok else f"{parent} is not writable")
            return
        if path.startswith(ARCH_PREFIX):
            try:
                spec, layers = arch_spec(path)
            except ValueError as e:
                self.add("FAIL", "model.path", str(e))
                return
            if spec["family"] != cfg.model.family:
                self.add("FAIL", "model.path", f"{path} is a {spec['family']} architecture but model.family is "
                         f"{cfg.model.family}", f"--set model.family={spec['family']}")
                return
            self.add("ok", "model.path", f"{path}: the published architecture, random weights (no download)")
            return
        if not os.path.isdir(path):
            self.add("FAIL", "model.path", f"{path} does not exist (or is not a directory)",
                     "livr-ds loads checkpoints offline: download one first (huggingface-cli download <repo> "
                     "--local-dir DIR on a machine with network) and set model.path=DIR")
            return
        files = set(os.listdir(path))
        problems = []
        if "config.json" not in files:
            problems.append("no config.json")
        if not any(f.endswith((".safetensors", ".bin")) or f.endswith(".index.json") for f in files):
            problems.append("no weights (*.safetensors)")
        if not files & {"preprocessor_config.json", "processor_config.json"}:
            problems.append("no preprocessor_config.json (the image processor)")
        if not files & {"tokenizer.json", "tokenizer.model", "vocab.json"}:
            problems.append("no tokenizer files (tokenizer.json)")
        template = files & {"chat_template.jinja", "chat_template.json"}
        if not template and "tokenizer_config.json" in files:
            with open(os.path.join(path, "tokenizer_config.json")) as f:
                template = {"tokenizer_config.json"} if "chat_template" in json.load(f) else set()
        if not template:
            problems.append("no chat template")
        if problems:
            self.add("FAIL", "model.path", f"{path}: {'; '.join(problems)}",
                     "point model.path at a complete checkpoint directory (config, weights, processor, tokenizer)")
            return
        model_type = None
        if "config.json" in files:
            with open(os.path.join(path, "config.json")) as f:
                model_type = json.load(f).get("model_type")
        if model_type and model_type != cfg.model.family and not cfg.model.trust_remote_code:
            self.add("warn", "model.path", f"{path}: config.json says model_type {model_type!r}, model.family is "
                     f"{cfg.model.family!r}", f"--set model.family={model_type} if that is the family")
            return
        self.add("ok", "model.path", f"{path}: config.json ({model_type}), weights, processor and tokenizer files")

    def data(self) -> None:
        cfg = self.cfg
        if cfg is None:
            return
        if not cfg.data.train:
            self.add("FAIL", "data.train", "empty", "--set data.train=[SHARD_DIR]")
            return
        if self.quick:
            self.add("note", "data", "shards not scanned (--quick): the trainer resolves them first and stops with "
                     "exit 2 on a missing one")
            return
        from ..data.schema import DataError
        from ..data.sources import ShardSource

        for key, sources, split in (("data.train", cfg.data.train, cfg.data.train_split),
                                    ("data.val", cfg.data.val, cfg.data.val_split)):
            for s in sources:
                try:
                    # A check must not change what it checks: indexes it builds go to the cache dir.
                    shards = ShardSource(s.path, weight=s.weight, split=split).resolve(store_beside=False)
                except (DataError, OSError) as e:
                    self.add("FAIL", key, str(e),
                             "write shards with `livr-ds shards ...` (docs/data.md) or fix the path")
                    continue
                n = sum(sh.count for sh in shards)
                self.add("ok", key, f"{s.path} ({split}): {len(shards)} shard(s), {n} samples")


# ---- the screen ---------------------------------------------------------------------------------

def render(checks: list[Check]) -> str:
    width = max(len(c.what) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"  {c.status:<4}  {c.what:<{width}}  {c.detail}")
        if c.fix and c.status in ("FAIL", "warn"):
            lines.append(f"  {'':<4}  {'':<{width}}  -> {c.fix}")
    fails = sum(c.status == "FAIL" for c in checks)
    warns = sum(c.status == "warn" for c in checks)
    notes = sum(c.status == "note" for c in checks)
    counts = f"{warns} warning(s), {notes} note(s)"
    if fails:
        lines.append(f"{fails} problem(s) would stop a run (FAIL above; fix them and run livr-ds doctor again); "
                     f"{counts}")
    else:
        lines.append(f"no blocking problem: ready to train. {counts}")
    return "\n".join(lines)


def doctor_cmd(args) -> int:
    cfg = None
    head = "livr-ds doctor" + (f": {args.config}" if args.config else ": this machine (give --config to check a run)")
    print(head, flush=True)
    if args.config or args.overrides:
        from ..config import ConfigError, load_config

        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            print(render([Check("FAIL", "config", str(e), "fix the key named above")]))
            return 1
    checks = Doctor(cfg, ds_path=args.ds, quick=args.quick).run()
    print(render(checks), flush=True)
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def add_doctor_command(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="check that this machine (and a config's model and data) can run a job",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML: also check its model path, processor files and shard sources")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, as launch/train.py does (repeatable)")
    p.add_argument("--ds", help="DeepSpeed JSON whose optimizer is checked (default: the config's `deepspeed` key)")
    p.add_argument("--quick", action="store_true",
                   help="skip the flex compile without a GPU and the shard scan (what slurm/train.sbatch runs)")
    p.set_defaults(func=doctor_cmd)
