"""Persistent on-disk block cache under a hard size cap, checked by xxhash.

A `BlockStore` keeps blocks of server files under the mount's ``cache_dir/blocks`` in
a `diskcache.Cache`: one SQLite row per block, keyed ``"<file_key>/<version>/<index>"``,
its value in a file under ``v/``.  `file_key` names a server file, `version` its
contents (the caller derives it from the file's change attributes), so a block of an
old version is never returned for a new one.

One version per file.  Storing a block of version V drops the blocks of every other
version of that file.  `discard` drops a file's blocks (all, or all but one version)
from the index at once, before any await, so no later `get` returns them; they leave
the disk in the next disk change (`purge` forces one).

Holes.  A block of zeros is kept as a 32-byte marker row and no file: it costs no
disk but its row, and `get` answers it from the in-memory index without any I/O.

On-disk value (format 1): a header, then the data::

    magic "WCBK" | format u8 | chunk shift u8 | chunk count u16 | data length u64
    | xxh3_64 of the key | xxh3_64 of each 64 KiB chunk of the data ...
    | xxh3_64 of all the header bytes before it

A hole marker is such a header alone, with magic "WCHL" and no chunks.  `get` checks
every chunk; `get_range` (a slice of a block, e.g. one FUSE read) checks only the
chunks it returns.  A block that fails a check (or is missing, or fails to load) is
dropped, counted in ``stats.corrupt``, logged once at WARNING with its key (never
its contents) and reported as a miss: bad bytes are never returned and the caller
fetches the block from the server again.

Hard cap.  Everything below the directory (value files, their directory, SQLite's
database, WAL and shared memory, the pin list), counted as the file system counts
it (``st_blocks * 512``), stays within the limit, also while blocks are written:

* every disk change (a put and the deletions it makes room with, a purge) runs
  alone, in one thread hop, under the store's writer lock; writers queue there, so
  eviction keeps up with any number of them;
* ``stats.bytes_used`` = the measured size of each value file (fstat after writing)
  + blocks dropped from the index but not yet from the disk + ``meta``: everything
  else, measured after every change;
* a put first makes room: it evicts least recently used unpinned blocks until the
  indexed blocks + meta + its own file (rounded up to the file system's block) +
  `_CHANGE_SLACK` fit the limit; the deletions run first in the put's hop, and if
  one fails the put does not write;
* `_CHANGE_SLACK` bounds what one change adds to the database files: rows are
  deleted or updated `_BATCH` at a time, and after each transaction the WAL is
  checkpointed into the database and truncated (it is empty between changes);
  the slack is also what a change or `close` may add while no put reserved it
  (blocks are stored while ``bytes_used`` + slack fits the limit).

A put that cannot fit (pinned blocks fill the cache) returns False.  Pinned files
are never evicted; each pin reserves the bytes its file will take (saved with the
pin list in ``pins.json``) and `pin` refuses with `PinError` a file that would take
the reserved total past what the limit leaves.  At most `max_blocks` blocks are
indexed (the index costs ~250 bytes of RAM a block).

Index and recency.  diskcache runs with ``eviction_policy="none"``, no size limit
and no statistics, so a read is a single SELECT plus a file read, never a database
write.  The store keeps its own in-memory index: ``file_key -> version -> index ->
_Block`` plus an `OrderedDict` of the unpinned blocks from least to most recently
used (a `get` hit or a `put` counts as a use).  `open` rebuilds it from one scan of
the SQLite table ordered by ``access_time`` (and a stat of every value file):
diskcache sets that when a block is stored and `close` rewrites it in LRU order, so
recency survives a clean remount exactly and a crash approximately.

Fast reads.  Besides the thread path, two shortcuts answer without a thread hop:
up to `memory_cache` bytes of recently read or stored whole blocks in RAM, and, for
`get_range`, up to 128 open descriptors of recently read block files (with their
checked headers), read on the trio thread with ``preadv2(RWF_NOWAIT)``, which
returns EAGAIN instead of waiting for the disk (we then fall back to a thread).
Only the trio thread uses or closes those descriptors; a block's descriptor is
closed when it leaves the index.  SQLite runs without mmap and with a small page
cache per connection, and at most `_THREADS` connections exist (one per worker
thread), so the store's RAM stays bounded.

Crashes.  SQLite runs in WAL mode with ``synchronous=OFF`` (no fsync: a killed
process loses nothing, a power loss may damage the database).  `open` after any
stop that was not a clean `close` runs ``PRAGMA quick_check`` and starts empty if
it fails.  Every value is checked against its own key, so a damaged database can
lose blocks but never return wrong ones.

Disk full.  A put that hits ENOSPC/EDQUOT or SQLite's "database or disk is full"
returns False, logs one warning per episode, and evicts ~5% of the cache; the
effective limit then drops to what is left and grows back by one block per
successful put, so a disk shared with the write-back journal settles instead of
thrashing.  Reads that hit I/O errors are misses with a (rate-limited) warning.

Threads.  All SQLite and file I/O runs in ``trio.to_thread.run_sync`` (except the
RWF_NOWAIT reads, closing cached descriptors, and `pin`/`unpin`, which write the
small pin list on the calling thread); the index is only touched on the trio
thread, and a put decides everything (victims, room, what to delete) between
taking the writer lock and its thread hop, without an await.  The result of a
read changes the index (recency, RAM copy, dropping a corrupt block) only if the
`_Block` read is still the indexed one (object identity is the generation).  A
`discard` that meets a put in its hop marks it doomed: its block is not indexed
and leaves the disk with the next change.  Thread hops that change the disk are
shielded from cancellation.  Directory 0700, files 0600.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import diskcache
import trio
import xxhash

log = logging.getLogger(__name__)

T = TypeVar("T")
BlockKey = tuple[str, str, int]

_MAGIC: Final = b"WCBK"
_HOLE_MAGIC: Final = b"WCHL"
_FORMAT: Final = 1
_CHUNK_SHIFT: Final = 16
_CHUNK: Final = 1 << _CHUNK_SHIFT
_HEAD: Final = struct.Struct("<4sBBHQQ")  # magic, format, shift, chunks, length, key hash
_U64: Final = struct.Struct("<Q")
_HOLE_SIZE: Final = _HEAD.size + 8  # a hole marker: the header and its hash
_MAX_BLOCK: Final = 0xFFFF << _CHUNK_SHIFT  # the chunk count is a u16
_MODE_RAW: Final = 1  # diskcache.core.MODE_RAW: bytes inline in SQLite
_MODE_BINARY: Final = 2  # diskcache.core.MODE_BINARY: bytes in a file
_HEX2: Final = re.compile(r"[0-9a-f]{2}")
_VALUES: Final = "v"  # the directory of value files
_DB_FILES: Final = ("cache.db", "cache.db-wal", "cache.db-shm", "cache.db-journal")
_PINS: Final = "pins.json"
_CLEAN: Final = "clean"  # an empty file: the store was closed cleanly
# Everything below the directory but the value files (the directory itself included).
_META: Final = (".", _VALUES, "lock", _CLEAN, *_DB_FILES, _PINS, _PINS + ".tmp")
_INLINE_MAX: Final = _HOLE_SIZE + 1  # diskcache keeps smaller values (hole markers) in SQLite
_READ_WARN_INTERVAL: Final = 60.0
_FD_CACHE: Final = 128  # open block files kept for reads on the trio thread
_NOWAIT_MAX: Final = 256 << 10  # larger ranges are read in a thread anyway
_BATCH: Final = 16  # rows deleted or updated per SQLite transaction
_CHANGE_SLACK: Final = 128 << 10  # most one change adds to the db, WAL and directory
_SQLITE_CACHE_PAGES: Final = 256  # per connection (1 MiB)
_THREADS: Final = 8  # worker threads (and SQLite connections) of a store
_MAX_BLOCKS: Final = 100_000
_DISK_FULL_MSG: Final = "block cache disk full; continuing without caching new blocks"


class BlockStoreError(Exception):
    """The block cache cannot be used (bad directory, in use, closed)."""


class PinError(ValueError):
    """Pinning would reserve more than the cache can hold."""


@dataclass
class BlockStats:
    """Counters of one block store; `bytes_used` to `holes` are current values."""

    hits: int = 0  # gets (get, get_range, get_many per block) answered from the cache
    misses: int = 0  # gets not answered (absent, corrupt or unreadable)
    puts: int = 0  # blocks stored (holes included)
    corrupt: int = 0  # blocks that failed a check (or were missing) and were dropped
    evictions: int = 0  # blocks dropped for room, or by evict_file
    evicted_bytes: int = 0
    put_failures: int = 0  # puts that returned False
    read_errors: int = 0  # reads that hit an I/O error (reported as misses)
    bytes_used: int = 0  # disk used below the directory (what du says), blocks + meta
    meta_bytes: int = 0  # of which SQLite, directories, pin list
    blocks: int = 0  # blocks indexed (holes included)
    holes: int = 0  # of which hole markers


def stored_size(length: int) -> int:
    """Bytes a block of `length` data bytes takes in its value file (header included)."""
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


_zeros = bytes(1 << 20)


def is_zero(data: bytes) -> bool:
    """True if `data` is all zero bytes (a hole)."""
    global _zeros
    if len(data) > len(_zeros):
        _zeros = bytes(len(data))
    return _zeros.startswith(data)  # a memcmp, no copy


def encode_block(dkey: str, data: bytes) -> bytes:
    """The stored form of `data` under `dkey`: header, then the data."""
    mv = memoryview(data)
    n = _nchunks(len(data))
    hashes = [xxhash.xxh3_64_intdigest(mv[i << _CHUNK_SHIFT:(i + 1) << _CHUNK_SHIFT])
              for i in range(n)]
    head = (_HEAD.pack(_MAGIC, _FORMAT, _CHUNK_SHIFT, n, len(data), _key_hash(dkey))
            + struct.pack(f"<{n}Q", *hashes))
    return b"".join((head, _U64.pack(xxhash.xxh3_64_intdigest(head)), data))


def encode_hole(dkey: str, length: int) -> bytes:
    """The stored marker of `length` zero bytes under `dkey`."""
    head = _HEAD.pack(_HOLE_MAGIC, _FORMAT, _CHUNK_SHIFT, 0, length, _key_hash(dkey))
    return head + _U64.pack(xxhash.xxh3_64_intdigest(head))


class _Corrupt(Exception):
    """A stored value failed a check (internal)."""


def _parse_hole(value: bytes, dkey: str) -> int:
    """The length of the hole a marker stands for; _Corrupt if it is not a good one."""
    if len(value) != _HOLE_SIZE:
        raise _Corrupt("bad hole marker size")
    magic, fmt, shift, n, length, khash = _HEAD.unpack_from(value)
    if magic != _HOLE_MAGIC or fmt != _FORMAT or shift != _CHUNK_SHIFT or n:
        raise _Corrupt("bad hole marker")
    if xxhash.xxh3_64_intdigest(value[:_HEAD.size]) != _U64.unpack_from(value, _HEAD.size)[0]:
        raise _Corrupt("header checksum mismatch")
    if khash != _key_hash(dkey):
        raise _Corrupt("stored under another key")
    return int(length)


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
    if value[:4] == _HOLE_MAGIC:
        length = _parse_hole(value, dkey)
        if rng is None:
            return bytes(length)
        return bytes(max(0, min(rng[1], length - rng[0])))
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


def _usage(st: os.stat_result) -> int:
    """Disk bytes a file takes, as du counts them."""
    return st.st_blocks * 512


# Errors of the disk layer that a read or write survives (anything else is a bug).
_IO_ERRORS: Final = (OSError, sqlite3.Error, diskcache.Timeout)


def _unlink(path: str) -> bool:
    """Remove a file; True if it is gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.debug("block cache: cannot remove %s: %s", path, _describe(exc))
        return False
    return True


