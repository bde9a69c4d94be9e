"""Write-back against the fake server, driven by random namespace and data changes:
what users see here, and what reaches the server once flushed, must be the same
tree, and nothing may be taken for a conflict or refused (there is no other client).
The flusher runs as fast as it can, so changes race with their own flushes.

As the model checker's, the default run is derandomized (the same examples every
time, so a failure is a regression that reproduces); WANCACHE_MODEL_RANDOM=1
explores new ones, WANCACHE_MODEL_EXAMPLES=N runs more.  Exploring still finds rare
failures after crashes (README, Testing)."""

from __future__ import annotations

import errno
import os
import random
import stat
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.fakes import FakeNfs, Fault
from tests.test_34_writeback import stack, stats, sync, wb
from wancache.cache.node import Node
from wancache.cache.store import Store
from wancache.cache.types import AttrChange
from wancache.creds import Cred
from wancache.nfs_backend.errors import ServerUnreachableError, TransportError

ROOT = Cred.root()
DIRS = ("", "a", "b", "a/x")
NAMES = ("n0", "n1", "n2", "n3")
KINDS = ("file", "mkdir", "mknod", "symlink", "link", "rename", "unlink", "rmdir", "write",
         "chown", "truncate", "flush")


async def resolve(store: Store, path: str) -> Node | None:
    node = store.root
    for part in [p for p in path.split("/") if p]:
        try:
            node, _ = await store.lookup(node, part.encode(), ROOT)
        except Exception:
            return None
    return node


async def local_tree(store: Store, node: Node, path: str = "") -> dict[str, Any]:
    """The tree as users here see it: {name: bytes | '-> target' | 'dev' | {...}}."""
    out: dict[str, Any] = {}
    for rec in await store.merged_records(node, ROOT):
        if rec.name in (b".", b".."):
            continue
        child, attrs = await store.lookup(node, rec.name, ROOT)
        name = rec.name.decode()
        if attrs.is_dir:
            out[name] = await local_tree(store, child, f"{path}/{name}")
        elif stat.S_ISLNK(attrs.mode):
            out[name] = b"-> " + await store.readlink(child, ROOT)
        elif stat.S_ISREG(attrs.mode):
            out[name] = await store.read(child, 0, 1 << 20, ROOT)
        else:
            out[name] = b""
    return out


def server_tree(fake: FakeNfs) -> dict[str, Any]:
    tree = fake.tree()

    def norm(t: dict[str, Any]) -> dict[str, Any]:
        return {k: norm(v) if isinstance(v, dict) else v for k, v in t.items()}
    return norm(tree)


def new_fake() -> FakeNfs:
    """The fake server the random runs start from: directories a, b and a/x."""
    fake = FakeNfs(latency=0.0005)
    for d in ("a", "b", "a/x"):
        fake.server_create(d, is_dir=True)
    return fake


