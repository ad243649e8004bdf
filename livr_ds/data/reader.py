"""Shard members -> samples: reading a sample's tar members from a shard and decoding them.

The loader (loader.py) asks a reader for stream positions of its epoch plan; a reader hands back
the sample's raw members ({"__key__", "json", "0.jpg", ...}) or a BadSample, and
``decode_sample`` turns raw members into a Sample.

Reading: ``IndexedReader`` reads a sample by seeking to it: a per-shard index (index.py,
    ``<shard>.idx.json``, written by the writer; for older shards built once from the tar
    headers and cached) gives each sample's byte ranges, and the reader reads exactly those
    (the tar headers and data of the sample's declared members, one read per sample). Bytes read
    are counted (the loader's ``stats["bytes_read"]``). ``StreamReader`` / ``read_shard`` is the
    old whole-tar stream reader (``LivrLoader._read_mode = "stream"``), kept for comparison.

Decoding: only ``json`` and ``<i>.jpg|jpeg|png`` members are read (others, e.g. ``.pyd``,
    ``.pickle``, ``.pth``, are never read from disk, never unpickled).
    Images go through PIL's JPEG/PNG parsers only, with a full load() (catches truncation).

Errors: a DataError "<shard>:<key>: what is wrong" (corrupt or truncated tar, truncated image,
    bad JSON fields, answer not among choices, shard shorter than its manifest). A tar cut
    inside a member affects only the sample it cuts (a short read): every complete sample
    before the cut is read normally. Read failures come back as BadSample; what happens to them
    (raise or skip) is the loader's on_error.
"""

from __future__ import annotations

import bisect
import collections
import json
import os
from typing import Any, Iterator

import webdataset as wds

from .index import INDEX_SUFFIX, CountingFile, ShardIndex, parse_run
from .images import decode_image
from .plan import EpochPlan
from .schema import DECLARED_MEMBER_RE, IMAGE_MEMBER_RE, DataError, Sample, validate_record
from .sources import ShardInfo


# ---- raw tar reading (webdataset stages) ----------------------------------------------------
class BadSample:
    """A sample that could not be read or decoded."""

    __slots__ = ("key", "error")

    def __init__(self, key: str, error: DataError):
        self.key, self.error = key, error


class _Stop(Exception):
    pass


def _stop_handler(exn: Exception) -> bool:
    if isinstance(exn, _Stop):
        return False  # tar_file_iterator: stop reading this shard
    raise exn


def read_shard(url: str, wanted: list[int], counter: list[int] | None = None) -> Iterator[tuple[int, dict | BadSample]]:
    """Yield (index in shard, raw sample) for the sorted, unique sample indices ``wanted``.

    The stream reader (``LivrLoader._read_mode = "stream"``, kept for comparison): webdataset's
    tar_file_iterator reads the tar from its start in stream mode, so every member before the
    last wanted sample is read from disk (unwanted ones are discarded unparsed). A raw sample is
    {"__key__", "json", "0.jpg", ...}. A read failure yields BadSample for every wanted sample not yet
    produced. ``counter[0]`` accumulates the bytes read from the file.
    """
    wanted_set, last = set(wanted), wanted[-1]
    st: dict[str, Any] = {"prefix": None, "idx": -1, "keys": {}}

    def select(fname: str) -> bool:  # samples are counted as in count_samples: by declared members
        prefix, ext = wds.tariterators.base_plus_ext(fname)
        if prefix is None or not DECLARED_MEMBER_RE.match(ext.lower()):
            return False
        if prefix != st["prefix"]:
            st["prefix"] = prefix
            st["idx"] += 1
            if st["idx"] > last:
                raise _Stop()
            if st["idx"] in wanted_set:
                st["keys"][st["idx"]] = prefix
        return st["idx"] in wanted_set

    done: set[int] = set()
    cur_idx, cur = None, None
    error = None
    try:
        f = CountingFile(url, counter)
        try:
            for member in wds.tariterators.tar_file_iterator(f, handler=_stop_handler, select_files=select):
                idx = st["idx"]
                if idx != cur_idx:
                    if cur is not None:
                        done.add(cur_idx)
                        yield cur_idx, cur
                    cur_idx, cur = idx, {"__key__": st["keys"][idx]}
                _, ext = wds.tariterators.base_plus_ext(member["fname"])
                if ext.lower() in cur:
                    raise DataError(f"{url}:{cur['__key__']}: duplicate member {member['fname']}")
                cur[ext.lower()] = member["data"]
        finally:
            f.close()
    except DataError as exc:
        error = exc
    except Exception as exc:  # tarfile.ReadError, OSError, ... from a corrupt or truncated tar
        key = st["prefix"] or "<start>"
        error = DataError(f"{url}:{key}: corrupt or truncated tar ({type(exc).__name__}: {exc})")
    if error is not None:
        for j in wanted:
            if j not in done:
                done.add(j)
                yield j, BadSample(st["keys"].get(j, f"#{j}"), error)
        return
    if cur is not None:
        done.add(cur_idx)
        yield cur_idx, cur
    n_seen = st["idx"] + 1
    for j in wanted:
        if j not in done:
            done.add(j)
            if j in st["keys"]:
                yield j, {"__key__": st["keys"][j]}
            else:
                yield j, BadSample(f"#{j}", DataError(
                    f"{url}:#{j}: shard ended after {n_seen} samples; the manifest promised more "
                    "(truncated or replaced shard?)"))


