"""The HDF5 cache: a dataset index per image folder and append-only feature shards.

Layout under the cache directory (schema version in every file's ``schema_version`` attr)::

    datasets/<name>-<hash8>.h5      one per image folder: the dataset index
    datasets/<name>-<hash8>.lock    held (lockf) while an extract runs on that folder
    features/<space_id>/space.json  what produced the vectors: backbone, weights digest, ...
    features/<space_id>/*.h5        immutable shards: ``hash`` (N,) S32 + ``emb`` (N, D)

Why shards: HDF5 has no journal, so a ``kill -9`` while a single growing file is being
written can leave it unreadable. Every file here is instead written under a temporary
name, fsync'ed and atomically renamed, and never modified afterwards. A crash loses at
most the shard being filled (a few seconds of work); leftovers of dead writers are
deleted on the next run. Features are keyed by image *content hash*, so they are shared by
every dataset (and by ``predict``) that contains the same bytes, and several writers can
add shards to one feature space without coordinating (the door to a distributed engine).
Duplicate rows (a crash during compaction) are removed on read.

This module must not import torch: ``heads`` reads the cache through it.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from featurize.errors import UserError, file_size_limit
from featurize.files import replacing, write_text
from featurize.layout import Cache, dataset_key, default_cache_dir  # noqa: F401  (re-exported)
from featurize.registry import is_run_folder

SCHEMA_VERSION = 1
HASH_DTYPE = "S32"  # blake2b-128 of the file bytes, hex
_STR = h5py.string_dtype("utf-8")
STATUS_OK = "ok"
STATUS_PENDING = "pending"


class NotRegularFile(OSError):
    """A path that names a FIFO, device, socket or folder: reading it can block forever or never end."""


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def not_regular_reason(mode: int) -> str:
    """``""`` for a regular file, else the status reason naming what it is."""
    if stat.S_ISREG(mode):
        return ""
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    return f"not a regular file ({kind})"


def open_regular(path: str | os.PathLike):
    """Open a file for binary reading only if it is a regular file (after following symlinks).

    The open is non-blocking (a FIFO with no writer would block ``open`` itself) and the
    check is on the open descriptor, so a file swapped for a FIFO after a scan is refused too.
    Raises ``NotRegularFile`` (an ``OSError``) with the reason, or the ``open`` error.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        reason = not_regular_reason(os.fstat(fd).st_mode)
        if reason:
            raise NotRegularFile(reason)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def content_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Return the blake2b-128 hex digest of a file's bytes (the feature key), read in chunks.

    Only regular files are read (``NotRegularFile`` otherwise)."""
    h = hashlib.blake2b(digest_size=16)
    with open_regular(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_error_reason(e: OSError) -> str:
    """The status reason for a file that could not be opened or read."""
    if isinstance(e, NotRegularFile):
        return str(e)
    if isinstance(e, FileNotFoundError):
        return "file not found (broken symlink?)"
    return f"unreadable ({e.strerror or e})"


def hash_files(paths: list[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Content-hash files; returns ``({path: hash}, [(path, reason)])`` for the unreadable ones."""
    hashes, errors = {}, []
    for p in paths:
        try:
            hashes[p] = content_hash(p)
        except OSError as e:
            errors.append((p, read_error_reason(e)))
    return hashes, errors


