"""The persistent block cache (wancache.cache.blocks) against a tmp_path store."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import sqlite3
import stat
import threading
import time
from pathlib import Path

import diskcache
import pytest
import trio

from wancache.cache import blocks as blocks_mod
from wancache.cache.blocks import BlockStore, BlockStoreError, PinError, stored_size

BS = 64 << 10  # block size of most tests: stored in files (diskcache inlines < 32 KiB)


def data_for(file_key: str, version: str, index: int, size: int = BS) -> bytes:
    """Deterministic contents of a block, different per key."""
    return random.Random(f"{file_key}/{version}/{index}").randbytes(size)


async def open_store(path: Path, limit: int = 1 << 30, **kw: object) -> BlockStore:
    kw.setdefault("block_size", BS)
    return await BlockStore.open(path, size_limit=limit, **kw)  # type: ignore[arg-type]


def index_state(store: BlockStore) -> dict[str, int]:
    """diskcache key -> hole length (or -1) of every indexed block."""
    return {b.dkey: b.hole for versions in store._files.values()
            for m in versions.values() for b in m.values()}


def disk_state(store: BlockStore) -> dict[str, int]:
    """diskcache key -> stored size of every block really on disk."""
    assert store._backend is not None
    cache = store._backend.cache
    out = {}
    for key in list(cache.iterkeys()):
        raw = cache.get(key)
        if raw is not None:
            out[key] = len(raw)
    return out


def du(path: Path) -> int:
    """Disk usage of `path` and everything below it, as du counts it."""
    total = os.lstat(path).st_blocks * 512
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def assert_consistent(store: BlockStore) -> None:
    """Index == disk, and what the store counts == what du counts (at rest)."""
    idx, disk = index_state(store), disk_state(store)
    assert set(idx) == set(disk)
    assert {k for k, hole in idx.items() if hole >= 0} == \
        {k for k, n in disk.items() if n == blocks_mod._HOLE_SIZE}
    assert store.stats.bytes_used == du(store.directory)
    assert store.stats.blocks == len(disk)
    assert store._lru_bytes == sum(b.size for b in store._lru)
    assert not store._doomed and store._writing is None


def room_for(store: BlockStore, n: int, size: int = BS) -> int:
    """A size limit that holds what `store` has besides blocks and `n` blocks of `size`."""
    return (store.stats.meta_bytes + blocks_mod._CHANGE_SLACK + n * store.block_cost(size)
            + 4096)


def value_file(store: BlockStore, dkey: str) -> Path:
    """The file diskcache keeps a (large) value in."""
    assert store._backend is not None
    (filename,) = store._backend.cache._sql(
        "SELECT filename FROM Cache WHERE key = ?", (dkey,)).fetchone()
    return store.directory / filename


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.get_records("call")
            if r.levelno >= logging.WARNING and r.name.startswith("wancache")]


# -- basics ---------------------------------------------------------------------------


async def test_round_trip_one_version_per_file(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "blocks")
    for i in range(3):
        assert await store.put("f", "v1", i, data_for("f", "v1", i))
    assert await store.put("f", "v1", 7, b"tail")  # a short last block
    assert await store.put("g", "v1", 0, b"")
    for i in range(3):
        assert await store.get("f", "v1", i) == data_for("f", "v1", i)
    assert await store.get("f", "v1", 7) == b"tail"
    assert await store.get("g", "v1", 0) == b""
    assert await store.get("f", "v4", 0) is None
    assert store.contains("f", "v1", 1) and not store.contains("f", "v1", 3)
    assert store.cached_indexes("f", "v1") == {0, 1, 2, 7}
    assert await store.get_many("f", "v1", [0, 2, 5]) == {
        0: data_for("f", "v1", 0), 2: data_for("f", "v1", 2)}
    assert_consistent(store)

    # A block of another version of the file drops every block of the old one.
    assert await store.put("f", "v2", 1, data_for("f", "v2", 1))
    assert store.cached_indexes("f", "v1") == set()
    assert store.cached_indexes("f", "v2") == {1}
    assert await store.get("f", "v1", 0) is None
    assert_consistent(store)
    assert await store.invalidate("f", keep_version="v2") == 0
    assert await store.invalidate("f") == 1
    assert await store.evict_file("g") == 1
    assert store.stats.blocks == 0
    assert_consistent(store)

    # Overwrite replaces the stored block.
    assert await store.put("h", "v", 0, b"x" * 40000)
    assert await store.put("h", "v", 0, b"y" * 50000)
    assert await store.get("h", "v", 0) == b"y" * 50000
    assert_consistent(store)
    with pytest.raises(ValueError, match="file_key"):
        await store.put("a/b", "v", 0, b"")
    with pytest.raises(ValueError, match="block_size"):
        await store.put("a", "v", 0, bytes(BS + 1))
    await store.close()
    with pytest.raises(BlockStoreError, match="closed"):
        await store.get("h", "v", 0)


async def test_holes_cost_no_disk_and_no_read(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (issue 14): blocks of sparse holes were stored as full blocks."""
    path = tmp_path / "blocks"
    store = await open_store(path, memory_cache=0)
    base = du(path)
    for i in range(20):
        assert await store.put("sparse", "v", i, bytes(BS))
    assert await store.put("sparse", "v", 20, bytes(1000))  # a short last hole
    assert store.stats.holes == 21 and store.stats.blocks == 21
    assert not list(path.rglob("*.val"))
    assert du(path) - base < 64 << 10  # 21 rows in SQLite, not 1.3 MB of zeros
    assert_consistent(store)

    def no_reads(*args: object) -> object:
        raise AssertionError("a hole was read from the disk")

    monkeypatch.setattr(blocks_mod._Backend, "read", no_reads)
    assert await store.get("sparse", "v", 3) == bytes(BS)
    assert await store.get_range("sparse", "v", 20, 900, 500) == bytes(100)
    assert await store.get_many("sparse", "v", [0, 20]) == {0: bytes(BS), 20: bytes(1000)}
    monkeypatch.undo()
    await store.close()
    store = await open_store(path)  # holes survive a remount
    assert store.stats.holes == 21
    assert await store.get("sparse", "v", 20) == bytes(1000)
    assert_consistent(store)
    await store.close()


