"""Block cache and read-ahead on the read path, against the fake backend."""

from __future__ import annotations

import os
from pathlib import Path

import trio
import trio.testing

from tests.fakes import FakeNfs
from wancache.cache.blocks import BlockStore
from wancache.cache.readahead import ReadAhead
from wancache.cache.store import Store
from wancache.config import build_config
from wancache.mount import build
from wancache.nfs_backend.transport import Cred

ROOT = Cred.root()
MiB = 1 << 20


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
