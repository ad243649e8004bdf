"""Run under torchrun by tests/test_handoff.py: one rank sees the filesystem in another state, as a
node of a cluster filesystem can. That rank moves into a private mount namespace (before anything
starts a thread) and bind-mounts a damaged file over --damage; then the given script runs as usual.

    torchrun --nproc_per_node 2 tests/view_probe.py --damage-on-rank 1 --damage FILE SCRIPT ARGS...

Needs root (mount namespaces); exits 77 when it cannot make the view.
"""

import ctypes
import os
import runpy
import sys
import tempfile

CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE, MS_BIND = 0x4000, 1 << 18, 0x1000


def private_view(damage: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    fd, fake = tempfile.mkstemp(prefix="damaged-")
    os.write(fd, b'{"truncated')
    os.close(fd)
    if libc.mount(fake.encode(), damage.encode(), None, MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), f"mount --bind {fake} {damage}")


def main() -> None:
    args = sys.argv[1:]
    rank = int(args[args.index("--damage-on-rank") + 1])
    damage = args[args.index("--damage") + 1]
    rest = [a for i, a in enumerate(args) if a not in ("--damage-on-rank", "--damage")
            and (i == 0 or args[i - 1] not in ("--damage-on-rank", "--damage"))]
    if int(os.environ.get("RANK", "0")) == rank:
        try:
            private_view(damage)
        except OSError as e:
            print(f"view_probe: cannot make a private view ({e})", file=sys.stderr)
            sys.exit(77)
    script, sys.argv = rest[0], rest
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
