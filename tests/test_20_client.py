"""The async NFSv3 client against a real nfs-ganesha (and through the WAN emulator)."""

from __future__ import annotations

import errno
import os
import random
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from bench.nfsserver import NfsServer
from bench.wanem import LinkProfile, WanEmulator
from tests.conftest import Export, run_tool
from wancache.nfs_backend import nfs3
from wancache.nfs_backend.client import (
    ClientOptions,
    NfsClient,
    list_exports,
    lookup_port,
    open_client,
)
from wancache.nfs_backend.errors import (
    MountError,
    NfsError,
    ProtocolError,
    RpcTimeoutError,
    ServerUnreachableError,
    UnknownOutcomeError,
)
from wancache.nfs_backend.nfs3 import CreateMode, Ftype3, Nfsstat3, Sattr3, StableHow
from wancache.nfs_backend.stats import RpcStats
from wancache.nfs_backend.transport import Cred, TransportOptions

ROOT = Cred.root()
ALICE = Cred(1001, 1001, (1001,))
BOB = Cred(1002, 1002, (1002, 2000))


@asynccontextmanager
async def connect(export: Export, *, port: int | None = None,
                  **topts: object) -> AsyncIterator[NfsClient]:
    """A client mounted on the test's export dir (optionally through another port)."""
    options = ClientOptions(nfs_port=port or export.server.nfs_port,
                            mount_port=export.server.mount_port,
                            transport=TransportOptions(**topts))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        client = await open_client(nursery, "127.0.0.1", export.export_path, options)
        try:
            yield client
        finally:
            client.close()


@asynccontextmanager
async def wan(server: NfsServer, profile: LinkProfile) -> AsyncIterator[WanEmulator]:
    emu = WanEmulator(("127.0.0.1", server.nfs_port), profile)
    async with trio.open_nursery() as nursery:
        await nursery.start(emu.run)
        try:
            yield emu
        finally:
            nursery.cancel_scope.cancel()


def fh_of(res: nfs3.DirOpRes | nfs3.LookupRes) -> bytes:
    """The handle a CREATE/MKDIR/LOOKUP reply carried (ganesha always sends one)."""
    assert res.object is not None
    return res.object


def expect(status: Nfsstat3, err: int) -> pytest.RaisesExc[NfsError]:
    return pytest.raises(NfsError, check=lambda e: e.status == status and e.errno == err)


async def test_mount_fsinfo_pathconf(export: Export) -> None:
    async with connect(export) as c:
        attrs = await c.getattr(c.root_fh, ROOT)
        assert attrs.type is Ftype3.DIR
        assert attrs.fileid == os.stat(export.path).st_ino
        assert 4096 <= c.info.rsize <= 1 << 20
        assert 4096 <= c.info.wsize <= 1 << 20
        assert c.info.name_max == 255 or c.info.name_max > 0
        fsstat = await c.fsstat(ROOT)
        vfs = os.statvfs(export.path)
        assert fsstat.tbytes == vfs.f_blocks * vfs.f_frsize
        assert c.stats.calls()["FSINFO"] == 1


