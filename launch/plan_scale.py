"""Scale check of the epoch plan and the per-rank work, with synthetic counts (no files).

    python launch/plan_scale.py [--shards 2000] [--per-shard 100] [--ranks 64] [--workers 4] [--batch 8]

A mixture of 6 sources over ``--shards`` shards of ``--per-shard`` samples (weights 1, 1, 1, 1,
0.5, 2: a full pass, a half subset and a double pass), at ``--ranks`` ranks. Measures, each with
tracemalloc (peak Python + numpy allocations) and wall time (best of 3, untraced):
  plan     EpochPlan: what every worker builds once per epoch (O(samples in the epoch), numpy)
  requests one worker's request list (loader.worker_requests): O(that worker's samples)
  indexes  the per-shard sample indexes a rank holds in memory (synthetic keys/offsets), the
           size of one shard's .idx.json, and the time to load all of them from files (sparse
           stand-in shards in a temp dir; once per rank and run)
and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from livr_ds.data import index as index_mod  # noqa: E402
from livr_ds.data.index import ShardIndex, load_indexes, write_index  # noqa: E402
from livr_ds.data.plan import EpochPlan, Layout  # noqa: E402
from livr_ds.data.loader import worker_requests  # noqa: E402


def measure(fn, repeats: int = 3):
    """-> (result, best wall seconds without tracing, tracemalloc peak bytes of one more call)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    tracemalloc.start()
    out = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, min(times), peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=2000)
    ap.add_argument("--per-shard", type=int, default=100)
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=4096)
    a = ap.parse_args()

    weights = [1.0, 1.0, 1.0, 1.0, 0.5, 2.0]
    per_src = [a.shards // len(weights)] * len(weights)
    per_src[-1] += a.shards - sum(per_src)
    sources, sid = [], 0
    for n, w in zip(per_src, weights):
        sources.append((list(range(sid, sid + n)), [a.per_shard] * n, w))
        sid += n

    plan, t_plan, m_plan = measure(lambda: EpochPlan(sources, 0, 3, True, a.block))
    layout = Layout(plan.n, a.ranks, a.batch, False)
    mine = list(range(0, layout.num_batches, a.workers))  # rank 0, worker 0
    reqs, t_req, m_req = measure(lambda: worker_requests(plan, layout, 0, mine))
    n_req = sum(len(r) for r in reqs)

    def indexes():
        return [ShardIndex([[f"task{s % 6}-{s:05d}-{i:04d}", 1536 * i, 1536 * i + 1400]
                            for i in range(a.per_shard)], 1536 * a.per_shard) for s in range(a.shards)]

    idx, t_idx, m_idx = measure(indexes)
    idx_json = len(json.dumps(idx[0].to_json("train-00000.tar"), separators=(",", ":")))

    # loading them from .idx.json files (once per rank and run): sparse stand-in shard files
    tmp = tempfile.mkdtemp(prefix="livr-plan-scale-")
    try:
        shards = []
        for s, ix in enumerate(idx):
            url = os.path.join(tmp, f"train-{s:05d}.tar")
            with open(url, "wb") as f:
                f.truncate(ix.bytes)
            write_index(url, ix)
            shards.append((url, ""))

        def load():
            index_mod._MEMO.clear()
            return load_indexes(shards)

        loaded, t_load, _ = measure(load, repeats=1)
        assert all(len(x) == a.per_shard for x in loaded)
    finally:
        shutil.rmtree(tmp)
    print(json.dumps({
        "samples_per_epoch": plan.n, "shards": a.shards, "ranks": a.ranks, "workers": a.workers,
        "plan_build_s": round(t_plan, 4), "plan_peak_MiB": round(m_plan / 2**20, 2),
        "worker_requests": n_req, "requests_s": round(t_req, 4), "requests_peak_MiB": round(m_req / 2**20, 3),
        "index_arrays_MiB": round(sum(i.nbytes() for i in idx) / 2**20, 2),
        "index_build_peak_MiB": round(m_idx / 2**20, 2), "idx_json_bytes_per_shard": idx_json,
        "index_load_s": round(t_load, 3),
        "process_maxrss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
