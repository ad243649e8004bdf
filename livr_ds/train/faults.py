"""Fault injection for tests and users' drills: kill or preempt a real run at an exact place, or
poison one gradient. Off unless the environment asks for it.

    LIVR_DS_FAULT="<point>:<n>[:<SIGNAL>]"   rank 0 sends itself SIGNAL (default KILL) the n-th
                                             time it passes <point> (after_step, before_step_sync,
                                             validation, checkpoint_mid_save)
    LIVR_DS_NAN_GRAD_AT_STEP="<step>"        rank 0's first trainable gradient becomes NaN in that
                                             optimizer step (train/guards.py must stop the run)
"""

from __future__ import annotations

import logging
import os
import signal

from .. import distributed as dist

log = logging.getLogger(__name__)

FAULT_ENV = "LIVR_DS_FAULT"
NAN_GRAD_ENV = "LIVR_DS_NAN_GRAD_AT_STEP"
_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get(FAULT_ENV, "").split(":")
    if spec[0] != name or not dist.is_main():
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == (int(spec[1]) if len(spec) > 1 else 1):
        sig = getattr(signal, "SIG" + (spec[2] if len(spec) > 2 else "KILL"))
        log.error("fault injected: %s at %s (%s)", sig.name, name, ":".join(spec))
        os.kill(os.getpid(), sig)


def nan_gradient_step() -> int | None:
    """The optimizer step whose gradient rank 0 poisons, or None."""
    value = os.environ.get(NAN_GRAD_ENV, "")
    return int(value) if value.isdigit() and dist.is_main() else None