async def test_every_procedure(export: Export) -> None:
    async with connect(export) as c:
        root = c.root_fh
        await c.null()
        # CREATE (all three modes), WRITE (all stabilities), COMMIT, READ
        f = (await c.create(root, b"file", ROOT, attrs=Sattr3(mode=0o640))).object
        assert f is not None
        for i, how in enumerate(StableHow):
            res = await c.write(f, i * 4, b"abcd", ROOT, stable=how)
            assert res.count == 4 and res.committed >= how and len(res.verf) == 8
        commit = await c.commit(f, ROOT)
        assert len(commit.verf) == 8
        read = await c.read(f, 0, 100, ROOT)
        assert (read.data, read.eof) == (b"abcd" * 3, True)
        g = await c.create(root, b"guarded", ROOT, mode=CreateMode.GUARDED,
                           attrs=Sattr3(mode=0o600))
        with expect(Nfsstat3.NFS3ERR_EXIST, errno.EEXIST):
            await c.create(root, b"guarded", ROOT, mode=CreateMode.GUARDED)
        verf = os.urandom(8)
        x1 = await c.create(root, b"excl", ROOT, mode=CreateMode.EXCLUSIVE, verf=verf)
        x2 = await c.create(root, b"excl", ROOT, mode=CreateMode.EXCLUSIVE, verf=verf)
        assert x1.object == x2.object  # a retransmitted EXCLUSIVE create is harmless
        assert g.object is not None
        # SETATTR with and without guard
        attrs = await c.getattr(f, ROOT)
        await c.setattr(f, Sattr3(mode=0o600, size=2), ROOT, guard=attrs.ctime)
        with expect(Nfsstat3.NFS3ERR_NOT_SYNC, errno.EIO):
            await c.setattr(f, Sattr3(mode=0o644), ROOT, guard=attrs.ctime)
        now = await c.getattr(f, ROOT)
        assert (now.mode & 0o7777, now.size) == (0o600, 2)
        # LOOKUP, ACCESS
        look = await c.lookup(root, b"file", ROOT)
        assert look.object == f and look.obj_attributes is not None
        assert await c.access(f, nfs3.ACCESS3_READ | nfs3.ACCESS3_MODIFY, ROOT) != 0
        # MKDIR, SYMLINK + READLINK, MKNOD (fifo), LINK
        d = (await c.mkdir(root, b"dir", Sattr3(mode=0o755), ROOT)).object
        assert d is not None
        s = (await c.symlink(d, b"sym", b"../file", Sattr3(), ROOT)).object
        assert s is not None and await c.readlink(s, ROOT) == b"../file"
        await c.mknod(d, b"fifo", Ftype3.FIFO, Sattr3(mode=0o644), ROOT)
        await c.link(f, d, b"hard", ROOT)
        assert (await c.getattr(f, ROOT)).nlink == 2
        # READDIR and READDIRPLUS
        rd = await c.readdir(d, 0, bytes(8), ROOT)
        names = {e.name for e in rd.entries} - {b".", b".."}
        assert names == {b"sym", b"fifo", b"hard"}
        rdp = await c.readdirplus(d, 0, bytes(8), ROOT)
        plus = {e.name: e for e in rdp.entries}
        assert plus[b"hard"].name_handle == f
        assert plus[b"fifo"].name_attributes is not None
        assert plus[b"fifo"].name_attributes.type is Ftype3.FIFO
        # RENAME, REMOVE, RMDIR (and their error paths)
        await c.rename(d, b"hard", root, b"hard2", ROOT)
        with expect(Nfsstat3.NFS3ERR_NOTEMPTY, errno.ENOTEMPTY):
            await c.rmdir(root, b"dir", ROOT)
        for name in (b"sym", b"fifo"):
            await c.remove(d, name, ROOT)
        await c.rmdir(root, b"dir", ROOT)
        with expect(Nfsstat3.NFS3ERR_NOENT, errno.ENOENT):
            await c.lookup(root, b"dir", ROOT)
        with expect(Nfsstat3.NFS3ERR_EXIST, errno.EEXIST):
            await c.mkdir(root, b"file", Sattr3(), ROOT)
        pc = await c.pathconf(ROOT, f)
        assert pc.name_max > 0
        await c.fsinfo(ROOT)
        await c.fsstat(ROOT)
        expected = {p.name for p in nfs3.Proc}
        assert expected <= set(c.stats.calls())

    # Cross-check with an independent NFS client.
    assert export.nfs_ls() == ["excl", "file", "guarded", "hard2"]
    assert export.nfs_cat("hard2") == b"ab"