# ---- decoding -------------------------------------------------------------------------------
def decode_sample(raw: dict, shard: str) -> Sample:
    """Raw members -> Sample. Only json and numbered jpg/jpeg/png members are looked at."""
    key = raw["__key__"]
    where = f"{shard}:{key}"
    if "json" not in raw:
        raise DataError(f"{where}: missing json member")
    try:
        record = json.loads(raw["json"].decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, or nesting deeper than Python's stack
        raise DataError(f"{where}: json member is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    found = []
    for ext in raw:
        m = IMAGE_MEMBER_RE.match(ext)
        if m:
            found.append((int(m.group(1)), ext, m.group(2)))
    found.sort()
    if [i for i, _, _ in found] != list(range(len(found))):
        raise DataError(f"{where}: images must be numbered 0..N-1, found {[e for _, e, _ in found]}")
    rec = validate_record(record, where, n_images=len(found))
    images = [decode_image(raw[ext], fmt, f"{where}.{ext}") for _, ext, fmt in found]
    return Sample(key=key, task=rec["task"], question=rec["question"], choices=rec["choices"],
                  answer=rec["answer"], images=images, meta=rec["meta"], shard=shard)


# ---- readers over an epoch plan's stream positions --------------------------------------
class StreamReader:
    """Stream mode: reads one pass over a sorted set of stream positions, buffering ahead."""

    def __init__(self, plan: EpochPlan, shards: list[ShardInfo], positions: list[int], counter: list[int]):
        self.plan, self.shards, self.counter = plan, shards, counter
        self.buffer: dict[int, tuple[str, dict | BadSample]] = {}
        self._gen = self._generate(sorted(set(positions)))

    def _generate(self, qs: list[int]):
        by_visit: dict[int, list[int]] = {}
        for q in qs:
            by_visit.setdefault(bisect.bisect_right(self.plan.offsets, q) - 1, []).append(q)
        for v in sorted(by_visit):
            sid, idxs = self.plan.visits[v]
            off = int(self.plan.offsets[v])
            q_of = {int(idxs[q - off]): q for q in by_visit[v]}
            url = self.shards[sid].url
            for idx, raw in read_shard(url, sorted(q_of), self.counter):
                yield q_of[idx], (url, raw)

    def get(self, q: int) -> tuple[str, dict | BadSample]:
        while q not in self.buffer:
            pos, item = next(self._gen)
            self.buffer[pos] = item
        return self.buffer.pop(q)


def _pread(fd: int, n: int, offset: int) -> bytes:
    """Up to n bytes at offset (fewer only at the end of the file)."""
    parts = []
    while n > 0:
        b = os.pread(fd, n, offset)
        if not b:
            break
        parts.append(b)
        n, offset = n - len(b), offset + len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class IndexedReader:
    """Reads samples by seeking to their members (index.py): per sample one read per run of its
    declared members (tar headers + data), nothing else. Counts the bytes in ``bytes_read``."""

    MAX_OPEN = 32  # open shard files kept per worker (least recently used closed first)

    def __init__(self, plan: EpochPlan, shards: list[ShardInfo], indexes: list[ShardIndex | DataError]):
        self.plan, self.shards, self.indexes = plan, shards, indexes
        self.fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.bytes_read = 0

    def _fd(self, sid: int) -> int:
        fd = self.fds.pop(sid, None)
        if fd is None:
            fd = os.open(self.shards[sid].url, os.O_RDONLY)
            if len(self.fds) >= self.MAX_OPEN:
                os.close(self.fds.popitem(last=False)[1])
        self.fds[sid] = fd
        return fd

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.popitem()[1])

    def get(self, q: int) -> tuple[str, dict | BadSample]:
        v, idx = self.plan.stream_locate(q)
        sid = self.plan.visits[v][0]
        return self.shards[sid].url, self.read(sid, idx)

    def read(self, sid: int, i: int) -> dict | BadSample:
        url, index = self.shards[sid].url, self.indexes[sid]
        if isinstance(index, DataError):  # the shard could not be indexed at all
            return BadSample(f"#{i}", index)
        if i >= len(index):
            why = f" ({index.error})" if index.error else ""
            return BadSample(f"#{i}", DataError(
                f"{url}:#{i}: shard ended after {len(index)} samples{why}; the manifest promised more "
                "(truncated or replaced shard?)"))
        key = index.key(i)
        raw: dict = {"__key__": key}
        try:
            fd = self._fd(sid)
            for start, end in index.runs(i):
                if end > index.bytes:  # a header claiming more than the file holds: refuse before allocating
                    return BadSample(key, DataError(
                        f"{url}:{key}: corrupt or truncated tar (the shard ends at byte {index.bytes}, inside "
                        f"this sample's members at bytes [{start}, {end}))"))
                buf = _pread(fd, end - start, start)
                self.bytes_read += len(buf)
                if len(buf) < end - start:
                    return BadSample(key, DataError(
                        f"{url}:{key}: corrupt or truncated tar (the shard ends at byte {start + len(buf)}, inside "
                        f"this sample's members at bytes [{start}, {end}))"))
                members = parse_run(buf, key)
                if isinstance(members, str):
                    return BadSample(key, DataError(
                        f"{url}:{key}: corrupt tar or stale index at bytes [{start}, {end}): {members} (a stale "
                        f"{os.path.basename(url)}{INDEX_SUFFIX} can be deleted; it is rebuilt from the tar headers)"))
                for ext, data in members:
                    if ext.lower() in raw:
                        return BadSample(key, DataError(f"{url}:{key}: duplicate member {key}.{ext}"))
                    raw[ext.lower()] = data
        except OSError as exc:
            return BadSample(key, DataError(f"{url}:{key}: cannot read shard ({exc})"))
        return raw