def bytes_hash(data: bytes) -> str:
    """Return the same digest as :func:`content_hash` for bytes already in memory."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def fault_point(name: str) -> None:
    """Crash-test hook: ``FEATURIZE_FAULT=<name>[:<n>]`` SIGKILLs this process the n-th time
    (default 1st) it reaches ``name``. Used by the kill -9 tests; inert otherwise."""
    spec = os.environ.get("FEATURIZE_FAULT")
    if not spec or spec.split(":")[0] != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    nth = int(spec.split(":")[1]) if ":" in spec else 1
    if _FAULT_COUNTS[name] >= nth:
        os.kill(os.getpid(), 9)


_FAULT_COUNTS: dict[str, int] = {}


def _ensure_space(folder: Path, nbytes: int) -> None:
    """Raise ``OSError(ENOSPC)`` before HDF5 starts a file the disk cannot hold, and
    ``OSError(EFBIG)`` before one larger than the process may write (``ulimit -f``).

    HDF5 does not recover from a failed write: the file can no longer be closed and the
    process segfaulted at exit (2 runs in 5 on a full disk; every run past ``ulimit -f``, with
    pages of h5py tracebacks first). Checked with room to spare for HDF5's own metadata; a
    plain ``OSError`` is what callers turn into one line."""
    room = nbytes * 1.2 + (32 << 10)
    free = shutil.disk_usage(folder).free
    if free < room:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free} bytes free, about {nbytes} needed)",
                      str(folder))
    limit = file_size_limit()
    if limit is not None and limit < room:
        raise OSError(errno.EFBIG, f"{os.strerror(errno.EFBIG)} (the file size limit is {limit} bytes, "
                      f"about {int(room)} needed)", str(folder))


def _atomic_h5(final: Path, fill, kind: str, nbytes: int = 0) -> None:
    """Write an HDF5 file via ``fill(h5file)`` under a temp name, then rename it into place.

    ``nbytes`` is what the file will hold, checked against the free space first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _ensure_space(final.parent, nbytes)
    with replacing(final, before_rename=lambda: fault_point(f"{kind}_tmp_written")) as tmp:
        with h5py.File(tmp, "w") as f:
            fill(f)


_atomic_text = write_text


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temp_files(folder: Path) -> int:
    """Delete ``.*.tmp-<pid>`` files left by writers that no longer run; return how many."""
    removed = 0
    for p in folder.glob(".*.tmp-*"):
        m = re.search(r"\.tmp-(\d+)$", p.name)
        if m and not _pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def _check_schema(f: h5py.File, path: Path, kind: str) -> None:
    if f.attrs.get("kind") != kind:
        raise UserError(f"{path} is not a featurize {kind} file; point --cache at a featurize cache directory")
    version = int(f.attrs.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{path} has cache schema {version}, this featurize reads schema {SCHEMA_VERSION}; "
            "re-run `extract` with a new --cache directory"
        )


class _ShardVanished(Exception):
    """A listed shard was deleted by a concurrent compaction before it could be opened."""


def _damaged(path: Path, err: Exception, what: str) -> UserError:
    return UserError(f"cache file {path} is damaged ({type(err).__name__}: {err}); delete it and re-run `extract` ({what})")


# --------------------------------------------------------------------------- feature spaces


def space_id_for(config: dict) -> str:
    """Return a readable, stable id for a feature space.

    ``config`` holds everything that changes the numbers: backbone name, weights digest,
    preprocessing and precision. The id is ``<backbone-slug>-<12 hex of its JSON digest>``.
    """
    canon = json.dumps(config, sort_keys=True, separators=(",", ":"))
    slug = re.sub(r"[^A-Za-z0-9_.]+", "-", str(config.get("backbone", "model"))).strip("-.")[:40] or "model"
    return f"{slug}-{hashlib.sha256(canon.encode()).hexdigest()[:12]}"


