"""What one check finds (`Check`), the state the groups of checks share (`Findings`), and the
screen they end on (`render`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Check:
    status: str  # ok | note | warn | FAIL
    what: str
    detail: str
    fix: str = ""


class Findings:
    """Base of every group of checks: the config under check, the findings so far, and what an
    earlier check learnt that later ones read (`torch` once it imports, `gpus` once counted)."""

    def __init__(self, cfg=None, ds_path: str | None = None, quick: bool = False):
        self.cfg = cfg
        self.ds_path = ds_path
        self.quick = quick
        self.checks: list[Check] = []
        self.gpus = 0
        self.torch = None

    def add(self, status: str, what: str, detail: str, fix: str = "") -> None:
        self.checks.append(Check(status, what, detail, fix))


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
