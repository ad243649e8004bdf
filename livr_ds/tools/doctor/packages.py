"""The installed stack: DeepSpeed (imports, and whether its optimizer needs an op build), the
versions against setup.py's pins, and torchvision."""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import json
import os
import re
import shutil

from ...config import PROJECT_ROOT
from .report import Findings

TESTED = ("torch", "deepspeed", "transformers", "tokenizers", "peft", "accelerate", "webdataset")


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


class PackageChecks(Findings):
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