class _BlockDisk(diskcache.Disk):  # type: ignore[misc]
    """diskcache `Disk` that keeps value files 0600 in one directory, never leaks one
    on failure, and tells the disk usage of the file it just wrote."""

    def __init__(self, directory: str, **kwargs: Any) -> None:
        super().__init__(directory, **kwargs)
        self._tls = threading.local()

    def filename(self, key: Any = diskcache.core.UNKNOWN,
                 value: Any = diskcache.core.UNKNOWN) -> tuple[str, str]:
        name = f"{_VALUES}/{os.urandom(16).hex()}.val"
        return name, os.path.join(self._directory, name)

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        """As `Disk.store`, remembering (per thread) the file just written."""
        self._tls.usage = 0
        result = super().store(value, read, key=key)
        self._tls.filename = result[2]
        return result

    def take_written(self) -> tuple[str | None, int]:
        """(file, disk usage) of the last `store` of this thread, forgetting them."""
        name: str | None = getattr(self._tls, "filename", None)
        usage: int = getattr(self._tls, "usage", 0)
        self._tls.filename, self._tls.usage = None, 0
        return name, usage

    def remove(self, file_path: str) -> None:
        """Remove a value file (and the empty directories of an old layout)."""
        full = os.path.join(self._directory, file_path)
        _unlink(full)
        if os.path.dirname(file_path) != _VALUES:
            with contextlib.suppress(OSError):
                os.removedirs(os.path.dirname(full))

    def _write(self, full_path: str, iterator: Iterable[Any], mode: str,
               encoding: str | None = None) -> int:
        if mode != "xb":  # text values: never stored by BlockStore
            return super()._write(full_path, iterator, mode, encoding)  # type: ignore[no-any-return]
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(full_path, flags, 0o600)
        except FileNotFoundError:  # the value directory was removed behind our back
            os.makedirs(os.path.dirname(full_path), mode=0o700, exist_ok=True)
            fd = os.open(full_path, flags, 0o600)
        try:
            with open(fd, "wb") as writer:
                if isinstance(iterator, io.BytesIO):  # bytes: one write, not line by line
                    value = iterator.getvalue()  # (getbuffer would copy)
                    # Allocate first: no speculative preallocation past the end (XFS)
                    # makes the file take more than its size while it is written.
                    with contextlib.suppress(OSError):
                        os.posix_fallocate(fd, 0, len(value))
                    size = writer.write(value)
                else:
                    size = 0
                    for chunk in iterator:
                        size += len(chunk)
                        writer.write(chunk)
                writer.flush()
                # Blocks the file system reserved (delayed allocation included).
                self._tls.usage = _usage(os.fstat(writer.fileno()))
                return size
        except BaseException:
            _unlink(full_path)
            raise