async def apply(store: Store, rnd: random.Random, kind: str, *,
                link_fails: bool = False) -> None:
    """One random change (`link_fails`: a call it needs may fail on the link)."""
    d = await resolve(store, rnd.choice(DIRS))
    if d is None:
        return
    name = rnd.choice(NAMES).encode()
    try:
        if kind == "file":
            f, attrs = await store.create(d, name, 0o644, ROOT, exclusive=False)
            if stat.S_ISREG(attrs.mode):
                await store.write(f, 0, rnd.randbytes(rnd.randrange(1, 64)), ROOT)
        elif kind == "mkdir":
            await store.mkdir(d, name, 0o755, ROOT)
        elif kind == "mknod":
            await store.mknod(d, name, stat.S_IFIFO | 0o644, 0, ROOT)
        elif kind == "symlink":
            await store.symlink(d, name, b"t" * rnd.randrange(1, 3000), ROOT)
        elif kind in ("link", "rename"):
            src, _ = await store.lookup(d, name, ROOT)
            d2 = await resolve(store, rnd.choice(DIRS))
            if d2 is None:
                return
            name2 = rnd.choice(NAMES).encode()
            if kind == "link":
                if not src.is_dir:
                    await store.link(src, d2, name2, ROOT)
            else:
                await store.rename(d, name, d2, name2, ROOT)
        elif kind == "unlink":
            await store.remove(d, name, ROOT)
        elif kind == "rmdir":
            await store.rmdir(d, name, ROOT)
        elif kind in ("write", "truncate", "chown"):
            f, attrs = await store.lookup(d, name, ROOT)
            if kind == "chown":
                await store.setattr(f, AttrChange(uid=rnd.randrange(1, 5000)), ROOT)
            elif stat.S_ISREG(attrs.mode) and kind == "write":
                await store.write(f, rnd.randrange(0, 100), rnd.randbytes(20), ROOT)
            elif stat.S_ISREG(attrs.mode):
                await store.setattr(f, AttrChange(size=rnd.randrange(0, 100)), ROOT)
        elif kind == "flush":
            await sync(store)
    except TransportError:
        assert link_fails
    except OSError as exc:
        assert exc.errno in (errno.ENOENT, errno.EEXIST, errno.ENOTDIR, errno.EISDIR,
                             errno.ENOTEMPTY, errno.EINVAL), exc
    except Exception as exc:   # NfsError NOENT/NOTEMPTY from the store's checks
        assert getattr(exc, "errno", None) in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST,
                                               errno.ENOTDIR, errno.EISDIR), exc


@settings(max_examples=int(os.environ.get("WANCACHE_MODEL_EXAMPLES", "60")), deadline=None,
          derandomize=not os.environ.get("WANCACHE_MODEL_RANDOM"),
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), count=st.integers(5, 300))
def test_random_changes_reach_the_server_as_seen_here(
        tmp_path_factory: pytest.TempPathFactory, seed: int, count: int) -> None:
    async def run() -> None:
        tmp: Path = tmp_path_factory.mktemp("wbm")
        fake = new_fake()
        rnd = random.Random(seed)
        async with stack(tmp, fake, "writeback_delay=0") as store:
            for _ in range(count):
                await apply(store, rnd, rnd.choice(KINDS))
            await sync(store)
            seen = await local_tree(store, store.root)
            assert server_tree(fake) == seen
            assert stats(store).conflicts == 0 and stats(store).lost == 0
            assert wb(store).pending_ops == 0

    trio.run(run)


@settings(max_examples=int(os.environ.get("WANCACHE_MODEL_EXAMPLES", "30")), deadline=None,
          derandomize=not os.environ.get("WANCACHE_MODEL_RANDOM"),
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), count=st.integers(5, 120))
def test_concurrent_changes_reach_the_server_as_seen_here(
        tmp_path_factory: pytest.TempPathFactory, seed: int, count: int) -> None:
    """Four tasks at once, as four processes on a mount: a change's checks (is the
    name free, is the directory empty) must still hold when it is applied.  (Without
    the store's directory locks, a create checked before a rename into its name was
    applied after it: a conflict copy of our own file.)"""
    async def worker(store: Store, rnd: random.Random) -> None:
        for _ in range(count):
            await apply(store, rnd, rnd.choice(KINDS[:-1]))

    async def run() -> None:
        tmp: Path = tmp_path_factory.mktemp("wbc")
        fake = new_fake()
        async with stack(tmp, fake, "writeback_delay=0") as store:
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(worker, store, random.Random(seed + i))
            await sync(store)
            seen = await local_tree(store, store.root)
            assert server_tree(fake) == seen
            assert stats(store).conflicts == 0 and stats(store).lost == 0

    trio.run(run)


FAULTY = ("CREATE", "MKDIR", "MKNOD", "SYMLINK", "LINK", "RENAME", "REMOVE", "RMDIR",
          "WRITE", "COMMIT", "SETATTR", "LOOKUP")


