"""The fake NFS backend of the cache tests (tests/fakes.py): it answers like the real
client against ganesha, and misbehaves on demand like the real thing."""

from __future__ import annotations

import errno
from typing import Any

import pytest
import trio

from tests.conftest import Export
from tests.fakes import FakeNfs, Fault
from wancache.nfs_backend.client import ClientOptions, open_client
from wancache.nfs_backend.errors import (
    NfsError,
    RpcTimeoutError,
    ServerUnreachableError,
    TransportError,
    UnknownOutcomeError,
)
from wancache.nfs_backend.nfs3 import CreateMode, Nfsstat3, Sattr3, StableHow
from wancache.nfs_backend.transport import Cred

ROOT = Cred.root()
S = Nfsstat3


def status(exc: BaseException) -> str:
    return exc.name if isinstance(exc, NfsError) else type(exc).__name__


async def make_file(fake: FakeNfs, name: bytes, data: bytes) -> bytes:
    res = await fake.create(fake.root_fh, name, ROOT, mode=CreateMode.GUARDED)
    assert res.object is not None
    await fake.write(res.object, 0, data, ROOT)
    return res.object


# -- the fake answers like the real server -------------------------------------------

async def scenario(c: Any) -> list[object]:
    """The same calls against the fake and against ganesha: what each step gave."""
    out: list[object] = []

    async def step(coro: Any) -> Any:
        try:
            res = await coro
        except NfsError as exc:
            out.append(exc.name)
            return None
        out.append("ok")
        return res

    root = c.root_fh
    a = (await step(c.create(root, b"a", ROOT, mode=CreateMode.GUARDED))).object
    await step(c.create(root, b"a", ROOT, mode=CreateMode.GUARDED))
    await step(c.write(a, 0, b"hello", ROOT, stable=StableHow.FILE_SYNC))
    read = await step(c.read(a, 0, 100, ROOT))
    out.append((read.data, read.count, read.eof))
    read = await step(c.read(a, 2, 2, ROOT))
    out.append((read.data, read.count, read.eof))
    await step(c.lookup(root, b"missing", ROOT))
    d = (await step(c.mkdir(root, b"d", Sattr3(mode=0o755), ROOT))).object
    await step(c.mkdir(root, b"d", Sattr3(mode=0o755), ROOT))
    await step(c.rename(root, b"a", d, b"b", ROOT))
    await step(c.rename(root, b"a", d, b"b", ROOT))
    await step(c.rmdir(root, b"d", ROOT))
    attrs = await c.getattr(a, ROOT)
    await step(c.setattr(a, Sattr3(mode=0o600), ROOT, guard=attrs.ctime))
    await step(c.setattr(a, Sattr3(mode=0o644), ROOT, guard=attrs.ctime))
    out.append((await c.getattr(a, ROOT)).mode & 0o777)
    await step(c.remove(d, b"b", ROOT))
    await step(c.remove(d, b"b", ROOT))
    await step(c.getattr(a, ROOT))
    await step(c.rmdir(root, b"d", ROOT))
    return out


async def test_fake_answers_like_ganesha(export: Export) -> None:
    opts = ClientOptions(nfs_port=export.server.nfs_port, mount_port=export.server.mount_port)
    async with trio.open_nursery() as nursery:
        real = await open_client(nursery, "127.0.0.1", export.export_path, opts)
        try:
            expected = await scenario(real)
        finally:
            real.close()
    assert await scenario(FakeNfs()) == expected
    assert expected[1] == "NFS3ERR_EXIST" and expected[-2] == "NFS3ERR_STALE"


# -- faults ----------------------------------------------------------------------------

async def test_short_read() -> None:
    fake = FakeNfs()
    f = await make_file(fake, b"f", b"0123456789")
    fake.inject("READ", Fault.short_read(4))
    res = await fake.read(f, 0, 10, ROOT)
    assert (res.data, res.count, res.eof) == (b"0123", 4, False)
    res = await fake.read(f, 4, 10, ROOT)                 # the fault was for one call
    assert (res.data, res.count, res.eof) == (b"456789", 6, True)
    fake.inject("READ", Fault.short_read(4))
    res = await fake.read(f, 8, 10, ROOT)                 # short, but that is the end
    assert (res.data, res.eof) == (b"89", True)


async def test_lost_reply_after_the_server_acted() -> None:
    fake = FakeNfs()
    seen: list[bytes] = []
    fake.attr_sinks.append(lambda fh, attrs, before, when: seen.append(fh))
    fake.inject("CREATE", Fault.lose_reply())
    with pytest.raises(UnknownOutcomeError):
        await fake.create(fake.root_fh, b"maybe", ROOT, mode=CreateMode.GUARDED)
    assert "maybe" in fake.tree() and fake.applied["CREATE"] == 1
    assert seen == []                                  # no reply: no attributes either
    with pytest.raises(NfsError) as info:              # a blind retry sees its own file
        await fake.create(fake.root_fh, b"maybe", ROOT, mode=CreateMode.GUARDED)
    assert info.value.status == S.NFS3ERR_EXIST

    f = fake.path("/maybe").fh
    fake.inject("WRITE", Fault.lose_reply())           # idempotent: a plain timeout
    with pytest.raises(RpcTimeoutError):
        await fake.write(f, 0, b"landed", ROOT)
    assert fake.tree()["maybe"] == b"landed"

    fake.inject("REMOVE", Fault.timeout_after_send(ServerUnreachableError("gone")))
    with pytest.raises(ServerUnreachableError):
        await fake.remove(fake.root_fh, b"maybe", ROOT)
    assert fake.tree() == {}


