"""A stateful, rank- and worker-exact loader over webdataset tar shards.

    loader = LivrLoader([ShardSource("data/counting"), ShardSource("data/jigsaw", weight=0.5)],
                        rank=rank, world_size=world, batch_size=8, num_workers=2, seed=0,
                        collate_fn=collator)          # default collate: list[Sample]
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)                     # same epoch as loaded state: keeps the position
        for batch in loader:                        # len(loader) batches, equal on every rank
            ...
            ckpt["data"] = loader.state_dict()      # {"epoch", "batches_consumed", ...}
    loader.load_state_dict(ckpt["data"])            # continues at exactly the next batch

Sources
    ``ShardSource(path, weight=1.0, split="train")``. ``path`` is a shard directory (its
    manifest.json gives shard names and sample counts for ``split``), a manifest.json file, or a
    brace/glob pattern such as ``data/train-{00000..00003}.tar`` (counts come from a
    manifest.json next to the shards if it lists them, else from one scan of the tar headers,
    logged). A pattern matching nothing is a DataError naming it.

    Weights (multi-task mixing): weight 1.0 = every sample of the source once per epoch; weight
    w = floor(w) full passes plus a subset of round(frac(w) * N) samples drawn without
    replacement from (seed, epoch, source index). E.g. 6 tasks x 1k with weights 1.0 mix all
    6k samples once; weight 0.5 on one task gives 500 of its samples per epoch, a different 500
    each epoch. The epoch length is the same every epoch.

Epoch order: a pure function of (seed, epoch, shuffle, shuffle_block, sources' shard names,
    counts and weights); NOT of world size, batch size or num_workers.
    1. "visits" (one pass over one shard, possibly a subset of it) are listed per source and
       weight and shuffled as a whole;  2. the concatenated stream is cut into blocks of
    ``shuffle_block`` samples and each block is permuted. Position p of this order is the p-th
    sample of the epoch. With shuffle=False: sources, shards and samples in order.

Ranks and workers: global batch s holds positions [s*W*B, (s+1)*W*B); rank r takes the r-th
    slice of B. Every rank gets ``len(loader)`` = ceil(N / (W*B)) batches of exactly B samples;
    the W*B*len - N positions past the end repeat the epoch from its start and are marked
    ``sample.meta["_pad"] = True`` (counted in ``num_padded`` and logged). ``drop_last=True``
    instead drops the last partial global batch (0 batches is an error). More ranks than
    samples is allowed (a warning: some ranks see only padding); 0 samples is an error.
    Batch b of a rank's remaining batches goes to worker b % num_workers, so DataLoader's
    round-robin returns them in order; a worker with no batches yields nothing.

Reading (reader.py): each worker reads exactly its samples' bytes (their tar headers and
    declared members, one read per sample, via the per-shard indexes of index.py); samples
    skipped for resume or belonging to other ranks are not read at all, and shards holding none
    of a worker's samples are never opened. Bytes read per epoch are therefore ~ the bytes of
    the samples the rank uses, independent of the number of ranks and workers; they are counted
    in ``stats["bytes_read"]`` and logged at each epoch's end. Indexes are loaded once per loader
    and kept across epochs (``index_shards`` builds missing ones split across the ranks).

Errors: on_error="raise" -> the reader's DataError "<shard>:<key>: what is wrong" (reader.py
    lists them; a sample the collator refuses is one too). on_error="skip" -> the bad sample is
    replaced by a copy of a good sample of the same batch (or the worker's previous one), marked
    ``_pad`` and ``_replaces``, counted once in ``stats["bad"]`` (a padding slot repeating it is
    not counted again) and logged: batch counts stay equal across ranks.

Position: ``state_dict()`` = {"epoch", "batches_consumed", "samples_consumed" (global),
    "world_size", "batch_size", "fingerprint", ...}, counting only batches handed to the
    caller (not prefetched ones). A finished epoch moves the loader to (epoch + 1, 0).
    Resuming needs the same data and shuffle settings (fingerprint) and drop_last. num_workers
    may change freely (the order does not depend on it). world_size / batch_size may change
    when the samples consumed are a multiple of the new global batch W*B: because the global
    order does not depend on W, the run continues with exactly the samples not yet seen this
    epoch (padding is recomputed). Otherwise ``load_state_dict`` raises DataError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Callable

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .collate import SampleRefused
from .index import load_indexes
from .plan import EpochPlan, Layout
from .reader import BadSample, IndexedReader, StreamReader, decode_sample, read_shard
from .schema import DataError, Sample
from .sources import ShardInfo, ShardSource
from .workers import ignore_stop_signals, live_worker_iterators, shutdown_workers

log = logging.getLogger(__name__)


# ---- the per-epoch dataset run in each worker -----------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoaderSettings:
    """What each worker's epoch dataset needs from its LivrLoader (pickled to DataLoader workers)."""

    layout: Layout
    plan_sources: list  # per source: (shard ids, sample counts, weight), as EpochPlan takes them
    seed: int
    shuffle: bool
    shuffle_block: int
    shards: list[ShardInfo]
    rank: int
    on_error: str  # "raise" | "skip"
    collate_fn: Callable
    read_mode: str  # "indexed" | "stream"
    indexes: list | None  # per shard, for indexed reads (None for stream reads)


