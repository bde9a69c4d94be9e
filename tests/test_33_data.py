"""Block cache and read-ahead on the read path, against the fake backend."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.fakes import FakeNfs
from wancache.cache import data as data_mod
from wancache.cache.attrs import data_version
from wancache.cache.blocks import BlockStore
from wancache.cache.data import VersionChanged
from wancache.cache.node import Node
from wancache.cache.readahead import ReadAhead
from wancache.cache.store import Store
from wancache.config import build_config
from wancache.mount import build
from wancache.nfs_backend import nfs3
from wancache.nfs_backend.nfs3 import Fattr3
from wancache.nfs_backend.transport import Cred

ROOT = Cred.root()
MiB = 1 << 20


def server_attrs(store: Store, node: Node) -> Fattr3:
    """The server's attributes of `node` as the attribute cache has them."""
    entry = store.attrs.peek(node.fh)
    assert entry is not None
    return entry.attrs


async def open_store(fake: FakeNfs, nursery: trio.Nursery, blocks: BlockStore | None,
                     *options: str) -> Store:
    cfg = build_config("fake:/x", "/mnt", ["block_size=64K", "small_file=16K",
                                           "readahead=1M", "actimeo=30", *options])
    store = (await build(fake, cfg, nursery, blocks=blocks)).store  # type: ignore[arg-type]
    fake.stats.reset()
    return store


async def read_all(store: Store, node, size: int, chunk: int, ra: ReadAhead | None) -> bytes:
    out = bytearray()
    for off in range(0, size, chunk):
        out += await store.read(node, off, chunk, ROOT, ra=ra)
    return bytes(out)


async def settled(blocks: BlockStore) -> None:
    """Wait until the background puts and deletions started so far are on disk (they
    queue on the store's writer lock, in order)."""
    await trio.testing.wait_all_tasks_blocked()
    await blocks.purge()


def test_readahead_window_grows_and_random_access_closes_it() -> None:
    ra = ReadAhead(block_size=64 << 10, max_window=1 << 20)
    assert list(ra.plan(0, 4096, 10 << 20)) == [0, 1, 2]     # first read: two blocks on
    windows = []
    off = 4096
    for _ in range(6):
        ra.plan(off, 128 << 10, 10 << 20)
        windows.append(ra.window)
        off += 128 << 10
    assert windows == [256 << 10, 512 << 10, 1 << 20, 1 << 20, 1 << 20, 1 << 20]
    assert list(ra.plan(7 << 20, 4096, 10 << 20)) == []       # a jump: random access
    assert ra.window == 0
    assert list(ra.plan(3 << 20, 4096, 10 << 20)) == []


async def test_sequential_read_is_fetched_ahead_in_blocks(nursery: trio.Nursery,
                                                          tmp_path: Path) -> None:
    fake = FakeNfs(latency=0.01)
    blob = os.urandom(3 * MiB + 123)
    fake.server_create("/f", blob)
    blocks = await BlockStore.open(tmp_path / "b", size_limit=64 * MiB, block_size=64 << 10)
    store = await open_store(fake, nursery, blocks)
    node, _ = await store.lookup(store.root, b"f", ROOT)
    fake.stats.reset()
    ra = store.readahead()
    assert await read_all(store, node, len(blob), 128 << 10, ra) == blob
    reads = fake.calls()["READ"]
    assert reads == (len(blob) + (64 << 10) - 1) // (64 << 10)   # each block once
    assert store.data is not None and store.data.stats.ahead_fetched > reads // 2
    await trio.testing.wait_all_tasks_blocked()
    await blocks.close()


async def test_cached_blocks_survive_a_new_store(nursery: trio.Nursery, tmp_path: Path) -> None:
    fake = FakeNfs()
    blob = os.urandom(MiB)
    fake.server_create("/f", blob)
    blocks = await BlockStore.open(tmp_path / "b", size_limit=64 * MiB, block_size=64 << 10)
    store = await open_store(fake, nursery, blocks)
    node, _ = await store.lookup(store.root, b"f", ROOT)
    assert await read_all(store, node, len(blob), 100_000, store.readahead()) == blob
    await trio.testing.wait_all_tasks_blocked()
    await blocks.close()
    # "Remount": a new store and block store over the same directory.
    blocks = await BlockStore.open(tmp_path / "b", size_limit=64 * MiB, block_size=64 << 10)
    store = await open_store(fake, nursery, blocks)
    node, _ = await store.lookup(store.root, b"f", ROOT)
    fake.stats.reset()
    assert await read_all(store, node, len(blob), 100_000, store.readahead()) == blob
    assert fake.calls()["READ"] == 0
    await blocks.close()