async def test_credentials_are_the_callers(export: Export) -> None:
    async with connect(export) as c:
        res = await c.create(c.root_fh, b"alice-file", ALICE, attrs=Sattr3(mode=0o600))
        st = (export.path / "alice-file").stat()
        assert (st.st_uid, st.st_gid) == (1001, 1001)
        assert stat.S_IMODE(st.st_mode) == 0o600
        await c.write(fh_of(res), 0, b"secret", ALICE, stable=StableHow.FILE_SYNC)
        with expect(Nfsstat3.NFS3ERR_ACCES, errno.EACCES):
            await c.read(fh_of(res), 0, 10, BOB)
        with expect(Nfsstat3.NFS3ERR_ACCES, errno.EACCES):
            await c.write(fh_of(res), 0, b"x", BOB)
        assert (await c.read(fh_of(res), 0, 10, ALICE)).data == b"secret"
        # Supplementary groups travel too: a 0770 directory of group 2000.
        d = fh_of(await c.mkdir(c.root_fh, b"team", Sattr3(mode=0o770, gid=2000), ROOT))
        await c.create(d, b"bob-was-here", BOB)
        with expect(Nfsstat3.NFS3ERR_ACCES, errno.EACCES):
            await c.create(d, b"alice-was-here", ALICE)


async def test_stale_handle_after_another_client_removes(export: Export) -> None:
    async with connect(export) as c, connect(export) as other:
        f = fh_of(await c.create(c.root_fh, b"doomed", ROOT))
        await other.remove(other.root_fh, b"doomed", ROOT)
        with pytest.raises(NfsError) as info:
            await c.getattr(f, ROOT)
        assert info.value.status == Nfsstat3.NFS3ERR_STALE
        assert info.value.errno == errno.ESTALE


async def test_attributes_of_every_reply_reach_the_sinks(export: Export) -> None:
    async with connect(export) as c:
        seen: list[tuple[bytes, int]] = []
        c.attr_sinks.append(lambda fh, attrs, before, when: seen.append((fh, attrs.fileid)))
        f = (await c.create(c.root_fh, b"a", ROOT)).object
        assert f is not None
        await c.write(f, 0, b"data", ROOT)
        await c.readdirplus(c.root_fh, 0, bytes(8), ROOT)
        fileid = (export.path / "a").stat().st_ino
        # CREATE (object + dir wcc), WRITE (wcc), READDIRPLUS (dir + every entry)
        assert sum(1 for fh, fid in seen if fh == f and fid == fileid) >= 3
        assert any(fh == c.root_fh for fh, _ in seen)


async def test_200_reads_in_flight_on_one_connection(export: Export, tmp_path: Path) -> None:
    blob = os.urandom(200 * 4096)
    (tmp_path / "blob").write_bytes(blob)
    export.nfs_cp_in(tmp_path / "blob", "blob")
    async with wan(export.server, LinkProfile(rtt_ms=50)) as emu, \
            connect(export, port=emu.port) as c:
        f = (await c.lookup(c.root_fh, b"blob", ROOT)).object
        assert f is not None
        emu.reset_counts()
        chunks: dict[int, bytes] = {}

        async def read(i: int) -> None:
            chunks[i] = (await c.read(f, i * 4096, 4096, ROOT)).data

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(read, i)
        elapsed = trio.current_time() - started
        assert b"".join(chunks[i] for i in range(200)) == blob
        assert emu.calls(prog=100003, proc=6) == 200
        assert emu.max_in_flight >= 150
        assert c.stats.max_in_flight >= 150
        # Latency is paid per batch: a few round trips, not 200 of them (10 s).
        assert elapsed < 10 * 0.050


async def test_dropped_connection_is_recovered(export: Export, tmp_path: Path) -> None:
    blob = os.urandom(64 * 65536)
    (tmp_path / "blob").write_bytes(blob)
    export.nfs_cp_in(tmp_path / "blob", "blob")
    async with wan(export.server, LinkProfile(rtt_ms=40, down_mbit=50)) as emu, \
            connect(export, port=emu.port) as c:
        f = (await c.lookup(c.root_fh, b"blob", ROOT)).object
        assert f is not None
        chunks: dict[int, bytes] = {}

        async def read(i: int) -> None:
            chunks[i] = (await c.read(f, i * 65536, 65536, ROOT)).data

        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(read, i)
            await trio.sleep(0.15)
            emu.drop_connections()
        assert b"".join(chunks[i] for i in range(64)) == blob
        assert c.stats.reconnects >= 1
        assert c.stats.proc("nfs3.READ").retransmits >= 1