def _identity(x):
    return x


def default_collate(samples: list[Sample]) -> list[Sample]:
    return samples


def worker_requests(plan: EpochPlan, layout: Layout, rank: int,
                    batches: list[int]) -> list[list[tuple[int, int, bool]]]:
    """(stream position q, pass k, is_pad) for each sample of ``batches`` of ``rank``: O(these
    samples). The k-th request of the same q (padding wraps around) is the stream reader's k-th
    pass; the indexed reader ignores k."""
    seen: dict[int, int] = {}
    requests = []
    for b in batches:
        reqs = []
        for p, pad in layout.positions(rank, b):
            q = int(plan.perm[p])
            k = seen.get(q, 0)
            seen[q] = k + 1
            reqs.append((q, k, pad))
        requests.append(reqs)
    return requests


class _EpochDataset(IterableDataset):
    """Yields (collated batch, info) for one rank's batches [start, num_batches) of one epoch."""

    def __init__(self, settings: LoaderSettings, epoch: int, start: int):
        self.settings, self.epoch, self.start = settings, epoch, start

    def __iter__(self):
        c = self.settings
        wi = get_worker_info()
        wid, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        layout = c.layout
        mine = list(range(self.start + wid, layout.num_batches, nw))
        if not mine:
            return
        plan = EpochPlan(c.plan_sources, c.seed, self.epoch, c.shuffle, c.shuffle_block)
        requests = worker_requests(plan, layout, c.rank, mine)
        if c.read_mode == "stream":
            passes: dict[int, list[int]] = {}
            for reqs in requests:
                for q, k, _ in reqs:
                    passes.setdefault(k, []).append(q)
            counter = [0]
            readers = {k: StreamReader(plan, c.shards, qs, counter) for k, qs in passes.items()}
            get = lambda q, k: readers[k].get(q)  # noqa: E731
            read_one = lambda sid, i: next(read_shard(c.shards[sid].url, [i], counter))[1]  # noqa: E731
            bytes_read = lambda: counter[0]  # noqa: E731
            indexed = None
        else:
            indexed = IndexedReader(plan, c.shards, c.indexes)
            get = lambda q, k: indexed.get(q)  # noqa: E731
            read_one = indexed.read
            bytes_read = lambda: indexed.bytes_read  # noqa: E731
        try:
            yield from self._batches(c, plan, mine, requests, get, read_one, bytes_read)
        finally:
            if indexed is not None:
                indexed.close()

    def _batches(self, c: LoaderSettings, plan, mine, requests, get, read_one, bytes_read):
        last_good: Sample | None = None
        reported = 0
        for b, reqs in zip(mine, requests):
            samples: list[Sample | None] = []
            bad: list[tuple[int, str, str]] = []
            for j, (q, k, pad) in enumerate(reqs):
                url, raw = get(q, k)
                try:
                    if isinstance(raw, BadSample):
                        raise raw.error
                    s = decode_sample(raw, url)
                except DataError as exc:
                    if c.on_error == "raise":
                        raise
                    log.warning("skipping bad sample (replaced by a pad copy): %s", exc)
                    bad.append((j, raw.key if isinstance(raw, BadSample) else raw.get("__key__", "?"), str(exc)))
                    samples.append(None)
                    continue
                if pad:
                    s.meta["_pad"] = True
                samples.append(s)
            good = [s for s in samples if s is not None]
            donor = good[0] if good else last_good
            if bad and donor is None:
                donor = self._any_good_sample(plan, c.shards, read_one)
            for j, key, _ in bad:
                samples[j] = dataclasses.replace(donor, meta={**donor.meta, "_pad": True, "_replaces": key})
            batch = self._collate(c, samples, bad, last_good, plan, read_one)
            bad_slots = {j for j, _, _ in bad}
            kept = [s for j, s in enumerate(samples) if j not in bad_slots]
            if kept:
                last_good = kept[-1]
            info = {"epoch": self.epoch, "batch": b, "n_pad": sum(pad for _, _, pad in reqs),
                    "n_real": sum(1 for j, (_, _, pad) in enumerate(reqs) if not pad and j not in bad_slots),
                    # a padding slot that repeats a bad sample is replaced too, but not counted twice
                    "bad": [(key, msg) for j, key, msg in bad if not reqs[j][2]],
                    "bytes_read": bytes_read() - reported}
            reported += info["bytes_read"]
            yield batch, info

    def _collate(self, c: LoaderSettings, samples: list[Sample], bad: list, last_good: Sample | None, plan, read_one):
        """collate_fn(samples); a sample the processor refuses (SampleRefused: an aspect ratio it
        rejects, an image it cannot resize) is a bad sample like one that does not decode: raised
        as a DataError naming shard:key, or (skip) counted in `bad` and replaced by a sample the
        processor took (one before it in the batch, else the last batch's), and collated again."""
        for _ in range(2 * len(samples) + 2):
            try:
                return c.collate_fn(samples)
            except SampleRefused as exc:
                if c.on_error == "raise" or exc.slot is None:
                    raise DataError(str(exc)) from None  # a plain DataError crosses the worker boundary
                j = exc.slot
                replaces = samples[j].meta.get("_replaces")
                if replaces is None:  # a sample of its own, not a stand-in whose donor was refused
                    log.warning("skipping bad sample (replaced by a pad copy): %s", exc)
                    bad.append((j, samples[j].key, str(exc)))
                    replaces = samples[j].key
                # The samples before slot j were encoded by this very call: safe donors.
                donor = samples[0] if j > 0 else last_good
                if donor is None:
                    donor = self._any_good_sample(plan, c.shards, read_one)
                samples[j] = dataclasses.replace(donor, meta={**donor.meta, "_pad": True, "_replaces": replaces})
        raise DataError("on_error='skip': the processor refused every stand-in for the bad samples of a batch "
                        f"({[key for _, key, _ in bad]})")

    @staticmethod
    def _any_good_sample(plan: EpochPlan, shards: list[ShardInfo], read_one) -> Sample:
        for q in range(plan.n):  # rare: a whole batch bad and nothing good before it
            v, idx = plan.stream_locate(q)
            sid = plan.visits[v][0]
            raw = read_one(sid, idx)
            if not isinstance(raw, BadSample):
                try:
                    return decode_sample(raw, shards[sid].url)
                except DataError:
                    pass
        raise DataError("on_error='skip': no readable sample in the whole epoch")