def inject_fault(fake: FakeNfs, rnd: random.Random) -> None:
    """A call of some kind soon fails as a WAN does: refused before it left (the link
    is down), or its reply lost after the server acted (a timeout after sending)."""
    proc = rnd.choice(FAULTY)
    how = rnd.choice(("refuse", "lost", "lost"))
    fault = Fault.refuse(ServerUnreachableError("fake: link down")) if how == "refuse" \
        else Fault.lose_reply()
    fake.inject(proc, fault, times=rnd.randrange(1, 4))


async def faulty_step(store: Store, fake: FakeNfs, rnd: random.Random) -> None:
    """Now and then a fault or the server going away (or back), then a random change."""
    roll = rnd.random()
    if roll < 0.15:
        inject_fault(fake, rnd)
    elif roll < 0.18:
        fake.down = not fake.down
    await apply(store, rnd, rnd.choice(KINDS[:-1]), link_fails=True)


@settings(max_examples=int(os.environ.get("WANCACHE_MODEL_EXAMPLES", "12")), deadline=None,
          derandomize=not os.environ.get("WANCACHE_MODEL_RANDOM"),
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), count=st.integers(5, 300))
def test_random_changes_reach_the_server_through_a_failing_link(
        tmp_path_factory: pytest.TempPathFactory, allow_log_warnings: None, seed: int,
        count: int) -> None:
    """As above, while calls fail before they leave or lose their replies after the
    server acted, and the server goes away for a while: every retry must find what
    the failed attempt did, and no call may name a file the server does not have yet
    (the soak saw a WRITE sent with a new file's placeholder handle: BADHANDLE)."""
    async def run() -> None:
        tmp: Path = tmp_path_factory.mktemp("wbf")
        fake = new_fake()
        rnd = random.Random(seed)
        async with stack(tmp, fake, "writeback_delay=0") as store:
            for _ in range(count):
                await faulty_step(store, fake, rnd)
                await trio.sleep(rnd.choice((0, 0, 0.001, 0.01)))   # let the flusher run
            fake.clear_faults()
            fake.down = False
            await sync(store)
            seen = await local_tree(store, store.root)
            assert fake.placeholder_calls == []
            assert server_tree(fake) == seen
            assert stats(store).conflicts == 0 and stats(store).lost == 0

    trio.run(run)


@settings(max_examples=int(os.environ.get("WANCACHE_MODEL_EXAMPLES", "12")), deadline=None,
          derandomize=not os.environ.get("WANCACHE_MODEL_RANDOM"),
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), count=st.integers(5, 200), crashes=st.integers(1, 3))
# Found by it: a replayed create's touch moved the version its file's later replayed
# WRITEs expect (a conflict copy of our own file), and a replayed rename of what had a
# name before hid the directory created under that name after it.
@example(seed=13, count=26, crashes=3)
@example(seed=177, count=24, crashes=2)
# ... and a replayed LINK whose name a later replayed rename had taken (EXIST: lost)
@example(seed=487, count=19, crashes=3)
def test_random_changes_survive_crashes_on_a_failing_link(
        tmp_path_factory: pytest.TempPathFactory, allow_log_warnings: None, seed: int,
        count: int, crashes: int) -> None:
    """As above, and the daemon dies (nothing flushed or completed beyond what the
    flusher had done) at random points: after each restart users see what they saw
    before it, and once flushed the server has it."""
    async def run() -> None:
        tmp: Path = tmp_path_factory.mktemp("wbk")
        fake = new_fake()
        rnd = random.Random(seed)
        seen: dict[str, Any] | None = None
        for life in range(crashes + 1):
            last = life == crashes
            async with stack(tmp, fake, "writeback_delay=0", crash=not last) as store:
                if seen is not None:
                    fake.down = False
                    assert await local_tree(store, store.root) == seen
                for _ in range(count):
                    await faulty_step(store, fake, rnd)
                    await trio.sleep(rnd.choice((0, 0, 0.001, 0.01)))
                fake.clear_faults()
                fake.down = False
                seen = await local_tree(store, store.root)
                if last:
                    await sync(store)
                    assert fake.placeholder_calls == []
                    assert server_tree(fake) == seen
                    assert stats(store).conflicts == 0 and stats(store).lost == 0

    trio.run(run)