async def test_discard_drops_from_the_index_at_once(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "blocks")
    for i in range(4):
        await store.put("f", "v", i, data_for("f", "v", i))
    assert store.discard("f") == 4  # synchronous: no await between it and a get
    assert await store.get("f", "v", 0) is None
    assert len(disk_state(store)) == 4  # still on disk, counted
    assert store.stats.bytes_used == du(store.directory)
    await store.purge()
    assert disk_state(store) == {}
    assert_consistent(store)
    await store.close()


async def test_get_range(tmp_path: Path) -> None:
    for nowait in (True, False):
        store = await open_store(tmp_path / f"b{nowait}", block_size=1 << 20,
                                 memory_cache=0, nowait_reads=nowait)
        data = data_for("f", "v", 0, 1 << 20)
        small = data_for("f", "v", 1, 1000)
        await store.put("f", "v", 0, data)
        await store.put("f", "v", 1, small)
        for off, n in [(0, 4096), (65530, 20), (200_000, 300_000), ((1 << 20) - 10, 100),
                       (5 << 20, 10), (100, 0)]:
            for _ in range(2):  # the second time through the cached descriptor
                assert await store.get_range("f", "v", 0, off, n) == data[off:off + n]
        assert await store.get_range("f", "v", 1, 10, 100) == small[10:110]
        assert await store.get_range("f", "v", 9, 0, 10) is None
        if nowait:
            assert store._fds
            # Evict the file from the page cache: preadv2(RWF_NOWAIT) says EAGAIN and
            # the read goes to a thread.
            fd = os.open(value_file(store, "f/v/0"), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            assert await store.get_range("f", "v", 0, 4096, 4096) == data[4096:8192]
        else:
            assert not store._fds
        await store.close()


# -- integrity ------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "delete"])
async def test_corrupt_file_block(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                  damage: str, allow_log_warnings: None) -> None:
    store = await open_store(tmp_path / "blocks", memory_cache=0)
    for i in range(3):
        await store.put("f", "v", i, data_for("f", "v", i))
    path = value_file(store, "f/v/1")
    if damage == "flip":
        with path.open("r+b") as f:
            f.seek(path.stat().st_size - 1000)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x01]))
    elif damage == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    elif damage == "extend":
        with path.open("ab") as f:
            f.write(b"junk")
    else:
        path.unlink()
    for _ in range(2):
        assert await store.get("f", "v", 1) is None
    assert store.stats.corrupt == 1
    assert not store.contains("f", "v", 1)
    assert "f/v/1" not in disk_state(store)
    (warning,) = warnings_of(caplog)
    assert "f/v/1" in warning
    # Untouched blocks are fine; a later put heals the damaged one.
    assert await store.get("f", "v", 0) == data_for("f", "v", 0)
    assert await store.put("f", "v", 1, data_for("f", "v", 1))
    assert await store.get("f", "v", 1) == data_for("f", "v", 1)
    assert_consistent(store)
    await store.close()