async def test_lost_reply_of_non_idempotent_call_is_reported(export: Export) -> None:
    async with wan(export.server, LinkProfile()) as emu, \
            connect(export, port=emu.port, timeo=30) as c:
        await c.null()
        emu.blackhole(True)
        with pytest.RaisesGroup(pytest.RaisesExc(UnknownOutcomeError,
                                                 match="outcome is unknown")):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(c.mkdir, c.root_fh, b"maybe", Sattr3(), ROOT)
                await trio.sleep(0.3)
                emu.blackhole(False)
                emu.drop_connections()


async def test_soft_timeout_when_server_is_silent(export: Export,
                                                  allow_log_warnings: None) -> None:
    async with wan(export.server, LinkProfile()) as emu, \
            connect(export, port=emu.port, timeout=1.5, timeo=0.5) as c:
        await c.getattr(c.root_fh, ROOT)
        emu.blackhole(True)
        with pytest.raises((RpcTimeoutError, ServerUnreachableError)) as info:
            await c.getattr(c.root_fh, ROOT)
        assert info.value.errno == errno.EIO
        emu.blackhole(False)
        with trio.fail_after(10):
            while True:
                try:
                    await c.getattr(c.root_fh, ROOT)
                    break
                except (RpcTimeoutError, ServerUnreachableError):
                    await trio.sleep(0.2)


async def test_unreachable_server_is_a_clear_error(export: Export) -> None:
    emu = WanEmulator(("127.0.0.1", export.server.nfs_port))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(emu.run)
        emu.stop()
        opts = ClientOptions(nfs_port=port, mount_port=export.server.mount_port,
                             transport=TransportOptions(timeout=1.0, connect_timeout=0.5))
        with pytest.raises(ServerUnreachableError, match="unreachable"):
            await open_client(nursery, "127.0.0.1", export.export_path, opts)
        nursery.cancel_scope.cancel()


async def test_missing_export_is_a_mount_error(export: Export) -> None:
    opts = ClientOptions(nfs_port=export.server.nfs_port, mount_port=export.server.mount_port)
    async with trio.open_nursery() as nursery:
        with pytest.raises(MountError) as info:
            await open_client(nursery, "127.0.0.1", "/no/such/export", opts)
        assert info.value.errno in (errno.ENOENT, errno.EACCES)


async def test_discovery_through_rpcbind(private_nfs_server: NfsServer) -> None:
    srv = private_nfs_server  # started last, so its registration is the one rpcbind has
    assert await lookup_port("127.0.0.1", 100003, 3) == srv.nfs_port
    assert await lookup_port("127.0.0.1", 100005, 3) == srv.mount_port
    exports = await list_exports("127.0.0.1")
    assert srv.export_path.encode() in {e.dir for e in exports}
    async with trio.open_nursery() as nursery:
        c = await open_client(nursery, "127.0.0.1", srv.export_path)
        assert c.info.nfs_port == srv.nfs_port
        await c.getattr(c.root_fh, ROOT)
        c.close()


async def test_reserved_source_port(export: Export) -> None:
    async with connect(export, resvport=True) as c:
        await c.null()
        conn = c.transport._conns[0]
        assert conn.stream.socket.getsockname()[1] < 1024


async def test_nconnect_spreads_calls(export: Export) -> None:
    async with connect(export, nconnect=3) as c:
        with trio.fail_after(5):
            while len(c.transport._conns) < 3:
                await trio.sleep(0.01)
        ports = {conn.stream.socket.getsockname()[1] for conn in c.transport._conns}
        assert len(ports) == 3
        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(c.getattr, c.root_fh, ROOT)
        assert c.stats.calls()["GETATTR"] == 30


async def test_counters(export: Export) -> None:
    stats = RpcStats()
    opts = ClientOptions(nfs_port=export.server.nfs_port, mount_port=export.server.mount_port)
    async with trio.open_nursery() as nursery:
        c = await open_client(nursery, "127.0.0.1", export.export_path,
                              replace(opts), stats=stats)
        f = fh_of(await c.create(c.root_fh, b"x", ROOT))
        await c.write(f, 0, b"y" * 100_000, ROOT)
        read = stats.proc("nfs3.WRITE")
        assert read.calls == 1 and read.bytes_sent > 100_000 and read.seconds > 0
        assert sum(read.buckets) == 1
        assert stats.proc("mount3.MNT").calls == 1
        assert stats.in_flight == 0
        c.close()
    assert run_tool(["nfs-cat", export.url("x")]).stdout == b"y" * 100_000