async def test_server_change_invalidates_within_a_lease(autojump_clock: trio.abc.Clock,
                                                        nursery: trio.Nursery,
                                                        tmp_path: Path) -> None:
    fake = FakeNfs()
    fake.server_create("/f", b"a" * 200_000)
    blocks = await BlockStore.open(tmp_path / "b", size_limit=64 * MiB, block_size=64 << 10)
    store = await open_store(fake, nursery, blocks)
    node, _ = await store.lookup(store.root, b"f", ROOT)
    assert await store.read(node, 0, 10, ROOT) == b"a" * 10
    fake.server_write("/f", b"b" * 150_000)
    assert await store.read(node, 0, 10, ROOT) == b"a" * 10     # within the lease
    await trio.sleep(31)
    assert await store.read(node, 0, 10, ROOT) == b"b" * 10
    assert await store.read(node, 149_995, 100, ROOT) == b"b" * 5
    await trio.testing.wait_all_tasks_blocked()
    assert blocks.cached_indexes(node.key, "") == set()
    await blocks.close()


async def test_concurrent_readers_share_one_fetch(nursery: trio.Nursery) -> None:
    fake = FakeNfs(latency=0.05)
    blob = os.urandom(64 << 10)
    fake.server_create("/f", blob + os.urandom(MiB))
    store = await open_store(fake, nursery, None)
    node, _ = await store.lookup(store.root, b"f", ROOT)
    fake.stats.reset()
    results: list[bytes] = []

    async def reader(off: int) -> None:
        results.append(await store.read(node, off, 1000, ROOT))

    async with trio.open_nursery() as readers:
        for off in range(0, 60_000, 3000):
            readers.start_soon(reader, off)
    assert len(results) == 20
    assert fake.calls()["READ"] == 1


async def test_small_files_are_fetched_whole(nursery: trio.Nursery) -> None:
    fake = FakeNfs()
    fake.server_create("/small", os.urandom(12_000))
    store = await open_store(fake, nursery, None, "block_size=4K")
    node, _ = await store.lookup(store.root, b"small", ROOT)
    fake.stats.reset()
    await store.read(node, 0, 100, ROOT)
    await trio.testing.wait_all_tasks_blocked()
    assert fake.calls()["READ"] == 3          # every block of it, at the first read
    await store.read(node, 8000, 4000, ROOT)
    assert fake.calls()["READ"] == 3


async def test_random_reads_do_not_read_ahead(nursery: trio.Nursery) -> None:
    fake = FakeNfs()
    fake.server_create("/f", os.urandom(4 * MiB))
    store = await open_store(fake, nursery, None)
    node, _ = await store.lookup(store.root, b"f", ROOT)
    ra = store.readahead()
    fake.stats.reset()
    for off in (3_000_000, 700_000, 2_100_000, 100_000, 3_900_000):
        await store.read(node, off, 4096, ROOT, ra=ra)
    await trio.testing.wait_all_tasks_blocked()
    assert fake.calls()["READ"] == 5


# -- short READs, holes, versions, epochs, RAM -------------------------------------