async def test_corrupt_range_read(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                  allow_log_warnings: None) -> None:
    """Damage found by a range read on the trio thread (cached descriptor)."""
    store = await open_store(tmp_path / "blocks", block_size=1 << 20, memory_cache=0)
    data = data_for("f", "v", 0, 1 << 20)
    await store.put("f", "v", 0, data)
    assert await store.get_range("f", "v", 0, 0, 100) == data[:100]
    assert store._fds  # the next read of this block runs on the trio thread
    path = value_file(store, "f/v/0")
    with path.open("r+b") as f:
        f.seek(path.stat().st_size - 70000)
        f.write(b"\0" * 8)
    # A range in an undamaged chunk is still served; the damaged chunk is not.
    assert await store.get_range("f", "v", 0, 0, 4096) == data[:4096]
    assert await store.get_range("f", "v", 0, (1 << 20) - 70000, 10) is None
    assert store.stats.corrupt == 1 and not store.contains("f", "v", 0)
    assert not store._fds
    assert len(warnings_of(caplog)) == 1
    assert_consistent(store)
    await store.close()


async def test_corrupt_values_behind_our_back(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture,
                                              allow_log_warnings: None) -> None:
    """Damaged values (in SQLite or files), written through diskcache's own API."""
    store = await open_store(tmp_path / "blocks", memory_cache=0)
    for i in range(5):
        await store.put("f", "v", i, data_for("f", "v", i, 3000))
    raw = diskcache.Cache(str(store.directory))  # a second handle on the same database
    damaged = bytearray(raw.get("f/v/0"))
    damaged[-5] ^= 0xFF
    raw.set("f/v/0", bytes(damaged))  # flipped data byte
    raw.set("f/v/1", raw.get("f/v/1")[:-10])  # truncated
    raw.set("f/v/2", raw.get("f/v/3"))  # another block's value
    raw.set("f/v/3", {"not": "bytes"})  # a value of another type (pickled)
    raw.set("f/v/4", b"\0" * 10)  # garbage header
    raw.close()
    for i in range(5):
        assert await store.get("f", "v", i) is None
    assert store.stats.corrupt == 5
    msgs = warnings_of(caplog)
    assert len(msgs) == 5
    assert all("corrupt" in m for m in msgs)
    assert "another key" in msgs[2]
    assert disk_state(store) == {}
    for i in range(5):
        assert await store.put("f", "v", i, data_for("f", "v", i, 3000))
        assert await store.get("f", "v", i) == data_for("f", "v", i, 3000)
    await store.close()


async def test_read_io_error_is_a_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture,
                                       allow_log_warnings: None) -> None:
    store = await open_store(tmp_path / "blocks", memory_cache=0)
    await store.put("f", "v", 0, data_for("f", "v", 0))

    def eio(*args: object) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(blocks_mod, "_decode_fd", eio)
    assert await store.get("f", "v", 0) is None
    assert await store.get("f", "v", 0) is None
    assert store.stats.read_errors == 2 and store.stats.corrupt == 0
    assert len(warnings_of(caplog)) == 1  # rate-limited
    monkeypatch.undo()
    assert store.contains("f", "v", 0)  # kept: the error may be transient
    assert await store.get("f", "v", 0) == data_for("f", "v", 0)
    await store.close()


# -- size limit, LRU, pins ------------------------------------------------------------


