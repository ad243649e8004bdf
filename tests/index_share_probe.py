"""Run under torchrun by tests/test_data.py: every rank opens the same shards (without indexes)
through LivrLoader.index_shards, as the trainer does, and writes which shards it indexed itself
(the real index.build, counted) and the keys it then reads.

    torchrun --nproc_per_node 2 tests/index_share_probe.py SHARD_DIR OUT_DIR [--private-cache]

--private-cache: each rank its own index cache and a shard folder it may not write (a node-local
cache), so what the other rank built is invisible here.
"""

import json
import os
import sys

import torch.distributed as dist

from livr_ds.data import index as index_mod
from livr_ds.data.loader import LivrLoader


def main() -> None:
    shard_dir, out_dir = sys.argv[1], sys.argv[2]
    private = "--private-cache" in sys.argv
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    built = []
    real_build = index_mod.build
    index_mod.build = lambda url, *a, **k: built.append(os.path.basename(url)) or real_build(url, *a, **k)
    if private:
        index_mod._dir_writable = lambda _: False
    cache = os.path.join(out_dir, f"cache-{rank}" if private else "cache")
    loader = LivrLoader(shard_dir, rank=rank, world_size=world, batch_size=2, seed=3, index_cache=cache)
    loader.index_shards(barrier=dist.barrier)
    keys = [s.key for batch in loader for s in batch]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"built": built, "keys": keys, "bytes_read": loader.stats["bytes_read"]}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