async def test_exclusive_create_counts_as_idempotent() -> None:
    fake = FakeNfs()
    fake.inject("CREATE", Fault.lose_reply())
    with pytest.raises(RpcTimeoutError):
        await fake.create(fake.root_fh, b"x", ROOT, mode=CreateMode.EXCLUSIVE, verf=b"v" * 8)
    assert "x" in fake.tree()


async def test_resent_call_runs_twice() -> None:
    """A retransmitted guarded SETATTR fails NOT_SYNC although it was applied, as on a
    real server whose duplicate request cache missed it."""
    fake = FakeNfs()
    f = await make_file(fake, b"f", b"data")
    ctime = (await fake.getattr(f, ROOT)).ctime
    fake.inject("SETATTR", Fault.resend())
    with pytest.raises(NfsError) as info:
        await fake.setattr(f, Sattr3(mode=0o600), ROOT, guard=ctime)
    assert info.value.status == S.NFS3ERR_NOT_SYNC
    assert fake.path("/f").attrs.mode == 0o600 and fake.applied["SETATTR"] == 2


async def test_jukebox_then_success() -> None:
    fake = FakeNfs()
    f = await make_file(fake, b"f", b"")
    fake.inject("WRITE", Fault.jukebox(), times=2)
    for _ in range(2):
        with pytest.raises(NfsError) as info:
            await fake.write(f, 0, b"late", ROOT)
        assert info.value.status == S.NFS3ERR_JUKEBOX and info.value.errno == errno.EAGAIN
        assert fake.tree()["f"] == b""
    await fake.write(f, 0, b"late", ROOT)
    assert fake.tree()["f"] == b"late"
    assert fake.calls()["WRITE"] == 4 and fake.applied["WRITE"] == 2


async def test_faults_queue_in_order_and_always() -> None:
    fake = FakeNfs()
    f = await make_file(fake, b"f", b"abcdef")
    fake.inject("READ", Fault.short_read(1))
    fake.inject("READ", Fault.stale())
    assert (await fake.read(f, 0, 6, ROOT)).data == b"a"
    with pytest.raises(NfsError, match="STALE"):
        await fake.read(f, 0, 6, ROOT)
    fake.inject("READ", Fault.short_read(2), times=None)
    assert [(await fake.read(f, i, 6, ROOT)).data for i in (0, 2, 4)] == [b"ab", b"cd", b"ef"]
    fake.clear_faults()
    assert (await fake.read(f, 0, 6, ROOT)).data == b"abcdef"


async def test_server_reboot_makes_handles_stale_but_names_still_work() -> None:
    fake = FakeNfs()
    d = fake.server_create("/d", is_dir=True)
    f = fake.server_create("/d/f", b"kept")
    old_d, old_f, fileid = d.fh, f.fh, f.attrs.fileid
    root = fake.root_fh
    fake.server_reboot_handles()
    assert fake.root_fh == root
    for fh in (old_d, old_f):
        with pytest.raises(NfsError) as info:
            await fake.getattr(fh, ROOT)
        assert info.value.status == S.NFS3ERR_STALE and info.value.errno == errno.ESTALE
    new_d = (await fake.lookup(root, b"d", ROOT)).object
    assert new_d is not None and new_d != old_d
    new_f = (await fake.lookup(new_d, b"f", ROOT)).object
    assert new_f is not None and new_f != old_f
    assert (await fake.getattr(new_f, ROOT)).fileid == fileid
    assert (await fake.read(new_f, 0, 10, ROOT)).data == b"kept"
    assert fake.tree() == {"d": {"f": b"kept"}}

    newer = fake.server_rehandle("/d/f")
    with pytest.raises(NfsError, match="STALE"):
        await fake.getattr(new_f, ROOT)
    assert (await fake.lookup(new_d, b"f", ROOT)).object == newer


async def test_another_client_between_apply_and_reply() -> None:
    fake = FakeNfs()
    f = await make_file(fake, b"doc", b"v1")

    async def theirs() -> None:
        await trio.lowlevel.checkpoint()
        fake.server_write("/doc", b"theirs")

    fake.inject("WRITE", Fault.between(theirs))
    res = await fake.write(f, 0, b"ours", ROOT)
    assert res.file_wcc.after is not None and res.file_wcc.after.size == 4   # our reply
    assert fake.tree()["doc"] == b"theirs"                                    # their bytes
    fake.inject("RENAME", Fault.between(lambda: fake.server_create("/new", b"x"), lost=True))
    with pytest.raises(UnknownOutcomeError):
        await fake.rename(fake.root_fh, b"doc", fake.root_fh, b"new", ROOT)
    assert fake.tree() == {"new": b"x"}                # their create replaced our rename


async def test_old_api_still_works() -> None:
    fake = FakeNfs()
    fake.fail["LOOKUP"] = NfsError(S.NFS3ERR_ACCES, "LOOKUP")
    with pytest.raises(NfsError, match="ACCES"):
        await fake.lookup(fake.root_fh, b"x", ROOT)
    assert fake.calls()["LOOKUP"] == 0                  # refused before it counted
    fake.down = True
    assert fake.offline and not fake.up
    with pytest.raises(TransportError):
        await fake.getattr(fake.root_fh, ROOT)