async def test_eviction_keeps_limit(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "blocks")
    limit = store.size_limit = room_for(store, 10)
    rng = random.Random(1)
    for n in range(120):
        size = rng.choice([BS, BS, 100, 40000])
        assert await store.put(f"f{rng.randrange(5)}", "v", rng.randrange(20),
                               bytes([n % 256]) * size)
        assert store.stats.bytes_used <= limit
    assert store.stats.evictions > 0
    assert store.stats.evicted_bytes > 0
    assert_consistent(store)
    # Lowering the limit takes effect with trim().
    store.size_limit = room_for(store, 3)
    await store.trim()
    assert store.stats.bytes_used <= store.size_limit
    assert_consistent(store)
    # A block larger than the whole cache is refused.
    store.size_limit = 1000
    assert not await store.put("big", "v", 0, bytes(BS))
    await store.close()


async def test_lru_order(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "blocks")
    store.size_limit = room_for(store, 10)
    for i in range(10):
        await store.put("f", "v", i, data_for("f", "v", i))
    assert await store.get("f", "v", 0) is not None  # a hit counts as a use
    assert await store.get_range("f", "v", 1, 0, 10) is not None
    assert await store.get_many("f", "v", [2]) != {}
    for i in range(10, 13):
        await store.put("f", "v", i, data_for("f", "v", i))
    assert store.cached_indexes("f", "v") == {0, 1, 2, 6, 7, 8, 9, 10, 11, 12}
    assert store.stats.evictions == 3
    assert_consistent(store)
    await store.close()


async def test_pinned_blocks_survive(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                     allow_log_warnings: None) -> None:
    store = await open_store(tmp_path / "blocks")
    store.size_limit = room_for(store, 6)
    store.pin("p")
    for i in range(3):
        await store.put("p", "v", i, data_for("p", "v", i))
    await store.put("q", "v", 0, data_for("q", "v", 0))
    store.pin("q")  # pinning a file that already has blocks
    for i in range(30):
        assert await store.put("x", "v", i, data_for("x", "v", i))
    assert store.cached_indexes("p", "v") == {0, 1, 2}
    assert store.cached_indexes("q", "v") == {0}
    assert store.cached_indexes("x", "v") == {28, 29}
    assert store.pinned() == {"p", "q"}
    # Pinned blocks fill the cache: further puts are refused (one warning).
    await store.put("p", "v", 3, data_for("p", "v", 3))
    await store.put("p", "v", 4, data_for("p", "v", 4))
    assert not await store.put("p", "v", 5, data_for("p", "v", 5))
    assert not await store.put("x", "v", 99, data_for("x", "v", 99))
    assert store.stats.put_failures == 2
    assert len(warnings_of(caplog)) == 1
    # Unpinned, they are evicted like any other block; evict_file drops pinned ones.
    store.unpin("q")
    assert await store.put("x", "v", 100, data_for("x", "v", 100))
    assert not store.contains("q", "v", 0)
    assert await store.evict_file("p") == 5
    assert store.pinned() == {"p"}
    assert_consistent(store)
    await store.close()


async def test_pins_reserve_room_within_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "blocks"
    store = await open_store(path)
    store.size_limit = room_for(store, 6) + 8192  # (+ the pin list's own file)
    store.pin("a", 4 * store.block_cost(BS))
    with pytest.raises(PinError, match="cache_size"):
        store.pin("b", 3 * store.block_cost(BS))  # 7 blocks into room for 6
    with pytest.raises(PinError):
        store.check_pins({"b": store.block_cost(BS), "c": 2 * store.block_cost(BS)})
    store.check_pins({"b": 2 * store.block_cost(BS)})
    store.pin("b", 2 * store.block_cost(BS))
    assert store.pinned() == {"a", "b"}
    store.unpin("a")
    store.pin("c", 3 * store.block_cost(BS))
    await store.close()
    store = await open_store(path)  # reservations persist
    assert store._pins == {"b": 2 * store.block_cost(BS), "c": 3 * store.block_cost(BS)}
    await store.close()


# -- persistence ----------------------------------------------------------------------