NFS_PROG = 100003


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Until `cond()` holds (checked every 10 ms), at most `timeout` seconds."""
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


async def test_fail_fast_while_disconnected(export: Export) -> None:
    """Issue 14.4: with the link down and the client known disconnected, a call fails
    at once without being sent, not after `timeout`; after the link returns, calls go
    through at once (the waiting call asks for a reconnect rather than the backoff)."""
    async with wan(export.server, LinkProfile(rtt_ms=20)) as emu, \
            connect(export, port=emu.port, timeout=30.0) as c:
        f = fh_of(await c.create(c.root_fh, b"f", ROOT))
        assert c.up and not c.offline
        emu.stop()                                   # the link goes down
        await wait_for(lambda: c.offline)            # a reconnect attempt failed
        assert not c.up
        before = c.stats.snapshot()
        emu.reset_counts()
        with trio.fail_after(3):                     # timeout is 30 s
            with pytest.raises(ServerUnreachableError, match="call not sent") as info:
                await c.read(f, 0, 4096, ROOT)
        assert info.value.errno == errno.EIO
        assert c.stats.snapshot() == before and emu.calls() == 0
        assert c.stats.failed_fast == 1
        emu.start()                                  # the link is back
        with trio.fail_after(3):
            res = await c.read(f, 0, 4096, ROOT)
        assert res.eof and res.data == b""
        assert c.up and not c.offline
        assert emu.calls(prog=NFS_PROG, proc=nfs3.Proc.READ) == 1


async def test_fail_fast_while_the_link_is_stalled(export: Export,
                                                  allow_log_warnings: None) -> None:
    """A stalled link (connection up, nothing comes back): the call in flight keeps its
    `timeout`; then the next ones fail at once, and a NULL probe notices the return."""
    async with wan(export.server, LinkProfile()) as emu, \
            connect(export, port=emu.port, timeout=2.0, timeo=0.5) as c:
        await c.getattr(c.root_fh, ROOT)
        emu.blackhole(True)
        started = trio.current_time()
        with pytest.raises(RpcTimeoutError):
            await c.getattr(c.root_fh, ROOT)
        assert trio.current_time() - started >= 2.0   # in flight: the whole timeout
        assert c.offline and not c.up
        sent = c.stats.calls()["GETATTR"]
        with trio.fail_after(1.9):
            with pytest.raises(ServerUnreachableError, match="call not sent"):
                await c.getattr(c.root_fh, ROOT)
        assert c.stats.calls()["GETATTR"] == sent
        emu.blackhole(False)
        await wait_for(lambda: not c.offline)         # the probe's NULL was answered
        with trio.fail_after(1.9):
            await c.getattr(c.root_fh, ROOT)
        assert c.up


async def test_hard_mount_blocks_until_the_server_answers(export: Export) -> None:
    async with wan(export.server, LinkProfile()) as emu, \
            connect(export, port=emu.port, timeout=None) as c:
        await c.getattr(c.root_fh, ROOT)
        emu.stop()
        await wait_for(lambda: c.offline)
        done = trio.Event()

        async def getattr_() -> None:
            await c.getattr(c.root_fh, ROOT)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(getattr_)
            await trio.sleep(2.0)          # longer than a soft call would have waited
            assert not done.is_set() and c.stats.failed_fast == 0
            emu.start()
            with trio.fail_after(5):
                await done.wait()


async def test_io_sizes_fit_the_replies_we_accept(export: Export,
                                                  allow_log_warnings: None) -> None:
    """rsize is capped below `max_record` (a READ of rsize used to come back too large,
    drop the connection and be retried until `timeout`); a READ asking for more fails
    at once, alone."""
    limit = 1 << 20
    async with connect(export, max_record=limit) as c:
        assert c.info.rsize <= limit - 64 * 1024
        f = fh_of(await c.create(c.root_fh, b"f", ROOT))
        await c.write(f, 0, b"x" * limit, ROOT, stable=StableHow.FILE_SYNC)
        res = await c.read(f, 0, c.info.rsize, ROOT)
        assert len(res.data) == c.info.rsize
        with trio.fail_after(5):
            with pytest.raises(ProtocolError, match="exceeds"):
                await c.read(f, 0, limit, ROOT)
        assert c.stats.reconnects == 0
        await c.readdirplus(c.root_fh, 0, bytes(8), ROOT, maxcount=4 * limit)


async def test_slow_uplink_is_not_taken_for_a_dead_connection(export: Export) -> None:
    """While the writer is still getting a big call out on a slow uplink, nothing
    comes back: that is not silence (the peer takes our bytes).  It used to be
    probed, found silent (the NULL waits behind the WRITE) and dropped, again and
    again, so the WRITE never got through."""
    async with wan(export.server, LinkProfile(up_mbit=2)) as emu, \
            connect(export, port=emu.port, timeo=0.5, timeout=20.0) as c:
        f = fh_of(await c.create(c.root_fh, b"f", ROOT))
        data = os.urandom(512 * 1024)               # ~2 s on the wire
        res = await c.write(f, 0, data, ROOT, stable=StableHow.FILE_SYNC)
        assert res.count == len(data)
        assert c.stats.reconnects == 0
        assert c.stats.proc("nfs3.WRITE").retransmits == 0


async def test_readdirplus_of_odd_entries(export: Export) -> None:
    """Issue 13.3 (`ls` failing with EINVAL after such a workload): symlinks with 2-4 KB
    targets, character devices with large numbers, hard links, files chowned to
    random ids, sparse files list in full, in one page or many, and read back."""
    rnd = random.Random(13)
    async with connect(export) as c:
        d = fh_of(await c.mkdir(c.root_fh, b"odd", Sattr3(mode=0o777), ROOT))
        targets: dict[bytes, bytes] = {}
        files: list[bytes] = []
        for i in range(60):
            name = b"e%02d" % i
            kind = i % 5
            if kind == 0:
                targets[name] = bytes(rnd.choice(b"ab/") for _ in range(rnd.randint(2048, 4095)))
                await c.symlink(d, name, targets[name], Sattr3(), ROOT)
            elif kind == 1:
                await c.mknod(d, name, Ftype3.CHR, Sattr3(mode=0o644), ROOT,
                              spec=(rnd.randint(0, 4095), rnd.randint(0, 2**20 - 1)))
            elif kind == 2:
                f = fh_of(await c.create(d, name, ROOT, attrs=Sattr3(mode=0o644)))
                await c.setattr(f, Sattr3(size=rnd.randint(0, 70 * 2**20),
                                          uid=rnd.randint(1, 2**31), gid=rnd.randint(1, 2**31)),
                                ROOT)
                files.append(name)
            elif kind == 3:
                f = fh_of(await c.lookup(d, rnd.choice(files), ROOT))
                await c.link(f, d, name, ROOT)
            else:
                await c.mknod(d, name, Ftype3.FIFO, Sattr3(mode=0o600), ROOT)
        expected = set(os.listdir(export.path / "odd"))
        for dircount, maxcount in ((None, None), (1024, 4096)):
            seen: dict[bytes, nfs3.EntryPlus3] = {}
            cookie, verf = 0, bytes(8)
            while True:
                res = await c.readdirplus(d, cookie, verf, ROOT, dircount, maxcount)
                verf = res.cookieverf
                seen.update((e.name, e) for e in res.entries)
                if res.eof:
                    break
                cookie = res.entries[-1].cookie
            assert {n.decode() for n in seen} - {".", ".."} == expected
            assert all(e.name_attributes is not None for n, e in seen.items()
                       if n not in (b".", b".."))
        for name, target in targets.items():
            assert await c.readlink(fh_of(await c.lookup(d, name, ROOT)), ROOT) == target