@dataclass
class FeatureSpace:
    """The feature vectors of one (backbone, weights, preprocessing, precision) in a cache."""

    cache: Cache  # a path is taken too, and made a Cache
    space_id: str

    def __post_init__(self):
        self.cache = Cache.of(self.cache)

    @property
    def folder(self) -> Path:
        return self.cache.space_folder(self.space_id)

    def exists(self) -> bool:
        return (self.folder / "space.json").exists()

    def info(self) -> dict:
        """Return the metadata written by :meth:`create` (backbone, dim, preprocess, ...)."""
        path = self.folder / "space.json"
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"no features for space {self.space_id} in {self.cache}; run `extract` first") from None
        except ValueError as e:  # not JSON, or not UTF-8
            raise _damaged(path, e, "the vectors are kept") from None
        dim = meta.get("dim") if isinstance(meta, dict) else None
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0 \
                or meta.get("space_id", self.space_id) != self.space_id:
            raise _damaged(path, ValueError("not the description of this feature space"), "the vectors are kept")
        if meta.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise UserError(f"{path} has cache schema {meta.get('schema_version')}, this featurize reads schema "
                            f"{SCHEMA_VERSION}; re-run `extract` with a new --cache directory")
        return meta

    def usable(self) -> bool:
        """True when the space's description exists and reads back intact."""
        try:
            self.info()
        except UserError:
            return False
        return True

    # A feature space holds vectors from one engine. Engines agree only approximately (OpenVINO
    # bf16 against the fp32 PyTorch vector: min cosine 0.9904 on 400 TrashNet photos), so a run
    # that fell back to another engine (OpenVINO failing on a full disk) must not add its vectors
    # to the same space: heads would train on a mixture. The first writer records its engine.
    def held_engine(self) -> str | None:
        """The engine whose vectors this space holds (None: none recorded yet)."""
        try:
            held = json.loads((self.folder / "engine.json").read_text())
        except (OSError, ValueError):
            return None
        return held.get("engine") if isinstance(held, dict) and isinstance(held.get("engine"), str) else None

    def engine_for(self, requested: str) -> str:
        """``auto`` keeps the engine whose vectors this space holds; any other request is returned as is."""
        held = self.held_engine()
        return held if requested == "auto" and held in ("torch", "openvino") else requested

    def claim_engine(self, engine: str) -> None:
        """Record ``engine`` as this space's engine, or raise ``UserError`` if another one holds it."""
        held = self.held_engine()
        if held is None:
            _atomic_text(self.folder / "engine.json", json.dumps({"engine": engine}))
        elif held != engine:
            raise UserError(
                f"feature space {self.space_id} holds vectors from the {held} engine and this run would add vectors "
                f"from {engine}; engines agree only to about 1% (cosine), so they are never mixed in one space: "
                f"pass --engine {held} (if {held} failed, see the warning above), or delete {self.folder} to "
                f"re-embed everything with {engine}")

    def create(self, config: dict, dim: int) -> None:
        """Record the space's metadata (idempotent); a damaged description is rewritten."""
        if self.exists():
            try:
                self.info()
                return
            except UserError as e:
                print(f"warning: {e}; rewriting it from the backbone's description", file=sys.stderr)
        meta = {"space_id": self.space_id, "dim": int(dim), "schema_version": SCHEMA_VERSION, **config}
        _atomic_text(self.folder / "space.json", json.dumps(meta, indent=2, sort_keys=True))

    def shard_paths(self) -> list[Path]:
        return sorted(Path(p) for p in glob.glob(str(self.folder / "*.h5")))

    def _read_shard(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """Return a shard's ``(hashes, emb)`` after checking its CRC (``UserError`` if damaged)."""
        got = []
        hashes = self._stream_rows(path, lambda rows, start: got.append(rows), chunk_rows=None)
        return hashes, got[0]

    # Shards already checked whole by an extract: {name: [size, mtime_ns]}. Shards are
    # immutable, so a re-run with nothing new need not read every vector again (30 MB for
    # 6k images); every full read (``load``) still checks the CRC and forgets a bad shard here.
    def _verified_path(self) -> Path:
        return self.folder / "verified.json"

    def _read_verified(self) -> dict:
        """``{shard name: [size, mtime_ns]}``; anything else (damaged, hand-edited) counts as empty,
        so every shard is checked again and the file is rewritten."""
        try:
            seen = json.loads(self._verified_path().read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(seen, dict):
            return {}
        return {k: v for k, v in seen.items() if isinstance(v, list) and len(v) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in v)}

    def _forget_verified(self, path: Path) -> None:
        seen = self._read_verified()
        if seen.pop(path.name, None) is not None:
            _atomic_text(self._verified_path(), json.dumps(seen))

    # Readers and compaction never race: compaction renames the merged shard in before it deletes
    # the old ones, so a shard that vanishes between listing and opening has its rows in a newer
    # one; a reader that meets one lists the folder again (duplicates are dropped on read).
    _RELIST = 20

    def _relisting(self, read):
        for _ in range(self._RELIST):
            try:
                return read()
            except _ShardVanished:
                continue
        raise UserError(f"the shards of {self.folder} kept changing while being read (another process is "
                        "compacting them continuously?); retry")

    def load(self, only: set[bytes] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(hashes, emb)``: unique content hashes (S32) and their float32 rows.

        ``only`` restricts the result to those hashes (as bytes). Raises ``UserError`` when a
        shard is damaged.
        """
        return self._relisting(lambda: self._load(only))

    def _load(self, only: set[bytes] | None) -> tuple[np.ndarray, np.ndarray]:
        hs, es = [], []
        for p in self.shard_paths():
            h, e = self._read_shard(p)
            if only is not None:
                keep = np.fromiter((x in only for x in h), bool, len(h))
                h, e = h[keep], e[keep]
            hs.append(h)
            es.append(e)
        dim = self.info().get("dim", 0) if self.exists() else 0
        if not hs:
            return np.empty(0, HASH_DTYPE), np.empty((0, dim), np.float32)
        hashes = np.concatenate(hs)
        emb = np.concatenate(es).astype(np.float32, copy=False)
        _, first = np.unique(hashes, return_index=True)
        if len(first) != len(hashes):
            first.sort()
            hashes, emb = hashes[first], emb[first]
        return hashes, emb

    def vectors_for(self, hashes: dict[str, str]) -> dict[str, np.ndarray]:
        """Map ``{path: content hash}`` to ``{path: vector}`` for the hashes this space has."""
        if not hashes or not self.exists():
            return {}
        got_h, got_e = self.load(only={h.encode() for h in hashes.values()})
        row = {h: i for i, h in enumerate(got_h.tolist())}
        return {p: got_e[row[h.encode()]] for p, h in hashes.items() if h.encode() in row}

    def known_hashes(self) -> set[bytes]:
        """Return the set of content hashes (bytes) that already have a vector."""
        return self._relisting(self._known_hashes)

    def _known_hashes(self) -> set[bytes]:
        out: set[bytes] = set()
        for p in self.shard_paths():
            out.update(self._hash_column(p).tolist())
        return out

    def _hash_column(self, p: Path) -> np.ndarray:
        try:
            with h5py.File(p, "r") as f:
                return f["hash"][()]
        except Exception as e:
            if not p.exists():
                raise _ShardVanished(p) from None
            raise _damaged(p, e, "its images will be re-embedded") from None

    def write_shard(self, hashes: list[str] | np.ndarray, emb: np.ndarray, tag: str = "") -> Path:
        """Atomically write one immutable shard and return its path."""
        hashes = np.asarray(hashes, dtype=HASH_DTYPE)
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if emb.ndim != 2 or len(hashes) != emb.shape[0]:
            raise ValueError(f"shard rows disagree: {len(hashes)} hashes, emb shape {emb.shape}")
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**9:09d}{tag}.h5"

        def fill(f: h5py.File) -> None:
            f.attrs.update(kind="shard", schema_version=SCHEMA_VERSION, space_id=self.space_id, n_rows=len(hashes))
            f.attrs["crc32"] = zlib.crc32(emb, zlib.crc32(hashes))  # both contiguous: no copies
            f.create_dataset("hash", data=hashes)
            f.create_dataset("emb", data=emb)  # contiguous: shards are written once, read whole

        path = self.folder / name
        _atomic_h5(path, fill, "shard", hashes.nbytes + emb.nbytes)
        fault_point("shard_written")
        return path

    def quarantine_damaged(self) -> list[Path]:
        """Rename unreadable shards to ``*.damaged`` so their images are re-embedded; return them.

        A shard checked before (same name, size and mtime) is not read again.
        """
        seen, ok, moved = self._read_verified(), {}, []
        for p in self.shard_paths():
            try:
                st = p.stat()
            except FileNotFoundError:  # merged away by a concurrent compaction
                continue
            sig = [st.st_size, st.st_mtime_ns]
            if seen.get(p.name) != sig:
                try:
                    self._stream_rows(p, lambda rows, start: None)
                except _ShardVanished:
                    continue
                except UserError:
                    target = p.with_suffix(".damaged")
                    os.replace(p, target)
                    moved.append(target)
                    continue
            ok[p.name] = sig
        if ok != seen:
            _atomic_text(self._verified_path(), json.dumps(ok))
        return moved

    _CHUNK_ROWS = 8192  # rows read at a time when a shard is checked or merged (40 MB at D=1280)

    def _stream_rows(self, path: Path, sink, chunk_rows: int | None = 0) -> np.ndarray:
        """Check a shard's CRC reading ``chunk_rows`` rows at a time; ``sink(rows, start)`` sees each chunk.

        ``chunk_rows`` 0 means ``_CHUNK_ROWS`` (memory stays at one chunk whatever the shard's
        size), None the whole shard at once. Returns its hash column. Raises ``UserError``
        (damaged) on a bad file or checksum.
        """
        try:
            with h5py.File(path, "r") as f:
                _check_schema(f, path, "shard")
                hashes, emb = f["hash"][()], f["emb"]
                expected, n = int(f.attrs["crc32"]), int(f.attrs["n_rows"])
                if len(hashes) != n or emb.shape[0] != n:
                    raise ValueError("row counts disagree")
                crc = zlib.crc32(np.ascontiguousarray(hashes))
                step = max(n, 1) if chunk_rows is None else (chunk_rows or self._CHUNK_ROWS)
                for start in range(0, n or 1, step):  # an empty shard still yields its (0, D) rows
                    rows = np.ascontiguousarray(emb[start:start + step])
                    crc = zlib.crc32(rows, crc)
                    sink(rows, start)
        except UserError:
            raise
        except Exception as e:  # h5py raises OSError/KeyError/ValueError for damaged files
            if not path.exists():  # merged away by a concurrent compaction: not damage
                raise _ShardVanished(path) from None
            self._forget_verified(path)
            raise _damaged(path, e, "its images will be re-embedded") from None
        if crc != expected:
            self._forget_verified(path)
            raise _damaged(path, ValueError("checksum mismatch"), "its images will be re-embedded")
        return hashes

    def compact(self, max_shards: int = 1) -> bool:
        """Merge all shards into one when there are more than ``max_shards``; return True if merged.

        Streams: reads the hash columns first (first copy of a hash wins, as in :meth:`load`),
        then copies rows a chunk at a time, checking each source's CRC on the way, so memory
        does not grow with the number of rows. Crash-safe: the merged shard is renamed into
        place before the old ones are deleted, and a crash in between only leaves duplicates,
        which :meth:`load` drops.
        """
        try:
            return self._compact(max_shards)
        except _ShardVanished:  # another writer compacted meanwhile: its merged shard holds these rows
            return False

    def _compact(self, max_shards: int) -> bool:
        paths = self.shard_paths()
        if len(paths) <= max_shards:
            return False
        seen: set[bytes] = set()
        keeps, kept_hashes = [], []
        for p in paths:
            h = self._hash_column(p)
            keep = np.fromiter((x not in seen and not seen.add(x) for x in h.tolist()), bool, len(h))
            keeps.append(keep)
            kept_hashes.append(h[keep])
        hashes = np.concatenate(kept_hashes).astype(HASH_DTYPE)
        dim = int(self.info()["dim"])
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**9:09d}-merged.h5"

        def fill(f: h5py.File) -> None:
            f.attrs.update(kind="shard", schema_version=SCHEMA_VERSION, space_id=self.space_id, n_rows=len(hashes))
            f.create_dataset("hash", data=hashes)
            out = f.create_dataset("emb", shape=(len(hashes), dim), dtype=np.float32)
            crc, row = zlib.crc32(hashes), 0
            for p, keep in zip(paths, keeps):
                def sink(rows, start, keep=keep):
                    nonlocal crc, row
                    kept = np.ascontiguousarray(rows[keep[start:start + len(rows)]], dtype=np.float32)
                    out[row:row + len(kept)] = kept
                    crc = zlib.crc32(kept, crc)
                    row += len(kept)

                self._stream_rows(p, sink)
            f.attrs["crc32"] = crc

        merged = self.folder / name
        _atomic_h5(merged, fill, "shard", len(hashes) * (hashes.itemsize + 4 * dim))
        fault_point("shard_written")
        fault_point("compact_merged")
        for p in paths:
            p.unlink(missing_ok=True)
        # Its CRC was computed from rows checked on the way in: the next extract need not re-read it.
        try:
            st = merged.stat()
        except FileNotFoundError:  # already merged again by another writer
            return True
        seen = {k: v for k, v in self._read_verified().items() if (self.folder / k).exists()}
        _atomic_text(self._verified_path(), json.dumps({**seen, merged.name: [st.st_size, st.st_mtime_ns]}))
        return True

class ShardWriter:
    """Buffers rows and writes a shard every ``max_rows`` rows or ``max_seconds`` seconds.

    The time bound is what limits the work a ``kill -9`` can lose.
    """

    def __init__(self, space: FeatureSpace, max_rows: int | None = None, max_seconds: float = 5.0):
        # FEATURIZE_SHARD_ROWS lets crash tests make many small shards.
        max_rows = max_rows or int(os.environ.get("FEATURIZE_SHARD_ROWS", 4096))
        self.space, self.max_rows, self.max_seconds = space, max_rows, max_seconds
        self._hashes: list[str] = []
        self._rows: list[np.ndarray] = []
        self._since = time.monotonic()
        self.rows_written = 0
        self.seconds = 0.0

    def add(self, hashes: list[str], emb: np.ndarray) -> None:
        self._hashes.extend(hashes)
        self._rows.append(np.asarray(emb, dtype=np.float32))
        if len(self._hashes) >= self.max_rows or time.monotonic() - self._since >= self.max_seconds:
            self.flush()

    def flush(self) -> None:
        if not self._hashes:
            self._since = time.monotonic()
            return
        t = time.perf_counter()
        self.space.write_shard(self._hashes, np.concatenate(self._rows))
        self.rows_written += len(self._hashes)
        self._hashes, self._rows = [], []
        self._since = time.monotonic()
        self.seconds += time.perf_counter() - t


# --------------------------------------------------------------------------- dataset index

INDEX_FIELDS = ("path", "label", "split", "hash", "size", "mtime_ns", "status")


@dataclass
class DatasetIndex:
    """Every file of one image folder: where it is, its label/split, content hash and status.

    ``status`` is ``"ok"`` (decoded and embedded), ``"pending"`` (not embedded yet) or
    ``"error: <reason>"``. ``extractions`` maps space ids to a summary of the last run.
    """

    root: str
    layout: str = "folder"  # folder | split | flat
    path: list[str] = field(default_factory=list)
    label: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    hash: list[str] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    mtime_ns: list[int] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    extractions: dict = field(default_factory=dict)
    updated_at: float = 0.0

    def __len__(self) -> int:
        return len(self.path)

    @property
    def classes(self) -> list[str]:
        return sorted({x for x in self.label if x})

    def ok_mask(self) -> np.ndarray:
        return np.array([s == STATUS_OK for s in self.status], dtype=bool)

    def errors(self) -> list[tuple[str, str]]:
        return [(p, s[len("error: "):]) for p, s in zip(self.path, self.status) if s.startswith("error")]


def index_path(cache: Cache | str | os.PathLike, root: str | os.PathLike) -> Path:
    """The index file of the image folder ``root`` (:meth:`Cache.index_path`)."""
    return Cache.of(cache).index_path(root)


def fs_bytes(name: str) -> bytes:
    """A file name as the bytes on disk. Python decodes names that are not UTF-8 (old archives,
    Windows copies) with lone surrogates standing for the raw bytes; those bytes are what the
    index stores, so such a name round-trips to the same file. Valid names are plain UTF-8."""
    return name.encode("utf-8", "surrogateescape")


def fs_str(raw) -> str:
    """Inverse of :func:`fs_bytes` (HDF5 hands strings back as bytes or str)."""
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)


def _index_crc(index: DatasetIndex) -> int:
    """CRC32 of everything an index says (columns, root, layout, extractions), like a shard's.

    An edit that keeps the file valid HDF5 (a changed hash, a status set to ok) would otherwise
    go unnoticed: ``fit`` silently used 999 of 1,000 images after one hash was changed."""
    crc = zlib.crc32(b"\0".join([fs_bytes(index.root), index.layout.encode(),
                                 json.dumps(index.extractions, sort_keys=True).encode()]))
    for name in ("path", "label", "split", "status"):
        col = getattr(index, name)
        crc = zlib.crc32(f"{len(col)}:".encode() + b"\0".join(fs_bytes(x) for x in col), crc)
    crc = zlib.crc32(np.asarray(index.hash, dtype=HASH_DTYPE).tobytes(), crc)
    for name in ("size", "mtime_ns"):
        crc = zlib.crc32(np.asarray(getattr(index, name), dtype=np.int64).tobytes(), crc)
    return crc


def _check_index(index: DatasetIndex) -> str:
    """What is wrong with an index read back (``""`` if nothing): shapes and values, not only the checksum."""
    lengths = {len(getattr(index, n)) for n in INDEX_FIELDS}
    if len(lengths) != 1:
        return f"columns of different lengths {sorted(lengths)}"
    if index.layout not in ("folder", "split", "flat") or not isinstance(index.extractions, dict):
        return "bad layout or extractions attribute"
    if not all(isinstance(v, dict) for v in index.extractions.values()):
        return "bad extractions attribute"
    if not all(s in (STATUS_OK, STATUS_PENDING) or s.startswith("error") for s in index.status):
        return "unknown status values"
    if not all(h == "" or re.fullmatch(r"[0-9a-f]{32}", h) for h in index.hash):
        return "malformed content hashes"
    return ""


def write_index(path: Path, index: DatasetIndex) -> None:
    """Atomically replace the dataset index file."""
    index.updated_at = time.time()

    columns = {name: [fs_bytes(x) for x in getattr(index, name)] for name in ("path", "label", "split", "status")}
    attrs = dict(kind="index", schema_version=SCHEMA_VERSION, root=fs_bytes(index.root), layout=index.layout,
                 classes=json.dumps(index.classes), extractions=json.dumps(index.extractions, sort_keys=True),
                 updated_at=index.updated_at, crc32=_index_crc(index))

    def fill(f: h5py.File) -> None:
        f.attrs.update(attrs)
        for name, raw in columns.items():
            f.create_dataset(name, data=np.array(raw, dtype=object), dtype=_STR)
        f.create_dataset("hash", data=np.array(index.hash, dtype=HASH_DTYPE))
        f.create_dataset("size", data=np.array(index.size, dtype=np.int64))
        f.create_dataset("mtime_ns", data=np.array(index.mtime_ns, dtype=np.int64))

    # A vlen string is a 16-byte reference plus a global-heap object (16-byte header, its bytes
    # padded to 8): 216 bytes a row at 100k rows, where "bytes + 16" estimated 143 and a nearly full
    # disk passed the check, then failed inside HDF5. Then 48 bytes for hash, size and mtime, and
    # the JSON attributes (the runs' decoder notes included).
    strings = sum(32 + -(-len(x) // 8) * 8 for raw in columns.values() for x in raw)
    _atomic_h5(path, fill, "index", strings + len(index.hash) * 48 + len(attrs["extractions"]) + len(attrs["classes"]))
    fault_point("index_written")


def read_index(path: str | os.PathLike) -> DatasetIndex:
    """Read a dataset index file. Raises ``UserError`` if it is missing or damaged."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no dataset index at {path}; run `extract DATA` first")
    try:
        with h5py.File(path, "r") as f:
            _check_schema(f, path, "index")
            idx = DatasetIndex(
                root=fs_str(f.attrs["root"]),
                layout=str(f.attrs["layout"]),
                extractions=json.loads(f.attrs["extractions"]),
                updated_at=float(f.attrs["updated_at"]),
            )
            for name in ("path", "label", "split", "status"):
                setattr(idx, name, [fs_str(x) for x in f[name][()]])
            idx.hash = [x.decode() for x in f["hash"][()]]
            idx.size = f["size"][()].tolist()
            idx.mtime_ns = f["mtime_ns"][()].tolist()
            crc = int(f.attrs["crc32"]) if "crc32" in f.attrs else None  # indexes before issue 10 have none
            problem = _check_index(idx) or ("checksum mismatch" if crc is not None and crc != _index_crc(idx) else "")
    except UserError:
        raise
    except Exception as e:
        raise _damaged(path, e, "cached features are kept, only the folder is re-scanned") from None
    if problem:
        raise _damaged(path, ValueError(problem), "cached features are kept, only the folder is re-scanned")
    return idx


def read_extractions(path: str | os.PathLike) -> dict:
    """Return only an index's ``extractions`` attribute ({} if unreadable): cheap at any size."""
    try:
        with h5py.File(path, "r") as f:
            runs = json.loads(f.attrs["extractions"])
    except Exception:
        return {}
    return runs if isinstance(runs, dict) else {}


def list_indexes(cache: Cache | str | os.PathLike) -> list[tuple[Path, DatasetIndex]]:
    """Return every dataset index in the cache, most recently updated first."""
    out = [(p, read_index(p)) for p in Cache.of(cache).index_files()]
    return sorted(out, key=lambda t: t[1].updated_at, reverse=True)


def find_index(cache: Cache | str | os.PathLike, data: str | os.PathLike | None = None) -> tuple[Path, DatasetIndex]:
    """Return the index for ``data`` or, when ``data`` is None, the most recently extracted one."""
    cache = Cache.of(cache)
    if data is not None:
        p = index_path(cache, data)
        if not p.exists():
            if not os.path.exists(data):  # a typo, most likely (an extracted folder may be gone: its index stays)
                raise UserError(f"no folder {data}, and no extraction of it in {cache}; check the path "
                                f"(extracted folders: `cache --cache {cache}`)")
            raise UserError(f"{data} has not been extracted into {cache}; run `extract {data}` first")
        return p, read_index(p)
    if cache.root.exists() and not cache.root.is_dir():
        raise UserError(f"--cache {cache} is a file, not a folder; pass the cache folder `extract` wrote")
    if not cache.root.is_dir():
        raise UserError(f"the cache folder {cache} does not exist; check --cache, or run `extract DATA` first")
    found = list_indexes(cache) if cache.datasets_dir.is_dir() else []
    if not found:
        raise UserError(f"the cache {cache} is empty; run `extract DATA` first (or pass --cache)")
    return found[0]


def extractions_newest_first(index: DatasetIndex) -> list[tuple[str, dict]]:
    """``[(space_id, run summary)]`` of an index's finished extractions, the latest first."""
    return sorted(index.extractions.items(), key=lambda kv: kv[1].get("finished_at", 0), reverse=True)


def resolve_space(cache: Cache | str | os.PathLike, index: DatasetIndex, backbone: str | None = None) -> FeatureSpace:
    """Pick the feature space of ``index`` extracted with ``backbone`` (latest run when None).

    ``backbone`` may be a backbone name (``efficientnet_lite0``) or a full space id.
    """
    runs = extractions_newest_first(index)
    if not runs:
        raise UserError(f"{index.root} has no finished extraction in {cache}; run `extract {index.root}`")
    if backbone is None:
        return FeatureSpace(cache, runs[0][0])
    if is_run_folder(backbone):  # a fine-tuning run folder
        backbone = f"run:{Path(backbone).resolve().name}"
    for sid, info in runs:
        if backbone in (sid, info.get("backbone")):
            return FeatureSpace(cache, sid)
    have = ", ".join(sorted({info.get("backbone", sid) for sid, info in runs}))
    raise UserError(
        f"{index.root} was not extracted with backbone {backbone!r} (cached: {have}); "
        f"run `extract {index.root} --backbone {backbone}`"
    )


def load_features(
    cache: Cache | str | os.PathLike, index: DatasetIndex, space: FeatureSpace
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Join the index with a feature space.

    Returns ``(X, labels, splits, paths)`` for the index rows with status ok whose hash has
    a vector, in index order. ``X`` is float32 (N, D).
    """
    ok = index.ok_mask()
    want = [index.hash[i].encode() for i in np.flatnonzero(ok)]
    hashes, emb = space.load(only=set(want))
    row = {h: i for i, h in enumerate(hashes.tolist())}
    take = [i for i in np.flatnonzero(ok) if index.hash[i].encode() in row]
    X = emb[[row[index.hash[i].encode()] for i in take]] if take else np.empty((0, emb.shape[1]), np.float32)
    pick = lambda col: np.array([col[i] for i in take], dtype=object)  # noqa: E731
    return X, pick(index.label), pick(index.split), pick(index.path)


class CacheLock:
    """An exclusive, non-blocking lock on one dataset's index that dies with its owner.

    A POSIX record lock (``lockf``), not ``flock``: a ``flock`` belongs to the open file, which
    the forked decode workers share, so after a ``kill -9`` of the extract the orphaned workers
    kept the lock until they noticed (~5 s) and a rerun was refused naming a dead pid. A record
    lock belongs to the process and is not inherited by ``fork``. (It is released when this
    process closes any descriptor of the file: only this class opens lock files.)
    """

    def __init__(self, path: Path, wait: bool = False):
        self.path, self.wait, self._fh = Path(path), wait, None

    def __enter__(self) -> "CacheLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")
        flags = fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB)
        try:
            fcntl.lockf(self._fh, flags)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES, by platform
            self._fh.seek(0)
            holder = self._fh.read().strip() or "?"
            self._fh.close()
            raise UserError(
                f"another extract (pid {holder}) is writing {self.path.with_suffix('.h5').name} in this cache; "
                "wait for it to finish or pass --wait"
            ) from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(str(os.getpid()))
        self._fh.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._fh:
            fcntl.lockf(self._fh, fcntl.LOCK_UN)
            self._fh.close()