class ShortReads(FakeNfs):
    """A server that answers at most `most` bytes a READ, without eof."""

    def __init__(self, most: int, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.most = most

    async def read(self, fh: bytes, offset: int, count: int, cred: Cred) -> nfs3.ReadRes:
        res = await super().read(fh, offset, min(count, self.most), cred)
        return replace(res, eof=res.eof and count <= self.most)


async def test_short_reads_are_continued(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Regression (issue 13.6): a short READ reply was cached as the whole block."""
    fake = ShortReads(most=10_000)
    blob = os.urandom(200_000)
    fake.server_create("/f", blob)
    blocks = await BlockStore.open(tmp_path / "b", size_limit=64 * MiB, block_size=64 << 10)
    store = await open_store(fake, nursery, blocks)
    node, _ = await store.lookup(store.root, b"f", ROOT)
    assert await read_all(store, node, len(blob), 50_000, None) == blob
    await settled(blocks)
    assert fake.calls()["READ"] == 3 * 7 + 1      # 10 000 bytes a READ, 4 blocks
    # What was cached is whole: served again without the server, from the disk.
    fake.stats.reset()
    store2 = await open_store(fake, nursery, blocks)
    node, _ = await store2.lookup(store2.root, b"f", ROOT)
    fake.stats.reset()
    assert await read_all(store2, node, len(blob), 50_000, None) == blob
    assert fake.calls()["READ"] == 0
    await blocks.close()


async def test_read_ending_early_is_not_cached(nursery: trio.Nursery, tmp_path: Path) -> None:
    """eof before the version's size says the file changed: nothing short is kept."""
    fake = FakeNfs()
    fake.server_create("/f", b"a" * 100_000)
    blocks = await BlockStore.open(tmp_path / "b", size_limit=64 * MiB, block_size=64 << 10)
    store = await open_store(fake, nursery, blocks)
    node, _ = await store.lookup(store.root, b"f", ROOT)
    attrs = server_attrs(store, node)
    fake.path("/f").data[:] = b"a" * 70_000   # shrunk, attributes not (yet) told
    assert store.data is not None
    with pytest.raises(VersionChanged):
        await store.data.read(node, attrs, 60_000, 30_000, ROOT, None)
    await settled(blocks)
    assert blocks.cached_indexes(node.key, data_version(attrs)) == {0}
    await blocks.close()


async def test_holes_are_not_stored_as_blocks(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Regression (issue 14): the blocks of sparse holes filled the cache disk."""
    fake = FakeNfs()
    blob = bytes(3 * MiB) + b"end"
    fake.server_create("/sparse", blob)
    blocks = await BlockStore.open(tmp_path / "b", size_limit=64 * MiB, block_size=64 << 10)
    store = await open_store(fake, nursery, blocks)
    node, _ = await store.lookup(store.root, b"sparse", ROOT)
    assert await read_all(store, node, len(blob), 128 << 10, store.readahead()) == blob
    await settled(blocks)
    assert blocks.stats.holes == 48 and blocks.stats.blocks == 49
    assert len(list((tmp_path / "b").rglob("*.val"))) == 1     # the last block only
    assert blocks.stats.bytes_used < 256 << 10
    fake.stats.reset()
    store2 = await open_store(fake, nursery, blocks)      # no RAM copies: from the index
    node, _ = await store2.lookup(store2.root, b"sparse", ROOT)
    fake.stats.reset()
    assert await read_all(store2, node, len(blob), 128 << 10, None) == blob
    assert fake.calls()["READ"] == 0
    await blocks.close()


async def test_one_version_per_file_and_forget(autojump_clock: trio.abc.Clock,
                                               nursery: trio.Nursery, tmp_path: Path) -> None:
    """Regression (issue 14): blocks of old versions and deleted files stayed on disk."""
    fake = FakeNfs()
    fake.server_create("/f", os.urandom(300_000))
    blocks = await BlockStore.open(tmp_path / "b", size_limit=64 * MiB, block_size=64 << 10)
    store = await open_store(fake, nursery, blocks)
    node, _ = await store.lookup(store.root, b"f", ROOT)
    attrs = server_attrs(store, node)
    await read_all(store, node, 300_000, 64 << 10, None)
    await settled(blocks)
    assert blocks.cached_indexes(node.key, data_version(attrs)) == {0, 1, 2, 3, 4}
    fake.server_write("/f", b"new" * 1000)
    await trio.sleep(31)                                 # past the lease
    assert await store.read(node, 0, 6, ROOT) == b"newnew"
    await settled(blocks)
    # The change was noticed: the old version left the disk, not only the index.
    assert blocks.cached_indexes(node.key, data_version(attrs)) == set()
    assert blocks.stats.blocks == 1 and len(list((tmp_path / "b").rglob("*.val"))) == 1
    # The file is removed: forget drops its blocks from the disk.
    assert store.data is not None
    store.data.forget(node.key)
    assert blocks.stats.blocks == 0                     # from the index at once
    await settled(blocks)
    assert not list((tmp_path / "b").rglob("*.val"))
    assert blocks.stats.bytes_used == blocks.stats.meta_bytes
    await blocks.close()


class HeldReads(FakeNfs):
    """A server whose READs, once `hold` is set, read the file when they arrive but
    answer only when `release` is set: a reply that overtakes our own WRITE."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.held = trio.Event()
        self.release = trio.Event()

    async def read(self, fh: bytes, offset: int, count: int, cred: Cred) -> nfs3.ReadRes:
        res = await super().read(fh, offset, count, cred)
        if self.hold:
            self.held.set()
            await self.release.wait()
        return res


async def test_changed_discards_a_fetch_in_flight(nursery: trio.Nursery,
                                                  tmp_path: Path) -> None:
    """A READ sent before our own WRITE landed, answered after it, under a version
    (mtime, ctime, size) the WRITE did not change (a coarse-timestamp server): its
    old bytes must be neither returned nor cached once `changed` was called."""
    fake = HeldReads()
    old, new = b"o" * 100_000, b"n" * 100_000
    fake.server_create("/f", old)
    blocks = await BlockStore.open(tmp_path / "b", size_limit=64 * MiB, block_size=64 << 10)
    store = await open_store(fake, nursery, blocks)
    node, _ = await store.lookup(store.root, b"f", ROOT)
    attrs = server_attrs(store, node)
    assert store.data is not None
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await store.read(node, 0, 100_000, ROOT))

    fake.hold = True
    async with trio.open_nursery() as readers:
        readers.start_soon(reader)
        await fake.held.wait()                  # the READ of `old` is in flight
        fake.hold = False
        fake.path("/f").data[:] = new           # our WRITE lands; attributes alias
        store.data.changed(node.key)            # ... and the store says so
        fake.release.set()
    assert got == [new]
    await settled(blocks)
    assert store.data.stats.stale_loads >= 1
    version = data_version(attrs)
    assert await blocks.get(node.key, version, 0) == new[:64 << 10]
    assert await blocks.get(node.key, version, 1) == new[64 << 10:]
    await blocks.close()


class Tracking(FakeNfs):
    """Counts the bytes of READs in flight at once."""

    def __init__(self) -> None:
        super().__init__(latency=0.001)
        self.in_flight = self.most = 0

    async def read(self, fh: bytes, offset: int, count: int, cred: Cred) -> nfs3.ReadRes:
        self.in_flight += count
        self.most = max(self.most, self.in_flight)
        try:
            return await super().read(fh, offset, count, cred)
        finally:
            self.in_flight -= count


async def test_block_bytes_in_ram_are_bounded(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Issue 14: RAM holding block bytes has fixed bounds, whatever readahead says."""
    fake = Tracking()
    for i in range(4):
        fake.server_create(f"/f{i}", os.urandom(24 * MiB))
    blocks = await BlockStore.open(tmp_path / "b", size_limit=1 << 30, block_size=1 << 20)
    store = await open_store(fake, nursery, blocks, "block_size=1M", "readahead=256M")
    assert store.data is not None
    data = store.data
    most_recent = most_storing = 0

    async def reader(i: int) -> None:
        nonlocal most_recent, most_storing
        node, _ = await store.lookup(store.root, b"f%d" % i, ROOT)
        ra = store.readahead()
        for off in range(0, 24 * MiB, 128 << 10):
            await store.read(node, off, 128 << 10, ROOT, ra=ra)
            most_recent = max(most_recent, data._recent_bytes)
            most_storing = max(most_storing, data._storing)

    async with trio.open_nursery() as readers:
        for i in range(4):
            readers.start_soon(reader, i)
    assert most_recent <= data_mod.RECENT_BYTES
    assert most_storing <= data_mod.STORE_BYTES
    assert fake.most <= data_mod.FETCH_BYTES
    await settled(blocks)
    await blocks.close()
