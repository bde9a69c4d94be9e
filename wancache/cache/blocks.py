"""Persistent on-disk block cache: fixed-size blocks of server files, checked by xxhash.

A `BlockStore` keeps blocks of server files under the mount's ``cache_dir/blocks`` in
a `diskcache.Cache` (SQLite rows; values of 32 KiB and more in their own files), keyed
by ``"<file_key>/<version>/<index>"``.  `file_key` names a server file, `version` its
contents (the caller derives it from the file's change attributes), so a block of an
old version is never returned for a new one; `invalidate` drops the old versions.

On-disk value (format 1): a header, then the data::

    magic "WCBK" | format u8 | chunk shift u8 | chunk count u16 | data length u64
    | xxh3_64 of the key | xxh3_64 of each 64 KiB chunk of the data ...
    | xxh3_64 of all the header bytes before it

`get` checks every chunk; `get_range` (a slice of a block, e.g. one FUSE read) checks
only the chunks it returns.  A block that fails a check (or is missing, or fails to
load) is deleted, counted in ``stats.corrupt``, logged once at WARNING with its key
(never its contents) and reported as a miss: bad bytes are never returned and the
caller fetches the block from the server again.

Index, recency and eviction.  diskcache runs with ``eviction_policy="none"``, no size
limit and no statistics, so a read is a single SELECT plus a file read, never a
database write.  The store keeps its own in-memory index instead: ``file_key ->
version -> index -> _Block`` plus an `OrderedDict` of the unpinned blocks from least
to most recently used (a `get` hit or a `put` counts as a use), ~230 bytes a block
(12 MB for 50 GiB of 1 MiB blocks).  `open` rebuilds it from one scan of the SQLite
table ordered by ``access_time``: diskcache sets that when a block is stored and
`close` rewrites it in LRU order, so recency survives a clean remount exactly and a
crash approximately (store order since the last clean close).  Eviction drops least
recently used unpinned blocks until the new block fits; blocks of pinned file_keys
(the pin set lives in ``pins.json``) are never evicted.  ``stats.bytes_used`` counts
header plus data of every indexed block plus space reserved by puts in flight, and
stays <= the limit (a lowered `size_limit` is reached at the next put or `trim`).
What is on disk can briefly exceed it by up to one block per concurrent put: a
block being written while its victims are deleted by another thread.  SQLite's own
overhead (~100 bytes a block) is not counted.

Fast reads.  Besides the thread path, two shortcuts answer without a thread hop
(~130 us on this kind of VM, the floor of a threaded read): up to `memory_cache`
bytes of recently read or stored whole blocks in RAM, and, for `get_range`, up to 128
open descriptors of recently read block files (with their checked headers), read on
the trio thread with ``preadv2(RWF_NOWAIT)``, which returns EAGAIN instead of waiting
for the disk (we then fall back to a thread).  Only the trio thread uses or closes
those descriptors, and a block's descriptor is closed when it leaves the index.

Disk full.  A put that hits ENOSPC/EDQUOT or SQLite's "database or disk is full"
returns False, logs one warning per episode, and evicts ~5% of the cache; the
effective limit then drops to what is left and grows back by one block per
successful put (additive increase, multiplicative decrease), so a disk shared with
the write-back journal settles instead of thrashing.  Reads that hit I/O errors are
misses with a (rate-limited) warning; the block stays indexed.

Threads and the trio thread.  All SQLite and file I/O runs in
``trio.to_thread.run_sync(..., limiter=limiter)`` (except the RWF_NOWAIT reads, closing
cached descriptors, and `pin`/`unpin`, below); the index is only touched on the trio
thread.  Sequences that must stay free of `await`:

* `put`: from the last look at ``_busy`` through choosing victims to reserving the
  key (``_busy``/``_writing``) and the bytes, all before the thread hop; and the
  settling of the result after it (in one ``finally``).
* `_drop` (eviction, invalidation, corruption): unindexing blocks and marking their
  keys busy happen before the hop that deletes them.
* applying a read's result: its side effects (recency, RAM copy, descriptor,
  dropping a corrupt block) happen only if the `_Block` read is still the indexed
  one (object identity is the generation), so a read that raced a replacement or
  an eviction never drops or promotes the newer block.

A key being written or deleted is "busy": gets miss it, puts of it wait.  An
`invalidate` that meets a put in flight for a dropped version marks it doomed and
that put deletes its block again before releasing the key, so no block escapes the
index.  Thread hops that change the disk are shielded from cancellation.

`pin`/`unpin` are synchronous by design and write the small ``pins.json`` on the
calling thread (rare administrative calls).  Directory 0700, files 0600.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import re
import shutil
import sqlite3
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import diskcache
import trio
import xxhash

log = logging.getLogger(__name__)

T = TypeVar("T")
BlockKey = tuple[str, str, int]

_MAGIC: Final = b"WCBK"
_FORMAT: Final = 1
_CHUNK_SHIFT: Final = 16
_CHUNK: Final = 1 << _CHUNK_SHIFT
_HEAD: Final = struct.Struct("<4sBBHQQ")  # magic, format, shift, chunks, length, key hash
_U64: Final = struct.Struct("<Q")
_MAX_BLOCK: Final = 0xFFFF << _CHUNK_SHIFT  # the chunk count is a u16
_MODE_RAW: Final = 1  # diskcache.core.MODE_RAW: bytes inline in SQLite
_MODE_BINARY: Final = 2  # diskcache.core.MODE_BINARY: bytes in a file
_HEX2: Final = re.compile(r"[0-9a-f]{2}")
_DB_FILES: Final = ("cache.db", "cache.db-wal", "cache.db-shm")
_PINS: Final = "pins.json"
_READ_WARN_INTERVAL: Final = 60.0
_INLINE_MAX: Final = 1 << 15  # diskcache keeps smaller values in SQLite (disk_min_file_size)
_FD_CACHE: Final = 128  # open block files kept for reads on the trio thread
_NOWAIT_MAX: Final = 256 << 10  # larger ranges are read in a thread anyway
_DISK_FULL_MSG: Final = "block cache disk full; continuing without caching new blocks"


class BlockStoreError(Exception):
    """The block cache cannot be used (bad directory, in use, closed)."""


@dataclass
class BlockStats:
    """Counters of one block store; `bytes_used` and `blocks` are current values."""

    hits: int = 0  # gets (get, get_range, get_many per block) answered from the cache
    misses: int = 0  # gets not answered (absent, busy, corrupt or unreadable)
    puts: int = 0  # blocks stored
    corrupt: int = 0  # blocks that failed a check (or were missing) and were dropped
    evictions: int = 0  # blocks dropped for room, or by evict_file
    evicted_bytes: int = 0
    put_failures: int = 0  # puts that returned False
    read_errors: int = 0  # reads that hit an I/O error (reported as misses)
    bytes_used: int = 0  # stored bytes (header + data) incl. puts in flight
    blocks: int = 0  # blocks indexed


def stored_size(length: int) -> int:
    """Bytes a block of `length` data bytes takes in the cache (header included)."""
    return _HEAD.size + 8 * _nchunks(length) + 8 + length


def _nchunks(length: int) -> int:
    return (length + _CHUNK - 1) >> _CHUNK_SHIFT


def _dkey(file_key: str, version: str, index: int) -> str:
    return f"{file_key}/{version}/{index}"


def _parse_dkey(text: str) -> BlockKey | None:
    """Split a diskcache key back into (file_key, version, index), or None."""
    file_key, sep, rest = text.partition("/")
    version, sep2, index = rest.rpartition("/")
    if not (sep and sep2 and file_key and index.isdigit() and index.isascii()):
        return None
    return file_key, version, int(index)


def _check_key(file_key: str, version: str, index: int) -> None:
    if not (isinstance(file_key, str) and file_key and file_key.isprintable()
            and "/" not in file_key):
        raise ValueError(f"file_key must be a non-empty printable string without '/': "
                         f"{file_key!r}")
    if not (isinstance(version, str) and version.isprintable()):
        raise ValueError(f"version must be a printable string: {version!r}")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"block index must be an int >= 0: {index!r}")


def _key_hash(dkey: str) -> int:
    return xxhash.xxh3_64_intdigest(dkey.encode("utf-8", "surrogatepass"))


def encode_block(dkey: str, data: bytes) -> bytes:
    """The stored form of `data` under `dkey`: header, then the data."""
    mv = memoryview(data)
    n = _nchunks(len(data))
    hashes = [xxhash.xxh3_64_intdigest(mv[i << _CHUNK_SHIFT:(i + 1) << _CHUNK_SHIFT])
              for i in range(n)]
    head = (_HEAD.pack(_MAGIC, _FORMAT, _CHUNK_SHIFT, n, len(data), _key_hash(dkey))
            + struct.pack(f"<{n}Q", *hashes))
    return b"".join((head, _U64.pack(xxhash.xxh3_64_intdigest(head)), data))


class _Corrupt(Exception):
    """A stored value failed a check (internal)."""


def _parse_header(buf: bytes | memoryview, dkey: str,
                  total: int) -> tuple[int, int, tuple[int, ...]]:
    """(header size, data length, chunk hashes) of a stored value of `total` bytes."""
    if len(buf) < _HEAD.size:
        raise _Corrupt("truncated header")
    magic, fmt, shift, n, length, khash = _HEAD.unpack_from(buf)
    if magic != _MAGIC:
        raise _Corrupt("bad magic")
    if fmt != _FORMAT or shift != _CHUNK_SHIFT:
        raise _Corrupt(f"unknown format {fmt}/{shift}")
    hsize = _HEAD.size + 8 * n + 8
    if len(buf) < hsize:
        raise _Corrupt("truncated header")
    (hhash,) = _U64.unpack_from(buf, hsize - 8)
    if xxhash.xxh3_64_intdigest(memoryview(buf)[:hsize - 8]) != hhash:
        raise _Corrupt("header checksum mismatch")
    if n != _nchunks(length):
        raise _Corrupt("bad chunk count")
    if khash != _key_hash(dkey):
        raise _Corrupt("stored under another key")
    if total != hsize + length:
        raise _Corrupt(f"size {total} != {hsize + length} (truncated or extended)")
    return hsize, length, struct.unpack_from(f"<{n}Q", buf, _HEAD.size)


def _verify(data: bytes | bytearray | memoryview, first_chunk: int,
            hashes: tuple[int, ...]) -> None:
    """Check `data` (starting at chunk `first_chunk`) against its chunk hashes."""
    mv = memoryview(data)
    for i in range(_nchunks(len(mv))):
        if xxhash.xxh3_64_intdigest(mv[i << _CHUNK_SHIFT:(i + 1) << _CHUNK_SHIFT]) \
                != hashes[first_chunk + i]:
            raise _Corrupt(f"checksum mismatch in chunk {first_chunk + i}")


def _chunk_span(offset: int, length: int, size: int) -> tuple[int, int, int]:
    """(first chunk, byte start, byte end) covering [offset, offset+length) of `size`."""
    c0 = offset >> _CHUNK_SHIFT
    c1 = (offset + length - 1) >> _CHUNK_SHIFT
    return c0, c0 << _CHUNK_SHIFT, min(size, (c1 + 1) << _CHUNK_SHIFT)


def _decode(dkey: str, value: bytes, rng: tuple[int, int] | None) -> bytes:
    """Data (or the `rng` slice of it) of an inline stored value, checked."""
    mv = memoryview(value)
    hsize, length, hashes = _parse_header(mv, dkey, len(value))
    data = mv[hsize:]
    if rng is None:
        _verify(data, 0, hashes)
        return bytes(data)
    offset, count = min(rng[0], length), min(rng[1], length - min(rng[0], length))
    if count <= 0:
        return b""
    c0, start, end = _chunk_span(offset, count, length)
    _verify(data[start:end], c0, hashes)
    return bytes(data[offset:offset + count])


@dataclass(slots=True)
class _Fd:
    """An open block file with its checked header, for reads on the trio thread."""

    fd: int
    hsize: int
    length: int
    hashes: tuple[int, ...]


def _decode_fd(dkey: str, fd: int, rng: tuple[int, int] | None) -> tuple[bytes, _Fd]:
    """Data (or the `rng` slice of it) of a stored value in open file `fd`, checked."""
    total = os.fstat(fd).st_size
    head = os.pread(fd, 4096, 0)
    if len(head) >= _HEAD.size:
        n = _HEAD.unpack_from(head)[3]
        if _HEAD.size + 8 * n + 8 > len(head):
            head = os.pread(fd, _HEAD.size + 8 * n + 8, 0)
    hsize, length, hashes = _parse_header(head, dkey, total)
    info = _Fd(fd, hsize, length, hashes)
    if rng is None:
        data = os.pread(fd, length, hsize)
        if len(data) != length:
            raise _Corrupt("truncated data")
        _verify(data, 0, hashes)
        return data, info
    offset, count = min(rng[0], length), min(rng[1], length - min(rng[0], length))
    if count <= 0:
        return b"", info
    c0, start, end = _chunk_span(offset, count, length)
    buf = os.pread(fd, end - start, hsize + start)
    if len(buf) != end - start:
        raise _Corrupt("truncated data")
    _verify(buf, c0, hashes)
    return bytes(memoryview(buf)[offset - start:offset - start + count]), info


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.Error) and "full" in str(exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# Errors of the disk layer that a read or write survives (anything else is a bug).
_IO_ERRORS: Final = (OSError, sqlite3.Error, diskcache.Timeout)


class _BlockDisk(diskcache.Disk):  # type: ignore[misc]
    """diskcache `Disk` that creates value files 0600 and never leaks one on failure."""

    def __init__(self, directory: str, **kwargs: Any) -> None:
        super().__init__(directory, **kwargs)
        self._tls = threading.local()

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        """As `Disk.store`, remembering (per thread) the file just written."""
        result = super().store(value, read, key=key)
        self._tls.filename = result[2]
        return result

    def take_filename(self) -> str | None:
        """The file the last `store` of this thread wrote, forgetting it."""
        name: str | None = getattr(self._tls, "filename", None)
        self._tls.filename = None
        return name

    def _write(self, full_path: str, iterator: Iterable[Any], mode: str,
               encoding: str | None = None) -> int:
        if mode != "xb":  # text values: never stored by BlockStore
            return super()._write(full_path, iterator, mode, encoding)  # type: ignore[no-any-return]
        # diskcache's `remove` prunes empty value directories (os.removedirs) in
        # other threads: one may vanish between makedirs and open, so try again.
        for attempt in range(5):
            os.makedirs(os.path.dirname(full_path), mode=0o700, exist_ok=True)
            try:
                fd = os.open(full_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600)
                break
            except FileNotFoundError:
                if attempt == 4:
                    raise
        try:
            with open(fd, "wb") as writer:
                if isinstance(iterator, io.BytesIO):  # bytes: one write, not line by line
                    return writer.write(iterator.getbuffer())
                size = 0
                for chunk in iterator:
                    size += len(chunk)
                    writer.write(chunk)
                return size
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(full_path)
            raise


@dataclass(slots=True)
class _Read:
    """Outcome of reading one block in a worker thread."""

    kind: str  # "ok", "missing", "corrupt", "error"
    data: bytes = b""
    detail: str = ""
    fd: _Fd | None = None  # a dup of the block file's descriptor, if asked for


@dataclass(slots=True)
class _Written:
    """Outcome of a put's thread hop."""

    stored: bool
    failed_deletes: list[str] = field(default_factory=list)
    error: BaseException | None = None
    old_remains: bool = False


