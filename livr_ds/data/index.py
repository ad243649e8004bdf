"""Per-shard sample indexes: where each sample's members lie in its tar, so a reader can seek to
them and read only its own bytes.

One JSON file per shard, ``<shard>.idx.json`` next to it (written by the shard writer; for older
shards built on first use by a pass that reads only the tar headers)::

    {"format": "livr-ds-index/1", "shard": "train-00000.tar", "bytes": 1126400,
     "sha256": "<of the shard>" | null, "mtime_ns": <of the shard>,
     "samples": [["s0000", 0, 3197], ["s0001", 3584, 6911, 7680, 7812], ...]}

A sample is its key, then [start, end) byte ranges ("runs"): each run is a maximal sequence of
consecutive tar members of the sample with a declared extension (``json``, ``<i>.jpg|jpeg|png``),
from the first one's header to the last one's data end; almost always one run per sample.
Samples are counted exactly as webdataset's tar iterator groups them (consecutive declared
members sharing a key), so sample i of the index is sample i of the manifest. Member names and
sizes are not stored: the reader gets them from the headers it reads with the data, and checks
that they fill the run exactly (a stale index is an error, not silent garbage).

Validity: ``bytes`` must equal the shard's size, ``mtime_ns`` its mtime, and ``sha256`` the
manifest's sha256 when both are known. An invalid or missing index is rebuilt by the header pass
and cached beside the shard when its folder is writable, else in ``index_cache``
(``$LIVR_DS_INDEX_CACHE``, else ``$XDG_CACHE_HOME/livr-ds/index``, else ``~/.cache/livr-ds/index``)
under a name derived from (absolute path, size, mtime).

A replaced shard: size and names alone cannot tell another file of the same size and keys from
the one the index describes, so the mtime is part of every index (indexes of livr-ds versions
that did not record it are rebuilt once). When an index has to be rebuilt and the manifest gives
the shard's sha256, the shard may be hashed once before it is indexed (a full read, logged): a shard
whose bytes differ from its manifest is refused (a DataError for its samples), never read as if
it were the data the manifest describes. The hash runs when the stored index has the shard's size
but not its mtime (the case the header pass cannot tell from the original); a shard of another
size is damaged, not replaced, and is read as far as it is complete. A copy that does not keep
mtimes (``cp`` without ``-p``) costs that one hash per shard; the rebuilt indexes then record the
new mtimes.

Why a file per shard rather than manifest.json: for 2,000 shards x 100 samples the offsets are
~6 MB of JSON; in the manifest every tool that reads it (verify, counts, the fingerprint) would
parse them, and a single shard replaced or re-indexed would mean rewriting the whole manifest.
A per-shard file is written as its shard closes, is invalidated with its shard only, has the same
format whether the writer or the cache built it, and also serves pattern sources with no manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
import uuid
from collections.abc import Callable

import numpy as np
import webdataset as wds

from .manifest import sha256_file
from .schema import DECLARED_MEMBER_RE, DataError

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT = "livr-ds-index/1"
_META_RE = re.compile(r"__[^/]*__($|/)")  # members webdataset's tar iterator skips


class ShardIndex:
    """The samples of one shard: ``key(i)`` and ``runs(i)`` -> [(start, end), ...]."""

    __slots__ = ("keys", "ptr", "spans", "bytes", "mtime_ns", "sha256", "error")

    def __init__(self, samples: list, size: int, mtime_ns: int | None = None, sha256: str | None = None,
                 error: str | None = None):
        self.keys = np.array([s[0].encode("utf-8") for s in samples], dtype=bytes) if samples else np.zeros(0, "S1")
        self.ptr = np.cumsum([0] + [(len(s) - 1) // 2 for s in samples]).astype(np.int64)
        flat = [x for s in samples for x in s[1:]]
        self.spans = np.array(flat, dtype=np.int64).reshape(-1, 2)
        self.bytes, self.mtime_ns, self.sha256, self.error = int(size), mtime_ns, sha256, error

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, i: int) -> str:
        return self.keys[i].decode("utf-8")

    def runs(self, i: int) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in self.spans[self.ptr[i]:self.ptr[i + 1]]]

    def nbytes(self) -> int:
        return self.keys.nbytes + self.ptr.nbytes + self.spans.nbytes

    def to_json(self, shard_name: str) -> dict:
        samples = [[self.key(i)] + [x for r in self.runs(i) for x in r] for i in range(len(self))]
        return {"format": INDEX_FORMAT, "shard": shard_name, "bytes": self.bytes, "sha256": self.sha256,
                "mtime_ns": self.mtime_ns, "error": self.error, "samples": samples}

    @classmethod
    def from_json(cls, d: dict) -> "ShardIndex":
        if not isinstance(d, dict) or d.get("format") != INDEX_FORMAT:
            raise ValueError("not a livr-ds index")
        return cls(d["samples"], d["bytes"], d.get("mtime_ns"), d.get("sha256"), d.get("error"))


# ---- the header-only pass -------------------------------------------------------------------
class CountingFile:
    """A raw (unbuffered) file that counts the bytes it returns: real bytes read from disk."""

    def __init__(self, path: str, sink: list[int] | None = None):
        self.f = open(path, "rb", buffering=0)
        self.bytes_read, self.sink = 0, sink

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.bytes_read += len(b)
        if self.sink is not None:
            self.sink[0] += len(b)
        return b

    def seek(self, *a) -> int:
        return self.f.seek(*a)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()


def scan_shard(url: str, sha256: str | None = None) -> tuple[ShardIndex, int]:
    """Index a shard by reading its tar headers only (tarfile seeks past member data).
    -> (index, bytes read). A tar cut inside a member keeps every sample whose header was seen
    (the cut one shows up as a short read later); an unreadable start is a DataError."""
    st = os.stat(url)
    f = CountingFile(url)
    members, error = [], None
    try:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"{url}:<start>: corrupt or truncated tar ({type(exc).__name__}: {exc})") from None
        try:
            for ti in tf:
                members.append((ti.name, ti.isreg(), ti.offset, ti.offset_data, ti.size))
                tf.members = []  # keep memory flat on big shards
        except (tarfile.TarError, EOFError, OSError) as exc:  # e.g. "unexpected end of data"
            error = f"{type(exc).__name__}: {exc}"
    finally:
        f.close()
    samples: list[list] = []
    prefix, contiguous = None, False
    for name, isreg, off, off_data, size in members:
        declared = False
        if isreg and not ("/" not in name and name.startswith("__") and name.endswith("__")) \
                and not _META_RE.match(name):
            p, ext = wds.tariterators.base_plus_ext(name)
            if p is not None and DECLARED_MEMBER_RE.match(ext.lower()):
                declared = True
                if p != prefix:  # a new sample (the same grouping as the stream reader)
                    prefix = p
                    samples.append([p, off, off_data + size])
                elif contiguous:
                    samples[-1][-1] = off_data + size
                else:
                    samples[-1] += [off, off_data + size]
        contiguous = declared
    if error is None and members and members[-1][3] + members[-1][4] > st.st_size:
        error = "last member cut short"
    return ShardIndex(samples, st.st_size, None, sha256, error), f.bytes_read


# ---- reading one sample by its runs ---------------------------------------------------------
def parse_run(buf: bytes, key: str) -> list[tuple[str, bytes]] | str:
    """The (extension, data) members of one run, or a message saying why the run does not hold
    exactly the declared members of ``key`` (a stale or wrong index, a corrupt header)."""
    pad = -len(buf) % tarfile.BLOCKSIZE
    try:
        tf = tarfile.TarFile(fileobj=io.BytesIO(buf + b"\0" * pad if pad else buf), mode="r")
        infos = list(tf)
    except (tarfile.TarError, EOFError) as exc:
        return f"no tar header where the index says ({type(exc).__name__}: {exc})"
    out, end = [], 0
    for ti in infos:
        p, ext = wds.tariterators.base_plus_ext(ti.name)
        if not ti.isreg() or p != key or not DECLARED_MEMBER_RE.match(ext.lower()):
            return f"unexpected member {ti.name!r} where the index says the sample lies"
        end = ti.offset_data + ti.size
        out.append((ext, buf[ti.offset_data:end]))
    if not out or end != len(buf):
        return "the members found do not fill the indexed byte range"
    return out


# ---- finding, validating, caching -----------------------------------------------------------
_MEMO: dict[tuple[str, int, int], ShardIndex] = {}


def default_cache_dir() -> str:
    d = os.environ.get("LIVR_DS_INDEX_CACHE")
    if d:
        return d
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "livr-ds", "index")


def beside_path(url: str) -> str:
    return url + INDEX_SUFFIX


def cache_path(url: str, st: os.stat_result, cache_dir: str | None) -> str:
    h = hashlib.sha256(f"{os.path.abspath(url)}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    return os.path.join(cache_dir or default_cache_dir(), h + INDEX_SUFFIX)


def _valid(idx: ShardIndex, st: os.stat_result, sha256: str) -> bool:
    return (idx.bytes == st.st_size and idx.mtime_ns == st.st_mtime_ns
            and not (idx.sha256 and sha256 and idx.sha256 != sha256))


def _read_index(path: str, st: os.stat_result, sha256: str) -> ShardIndex | None:
    try:
        with open(path) as f:
            idx = ShardIndex.from_json(json.load(f))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return idx if _valid(idx, st, sha256) else None


def _dir_writable(d: str) -> bool:
    return os.access(d or ".", os.W_OK)


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, separators=(",", ":"))
            f.write("\n")
        os.replace(tmp, path)  # atomic: concurrent ranks never see half a file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_index(url: str, idx: ShardIndex) -> None:
    """Store ``idx`` as ``<url>.idx.json`` (the writer's index, or a rebuilt one), with the shard's mtime."""
    idx.mtime_ns = os.stat(url).st_mtime_ns
    _write_json(beside_path(url), idx.to_json(os.path.basename(url)))


def lookup(url: str, sha256: str = "", cache_dir: str | None = None) -> ShardIndex | None:
    """A valid stored index of ``url`` (memo, beside the shard, or in the cache dir), else None."""
    st = os.stat(url)
    mk = (os.path.abspath(url), st.st_size, st.st_mtime_ns)
    idx = _MEMO.get(mk)
    if idx is not None and _valid(idx, st, sha256):
        return idx
    for path in (beside_path(url), cache_path(url, st, cache_dir)):
        if os.path.isfile(path):
            idx = _read_index(path, st, sha256)
            if idx is not None:
                _MEMO[mk] = idx
                return idx
    return None


def _same_size_index_exists(url: str, st: os.stat_result) -> bool:
    try:
        with open(beside_path(url)) as f:
            return json.load(f).get("bytes") == st.st_size
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def build(url: str, sha256: str = "", cache_dir: str | None = None,
          store_beside: bool = True) -> tuple[ShardIndex, int, str]:
    """Header pass + store (beside the shard if writable and ``store_beside``, else the cache dir);
    with the manifest's ``sha256`` the shard is first hashed and refused if it differs.
    -> (index, header bytes read, where it was stored or "")."""
    st = os.stat(url)
    if sha256 and _same_size_index_exists(url, st):
        log.info("%s: its index is for another file of the same size; checking the shard against the "
                 "manifest's sha256 first", url)
        actual = sha256_file(url)
        if actual != sha256:
            raise DataError(f"{url}:<start>: the shard's bytes differ from its manifest (sha256 {actual[:16]}..., "
                            f"manifest {sha256[:16]}...): it was replaced or changed after it was written. Re-run "
                            "the conversion, or restore the shard; `livr-ds shards verify DIR` lists every such shard")
    idx, nread = scan_shard(url)
    idx.mtime_ns, idx.sha256 = st.st_mtime_ns, (sha256 or None)
    where = ""
    paths = [beside_path(url)] if store_beside and _dir_writable(os.path.dirname(url)) else []
    for path in paths + [cache_path(url, st, cache_dir)]:
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            _write_json(path, idx.to_json(os.path.basename(url)))
            where = path
            break
        except OSError as exc:
            log.debug("cannot store index %s (%s)", path, exc)
    _MEMO[(os.path.abspath(url), st.st_size, st.st_mtime_ns)] = idx
    return idx, nread, where


def get_index(url: str, sha256: str = "", cache_dir: str | None = None) -> ShardIndex:
    idx = lookup(url, sha256, cache_dir)
    return idx if idx is not None else build(url, sha256, cache_dir)[0]


def load_indexes(shards: list[tuple[str, str]], cache_dir: str | None = None, start: float = 0.0,
                 what: str = "shards", store_beside: bool = True, share: tuple[int, int] | None = None,
                 barrier: Callable[[], None] | None = None) -> list[ShardIndex | DataError]:
    """Indexes of (url, sha256) shards, building the missing ones with one header pass, logged
    once (``store_beside=False``: what is built goes to the cache dir only, for checks that must
    not change the folders they check). A shard that cannot be indexed at all gives a DataError in
    its place (the reader reports its samples as bad).

    Several ranks. With ``share=(rank, world)`` and a ``barrier`` that every rank calls, the
    missing indexes are split: rank r builds the missing ones among shards r, r + world, ...; all wait,
    then each reads the others' results (beside the shards or in a shared cache). A rank that
    cannot see what another built (a node-local cache, a read-only shard folder) builds it itself
    and says so. Without a barrier ``start`` in [0, 1) (rank / world) only rotates the build order,
    so ranks that start together mostly find each other's results instead of repeating the work."""
    out: list = [None] * len(shards)
    todo = []
    for i, (url, sha) in enumerate(shards):
        try:
            out[i] = lookup(url, sha, cache_dir)
        except OSError as exc:
            out[i] = DataError(f"{url}:<start>: cannot open shard ({exc})")
        if out[i] is None:
            todo.append(i)
    if share is not None and barrier is not None:
        # Every rank reaches the barrier, whatever it found: ranks may see different caches.
        rank, world = share
        # Owned by position, not by what this rank happened to find missing: ranks that look at
        # different moments still agree on who builds what.
        mine = [i for i in todo if i % world == rank]
        _build_missing(shards, out, mine, cache_dir, what, store_beside, f"this rank's share ({rank}/{world})")
        barrier()
        rest = [i for i in todo if i not in set(mine)]
        late = _build_missing(shards, out, rest, cache_dir, what, store_beside, "built by other ranks", quiet=True)
        if late["built"]:
            log.warning("%d index(es) built by other ranks were not visible here, built again on this rank "
                        "(is the index cache %s shared between nodes? set it with LIVR_DS_INDEX_CACHE)",
                        late["built"], cache_dir or default_cache_dir())
        return out
    if todo:
        k = int(start * len(todo)) % len(todo)
        _build_missing(shards, out, todo[k:] + todo[:k], cache_dir, what, store_beside, "")
    return out


def _build_missing(shards, out: list, which: list[int], cache_dir, what: str, store_beside: bool, share: str,
                   quiet: bool = False) -> dict:
    """Fill out[i] for i in `which`: an index another process stored meanwhile, else one built now."""
    stats = {"built": 0, "read": 0}
    if not which:
        return stats
    if not quiet:
        log.info("indexing %d of %d %s%s: no usable index (reading the tar headers only, once; the index is "
                 "stored %s %s)", len(which), len(shards), what, f", {share}" if share else "",
                 "beside the shard when writable, else in" if store_beside else "in",
                 cache_dir or default_cache_dir())
    t = time.perf_counter()
    for i in which:
        url, sha = shards[i]
        try:
            idx = lookup(url, sha, cache_dir)  # another rank may have built it meanwhile
            if idx is None:
                idx, n, _ = build(url, sha, cache_dir, store_beside)
                stats["built"], stats["read"] = stats["built"] + 1, stats["read"] + n
            out[i] = idx
        except DataError as exc:
            out[i] = exc
        except OSError as exc:
            out[i] = DataError(f"{url}:<start>: cannot read shard ({exc})")
    if not quiet:
        log.info("indexed %d shard(s) in %.2f s, %d header bytes read (%d found built by another process)",
                 stats["built"], time.perf_counter() - t, stats["read"], len(which) - stats["built"])
    return stats