async def test_persistence_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "blocks"
    store = await open_store(path)
    for i in range(8):
        await store.put("f", "v", i, data_for("f", "v", i))
    await store.put("s", "v", 0, b"small block")
    store.pin("s")
    # Just room for these nine blocks.
    limit = store.stats.bytes_used + blocks_mod._CHANGE_SLACK + 8192
    for i in (3, 1, 0):  # recency: 2 4 5 6 7 3 1 0 are the unpinned, oldest first
        assert await store.get("f", "v", i) is not None
    with pytest.raises(BlockStoreError, match="in use"):
        await open_store(path)
    await store.close()

    store = await open_store(path, limit)
    assert store.pinned() == {"s"}
    assert store.stats.blocks == 9
    for i in range(8):
        assert await store.get("f", "v", i) == data_for("f", "v", i)
    assert await store.get("s", "v", 0) == b"small block"
    assert store.stats.hits == 9 and store.stats.misses == 0
    for i in (5, 6):  # recency now: 0 1 2 3 4 7 5 6
        assert await store.get("f", "v", i) is not None
    await store.close()

    # Recency and pins survive a clean remount: the least recently used go first.
    store = await open_store(path, limit, memory_cache=0)
    for i in (2, 4):
        await store.put("g", "v", i, data_for("g", "v", i))
    assert store.cached_indexes("f", "v") == {2, 3, 4, 5, 6, 7}
    assert store.contains("s", "v", 0)
    assert_consistent(store)
    await store.close()

    # After a crash (no close), recency falls back to store order (and what the
    # last clean close saved).
    store = await open_store(path, limit)
    await store.put("g", "v", 5, data_for("g", "v", 5))  # evicts f/v/2, saved as oldest
    assert store._backend is not None
    backend, store._backend = store._backend, None
    backend.cache.close()
    os.close(backend.lock_fd)
    store = await open_store(path, limit)
    assert store.cached_indexes("f", "v") == {3, 4, 5, 6, 7}
    assert store.cached_indexes("g", "v") == {2, 4, 5}
    assert_consistent(store)
    await store.close()

    # Root-only: directory 0700, database and value files 0600.
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    files = [p for p in path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".val" for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


async def test_open_cleans_orphans_and_foreign_rows(tmp_path: Path) -> None:
    path = tmp_path / "blocks"
    store = await open_store(path)
    await store.put("f", "v", 0, data_for("f", "v", 0))
    await store.close()
    raw = diskcache.Cache(str(path))
    raw.set("not a block key", b"x")
    raw.set(("tuple", "key"), b"x")
    raw.close()
    orphan = path / "ab" / "cd" / "0123.val"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"left by a crash")
    store = await open_store(path)
    assert disk_state(store) == {"f/v/0": stored_size(BS)}
    assert not orphan.exists()
    assert_consistent(store)
    await store.close()


async def test_open_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                           allow_log_warnings: None) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for bad in (afile, afile / "sub"):
        with pytest.raises(BlockStoreError) as info:
            await open_store(bad)
        assert "\n" not in str(info.value) and str(bad) in str(info.value)
    # A damaged database is replaced by an empty cache, with a warning.
    path = tmp_path / "blocks"
    store = await open_store(path)
    await store.put("f", "v", 0, data_for("f", "v", 0))
    await store.close()
    (path / "cache.db").write_bytes(b"this is not a database" * 100)
    store = await open_store(path)
    assert store.stats.blocks == 0
    assert any("damaged" in m for m in warnings_of(caplog))
    assert await store.put("f", "v", 0, data_for("f", "v", 0))
    assert not [p for p in path.rglob("*.val")][1:]  # the old value file is gone
    await store.close()


# -- disk full ------------------------------------------------------------------------


