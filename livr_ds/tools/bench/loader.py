"""Loader benchmarks: samples/s per worker count, stream vs indexed shard reads."""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from .fixtures import tiny_backbone


def bench_loader(model_path, family, data_dir, batch_size=8, batches=12, workers=(0, 1, 2)):
    from ...data.collate import LivrCollator
    from ...data.loader import LivrLoader
    from ...data.sources import ShardSource

    bb = tiny_backbone(model_path, family, "sdpa", 4)
    collator = LivrCollator(bb.adapter, bb.processor, bb.latent_ids)
    rows = []
    for w in workers:
        loader = LivrLoader([ShardSource(data_dir)], 0, 1, batch_size=batch_size, num_workers=w, seed=0,
                            collate_fn=collator)
        it = iter(loader)
        next(it)  # worker start-up is paid once per epoch, not per sample
        t = time.perf_counter()
        n = 0
        for _ in range(batches):
            try:
                n += len(next(it)["meta"]["keys"])
            except StopIteration:
                break
        rows.append({"num_workers": w, "samples_per_s": n / (time.perf_counter() - t)})
    return rows


def bench_loader_io(world_size=8, rounds=5, n_shards=16, per_shard=64, image_size=160, batch_size=8,
                    work_dir: str | None = None):
    """Stream vs indexed shard reads, same synthetic shards (n_shards x per_shard samples, 2 random
    JPEGs of image_size^2 each): rank 0 of ``world_size``, one process (num_workers=0), decode only.
    The two modes alternate for ``rounds`` epochs, order reversed every round; median samples/s,
    and bytes read from the shards per sample / per epoch (the same every round)."""
    import io

    import numpy as np
    from PIL import Image

    from ...data.loader import LivrLoader
    from ...data.writer import write_shards

    def samples():
        rng = np.random.default_rng(0)
        for i in range(n_shards * per_shard):
            ims = []
            for _ in range(2):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(
                    buf, format="JPEG", quality=90)
                ims.append(buf.getvalue())
            yield {"key": f"b{i:06d}", "task": "t", "question": "q?", "choices": ["x", "y"], "answer": "A",
                   "images": ims}

    d = os.path.join(tempfile.mkdtemp(prefix="livr-bench-io-", dir=work_dir), "shards")
    write_shards(samples(), d, "train", shard_size=per_shard, progress=False)
    data_bytes = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".tar"))
    times: dict[str, list[float]] = {"stream": [], "indexed": []}
    got: dict[str, tuple[int, int]] = {}
    order = list(times)
    for r in range(rounds + 1):  # round 0: warm-up (page cache, imports), not timed
        for mode in order if r % 2 == 0 else order[::-1]:
            loader = LivrLoader(d, rank=0, world_size=world_size, batch_size=batch_size, seed=0)
            loader._read_mode = mode
            t = time.perf_counter()
            n = sum(len(b) for b in loader)
            if r:
                times[mode].append(time.perf_counter() - t)
            got[mode] = (n, loader.stats["bytes_read"])
    return [{"read": mode, "world_size": world_size, "samples_per_epoch": got[mode][0],
             "samples_per_s": got[mode][0] / statistics.median(times[mode]),
             "MiB_read_per_epoch": got[mode][1] / 2**20, "bytes_read_per_sample": got[mode][1] / got[mode][0],
             "read_vs_dataset": got[mode][1] / data_bytes} for mode in order]