@dataclass
class _Opened:
    """What `_Backend.open` found on disk."""

    backend: _Backend
    rows: list[tuple[str, int]]  # (diskcache key, stored size), least recently used first
    pins: set[str]


class _Backend:
    """The blocking half: diskcache, SQLite and files.  Runs only in worker threads.

    diskcache has no API for bulk metadata, so the scan at open, batched deletes
    and saving recency use its SQL schema (table ``Cache``) through ``Cache._sql``.
    """

    def __init__(self, directory: Path, cache: diskcache.Cache, lock_fd: int) -> None:
        self.directory = directory
        self.cache = cache
        self.disk: _BlockDisk = cache.disk
        self.lock_fd = lock_fd

    # -- open ---------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path) -> _Opened:
        """Open or create the cache in `directory` (locked against other processes)."""
        if directory.exists() and not directory.is_dir():
            raise BlockStoreError(f"block cache directory {directory} is not a directory")
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if directory.stat().st_mode & 0o077:
                directory.chmod(0o700)
        except OSError as exc:
            raise BlockStoreError(
                f"cannot create block cache directory {directory}: {_describe(exc)}") from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise BlockStoreError(f"block cache directory {directory} is not writable")
        try:
            lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise BlockStoreError(
                f"cannot use block cache directory {directory}: {_describe(exc)}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise BlockStoreError(f"block cache directory {directory} is in use by another "
                                  "wancache process") from None
        try:
            return cls._open_locked(directory, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open_locked(cls, directory: Path, lock_fd: int) -> _Opened:
        for attempt in (1, 2):
            try:
                for name in _DB_FILES[:1]:
                    fd = os.open(directory / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                    os.fchmod(fd, 0o600)
                    os.close(fd)
                cache = diskcache.Cache(
                    str(directory), disk=_BlockDisk, eviction_policy="none",
                    size_limit=1 << 62, cull_limit=0, statistics=0, tag_index=0,
                    disk_min_file_size=_INLINE_MAX)
                backend = cls(directory, cache, lock_fd)
                rows = backend._scan()
            except sqlite3.DatabaseError as exc:
                if attempt == 2:
                    raise BlockStoreError(f"cannot open block cache in {directory}: "
                                          f"{_describe(exc)}") from None
                log.warning("block cache database in %s is damaged (%s); starting empty",
                            directory, _describe(exc))
                cls._wipe(directory)
                continue
            except OSError as exc:
                raise BlockStoreError(
                    f"cannot open block cache in {directory}: {_describe(exc)}") from None
            return _Opened(backend, rows, backend._load_pins())
        raise AssertionError("unreachable")

    @staticmethod
    def _wipe(directory: Path) -> None:
        for name in _DB_FILES:
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()
        for entry in os.scandir(directory):
            if entry.is_dir(follow_symlinks=False) and _HEX2.fullmatch(entry.name):
                shutil.rmtree(entry.path, ignore_errors=True)

    def _value_files(self) -> set[str]:
        files: set[str] = set()
        for d1 in os.scandir(self.directory):
            if not (d1.is_dir(follow_symlinks=False) and _HEX2.fullmatch(d1.name)):
                continue
            for d2 in os.scandir(d1.path):
                if d2.is_dir(follow_symlinks=False) and _HEX2.fullmatch(d2.name):
                    files.update(f"{d1.name}/{d2.name}/{f.name}" for f in os.scandir(d2.path))
        return files

    def _scan(self) -> list[tuple[str, int]]:
        """Index rows oldest-first; delete foreign or damaged rows and orphan files."""
        rows = self.cache._sql(
            "SELECT rowid, key, raw, mode, filename, typeof(value),"
            " CASE WHEN filename IS NULL THEN length(value) ELSE size END"
            " FROM Cache ORDER BY access_time, rowid").fetchall()
        files = self._value_files()
        good: list[tuple[str, int]] = []
        bad: list[int] = []
        referenced: set[str] = set()
        for rowid, key, raw, mode, filename, vtype, size in rows:
            ok = (raw == 1 and isinstance(key, str) and _parse_dkey(key) is not None
                  and isinstance(size, int)
                  and ((mode == _MODE_RAW and filename is None and vtype == "blob")
                       or (mode == _MODE_BINARY and filename in files)))
            if ok:
                good.append((key, size))
                if filename is not None:
                    referenced.add(filename)
            else:
                bad.append(rowid)
        if bad:
            with self.cache.transact():
                self.cache._con.executemany("DELETE FROM Cache WHERE rowid = ?",
                                            [(r,) for r in bad])
        orphans = files - referenced
        for name in orphans:
            self.disk.remove(name)
        if bad or orphans:
            log.info("block cache %s: removed %d damaged or foreign entries and %d orphan "
                     "files", self.directory, len(bad), len(orphans))
        return good

    def _load_pins(self) -> set[str]:
        try:
            pins = json.loads((self.directory / _PINS).read_text())
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as exc:
            log.warning("block cache pin list %s unreadable (%s); no files are pinned",
                        self.directory / _PINS, _describe(exc))
            return set()
        if not (isinstance(pins, list) and all(isinstance(p, str) for p in pins)):
            log.warning("block cache pin list %s malformed; no files are pinned",
                        self.directory / _PINS)
            return set()
        return set(pins)

    # -- reads ---------------------------------------------------------------------

    def read(self, dkey: str, rng: tuple[int, int] | None, keep_fd: bool = False) -> _Read:
        """Read and check one block (or the `rng` = (offset, length) slice of it).

        With `keep_fd`, a block kept in a file comes back with a dup of its descriptor.
        """
        try:
            value = self.cache.get(dkey, read=True)
        except _IO_ERRORS as exc:
            return _Read("error", detail=_describe(exc))
        except Exception as exc:  # a value diskcache cannot load is a damaged value
            return _Read("corrupt", detail=f"value fails to load: {type(exc).__name__}")
        if value is None:
            return _Read("missing", detail="missing from the cache directory")
        try:
            if isinstance(value, bytes):
                return _Read("ok", _decode(dkey, value, rng))
            if hasattr(value, "fileno"):
                with value:
                    data, info = _decode_fd(dkey, value.fileno(), rng)
                    if keep_fd:
                        info.fd = os.dup(info.fd)
                        return _Read("ok", data, fd=info)
                    return _Read("ok", data)
            return _Read("corrupt", detail=f"unexpected value type {type(value).__name__}")
        except _Corrupt as exc:
            return _Read("corrupt", detail=str(exc))
        except OSError as exc:
            return _Read("error", detail=_describe(exc))

    def read_many(self, dkeys: list[str], keep_fd: bool) -> list[_Read]:
        """`read` of several whole blocks in one thread hop."""
        return [self.read(k, None, keep_fd) for k in dkeys]

    # -- writes --------------------------------------------------------------------

    def write(self, deletes: list[str], dkey: str, data: bytes, overwrite: bool) -> _Written:
        """Delete `deletes` (evicted blocks), then store `data` under `dkey`."""
        failed = self.delete(deletes) if deletes else []
        value = encode_block(dkey, data)
        try:
            self.cache.set(dkey, value)
        except _IO_ERRORS as exc:
            self._after_failed_set()
            return _Written(False, failed, exc, old_remains=overwrite)
        finally:
            self.disk.take_filename()
        return _Written(True, failed)

    def _after_failed_set(self) -> None:
        """Undo what a failed `Cache.set` left: an open transaction, a value file."""
        with contextlib.suppress(*_IO_ERRORS):
            con = self.cache._con
            if con.in_transaction:
                con.execute("ROLLBACK")
        name = self.disk.take_filename()
        if name is not None:
            self.disk.remove(name)

    def delete(self, dkeys: list[str]) -> list[str]:
        """Delete blocks; return the keys whose rows could not be deleted.

        Files go first so that space is freed even when SQLite cannot write (full
        disk); a row left without its file is caught by the next read or open.
        """
        try:
            found: list[tuple[int, str, str | None]] = []
            for k in dkeys:
                row = self.cache._sql("SELECT rowid, filename FROM Cache WHERE key = ?"
                                      " AND raw = 1", (k,)).fetchone()
                if row is not None:
                    found.append((row[0], k, row[1]))
        except _IO_ERRORS as exc:
            log.debug("block cache: cannot look up blocks to delete: %s", _describe(exc))
            return list(dkeys)
        for _rowid, _k, filename in found:
            if filename is not None:
                self.disk.remove(filename)
        try:
            with self.cache.transact():
                self.cache._con.executemany("DELETE FROM Cache WHERE rowid = ? AND key = ?",
                                            [(r, k) for r, k, _ in found])
        except _IO_ERRORS as exc:
            log.debug("block cache: cannot delete %d blocks: %s", len(found), _describe(exc))
            return [k for _, k, _ in found]
        return []

    def save_pins(self, pins: list[str]) -> None:
        """Write the pin list atomically (0600)."""
        tmp = self.directory / (_PINS + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as f:
            json.dump(pins, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / _PINS)

    def close(self, order: list[str]) -> None:
        """Save recency (`order`: least recently used first), close, unlock."""
        try:
            base = time.time() - len(order) * 1e-6
            with self.cache.transact():
                self.cache._con.executemany(
                    "UPDATE Cache SET access_time = ? WHERE key = ? AND raw = 1",
                    ((base + i * 1e-6, k) for i, k in enumerate(order)))
        except _IO_ERRORS as exc:
            log.info("block cache: could not save block recency: %s", _describe(exc))
        finally:
            self.cache.close()
            os.close(self.lock_fd)


class _Block:
    """One indexed block; its identity is its generation (a re-put makes a new one)."""

    __slots__ = ("file_key", "index", "size", "version")

    def __init__(self, file_key: str, version: str, index: int, size: int) -> None:
        self.file_key = sys.intern(file_key)  # shared by all blocks of a file
        self.version = sys.intern(version)
        self.index = index
        self.size = size

    @property
    def key(self) -> BlockKey:
        return (self.file_key, self.version, self.index)

    @property
    def dkey(self) -> str:
        return _dkey(self.file_key, self.version, self.index)


class BlockStore:
    """Persistent cache of fixed-size blocks of server files (see the module doc)."""

    def __init__(self, directory: Path, *, size_limit: int, block_size: int = 1 << 20,
                 limiter: trio.CapacityLimiter | None = None,
                 memory_cache: int = 8 << 20, nowait_reads: bool = True) -> None:
        """An unopened store; use `BlockStore.open`.

        `memory_cache` bytes of recently used, already checked blocks are also kept
        in RAM (0 disables), so consecutive small reads of one block cost no I/O.
        `nowait_reads` lets `get_range` read page-cached block files on the trio
        thread with preadv2(RWF_NOWAIT) (never waits for the disk).
        """
        if not 0 < block_size <= _MAX_BLOCK:
            raise ValueError(f"block_size must be in 1..{_MAX_BLOCK}: {block_size}")
        if size_limit < 0:
            raise ValueError(f"size_limit must be >= 0: {size_limit}")
        self.directory = Path(directory)
        self.block_size = block_size
        self._size_limit = size_limit
        self._limiter = limiter
        self._memory_limit = memory_cache
        self._backend: _Backend | None = None
        self._closing = False
        self._stats = BlockStats()
        # The index (trio thread only).
        self._files: dict[str, dict[str, dict[int, _Block]]] = {}
        self._lru: OrderedDict[_Block, None] = OrderedDict()  # unpinned, oldest first
        self._lru_bytes = 0
        self._bytes_used = 0  # indexed blocks + reservations of puts in flight
        self._reserved = 0  # reservations of puts in flight
        self._nblocks = 0
        self._pins: set[str] = set()
        self._busy: dict[BlockKey, trio.Event] = {}  # keys being written or deleted
        self._writing: dict[BlockKey, bool] = {}  # keys being put -> doomed
        self._hot: OrderedDict[_Block, bytes] = OrderedDict()
        self._hot_bytes = 0
        self._nowait = nowait_reads and hasattr(os, "preadv") and hasattr(os, "RWF_NOWAIT")
        self._fds: OrderedDict[_Block, _Fd] = OrderedDict()  # trio thread only
        # Failure handling.
        self._full_limit: int | None = None  # lowered effective limit after ENOSPC
        self._write_warned = False
        self._pinned_warned = False
        self._read_warned_at = -_READ_WARN_INTERVAL
        # Operations in flight, so that `close` can wait for them.
        self._active = 0
        self._idle: trio.Event | None = None

    # -- life cycle ------------------------------------------------------------------

    @classmethod
    async def open(cls, directory: Path, *, size_limit: int, block_size: int = 1 << 20,
                   limiter: trio.CapacityLimiter | None = None,
                   memory_cache: int = 8 << 20, nowait_reads: bool = True) -> BlockStore:
        """Open or create the store in `directory` and rebuild its index.

        Raises `BlockStoreError` if the directory is unusable or in use.
        """
        self = cls(directory, size_limit=size_limit, block_size=block_size,
                   limiter=limiter, memory_cache=memory_cache, nowait_reads=nowait_reads)
        opened = await trio.to_thread.run_sync(_Backend.open, self.directory, limiter=limiter)
        self._backend = opened.backend
        self._pins = opened.pins
        for dkey, size in opened.rows:
            parsed = _parse_dkey(dkey)
            assert parsed is not None
            self._index(_Block(*parsed, size))
        log.info("block cache %s: %d blocks, %d bytes", self.directory, self._nblocks,
                 self._bytes_used)
        try:
            await self.trim()  # the limit may have been lowered since the last mount
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.close()
            raise
        return self

    async def close(self) -> None:
        """Wait for operations in flight, save recency, close the database."""
        if self._backend is None or self._closing:
            return
        self._closing = True
        while self._active:
            self._idle = trio.Event()
            await self._idle.wait()
        backend, self._backend = self._backend, None
        order = [b.dkey for b in self._lru]
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(backend.close, order, limiter=self._limiter)
        self._hot.clear()
        self._hot_bytes = 0
        self._close_fds()

    @contextlib.contextmanager
    def _op(self) -> Iterator[_Backend]:
        """Count an operation in flight; raise if the store is closed."""
        if self._backend is None or self._closing:
            raise BlockStoreError(f"block cache {self.directory} is closed")
        self._active += 1
        try:
            yield self._backend
        finally:
            self._active -= 1
            if not self._active and self._idle is not None:
                self._idle.set()

    def _check_open(self) -> None:
        if self._backend is None or self._closing:
            raise BlockStoreError(f"block cache {self.directory} is closed")

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- properties -----------------------------------------------------------------

    @property
    def stats(self) -> BlockStats:
        """The counters, with `bytes_used` and `blocks` brought up to date."""
        self._stats.bytes_used = self._bytes_used
        self._stats.blocks = self._nblocks
        return self._stats

    @property
    def size_limit(self) -> int:
        """Most bytes the store keeps; lowering it takes effect at the next put or `trim`."""
        return self._size_limit

    @size_limit.setter
    def size_limit(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"size_limit must be >= 0: {value}")
        self._size_limit = value
        self._full_limit = None

    def _limit(self) -> int:
        if self._full_limit is None:
            return self._size_limit
        return min(self._size_limit, self._full_limit)

    # -- index (trio thread, synchronous) ---------------------------------------------

    def _lookup(self, file_key: str, version: str, index: int) -> _Block | None:
        versions = self._files.get(file_key)
        if versions is None:
            return None
        blocks = versions.get(version)
        return None if blocks is None else blocks.get(index)

    def _index(self, b: _Block, *, recent: bool = True) -> None:
        self._files.setdefault(b.file_key, {}).setdefault(b.version, {})[b.index] = b
        self._bytes_used += b.size
        self._nblocks += 1
        if b.file_key not in self._pins:
            self._lru[b] = None
            if not recent:
                self._lru.move_to_end(b, last=False)
            self._lru_bytes += b.size

    def _unindex(self, b: _Block) -> None:
        versions = self._files[b.file_key]
        blocks = versions[b.version]
        del blocks[b.index]
        if not blocks:
            del versions[b.version]
            if not versions:
                del self._files[b.file_key]
        self._bytes_used -= b.size
        self._nblocks -= 1
        if b in self._lru:
            del self._lru[b]
            self._lru_bytes -= b.size
        data = self._hot.pop(b, None)
        if data is not None:
            self._hot_bytes -= len(data)
        f = self._fds.pop(b, None)
        if f is not None:
            os.close(f.fd)

    def _is_current(self, b: _Block) -> bool:
        return self._lookup(b.file_key, b.version, b.index) is b

    def _used(self, b: _Block) -> None:
        if b in self._lru:
            self._lru.move_to_end(b)

    def _hot_add(self, b: _Block, data: bytes) -> None:
        if len(data) > self._memory_limit or b in self._hot:
            return
        self._hot[b] = data
        self._hot_bytes += len(data)
        while self._hot_bytes > self._memory_limit:
            _, old = self._hot.popitem(last=False)
            self._hot_bytes -= len(old)

    def _blocks_of(self, file_key: str) -> Iterator[_Block]:
        for blocks in self._files.get(file_key, {}).values():
            yield from blocks.values()

    def _pick_victims(self, need: int, limit: int) -> list[_Block]:
        """Unindex least recently used unpinned blocks until `need` more bytes fit."""
        victims: list[_Block] = []
        while self._bytes_used + need > limit and self._lru:
            b = next(iter(self._lru))
            self._unindex(b)
            victims.append(b)
        self._stats.evictions += len(victims)
        self._stats.evicted_bytes += sum(b.size for b in victims)
        return victims

    def _release(self, blocks: list[_Block], ev: trio.Event, failed: Iterable[str]) -> None:
        """End a deletion: re-index blocks whose rows could not be deleted (oldest)."""
        failed_set = set(failed)
        for b in blocks:
            del self._busy[b.key]
            if b.dkey in failed_set:
                self._index(b, recent=False)
        ev.set()

    async def _drop_unindexed(self, blocks: list[_Block]) -> None:
        """Delete already unindexed blocks from disk; their keys are busy meanwhile."""
        if not blocks:
            return
        ev = trio.Event()
        for b in blocks:
            self._busy[b.key] = ev
        failed = [b.dkey for b in blocks]
        try:
            with trio.CancelScope(shield=True):
                assert self._backend is not None
                failed = await self._run(self._backend.delete, [b.dkey for b in blocks])
        finally:
            self._release(blocks, ev, failed)

    async def _drop(self, blocks: list[_Block]) -> None:
        """Unindex `blocks` (now, before any await) and delete them from disk."""
        for b in blocks:
            self._unindex(b)
        await self._drop_unindexed(blocks)

    # -- reads -----------------------------------------------------------------------

    def contains(self, file_key: str, version: str, index: int) -> bool:
        """Whether the block is cached (in-memory index only, no disk I/O)."""
        return self._lookup(file_key, version, index) is not None

    def cached_indexes(self, file_key: str, version: str) -> set[int]:
        """Indexes of the cached blocks of one version of a file (in memory)."""
        return set(self._files.get(file_key, {}).get(version, {}))

    async def get(self, file_key: str, version: str, index: int) -> bytes | None:
        """The block's data, or None on a miss (or a corrupt or unreadable block)."""
        return await self._get(file_key, version, index, None)

    async def get_range(self, file_key: str, version: str, index: int, offset: int,
                        length: int) -> bytes | None:
        """Bytes [offset, offset+length) of a block (short at its end), or None on a miss.

        Reads and checks only the 64 KiB chunks covering the range.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"bad range {offset}+{length}")
        return await self._get(file_key, version, index, (offset, length))

    async def _get(self, file_key: str, version: str, index: int,
                   rng: tuple[int, int] | None) -> bytes | None:
        with self._op() as backend:
            b = self._lookup(file_key, version, index)
            if b is None:
                self._stats.misses += 1
                return None
            data = self._hot.get(b)
            if data is not None:
                self._hot.move_to_end(b)
                self._used(b)
                self._stats.hits += 1
                return data if rng is None else data[rng[0]:rng[0] + rng[1]]
            bad: list[_Block] = []
            if rng is not None and b.size < _INLINE_MAX:
                # Small blocks live in SQLite: read it whole, keep it in RAM, slice.
                res = await self._run(backend.read, b.dkey, None, False)
                data = self._settle(b, res, bad, whole=True)
                data = None if data is None else data[rng[0]:rng[0] + rng[1]]
            else:
                res_now = self._read_nowait(b, rng) if rng is not None else None
                if res_now is None:
                    res = await self._run(backend.read, b.dkey, rng, self._nowait)
                else:
                    res = res_now
                data = self._settle(b, res, bad, whole=rng is None)
            if bad:
                await self._drop(bad)
            return data

    def _read_nowait(self, b: _Block, rng: tuple[int, int]) -> _Read | None:
        """Read a range of a block on the trio thread if the page cache has it.

        Uses preadv2(RWF_NOWAIT), which fails with EAGAIN rather than wait for the
        disk, on a descriptor cached from an earlier threaded read.  None: use a thread.
        """
        f = self._fds.get(b)
        if f is None or rng[1] > _NOWAIT_MAX:
            return None
        offset = min(rng[0], f.length)
        count = min(rng[1], f.length - offset)
        if count <= 0:
            return _Read("ok", b"")
        c0, start, end = _chunk_span(offset, count, f.length)
        buf = bytearray(end - start)
        try:
            n = os.preadv(f.fd, [buf], f.hsize + start, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = False  # this file system cannot: always use threads
                self._close_fds()
            return None
        if n != len(buf):
            return None  # partly cached (or truncated: the thread will tell)
        self._fds.move_to_end(b)
        try:
            _verify(buf, c0, f.hashes)
        except _Corrupt as exc:
            return _Read("corrupt", detail=str(exc))
        return _Read("ok", bytes(memoryview(buf)[offset - start:offset - start + count]))

    def _keep_fd(self, b: _Block, info: _Fd) -> None:
        """Cache an open descriptor of a current block (closing the oldest)."""
        if not self._nowait or b in self._fds or not self._is_current(b):
            os.close(info.fd)
            return
        self._fds[b] = info
        if len(self._fds) > _FD_CACHE:
            _, old = self._fds.popitem(last=False)
            os.close(old.fd)

    def _close_fds(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1].fd)

    async def get_many(self, file_key: str, version: str,
                       indexes: Iterable[int]) -> dict[int, bytes]:
        """The cached blocks among `indexes` (misses left out), in one thread hop."""
        with self._op() as backend:
            out: dict[int, bytes] = {}
            todo: list[_Block] = []
            for i in dict.fromkeys(indexes):
                b = self._lookup(file_key, version, i)
                if b is None:
                    self._stats.misses += 1
                elif (data := self._hot.get(b)) is not None:
                    self._hot.move_to_end(b)
                    self._used(b)
                    self._stats.hits += 1
                    out[i] = data
                else:
                    todo.append(b)
            if not todo:
                return out
            results = await self._run(backend.read_many, [b.dkey for b in todo], self._nowait)
            bad: list[_Block] = []
            for b, res in zip(todo, results, strict=True):
                data = self._settle(b, res, bad, whole=True)
                if data is not None:
                    out[b.index] = data
            if bad:
                await self._drop(bad)
            return out

    def _settle(self, b: _Block, res: _Read, bad: list[_Block], *,
                whole: bool) -> bytes | None:
        """Apply a read's outcome to the index (no await); corrupt blocks go to `bad`."""
        if res.fd is not None:
            self._keep_fd(b, res.fd)
        if res.kind == "ok":
            self._stats.hits += 1
            if self._is_current(b):
                self._used(b)
                if whole:
                    self._hot_add(b, res.data)
            return res.data
        self._stats.misses += 1
        if res.kind == "error":
            self._stats.read_errors += 1
            now = time.monotonic()
            if now - self._read_warned_at >= _READ_WARN_INTERVAL:
                self._read_warned_at = now
                log.warning("block cache read error for %s: %s (treated as a miss)",
                            b.dkey, res.detail)
        elif self._is_current(b) and b not in bad:
            # Corrupt or missing, and not replaced or dropped while we read it.
            self._stats.corrupt += 1
            log.warning("block cache: dropped corrupt block %s (%s); it will be "
                        "fetched again", b.dkey, res.detail)
            bad.append(b)
        return None

    # -- writes ----------------------------------------------------------------------

    async def put(self, file_key: str, version: str, index: int, data: bytes) -> bool:
        """Store a block; False if it was not stored (no room, disk full, I/O error).

        A put replaces a stored block of the same key.  Never raises for disk errors.
        """
        _check_key(file_key, version, index)
        if not isinstance(data, bytes):
            data = bytes(data)
        if len(data) > self.block_size:
            raise ValueError(f"block of {len(data)} bytes > block_size {self.block_size}")
        key = (file_key, version, index)
        with self._op():
            while (ev := self._busy.get(key)) is not None:
                await ev.wait()
            # -- no await from here until the reservation is recorded --
            backend = self._backend
            if backend is None or self._closing:
                raise BlockStoreError(f"block cache {self.directory} is closed")
            size = stored_size(len(data))
            limit = self._limit()
            old = self._lookup(file_key, version, index)
            old_size = old.size if old is not None else 0
            evictable = self._lru_bytes - (old_size if old in self._lru else 0)
            if self._bytes_used - old_size + size - evictable > limit:
                self._no_room(size, limit)
                return False
            if old is not None:
                self._unindex(old)
            victims = self._pick_victims(size, limit)
            self._bytes_used += size
            self._reserved += size
            ev = trio.Event()
            self._busy[key] = ev
            for v in victims:
                self._busy[v.key] = ev
            self._writing[key] = False
            # -- reserved --
            res: _Written | None = None
            on_disk = False
            doomed = False
            try:
                with trio.CancelScope(shield=True):
                    res = await self._run(backend.write, [v.dkey for v in victims],
                                          _dkey(*key), data, old is not None)
                    on_disk = res.stored
                    if on_disk and self._writing[key]:
                        # Invalidated while we wrote: delete it again.
                        on_disk = bool(await self._run(backend.delete, [_dkey(*key)]))
            finally:
                # -- no await: settle the reservation, index, busy keys --
                self._bytes_used -= size
                self._reserved -= size
                doomed = self._writing.pop(key)
                failed = res.failed_deletes if res is not None else [v.dkey for v in victims]
                for v in victims:
                    del self._busy[v.key]
                    if v.dkey in failed:
                        self._index(v, recent=False)
                if on_disk:
                    new = _Block(file_key, version, index, size)
                    self._index(new, recent=not doomed)
                    if not doomed:
                        self._hot_add(new, data)
                elif old is not None and (res is None or res.old_remains):
                    self._index(old, recent=False)
                del self._busy[key]
                ev.set()
            if on_disk and not doomed:
                self._stats.puts += 1
                self._write_ok(size)
                return True
            if res is not None and res.error is not None:
                self._stats.put_failures += 1
                await self._write_failed(res.error)
            return False

    def _no_room(self, size: int, limit: int) -> None:
        """A put that cannot fit even after evicting every unpinned block.

        Warns (once until a put succeeds) only when pinned blocks are the reason.
        """
        self._stats.put_failures += 1
        pinned = self._bytes_used - self._reserved - self._lru_bytes
        if size > limit or pinned + size <= limit or self._pinned_warned:
            return  # too big for the cache, or room taken by puts in flight
        self._pinned_warned = True
        log.warning("block cache is full of pinned blocks (%d bytes pinned, limit %d); "
                    "not caching more", pinned, limit)

    def _write_ok(self, size: int) -> None:
        self._pinned_warned = False
        if self._full_limit is not None:
            self._full_limit += size
            if self._full_limit >= self._size_limit:
                self._full_limit = None
        if self._write_warned:
            self._write_warned = False
            log.info("block cache is storing new blocks again")

    async def _write_failed(self, exc: BaseException) -> None:
        """After a failed write: warn once per episode; on a full disk free some space."""
        full = _is_disk_full(exc)
        if not self._write_warned:
            self._write_warned = True
            if full:
                log.warning(_DISK_FULL_MSG)
            else:
                log.warning("block cache write failed (%s); continuing without caching "
                            "new blocks", _describe(exc))
        if full:
            free = max(2 * self.block_size, self._bytes_used // 20)
            self._full_limit = max(0, min(self._limit(), self._bytes_used - free))
            await self._drop_unindexed(self._pick_victims(0, self._limit()))

    async def trim(self) -> None:
        """Evict down to the (possibly lowered) size limit now."""
        with self._op():
            await self._drop_unindexed(self._pick_victims(0, self._limit()))

    async def invalidate(self, file_key: str, *, keep_version: str | None = None) -> int:
        """Drop every block of `file_key` except those of `keep_version`; return the count."""
        with self._op():
            blocks = [b for b in self._blocks_of(file_key) if b.version != keep_version]
            for key in self._writing:
                if key[0] == file_key and key[1] != keep_version:
                    self._writing[key] = True  # doomed: that put deletes its block again
            await self._drop(blocks)
            return len(blocks)

    async def evict_file(self, file_key: str) -> int:
        """Drop every block of `file_key`, pinned or not (its pin stays); return the count."""
        with self._op():
            blocks = list(self._blocks_of(file_key))
            for key in self._writing:
                if key[0] == file_key:
                    self._writing[key] = True
            self._stats.evictions += len(blocks)
            self._stats.evicted_bytes += sum(b.size for b in blocks)
            await self._drop(blocks)
            return len(blocks)

    # -- pins ------------------------------------------------------------------------

    def pinned(self) -> set[str]:
        """The pinned file_keys."""
        return set(self._pins)

    def pin(self, file_key: str) -> None:
        """Never evict blocks of `file_key` (persisted; survives restarts)."""
        _check_key(file_key, "", 0)
        self._check_open()
        if file_key in self._pins:
            return
        self._pins.add(file_key)
        for b in self._blocks_of(file_key):
            if b in self._lru:
                del self._lru[b]
                self._lru_bytes -= b.size
        self._save_pins()

    def unpin(self, file_key: str) -> None:
        """Let blocks of `file_key` be evicted again (as if just used)."""
        self._check_open()
        if file_key not in self._pins:
            return
        self._pins.discard(file_key)
        for b in self._blocks_of(file_key):
            self._lru[b] = None
            self._lru_bytes += b.size
        self._save_pins()

    def _save_pins(self) -> None:
        assert self._backend is not None
        try:
            self._backend.save_pins(sorted(self._pins))
        except OSError as exc:
            log.warning("block cache: cannot save the pin list: %s", _describe(exc))
