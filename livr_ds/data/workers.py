"""DataLoader worker lifecycle: workers leave stop signals to the trainer, and are always shut
down through their queues (never left to multiprocessing's SIGTERM-then-join exit handler)."""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401  (registers its exit handler first; ours must run before it)
import weakref


# Workers ignore SIGTERM (below), so they must never be left for multiprocessing's exit handler,
# which stops daemonic children with SIGTERM and then joins them: that would wait forever. Live
# worker iterators are shut down through their queues instead, when their epoch ends or fails,
# and at interpreter exit by this handler (registered after multiprocessing's, so it runs first).
live_worker_iterators: "weakref.WeakSet" = weakref.WeakSet()


def shutdown_workers(batches) -> None:
    shutdown = getattr(batches, "_shutdown_workers", None)  # only multi-process iterators have workers
    if shutdown is not None:
        shutdown()
    live_worker_iterators.discard(batches)


@atexit.register
def _shutdown_live_workers() -> None:
    for batches in list(live_worker_iterators):
        shutdown_workers(batches)


def ignore_stop_signals(worker_id: int) -> None:
    """Workers leave stop signals to the trainer. SLURM signals every process of a job step;
    torch's worker SIGTERM handler would kill the worker, and the rank would die before it
    could write its resume checkpoint."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