@dataclass(slots=True)
class _Read:
    """Outcome of reading one block in a worker thread."""

    kind: str  # "ok", "missing", "corrupt", "error"
    data: bytes = b""
    detail: str = ""
    fd: _Fd | None = None  # a dup of the block file's descriptor, if asked for


@dataclass(slots=True)
class _Changed:
    """Outcome of one disk change (`_Backend.change`)."""

    stored: bool  # the new block is on disk
    usage: int  # disk usage of its value file
    failed: set[str]  # keys whose deletion failed (still on disk)
    meta: int  # disk usage of everything but value files, after the change
    error: BaseException | None = None


@dataclass
class _Opened:
    """What `_Backend.open` found on disk."""

    backend: _Backend
    rows: list[tuple[str, int, int]]  # (key, disk usage, hole length or -1), LRU first
    pins: dict[str, int] | None  # None: an old pin list without reservations
    pin_keys: set[str]
    meta: int
    fs_block: int


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
            (directory / _VALUES).mkdir(mode=0o700, exist_ok=True)
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
        clean = (directory / _CLEAN).exists() or not (directory / _DB_FILES[0]).exists()
        with contextlib.suppress(FileNotFoundError):
            (directory / _CLEAN).unlink()
        for attempt in (1, 2):
            try:
                fd = os.open(directory / _DB_FILES[0], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                             0o600)
                os.fchmod(fd, 0o600)
                os.close(fd)
                cache = diskcache.Cache(
                    str(directory), disk=_BlockDisk, eviction_policy="none",
                    size_limit=1 << 62, cull_limit=0, statistics=0, tag_index=0,
                    disk_min_file_size=_INLINE_MAX, sqlite_mmap_size=0,
                    sqlite_cache_size=_SQLITE_CACHE_PAGES, sqlite_synchronous=0)
                backend = cls(directory, cache, lock_fd)
                if not clean:  # a crash or power loss may have damaged the database
                    backend._check_db()
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
            pins, keys = backend._load_pins()
            return _Opened(backend, rows, pins, keys, backend._settle_meta(),
                           os.statvfs(directory).f_frsize or 4096)
        raise AssertionError("unreachable")

    def _check_db(self) -> None:
        """Raise sqlite3.DatabaseError if SQLite finds the database damaged."""
        result = self.cache._sql("PRAGMA quick_check").fetchall()
        if result != [("ok",)]:
            self.cache.close()
            raise sqlite3.DatabaseError(f"quick_check: {result[0][0]}")

    @staticmethod
    def _wipe(directory: Path) -> None:
        for name in _DB_FILES:
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()
        for entry in os.scandir(directory):
            if entry.is_dir(follow_symlinks=False) and _HEX2.fullmatch(entry.name):
                shutil.rmtree(entry.path, ignore_errors=True)
            elif entry.name == _VALUES:
                for f in os.scandir(entry.path):
                    _unlink(f.path)

    def _value_files(self) -> dict[str, int]:
        """Every value file (this layout's and the old two-level one's) -> disk usage."""
        files: dict[str, int] = {}
        for f in os.scandir(self.directory / _VALUES):
            files[f"{_VALUES}/{f.name}"] = _usage(f.stat(follow_symlinks=False))
        for d1 in os.scandir(self.directory):
            if not (d1.is_dir(follow_symlinks=False) and _HEX2.fullmatch(d1.name)):
                continue
            for d2 in os.scandir(d1.path):
                if d2.is_dir(follow_symlinks=False) and _HEX2.fullmatch(d2.name):
                    for f in os.scandir(d2.path):
                        files[f"{d1.name}/{d2.name}/{f.name}"] = _usage(
                            f.stat(follow_symlinks=False))
        return files

    def _scan(self) -> list[tuple[str, int, int]]:
        """Index rows oldest-first; delete foreign or damaged rows and orphan files;
        move value files of the old two-level layout into ``v/``."""
        rows = self.cache._sql(
            "SELECT rowid, key, raw, mode, filename,"
            " CASE WHEN filename IS NULL AND typeof(value) = 'blob'"
            " AND length(value) = ? THEN value END"
            " FROM Cache ORDER BY access_time, rowid", (_HOLE_SIZE,)).fetchall()
        files = self._value_files()
        good: list[tuple[str, int, int]] = []
        bad: list[tuple[int]] = []
        moved: list[tuple[str, int]] = []
        referenced: set[str] = set()
        for rowid, key, raw, mode, filename, marker in rows:
            ok = raw == 1 and isinstance(key, str) and _parse_dkey(key) is not None
            if ok and filename is None and mode == _MODE_RAW and marker is not None:
                with contextlib.suppress(_Corrupt):
                    good.append((key, 0, _parse_hole(bytes(marker), key)))
                    continue
            elif ok and mode == _MODE_BINARY and filename in files:
                referenced.add(filename)
                if self._move(filename, rowid, moved):
                    good.append((key, files[filename], -1))
                    continue
            bad.append((rowid,))
        self._batched("UPDATE Cache SET filename = ? WHERE rowid = ?", moved)
        self._batched("DELETE FROM Cache WHERE rowid = ?", bad)
        orphans = set(files) - referenced
        for name in orphans:
            self.disk.remove(name)
        for d1 in os.scandir(self.directory):  # the old layout's directories, if empty
            if d1.is_dir(follow_symlinks=False) and _HEX2.fullmatch(d1.name):
                for d2 in os.scandir(d1.path):
                    with contextlib.suppress(OSError):
                        os.rmdir(d2.path)
                with contextlib.suppress(OSError):
                    os.rmdir(d1.path)
        if bad or orphans:
            log.info("block cache %s: removed %d damaged or foreign entries and %d orphan "
                     "files", self.directory, len(bad), len(orphans))
        return good

    def _move(self, filename: str, rowid: int, moved: list[tuple[str, int]]) -> bool:
        """Move a value file of the old layout into ``v/``; False if it cannot be."""
        if filename.startswith(_VALUES + "/"):
            return True
        new = f"{_VALUES}/{os.path.basename(filename)}"
        try:
            os.rename(self.directory / filename, self.directory / new)
        except OSError:
            return False
        moved.append((new, rowid))
        return True

    def _batched(self, sql: str, params: list[Any]) -> None:
        """executemany `sql`, `_BATCH` rows a transaction, the WAL emptied after each."""
        for i in range(0, len(params), _BATCH):
            with self.cache.transact():
                self.cache._con.executemany(sql, params[i:i + _BATCH])
            self._settle_meta()

    def _load_pins(self) -> tuple[dict[str, int] | None, set[str]]:
        """(file_key -> reserved bytes, or None for an old list of keys; the keys)."""
        path = self.directory / _PINS
        try:
            pins = json.loads(path.read_text())
        except FileNotFoundError:
            return {}, set()
        except (OSError, ValueError) as exc:
            log.warning("block cache pin list %s unreadable (%s); no files are pinned",
                        path, _describe(exc))
            return {}, set()
        if isinstance(pins, list) and all(isinstance(p, str) for p in pins):
            return None, set(pins)
        if isinstance(pins, dict) and all(isinstance(k, str) and isinstance(v, int)
                                          for k, v in pins.items()):
            return pins, set(pins)
        log.warning("block cache pin list %s malformed; no files are pinned", path)
        return {}, set()

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

    # -- changes -------------------------------------------------------------------

    def change(self, deletes: list[str], put: tuple[str, bytes, bool] | None) -> _Changed:
        """One disk change: delete blocks, then (if every deletion worked) store `put`
        = (key, data, is a hole); then measure everything but the value files."""
        failed = self.delete(deletes) if deletes else set()
        stored, usage, error = False, 0, None
        if put is not None and not failed:
            dkey, data, hole = put
            value = encode_hole(dkey, len(data)) if hole else encode_block(dkey, data)
            self.disk.take_written()
            try:
                self.cache.set(dkey, value)
                stored = True
                usage = self.disk.take_written()[1]
            except _IO_ERRORS as exc:
                self._after_failed_set()
                error = exc
        elif put is not None:
            error = OSError(errno.EIO, f"{len(failed)} blocks could not be deleted")
        return _Changed(stored, usage, failed, self._settle_meta(), error)

    def _after_failed_set(self) -> None:
        """Undo what a failed `Cache.set` left: an open transaction, a value file."""
        with contextlib.suppress(*_IO_ERRORS):
            con = self.cache._con
            if con.in_transaction:
                con.execute("ROLLBACK")
        name, _ = self.disk.take_written()
        if name is not None:
            self.disk.remove(name)

    def delete(self, dkeys: list[str]) -> set[str]:
        """Delete blocks, `_BATCH` rows a transaction; the keys not deleted.

        Files go first so that space is freed even when SQLite cannot write (full
        disk); a row left without its file is caught by the next read or open.
        """
        failed: set[str] = set()
        for i in range(0, len(dkeys), _BATCH):
            batch = dkeys[i:i + _BATCH]
            try:
                found = self.cache._sql(
                    "SELECT rowid, key, filename FROM Cache WHERE raw = 1 AND key IN"
                    f" ({','.join('?' * len(batch))})", batch).fetchall()
            except _IO_ERRORS as exc:
                log.debug("block cache: cannot look up blocks to delete: %s", _describe(exc))
                failed.update(batch)
                continue
            gone = []
            for rowid, key, filename in found:
                if filename is None or _unlink(str(self.directory / filename)):
                    gone.append((rowid, key))
                else:
                    failed.add(key)
            try:
                with self.cache.transact():
                    self.cache._con.executemany(
                        "DELETE FROM Cache WHERE rowid = ? AND key = ?", gone)
            except _IO_ERRORS as exc:
                log.debug("block cache: cannot delete %d rows: %s", len(gone), _describe(exc))
            self._settle_meta()
        return failed

    def _settle_meta(self) -> int:
        """Checkpoint the WAL into the database and truncate it; the meta disk usage."""
        with contextlib.suppress(*_IO_ERRORS):
            if os.stat(self.directory / _DB_FILES[1]).st_size:
                self.cache._con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return self.measure()

    def measure(self) -> int:
        """Disk usage of everything below the directory but the value files."""
        total = 0
        for name in _META:
            with contextlib.suppress(FileNotFoundError):
                total += _usage(os.lstat(self.directory / name))
        return total

    def save_pins(self, pins: dict[str, int]) -> None:
        """Write the pin list atomically (0600)."""
        tmp = self.directory / (_PINS + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as f:
            json.dump(pins, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / _PINS)

    def close(self, order: list[str]) -> None:
        """Save recency (`order`: the blocks used since open, least recently used
        first; the others keep their older times), close, unlock."""
        try:
            base = time.time() - len(order) * 1e-6
            self._batched("UPDATE Cache SET access_time = ? WHERE key = ? AND raw = 1",
                          [(base + i * 1e-6, k) for i, k in enumerate(order)])
        except _IO_ERRORS as exc:
            log.info("block cache: could not save block recency: %s", _describe(exc))
        finally:
            self.cache.close()
            with contextlib.suppress(OSError):
                os.close(os.open(self.directory / _CLEAN, os.O_WRONLY | os.O_CREAT, 0o600))
            os.close(self.lock_fd)


class _Block:
    """One indexed block; its identity is its generation (a re-put makes a new one)."""

    __slots__ = ("file_key", "hole", "index", "size", "used", "version")

    def __init__(self, file_key: str, version: str, index: int, size: int,
                 hole: int = -1) -> None:
        self.file_key = sys.intern(file_key)  # shared by all blocks of a file
        self.version = sys.intern(version)
        self.index = index
        self.size = size  # disk usage of its value file (0 for a hole)
        self.hole = hole  # length of a hole, or -1
        self.used = False  # stored or read since the store was opened

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
                 memory_cache: int = 8 << 20, nowait_reads: bool = True,
                 max_blocks: int = _MAX_BLOCKS) -> None:
        """An unopened store; use `BlockStore.open`.

        `memory_cache` bytes of recently used, already checked blocks are also kept
        in RAM (0 disables), so consecutive small reads of one block cost no I/O.
        `nowait_reads` lets `get_range` read page-cached block files on the trio
        thread with preadv2(RWF_NOWAIT) (never waits for the disk).  `limiter`
        bounds the worker threads (default: `_THREADS` of the store's own).
        """
        if not 0 < block_size <= _MAX_BLOCK:
            raise ValueError(f"block_size must be in 1..{_MAX_BLOCK}: {block_size}")
        if size_limit < 0:
            raise ValueError(f"size_limit must be >= 0: {size_limit}")
        self.directory = Path(directory)
        self.block_size = block_size
        self._size_limit = size_limit
        self._limiter = limiter or trio.CapacityLimiter(_THREADS)
        self._memory_limit = memory_cache
        self._max_blocks = max_blocks
        self._backend: _Backend | None = None
        self._closing = False
        self._stats = BlockStats()
        self._fs_block = 4096
        # The index (trio thread only).
        self._files: dict[str, dict[str, dict[int, _Block]]] = {}
        self._lru: OrderedDict[_Block, None] = OrderedDict()  # unpinned, oldest first
        self._lru_bytes = 0
        self._indexed_bytes = 0  # disk usage of the indexed blocks
        self._nblocks = 0
        self._nholes = 0
        self._doomed: dict[_Block, None] = {}  # out of the index, still on disk
        self._doomed_bytes = 0
        self._meta = 0  # disk usage of everything but value files (measured)
        self._pins: dict[str, int] = {}  # pinned file_key -> bytes reserved for it
        self._wlock = trio.Lock()  # one disk change at a time
        self._writing: list[Any] | None = None  # [key, doomed] of the put in its hop
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
                   memory_cache: int = 8 << 20, nowait_reads: bool = True,
                   max_blocks: int = _MAX_BLOCKS) -> BlockStore:
        """Open or create the store in `directory` and rebuild its index.

        Raises `BlockStoreError` if the directory is unusable or in use.
        """
        self = cls(directory, size_limit=size_limit, block_size=block_size,
                   limiter=limiter, memory_cache=memory_cache, nowait_reads=nowait_reads,
                   max_blocks=max_blocks)
        opened = await trio.to_thread.run_sync(_Backend.open, self.directory,
                                               limiter=self._limiter)
        self._backend = opened.backend
        self._meta = opened.meta
        self._fs_block = opened.fs_block
        self._pins = {k: 0 for k in opened.pin_keys}
        for dkey, size, hole in opened.rows:
            parsed = _parse_dkey(dkey)
            assert parsed is not None
            self._index(_Block(*parsed, size, hole))
        if opened.pins is None:  # an old list of keys: reserve what they hold now
            self._pins = {k: sum(b.size for b in self._blocks_of(k)) for k in self._pins}
        else:
            self._pins = opened.pins
        log.info("block cache %s: %d blocks, %d bytes", self.directory, self._nblocks,
                 self.stats.bytes_used)
        try:
            await self.trim()  # the limit may have been lowered since the last mount
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.close()
            raise
        return self

    async def close(self) -> None:
        """Wait for operations in flight, delete dropped blocks, save recency, close."""
        if self._backend is None or self._closing:
            return
        self._closing = True
        while self._active:
            self._idle = trio.Event()
            await self._idle.wait()
        with trio.CancelScope(shield=True):
            if self._doomed:
                async with self._wlock:
                    await self._change(self._backend, None)
            backend, self._backend = self._backend, None
            order = [b.dkey for b in self._lru if b.used]
            await trio.to_thread.run_sync(backend.close, order, limiter=self._limiter)
        self._hot.clear()
        self._hot_bytes = 0
        self._close_fds()

    @contextlib.contextmanager
    def _op(self) -> Iterator[_Backend]:
        """Count an operation in flight; raise if the store is closed."""
        backend = self._check_open()
        self._active += 1
        try:
            yield backend
        finally:
            self._active -= 1
            if not self._active and self._idle is not None:
                self._idle.set()

    def _check_open(self) -> _Backend:
        if self._backend is None or self._closing:
            raise BlockStoreError(f"block cache {self.directory} is closed")
        return self._backend

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- properties -----------------------------------------------------------------

    @property
    def stats(self) -> BlockStats:
        """The counters, with the current values brought up to date."""
        s = self._stats
        s.bytes_used = self._indexed_bytes + self._doomed_bytes + self._meta
        s.meta_bytes = self._meta
        s.blocks = self._nblocks
        s.holes = self._nholes
        return s

    @property
    def size_limit(self) -> int:
        """Most bytes the store takes on disk; lowering it takes effect at the next
        put or `trim`."""
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

    def block_cost(self, length: int) -> int:
        """Disk bytes a block of `length` data bytes takes (0 would do for a hole)."""
        fsb = self._fs_block
        return (stored_size(length) + fsb - 1) // fsb * fsb

    def file_cost(self, size: int) -> int:
        """Disk bytes every block of a file of `size` bytes takes."""
        full, tail = divmod(size, self.block_size)
        return full * self.block_cost(self.block_size) + (self.block_cost(tail) if tail else 0)

    # -- index (trio thread, synchronous) ---------------------------------------------

    def _lookup(self, file_key: str, version: str, index: int) -> _Block | None:
        versions = self._files.get(file_key)
        if versions is None:
            return None
        blocks = versions.get(version)
        return None if blocks is None else blocks.get(index)

    def _index(self, b: _Block) -> None:
        self._files.setdefault(b.file_key, {}).setdefault(b.version, {})[b.index] = b
        self._indexed_bytes += b.size
        self._nblocks += 1
        self._nholes += b.hole >= 0
        if b.file_key not in self._pins:
            self._lru[b] = None
            self._lru_bytes += b.size

    def _unindex(self, b: _Block) -> None:
        versions = self._files[b.file_key]
        blocks = versions[b.version]
        del blocks[b.index]
        if not blocks:
            del versions[b.version]
            if not versions:
                del self._files[b.file_key]
        self._indexed_bytes -= b.size
        self._nblocks -= 1
        self._nholes -= b.hole >= 0
        if b in self._lru:
            del self._lru[b]
            self._lru_bytes -= b.size
        data = self._hot.pop(b, None)
        if data is not None:
            self._hot_bytes -= len(data)
        f = self._fds.pop(b, None)
        if f is not None:
            os.close(f.fd)

    def _doom(self, b: _Block) -> None:
        """Mark an unindexed block for deletion by the next disk change."""
        self._doomed[b] = None
        self._doomed_bytes += b.size

    def _drop(self, b: _Block) -> None:
        self._unindex(b)
        self._doom(b)

    def _is_current(self, b: _Block) -> bool:
        return self._lookup(b.file_key, b.version, b.index) is b

    def _used(self, b: _Block) -> None:
        b.used = True
        if b in self._lru:
            self._lru.move_to_end(b)

    def _hot_add(self, b: _Block, data: bytes) -> None:
        if len(data) > self._memory_limit or b in self._hot or b.hole >= 0:
            return
        self._hot[b] = data
        self._hot_bytes += len(data)
        while self._hot_bytes > self._memory_limit:
            _, old = self._hot.popitem(last=False)
            self._hot_bytes -= len(old)

    def _blocks_of(self, file_key: str) -> Iterator[_Block]:
        for blocks in self._files.get(file_key, {}).values():
            yield from blocks.values()

    def _make_room(self, need: int, limit: int) -> bool:
        """Evict least recently used unpinned blocks until `need` more bytes and one
        more block fit; False (evicting nothing) if they cannot."""
        if self._indexed_bytes - self._lru_bytes + self._meta + need > limit:
            return False
        evicted = 0
        while self._lru and (self._indexed_bytes + self._meta + need > limit
                             or self._nblocks >= self._max_blocks):
            b = next(iter(self._lru))
            evicted += b.size
            self._drop(b)
            self._stats.evictions += 1
        self._stats.evicted_bytes += evicted
        return self._nblocks < self._max_blocks

    def discard(self, file_key: str, keep_version: str | None = None) -> int:
        """Drop every block of `file_key` (except those of `keep_version`) from the
        index now, pinned or not; they leave the disk with the next change.  A put of
        such a block in its thread hop is doomed.  Returns the count."""
        blocks = [b for b in self._blocks_of(file_key) if b.version != keep_version]
        for b in blocks:
            self._drop(b)
        w = self._writing
        if w is not None and w[0][0] == file_key and w[0][1] != keep_version:
            w[1] = True
        return len(blocks)

    # -- disk changes (under the writer lock) -----------------------------------------

    async def _change(self, backend: _Backend,
                      put: tuple[BlockKey, bytes, bool] | None) -> _Changed:
        """Run one disk change: delete the doomed blocks, then store `put`.

        Call with the writer lock held.  Settles the index (no await after the hop).
        """
        doomed = list(self._doomed)
        self._writing = [put[0], False] if put is not None else None
        res: _Changed | None = None
        try:
            with trio.CancelScope(shield=True):
                res = await self._run(backend.change, [b.dkey for b in doomed],
                                      None if put is None else (_dkey(*put[0]), *put[1:]))
        finally:
            writing, self._writing = self._writing, None
            failed = res.failed if res is not None else {b.dkey for b in doomed}
            for b in doomed:
                if b.dkey not in failed:
                    del self._doomed[b]
                    self._doomed_bytes -= b.size
            if res is not None:
                self._meta = res.meta
                if res.stored and put is not None:
                    (fk, ver, idx), data, hole = put
                    new = _Block(fk, ver, idx, res.usage, len(data) if hole else -1)
                    if writing is not None and writing[1]:
                        self._doom(new)  # discarded while we wrote it
                        res.stored = False
                    else:
                        self._index(new)
                        new.used = True
                        self._hot_add(new, data)
        assert res is not None
        return res

    async def purge(self) -> None:
        """Delete the blocks dropped from the index from the disk now."""
        with self._op() as backend:
            async with self._wlock:
                if self._doomed:
                    await self._change(backend, None)

    async def put(self, file_key: str, version: str, index: int, data: bytes, *,
                  valid: Callable[[], bool] | None = None) -> bool:
        """Store a block; False if it was not (no room, disk full, I/O error, or
        `valid()` said no once the put's turn came).  Blocks of the file's other
        versions are dropped; a stored block of the same key is replaced.  A block of
        zeros is kept as a hole marker.  Never raises for disk errors."""
        _check_key(file_key, version, index)
        if not isinstance(data, bytes):
            data = bytes(data)
        if len(data) > self.block_size:
            raise ValueError(f"block of {len(data)} bytes > block_size {self.block_size}")
        key = (file_key, version, index)
        hole = is_zero(data)
        with self._op() as backend:
            async with self._wlock:
                # -- no await from here to the hop --
                if valid is not None and not valid():
                    return False
                self.discard(file_key, keep_version=version)
                old = self._lookup(*key)
                if old is not None:
                    self._drop(old)
                need = (0 if hole else self.block_cost(len(data))) + _CHANGE_SLACK
                fits = self._make_room(need, self._limit())
                if not fits:
                    self._no_room(need, file_key)
                res = await self._change(backend, (key, data, hole) if fits else None)
                if res.stored:
                    self._stats.puts += 1
                    self._write_ok(res.usage)
                    return True
                if fits:
                    self._stats.put_failures += 1
                if res.error is not None:
                    await self._write_failed(backend, res.error)
                return False

    def _no_room(self, need: int, file_key: str) -> None:
        """A put that cannot fit even after evicting every unpinned block.

        Warns (once until a put succeeds) only when pinned blocks are the reason.
        """
        self._stats.put_failures += 1
        pinned = self._indexed_bytes - self._lru_bytes
        if need + self._meta > self._limit() or self._pinned_warned or not pinned:
            return  # too big for the cache
        self._pinned_warned = True
        log.warning("block cache is full of pinned blocks (%d bytes pinned, limit %d); "
                    "not caching more of %s", pinned, self._limit(), file_key)

    def _write_ok(self, size: int) -> None:
        self._pinned_warned = False
        if self._full_limit is not None:
            self._full_limit += max(size, self._fs_block)
            if self._full_limit >= self._size_limit:
                self._full_limit = None
        if self._write_warned:
            self._write_warned = False
            log.info("block cache is storing new blocks again")

    async def _write_failed(self, backend: _Backend, exc: BaseException) -> None:
        """After a failed write: warn once per episode; on a full disk free some space.
        Call with the writer lock held."""
        full = _is_disk_full(exc)
        if not self._write_warned:
            self._write_warned = True
            if full:
                log.warning(_DISK_FULL_MSG)
            else:
                log.warning("block cache write failed (%s); continuing without caching "
                            "new blocks", _describe(exc))
        if full:
            used = self.stats.bytes_used
            free = max(2 * self.block_cost(self.block_size), used // 20)
            self._full_limit = max(0, min(self._limit(), used - free))
            self._make_room(0, self._limit())
            if self._doomed:
                await self._change(backend, None)

    async def trim(self) -> None:
        """Evict down to the (possibly lowered) size limit now."""
        with self._op() as backend:
            async with self._wlock:
                self._make_room(0, self._limit())
                if self._doomed:
                    await self._change(backend, None)

    async def invalidate(self, file_key: str, *, keep_version: str | None = None) -> int:
        """Drop every block of `file_key` except those of `keep_version` from the index
        and the disk; return the count."""
        n = self.discard(file_key, keep_version)
        await self.purge()
        return n

    async def evict_file(self, file_key: str) -> int:
        """Drop every block of `file_key`, pinned or not (its pin stays); return the count."""
        evicted = sum(b.size for b in self._blocks_of(file_key))
        n = self.discard(file_key)
        self._stats.evictions += n
        self._stats.evicted_bytes += evicted
        await self.purge()
        return n

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

    def _get_now(self, b: _Block) -> bytes | None:
        """A hole's zeros or a block's RAM copy, counted as a hit; None: read it."""
        data = bytes(b.hole) if b.hole >= 0 else self._hot.get(b)
        if data is None:
            return None
        if b in self._hot:
            self._hot.move_to_end(b)
        self._used(b)
        self._stats.hits += 1
        return data

    async def _get(self, file_key: str, version: str, index: int,
                   rng: tuple[int, int] | None) -> bytes | None:
        with self._op() as backend:
            b = self._lookup(file_key, version, index)
            if b is None:
                self._stats.misses += 1
                return None
            data = self._get_now(b)
            if data is not None:
                return data if rng is None else data[rng[0]:rng[0] + rng[1]]
            bad: list[_Block] = []
            res_now = self._read_nowait(b, rng) if rng is not None else None
            if res_now is None:
                res = await self._run(backend.read, b.dkey, rng, self._nowait)
            else:
                res = res_now
            data = self._settle(b, res, bad, whole=rng is None)
        if bad:
            await self.purge()
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
                elif (data := self._get_now(b)) is not None:
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
            await self.purge()
        return out

    def _settle(self, b: _Block, res: _Read, bad: list[_Block], *,
                whole: bool) -> bytes | None:
        """Apply a read's outcome to the index (no await); corrupt blocks are dropped
        (and listed in `bad`)."""
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
        elif self._is_current(b):
            # Corrupt or missing, and not replaced or dropped while we read it.
            self._stats.corrupt += 1
            log.warning("block cache: dropped corrupt block %s (%s); it will be "
                        "fetched again", b.dkey, res.detail)
            self._drop(b)
            bad.append(b)
        return None

    # -- pins ------------------------------------------------------------------------

    def pinned(self) -> set[str]:
        """The pinned file_keys."""
        return set(self._pins)

    def pin_room(self) -> int:
        """Bytes more that pins may reserve."""
        return (self._size_limit - self._meta - _CHANGE_SLACK - sum(self._pins.values()))

    def check_pins(self, reserve: dict[str, int]) -> None:
        """Raise PinError unless pinning these file_keys (-> bytes each will take,
        replacing their current reservation) fits the limit."""
        more = sum(n - self._pins.get(k, 0) for k, n in reserve.items())
        room = self.pin_room()
        if more > room:
            mib = 1 << 20
            raise PinError(
                f"pinning needs {-(-more // mib)} MiB more but the cache can pin only "
                f"{max(0, room) // mib} MiB more (cache_size {self._size_limit // mib} MiB, "
                f"{sum(self._pins.values()) // mib} MiB pinned already)")

    def pin(self, file_key: str, reserve: int = 0) -> None:
        """Never evict blocks of `file_key`, which will take up to `reserve` bytes
        (persisted; survives restarts).  PinError if that does not fit."""
        _check_key(file_key, "", 0)
        self._check_open()
        if self._pins.get(file_key) == reserve:
            return
        self.check_pins({file_key: reserve})
        was = file_key in self._pins
        self._pins[file_key] = reserve
        if not was:
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
        del self._pins[file_key]
        for b in self._blocks_of(file_key):
            self._lru[b] = None
            self._lru_bytes += b.size
        self._save_pins()

    def _save_pins(self) -> None:
        assert self._backend is not None
        try:
            self._backend.save_pins(dict(sorted(self._pins.items())))
        except OSError as exc:
            log.warning("block cache: cannot save the pin list: %s", _describe(exc))
        self._meta = self._backend.measure()
