"""Metadata caches (attributes, listings, negative lookups) against a fake backend,
on trio's mock clock: leases are exact and nothing waits for real."""

from __future__ import annotations

import gc
import time
import weakref
from dataclasses import replace

import pytest
import trio
import trio.testing

from tests.fakes import FakeNfs
from wancache.cache.attrs import AttrCache
from wancache.cache.lru import Lru
from wancache.cache.node import Node
from wancache.cache.nodes import NodeTable
from wancache.cache.store import DirCursor, Store
from wancache.config import build_config
from wancache.fs.inodes import InodeTable
from wancache.mount import build
from wancache.nfs_backend.errors import NfsError
from wancache.nfs_backend.nfs3 import Fattr3, Ftype3, NfsTime
from wancache.nfs_backend.transport import Cred

ROOT = Cred.root()


def make_config(*options: str):
    return build_config("fake:/export", "/mnt", ["acregmin=3", "acregmax=60", "acdirmin=30",
                                                 "acdirmax=60", "neg_lease=5", *options])


async def open_store(fake: FakeNfs, nursery: trio.Nursery, *options: str) -> Store:
    store = (await build(fake, make_config(*options), nursery)).store  # type: ignore[arg-type]
    fake.stats.reset()
    return store


async def list_all(store: Store, node: Node) -> list[bytes]:
    cursor = DirCursor(node)
    names: list[bytes] = []
    offset = 0
    while True:
        entries, eof = await store.readdir(cursor, offset, ROOT)
        names += [e.name for e in entries]
        if eof or not entries:
            return names
        offset = entries[-1].offset


async def test_attributes_within_lease_cost_nothing(autojump_clock: trio.abc.Clock,
                                                    nursery: trio.Nursery) -> None:
    fake = FakeNfs()
    fake.server_create("/f", b"abc")
    store = await open_store(fake, nursery)
    node, attrs = await store.lookup(store.root, b"f", ROOT)
    assert attrs.size == 3
    assert fake.calls() == {"LOOKUP": 1}
    for _ in range(10):
        await store.getattr(node, ROOT)
    assert fake.calls() == {"LOOKUP": 1}
    assert 0 < store.attr_ttl(node) <= 3          # a fresh file: acregmin
    await trio.sleep(3.5)
    assert store.attr_ttl(node) == 0
    await store.getattr(node, ROOT)
    assert fake.calls()["GETATTR"] == 1


async def test_lease_adapts_like_linux(autojump_clock: trio.abc.Clock,
                                       nursery: trio.Nursery) -> None:
    fake = FakeNfs()
    fake.server_create("/new", b"x")
    old = fake.server_create("/old", b"y")
    old.attrs = replace(old.attrs, mtime=NfsTime(int(time.time()) - 86400, 0))
    store = await open_store(fake, nursery)
    new_node, _ = await store.lookup(store.root, b"new", ROOT)
    old_node, _ = await store.lookup(store.root, b"old", ROOT)
    def lease(node: Node) -> float:
        entry = store.attrs.peek(node.fh)
        assert entry is not None
        return entry.lease

    assert lease(new_node) == 3     # changed just now: acregmin
    assert lease(old_node) == 60    # unchanged for a day: acregmax
    leases = []
    for _ in range(6):
        await trio.sleep(lease(new_node) + 0.1)
        await store.getattr(new_node, ROOT)
        leases.append(lease(new_node))
    assert leases == [6, 12, 24, 48, 60, 60]          # unchanged: doubled up to acregmax
    fake.server_write("/new", b"changed")
    await trio.sleep(60.1)
    assert (await store.getattr(new_node, ROOT)).size == 7
    assert lease(new_node) == 3     # a change resets it


async def test_listing_answers_lookups_and_readdir(autojump_clock: trio.abc.Clock,
                                                   nursery: trio.Nursery) -> None:
    fake = FakeNfs()
    d = fake.server_create("/big", is_dir=True)
    for i in range(250):
        fake.server_create(f"/big/f{i:03}", b"z" * i)
    store = await open_store(fake, nursery, "prefetch_depth=0")
    big, _ = await store.lookup(store.root, b"big", ROOT)
    fake.stats.reset()
    names = await list_all(store, big)
    assert len(names) == 250
    assert fake.calls() == {"READDIRPLUS": 3}          # pages of 100, nothing per entry
    for i in range(250):
        node, attrs = await store.lookup(big, f"f{i:03}".encode(), ROOT)
        assert attrs.size == i
        await store.getattr(node, ROOT)
    with pytest.raises(NfsError):
        await store.lookup(big, b"missing", ROOT)
    assert await list_all(store, big) == names
    assert fake.calls() == {"READDIRPLUS": 3}          # all of it from the cache
    assert d.fh == big.fh