# ---- the loader -----------------------------------------------------------------------------
def _without_worker_traceback(batches):
    """The batches; a DataError raised in a worker comes back as the worker's message alone.
    DataLoader re-raises it with the worker's whole traceback as its text ("Caught DataError in
    DataLoader worker process 0. Original Traceback ..."), which buries the shard:key line."""
    marker = f"{DataError.__module__}.{DataError.__qualname__}: "
    try:
        yield from batches
    except DataError as exc:
        text = str(exc)
        if text.startswith("Caught ") and marker in text:
            raise DataError(text.rsplit(marker, 1)[1].strip()) from None
        raise


def dist_rank_world() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class LivrLoader:
    """See the module docstring. ``rank``/``world_size`` None -> from torch.distributed."""

    _read_mode = "indexed"  # "stream": the old whole-tar stream reader, kept for benchmarks and tests

    def __init__(self, sources, rank: int | None = None, world_size: int | None = None, batch_size: int = 1,
                 num_workers: int = 0, seed: int = 0, collate_fn: Callable | None = None, shuffle: bool = True,
                 on_error: str = "raise", drop_last: bool = False, shuffle_block: int = 4096,
                 prefetch_factor: int = 2, timeout: float = 0, state: dict | None = None,
                 index_cache: str | None = None):
        if rank is None or world_size is None:
            r, w = dist_rank_world()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        if isinstance(sources, (str, os.PathLike, ShardSource)):
            sources = [sources]
        self.sources = [s if isinstance(s, ShardSource) else
                        ShardSource(*s) if isinstance(s, (tuple, list)) else ShardSource(s) for s in sources]
        if not self.sources:
            raise DataError("no shard sources given")
        if not (0 <= rank < world_size):
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or num_workers < 0 or shuffle_block < 1:
            raise DataError("batch_size and shuffle_block must be >= 1 and num_workers >= 0")
        if on_error not in ("raise", "skip"):
            raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not isinstance(seed, int) or seed < 0:
            raise DataError(f"seed must be a non-negative int, got {seed!r}")
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.num_workers, self.seed, self.shuffle, self.shuffle_block = num_workers, seed, shuffle, shuffle_block
        self.collate_fn = collate_fn or default_collate
        self.on_error, self.drop_last = on_error, drop_last
        self.prefetch_factor, self.timeout = prefetch_factor, timeout
        self.index_cache = index_cache
        self._indexes: list | None = None  # per shard, loaded (or built) on the first epoch

        self.shards: list[ShardInfo] = []
        plan_sources, fp = [], []
        for src in self.sources:
            infos = src.resolve(index_cache)
            ids = list(range(len(self.shards), len(self.shards) + len(infos)))
            self.shards += infos
            plan_sources.append((ids, [i.count for i in infos], float(src.weight)))
            fp.append([float(src.weight), [(i.name, i.count, i.sha256) for i in infos]])
        self._plan_sources = plan_sources
        n = EpochPlan.length(plan_sources)  # the same every epoch
        if n == 0:
            raise DataError(f"no samples in {[s.path for s in self.sources]}")
        self.layout = Layout(n, world_size, batch_size, drop_last)
        if self.layout.num_batches == 0:
            raise DataError(f"drop_last: {n} samples < one global batch of {self.layout.global_batch} "
                            f"({world_size} ranks x {batch_size})")
        if world_size > n and not drop_last:
            log.warning("%d ranks > %d samples: some ranks see only padded samples", world_size, n)
        self.fingerprint = hashlib.sha256(json.dumps(
            {"sources": fp, "seed": seed, "shuffle": shuffle, "block": shuffle_block}, sort_keys=True).encode()
        ).hexdigest()[:16]
        self.epoch, self._consumed = 0, 0
        self.stats = {"samples": 0, "pad": 0, "bad": 0, "bad_keys": [], "bytes_read": 0}
        if state is not None:
            self.load_state_dict(state)

    # -- sizes --
    def __len__(self) -> int:
        """Batches per epoch on every rank."""
        return self.layout.num_batches

    @property
    def num_samples(self) -> int:
        """Real samples per epoch (all ranks)."""
        return self.layout.n

    @property
    def num_padded(self) -> int:
        """Padded samples this rank gets per epoch."""
        return self.layout.rank_padded(self.rank)

    @property
    def num_padded_global(self) -> int:
        return self.layout.num_padded

    # -- epoch / position --
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, unless it is the current epoch (then the position,
        e.g. from load_state_dict, is kept)."""
        if epoch != self.epoch:
            self.epoch, self._consumed = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self._consumed,
                "samples_consumed": self._consumed * self.layout.global_batch,
                "world_size": self.world_size, "batch_size": self.batch_size, "drop_last": self.drop_last,
                "num_samples": self.layout.n, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise DataError("data loader state is for different data or shuffle settings (fingerprint "
                            f"{state.get('fingerprint')} != {self.fingerprint}); cannot resume the position")
        if bool(state.get("drop_last")) != self.drop_last:
            raise DataError("data loader state was saved with drop_last=%s" % state.get("drop_last"))
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        if (state["world_size"], state["batch_size"]) != (self.world_size, self.batch_size):
            samples = int(state["samples_consumed"])
            g = self.layout.global_batch
            if samples % g:
                raise DataError(
                    f"cannot resume mid-epoch: {samples} samples consumed with world_size={state['world_size']} x "
                    f"batch_size={state['batch_size']} is not a multiple of the new global batch {g} "
                    f"({self.world_size} x {self.batch_size}); resume at the old layout or at an epoch boundary")
            consumed = samples // g
            log.info("data: resuming epoch %d at global sample %d with a new layout (%d ranks x %d)",
                     epoch, samples, self.world_size, self.batch_size)
        if consumed > len(self):
            raise DataError(f"state says {consumed} batches consumed, but the epoch has {len(self)}")
        self.epoch, self._consumed = epoch, consumed

    # -- iteration --
    def index_shards(self, barrier: Callable[[], None]) -> None:
        """Load the shards' indexes now, the missing ones built split across the ranks
        (index.load_indexes). Every rank of the group must call it with the group's barrier; a
        loader never calls it itself, since not every loader is iterated by every rank."""
        if self._read_mode != "stream" and self._indexes is None:
            self._indexes = load_indexes([(s.url, s.sha256) for s in self.shards], self.index_cache,
                                         share=(self.rank, self.world_size), barrier=barrier)

    def _load_indexes(self) -> list:
        """The shards' sample indexes, once per loader (kept across epochs; workers inherit them)."""
        if self._indexes is None:
            self._indexes = load_indexes([(s.url, s.sha256) for s in self.shards], self.index_cache,
                                         start=self.rank / self.world_size)
        return self._indexes

    def _settings(self) -> LoaderSettings:
        indexed = self._read_mode != "stream"
        return LoaderSettings(layout=self.layout, plan_sources=self._plan_sources, seed=self.seed,
                              shuffle=self.shuffle, shuffle_block=self.shuffle_block, shards=self.shards,
                              rank=self.rank, on_error=self.on_error, collate_fn=self.collate_fn,
                              read_mode="indexed" if indexed else "stream",
                              indexes=self._load_indexes() if indexed else None)

    def __iter__(self):
        epoch, start, total = self.epoch, self._consumed, len(self)
        if start < total:
            log.info("data: rank %d/%d epoch %d: batches %d..%d of %d x %d samples; %d padded samples on this "
                     "rank (%d on all ranks), %d dropped", self.rank, self.world_size, epoch, start, total - 1,
                     total, self.batch_size, self.num_padded, self.num_padded_global, self.layout.num_dropped)
            ds = _EpochDataset(self._settings(), epoch, start)
            kw = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
            # A private generator: DataLoader otherwise draws worker seeds from the global torch
            # RNG, and a resumed run (which builds its iterator at a different point) would then
            # see different dropout masks than the uninterrupted one.
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            if self.num_workers > 0:
                kw["worker_init_fn"] = ignore_stop_signals
            dl = DataLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            timeout=self.timeout, generator=gen, **kw)
            expected, epoch_bytes, epoch_samples = start, 0, 0
            batches = iter(dl)
            live_worker_iterators.add(batches)
            try:
                for batch, info in _without_worker_traceback(batches):
                    if (info["epoch"], info["batch"]) != (epoch, expected):
                        raise DataError(f"internal: got batch {info['batch']} of epoch {info['epoch']}, "
                                        f"expected {expected} of {epoch}")
                    expected += 1
                    self._consumed = expected
                    self.stats["samples"] += info["n_real"]
                    self.stats["pad"] += info["n_pad"]
                    self.stats["bad"] += len(info["bad"])
                    self.stats["bad_keys"] = (self.stats["bad_keys"] + [k for k, _ in info["bad"]])[-1000:]
                    self.stats["bytes_read"] += info["bytes_read"]
                    epoch_bytes += info["bytes_read"]
                    epoch_samples += self.batch_size
                    yield batch
            finally:  # an error or an abandoned epoch: stop the workers through their queues now
                shutdown_workers(batches)
            if expected != total:
                raise DataError(f"internal: rank {self.rank} got {expected} of {total} batches in epoch {epoch}")
            log.info("data: rank %d/%d epoch %d done: %d samples (batches %d..%d), %.1f MiB read from shards "
                     "(%s reads, %.0f bytes per sample)", self.rank, self.world_size, epoch, epoch_samples, start,
                     total - 1, epoch_bytes / 2**20, self._read_mode, epoch_bytes / max(1, epoch_samples))
        self.epoch, self._consumed = epoch + 1, 0
