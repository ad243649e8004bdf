"""Files and directories that appear whole or not at all: a crash mid-write never leaves a
half-written file where a finished one is expected."""

from __future__ import annotations

import json
import os
import shutil


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(tmp: str, final: str) -> None:
    """Swap a finished directory into place; the old one is removed only after the swap."""
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