async def test_expired_directory_is_revalidated_with_one_getattr(
        autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    fake = FakeNfs()
    fake.server_create("/d", is_dir=True)
    for i in range(20):
        fake.server_create(f"/d/f{i}")
    store = await open_store(fake, nursery, "prefetch_depth=0", "actimeo=10")
    d, _ = await store.lookup(store.root, b"d", ROOT)
    await list_all(store, d)
    await trio.sleep(11)
    fake.stats.reset()
    for i in range(20):
        await store.lookup(d, f"f{i}".encode(), ROOT)
    calls = fake.calls()
    assert calls["GETATTR"] <= 1 + 20   # the directory, then each expired child
    assert calls["LOOKUP"] == 0 and calls["READDIRPLUS"] == 0
    # An expired listing read again by readdir refreshes all children at once:
    await trio.sleep(11)
    fake.stats.reset()
    await list_all(store, d)
    assert set(fake.calls()) == {"READDIRPLUS"}


async def test_changes_by_another_client_show_within_a_lease(
        autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    fake = FakeNfs()
    fake.server_create("/d", is_dir=True)
    fake.server_create("/d/a", b"one")
    store = await open_store(fake, nursery, "prefetch_depth=0", "actimeo=10")
    d, _ = await store.lookup(store.root, b"d", ROOT)
    assert await list_all(store, d) == [b"a"]
    fake.server_create("/d/b", b"new")
    fake.server_write("/d/a", b"changed!")
    assert await list_all(store, d) == [b"a"]          # within the lease: cached
    await trio.sleep(10.5)
    assert sorted(await list_all(store, d)) == [b"a", b"b"]
    _, attrs = await store.lookup(d, b"a", ROOT)
    assert attrs.size == 8


async def test_negative_lookups(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    fake = FakeNfs()
    store = await open_store(fake, nursery)
    for _ in range(3):
        with pytest.raises(NfsError):
            await store.lookup(store.root, b"later", ROOT)
    assert fake.calls() == {"LOOKUP": 1}
    assert 0 < store.negative_ttl(store.root, b"later") <= 5
    fake.server_create("/later", b"")
    with pytest.raises(NfsError):
        await store.lookup(store.root, b"later", ROOT)   # still within the negative lease
    await trio.sleep(5.1)
    await store.lookup(store.root, b"later", ROOT)      # found after it
    # A local create forgets the negative entry at once.
    with pytest.raises(NfsError):
        await store.lookup(store.root, b"mine", ROOT)
    await store.create(store.root, b"mine", 0o644, ROOT, exclusive=False)
    await store.lookup(store.root, b"mine", ROOT)


async def test_listing_silence_is_trusted_only_for_the_negative_lease(
        autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    fake = FakeNfs()
    fake.server_create("/d", is_dir=True)
    store = await open_store(fake, nursery, "prefetch_depth=0")
    d, _ = await store.lookup(store.root, b"d", ROOT)
    await list_all(store, d)
    with pytest.raises(NfsError):
        await store.lookup(d, b"x", ROOT)
    fake.server_create("/d/x")
    await trio.sleep(5.1)                               # dir lease (30 s) still holds
    node, _ = await store.lookup(d, b"x", ROOT)         # one GETATTR saw the change
    assert node.name == b"x"


async def test_own_changes_patch_the_listing(autojump_clock: trio.abc.Clock,
                                             nursery: trio.Nursery) -> None:
    fake = FakeNfs()
    store = await open_store(fake, nursery, "prefetch_depth=0")
    await list_all(store, store.root)
    await store.create(store.root, b"a", 0o644, ROOT, exclusive=True)
    await store.mkdir(store.root, b"sub", 0o755, ROOT)
    await store.remove(store.root, b"a", ROOT)
    fake.stats.reset()
    assert await list_all(store, store.root) == [b"sub"]
    with pytest.raises(NfsError):
        await store.lookup(store.root, b"a", ROOT)
    assert fake.calls() == {}


async def test_prefetch_lists_subdirectories_ahead(autojump_clock: trio.abc.Clock,
                                                   nursery: trio.Nursery) -> None:
    fake = FakeNfs(latency=0.05)
    for i in range(5):
        fake.server_create(f"/d{i}", is_dir=True)
        for j in range(3):
            fake.server_create(f"/d{i}/s{j}", is_dir=True)
            fake.server_create(f"/d{i}/s{j}/file")
    store = await open_store(fake, nursery, "prefetch_depth=2")
    await list_all(store, store.root)
    await trio.sleep(1)   # background prefetch
    assert fake.calls()["READDIRPLUS"] == 1 + 5 + 15
    fake.stats.reset()
    for i in range(5):
        d, _ = await store.lookup(store.root, f"d{i}".encode(), ROOT)
        await list_all(store, d)
        for j in range(3):
            s, _ = await store.lookup(d, f"s{j}".encode(), ROOT)
            assert await list_all(store, s) == [b"file"]
    assert fake.calls() == {}


async def test_cache_off_asks_the_server_every_time(nursery: trio.Nursery) -> None:
    fake = FakeNfs()
    fake.server_create("/f")
    store = await open_store(fake, nursery, "cache=off")
    for _ in range(3):
        node, _ = await store.lookup(store.root, b"f", ROOT)
        await store.getattr(node, ROOT)
    assert fake.calls() == {"LOOKUP": 3, "GETATTR": 3}
    assert store.attr_ttl(node) == 0 and store.entry_ttl(store.root, b"f") == 0


async def test_attribute_cache_is_bounded(nursery: trio.Nursery) -> None:
    fake = FakeNfs()
    for i in range(300):
        fake.server_create(f"/f{i}")
    store = await open_store(fake, nursery, "attr_entries=100", "prefetch_depth=0")
    for i in range(300):
        await store.lookup(store.root, f"f{i}".encode(), ROOT)
    assert len(store.attrs) <= 100


# -- compact per-inode state (issue 14): the same answers as before -------------------

def test_lru_drops_the_least_recently_used_first() -> None:
    lru: Lru[str, int] = Lru(3)
    for k in "abc":
        lru[k] = ord(k)
    assert lru.get("a") == ord("a")          # a used: b is the oldest now
    lru["d"] = 4
    assert "b" not in lru and len(lru) == 3
    lru["c"] = 5                              # setting counts as use too
    lru["e"] = 6
    assert [k for k, _ in lru.items()] == ["d", "c", "e"]
    assert lru.get("zz", -1) == -1 and lru.pop("d") == 4 and lru.pop("d") is None


async def test_attribute_entries_come_back_as_they_went_in(
        autojump_clock: trio.abc.Clock) -> None:
    """Entries are stored packed; what no fattr3 can carry is kept as it is."""
    cache = AttrCache(make_config())
    t = NfsTime(1_760_000_000, 999_999_999)
    plain = Fattr3(Ftype3.CHR, 0o4755, 3, 2**32 - 1, 0, 2**64 - 1, 2**63, (7, 9),
                   2**64 - 1, 2**64 - 2, NfsTime(0, 0), t, NfsTime(2**32 - 1, 1))
    odd = replace(plain, fileid=2**64, mtime=NfsTime(-5, 0))     # made here, not by XDR
    cache.update(b"plain", plain, None, 10.0)
    cache.update(b"odd", odd, None, 10.0)
    for fh, attrs in ((b"plain", plain), (b"odd", odd)):
        entry = cache.peek(fh)
        assert entry is not None and entry.attrs == attrs and entry.fetched == 10.0
        assert type(entry.attrs.type) is Ftype3 and entry.attrs.type is Ftype3.CHR
    cache.barrier(b"plain", 20.0, nlink=-1)       # kept, but asked again first
    entry = cache.peek(b"plain")
    assert entry is not None and entry.before_our_change and entry.attrs.nlink == 2
    assert not cache.holds(b"plain") and cache.valid(b"plain") is None
    assert cache.items()[0][0] == b"odd"


def test_nodes_the_kernel_holds_stay_one_per_handle() -> None:
    """A node with an inode is kept without a weak reference; let go, it lives on
    while something refers to it, and is still the one node of its handle."""
    attrs = Fattr3(Ftype3.REG, 0o644, 1, 0, 0, 0, 0, (0, 0), 1, 50, *[NfsTime(1, 0)] * 3)
    root = Node(b"root", 2, 1, Ftype3.DIR)
    nodes = NodeTable(None, root, 100)  # type: ignore[arg-type]
    inodes = InodeTable(root, nodes)
    node = nodes.node_for(b"fh50", attrs, root, b"f")
    ino = inodes.remember(node)
    ref = weakref.ref(node)
    del node
    gc.collect()
    assert nodes.get(b"fh50") is ref() is inodes.node(ino)       # held by its inode
    node = inodes.node(ino)
    inodes.opened(node)
    inodes.forget(ino, 1)
    assert nodes.get(b"fh50") is node and ino in inodes          # an open file holds it
    inodes.closed(node)
    assert ino not in inodes and node.ino == 0
    assert nodes.get(b"fh50") is node and nodes.node_for(b"fh50", attrs) is node
    nodes.rebind(node, b"fh50-new", attrs)
    assert nodes.get(b"fh50") is None and nodes.get(b"fh50-new") is node
    assert inodes.remember(node) == ino and nodes.get(b"fh50-new") is node
    inodes.forget(ino, 1)
    del node
    gc.collect()
    assert ref() is None and nodes.get(b"fh50-new") is None and len(nodes) == 1