async def test_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         caplog: pytest.LogCaptureFixture, allow_log_warnings: None) -> None:
    store = await open_store(tmp_path / "blocks", memory_cache=0)
    for i in range(40):
        await store.put("f", "v", i, data_for("f", "v", i))
    used = store.stats.bytes_used

    def enospc(*args: object, **kw: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(blocks_mod._BlockDisk, "_write", enospc)
    assert not await store.put("g", "v", 0, data_for("g", "v", 0))
    assert not await store.put("g", "v", 1, data_for("g", "v", 1))
    assert store.stats.put_failures == 2
    assert warnings_of(caplog) == [blocks_mod._DISK_FULL_MSG]
    assert store.stats.bytes_used < used  # evicted to free space
    assert store.stats.evictions > 0
    # What is left is still served.
    assert await store.get("f", "v", 39) == data_for("f", "v", 39)
    assert_consistent(store)

    # SQLite's "database or disk is full" after the value file was written: no file
    # is left behind and the block is not indexed.
    monkeypatch.undo()
    real_store = blocks_mod._BlockDisk.store

    def store_then_full(self: object, *args: object, **kw: object) -> object:
        real_store(self, *args, **kw)  # type: ignore[arg-type]
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(blocks_mod._BlockDisk, "store", store_then_full)
    assert not await store.put("g", "v", 2, data_for("g", "v", 2))
    assert len(warnings_of(caplog)) == 1  # still the same episode
    monkeypatch.undo()
    assert len(list(store.directory.rglob("*.val"))) == store.stats.blocks
    assert_consistent(store)

    # Space again: puts succeed (the lowered limit grows back block by block).
    assert await store.put("g", "v", 3, data_for("g", "v", 3))
    assert await store.get("g", "v", 3) == data_for("g", "v", 3)
    assert_consistent(store)
    await store.close()


# -- concurrency ----------------------------------------------------------------------


async def test_concurrent_operations_keep_the_index_exact(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, allow_log_warnings: None) -> None:
    store = await open_store(tmp_path / "blocks", memory_cache=2 * BS,
                             limiter=trio.CapacityLimiter(6))
    limit = store.size_limit = room_for(store, 12)
    rng = random.Random(7)
    files = ["a", "b", "c"]

    async def worker(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(60):
            fk, ver, idx = r.choice(files), r.choice(["1", "2"]), r.randrange(8)
            op = r.random()
            with trio.move_on_after(0.002 if r.random() < 0.1 else 10):
                if op < 0.45:
                    await store.put(fk, ver, idx, data_for(fk, ver, idx, r.choice([BS, 500])))
                elif op < 0.75:
                    got = await store.get(fk, ver, idx)
                    assert got is None or got in (data_for(fk, ver, idx),
                                                  data_for(fk, ver, idx, 500))
                elif op < 0.85:
                    got = await store.get_range(fk, ver, idx, 1000, 5000)
                    assert got is None or got in (data_for(fk, ver, idx)[1000:6000],
                                                  data_for(fk, ver, idx, 500)[1000:6000])
                elif op < 0.95:
                    await store.invalidate(fk, keep_version=r.choice(["1", "2"]))
                elif op < 0.98:
                    store.pin(fk) if r.random() < 0.5 else store.unpin(fk)
                else:
                    await store.evict_file(fk)
            assert store.stats.bytes_used <= limit

    async with trio.open_nursery() as nursery:
        for n in range(16):
            nursery.start_soon(worker, rng.randrange(1 << 30) + n)
    await store.purge()  # (of blocks dropped by cancelled invalidates)
    assert_consistent(store)
    assert store.stats.puts > 0 and store.stats.hits > 0
    # Pinned files may fill this small cache; nothing else may be logged.
    assert all("pinned" in m for m in warnings_of(caplog))
    await store.close()


async def test_hard_cap_holds_under_concurrent_writers(tmp_path: Path) -> None:
    """Regression (issue 14: 11 GiB in a 10 GiB cache): what du counts below the
    directory, SQLite and rounding included, never exceeds the limit, sampled while
    32 writers put random blocks (holes, short blocks, two versions), invalidate and
    pin, and after."""
    path = tmp_path / "blocks"
    cap = 4 << 20
    store = await open_store(path, cap, memory_cache=BS)
    stop = threading.Event()
    samples: list[int] = []

    def sample() -> None:
        while not stop.is_set():
            samples.append(du(path))
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()

    async def writer(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(60):
            fk = f"f{r.randrange(12)}"
            op = r.random()
            if op < 0.85:
                size = r.choice([BS, BS, BS, 40_000, 3000, 100])
                data = bytes(size) if r.random() < 0.15 else r.randbytes(size)
                await store.put(fk, "v2" if r.random() < 0.03 else "v1", r.randrange(24), data)
            elif op < 0.92:
                await store.put("p", "v1", r.randrange(8), r.randbytes(BS))  # pinned, or not
            elif op < 0.96:
                await store.invalidate(fk, keep_version="v1")
            elif op < 0.98:
                store.pin("p", 8 * store.block_cost(BS))
            else:
                store.unpin("p")

    try:
        async with trio.open_nursery() as nursery:
            for n in range(32):
                nursery.start_soon(writer, n)
    finally:
        stop.set()
        await trio.to_thread.run_sync(sampler.join)
    peak = max(samples)
    print(f"\nhard cap {cap} bytes: {len(samples)} du samples during {store.stats.puts} puts "
          f"({store.stats.evictions} evictions, {store.stats.holes} holes): peak {peak}, "
          f"after {du(path)}")
    assert len(samples) > 50 and store.stats.puts > 1000 and store.stats.evictions > 100
    assert peak <= cap
    await store.purge()
    assert_consistent(store)
    assert du(path) <= cap
    await store.close()
    assert du(path) <= cap


async def test_put_racing_discard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A discard while the put's write is in its thread: the block must not stay."""
    store = await open_store(tmp_path / "blocks")
    started, release = threading.Event(), threading.Event()
    real_change = blocks_mod._Backend.change

    def slow_change(self: blocks_mod._Backend, *args: object) -> object:
        started.set()
        release.wait(10)
        return real_change(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(blocks_mod._Backend, "change", slow_change)
    results: list[bool] = []

    async def putter() -> None:
        results.append(await store.put("f", "old", 0, data_for("f", "old", 0)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(putter)
        await trio.to_thread.run_sync(started.wait, 10)
        assert not store.contains("f", "old", 0)  # being written: not readable yet
        assert await store.get("f", "old", 0) is None
        assert store.discard("f", keep_version="new") == 0
        release.set()
    assert results == [False]
    assert not store.contains("f", "old", 0)
    await store.purge()
    assert_consistent(store)
    # A put whose `valid` says no by its turn stores nothing.
    assert not await store.put("f", "new", 0, data_for("f", "new", 0), valid=lambda: False)
    assert_consistent(store)
    await store.close()


# -- speed ----------------------------------------------------------------------------


async def test_speed(tmp_path: Path) -> None:
    """Not a benchmark: prints rates so regressions are visible (-s to see them)."""
    store = await open_store(tmp_path / "blocks", block_size=1 << 20)
    nblocks = 64
    payload = os.urandom(1 << 20)
    t0 = time.perf_counter()
    for i in range(nblocks):
        await store.put("f", "v", i, payload)
    put_mbs = nblocks / (time.perf_counter() - t0)
    await store.close()
    store = await open_store(tmp_path / "blocks", block_size=1 << 20, memory_cache=0)
    rng = random.Random(3)

    async def rate(fn: object, seconds: float = 0.4) -> float:
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            assert await fn() is not None  # type: ignore[operator]
            n += 1
        return n / (time.perf_counter() - t)

    range_rate = await rate(lambda: store.get_range(
        "f", "v", rng.randrange(nblocks), rng.randrange(256) * 4096, 4096))
    slice_rate = await rate(lambda: store.get("f", "v", rng.randrange(nblocks)))
    t0 = time.perf_counter()
    for i in range(nblocks):
        assert len(await store.get("f", "v", i) or b"") == 1 << 20
    seq_mbs = nblocks / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(nblocks):
        for off in range(0, 1 << 20, 128 << 10):
            assert len(await store.get_range("f", "v", i, off, 128 << 10) or b"") == 128 << 10
    seq128_mbs = nblocks / (time.perf_counter() - t0)
    await store.close()
    store = await open_store(tmp_path / "blocks", block_size=1 << 20, memory_cache=0,
                             nowait_reads=False)
    thread_rate = await rate(lambda: store.get_range(
        "f", "v", rng.randrange(nblocks), rng.randrange(256) * 4096, 4096), 0.3)
    print(f"\nblock cache: put {put_mbs:.0f} MB/s; random 4 KiB get_range {range_rate:.0f}/s "
          f"({thread_rate:.0f}/s all in threads); random 1 MiB get {slice_rate:.0f}/s; "
          f"sequential 1 MiB get {seq_mbs:.0f} MB/s, 128 KiB get_range {seq128_mbs:.0f} MB/s")
    assert range_rate > 1000 and seq_mbs > 100  # loose: shared CI machines
    await store.close()
