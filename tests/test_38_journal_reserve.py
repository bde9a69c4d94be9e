"""The journal's disk reserve: records that say what already happened on the server
(BIND, COMPLETE markers) are written even when users' writes filled the cache disk.

Soak ("cache disk full", then kill -9): the flusher made directories on the server,
the BIND records giving their handles failed with ENOSPC, and after the remount replay
moved ~886 records to lost+found ("names a file that is gone").  These tests put the
journal on a real small file system (tmpfs, and ext4 on a loop device as the soak does)
and fill it with a ballast file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.fakes import FakeNfs
from wancache.cache import journal as jmod
from wancache.cache.flusher import FlushStats
from wancache.cache.journal import Journal
from wancache.cache.records import PREFIX, Op, decode_op, header_length
from wancache.cache.store import Store
from wancache.cache.writeback import WriteBack
from wancache.config import build_config
from wancache.creds import Cred
from wancache.mount import build

ROOT = Cred.root()
MIB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small file system")


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@contextlib.contextmanager
def small_fs(where: Path, kind: str, size: int) -> Iterator[Path]:
    """A file system of `size` bytes mounted at `where`: tmpfs, or ext4 on a loop
    device (no blocks reserved for root, as bench/soak.py makes it)."""
    where.mkdir()
    if kind == "tmpfs":
        _run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)])
    else:
        if shutil.which("mkfs.ext4") is None:
            pytest.skip("no mkfs.ext4")
        image = where.parent / f"{where.name}.img"
        with image.open("wb") as f:
            f.truncate(size)
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)])
        try:
            _run(["mount", "-o", "loop", str(image), str(where)])
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot loop-mount ext4 here: {exc.stderr!r}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


@pytest.fixture(params=["tmpfs", "ext4"])
def fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    with small_fs(tmp_path / "fs", request.param, 8 * MIB) as where:
        yield where


def fill(where: Path) -> int:
    """Fill the file system with a ballast file until it says ENOSPC (as the soak's
    disk-full fault does); returns the ballast's size."""
    chunk = b"\0" * 4096
    fd = os.open(where / "ballast", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        # the last bytes of a partly free block
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0" * 512):
                pass
        with contextlib.suppress(OSError):
            os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def unfill(where: Path) -> None:
    (where / "ballast").unlink(missing_ok=True)


def blocks(path: Path) -> int:
    return path.stat().st_blocks * 512


def segs(d: Path) -> list[Path]:
    return sorted(d.glob("seg-*.wj"))


# --- the journal alone ---------------------------------------------------------------

def full_disk_warnings(caplog: pytest.LogCaptureFixture) -> int:
    return sum("the disk is full" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.get_records("call"))


async def test_internal_records_are_written_on_a_full_disk_user_appends_refused(
        fs: Path, caplog: pytest.LogCaptureFixture, allow_log_warnings: None) -> None:
    d = fs / "journal"
    j = await Journal.open(d, segment_size=1 * MIB, reserve=64 << 10, reserve_per_record=512)
    users = [await j.append(b"u%d" % i * 500) for i in range(50)]
    assert j.stats.reserve_bytes >= (64 << 10) + 512 * 50
    fill(fs)
    # Users' writes go on while what is allocated past the reserve lasts, then they are
    # refused (ENOSPC: never acknowledged), the reserve untouched.
    with pytest.raises(OSError) as info:
        for _ in range(1000):
            users.append(await j.append(b"x" * 4000))
    assert info.value.errno == errno.ENOSPC
    assert j.stats.disk_refusals == 1
    assert j.stats.reserve_bytes >= (64 << 10) + 512 * len(users)
    for _ in range(5):
        with pytest.raises(OSError):
            await j.append(b"x" * 4000)
    assert full_disk_warnings(caplog) == 1      # once, not for every refused write
    binds = [await j.append(b"bind %d" % i * 20, internal=True) for i in range(40)]
    await j.complete(users[:30])
    await j.complete(binds[:10])
    assert j.stats.reserve_writes > 0           # they went into the reserve
    assert j.stats.disk_refusals == 6
    await j.close()

    # kill -9 and remount on the still full disk: replay finds what was written, and
    # completing more of it still works
    j = await Journal.open(d, segment_size=1 * MIB, reserve=64 << 10, reserve_per_record=512)
    assert list(j.pending_seqs()) == users[30:] + binds[10:]
    assert j.replay_report.damaged == []
    with pytest.raises(OSError):
        for _ in range(1000):
            users.append(await j.append(b"z" * 4000))
    more = await j.append(b"y" * 100, internal=True)
    await j.complete(users[30:] + binds[10:])
    assert list(j.pending_seqs()) == [more]
    await j.close()

    unfill(fs)                                  # room again: users may write
    async with await Journal.open(d, segment_size=1 * MIB, reserve=64 << 10,
                                  reserve_per_record=512) as j:
        assert list(j.pending_seqs()) == [more]
        assert await j.append(b"z" * 100) > more


async def test_an_internal_group_that_needs_a_new_segment_uses_the_old_ones_reserve(
        fs: Path, allow_log_warnings: None) -> None:
    """The active segment is at segment_size and the disk is full: a new segment could
    not be reserved, so internal records go on in the old one, past segment_size."""
    d = fs / "journal"
    opts: dict[str, Any] = dict(segment_size=64 << 10, reserve=128 << 10, reserve_per_record=0)
    j = await Journal.open(d, **opts)
    users = [await j.append(b"u%d" % i * 1000) for i in range(60)]   # several segments
    before = segs(d)
    fill(fs)
    internal = [await j.append(b"b%d" % i * 100, internal=True) for i in range(300)]
    assert segs(d) == before                    # no new segment: the disk is full
    assert before[-1].stat().st_size > 64 << 10
    with pytest.raises(OSError):
        await j.append(b"x")
    await j.complete(users + internal[:100])
    await j.close()
    j = await Journal.open(d, **opts)
    assert list(j.pending_seqs()) == internal[100:]
    assert [j.read_sync(s) for s in internal[100:]] == \
        [b"b%d" % i * 100 for i in range(100, 300)]
    await j.close()


async def test_a_rolled_segment_gives_its_reserve_back(fs: Path) -> None:
    d = fs / "journal"
    async with await Journal.open(d, segment_size=64 << 10, reserve=256 << 10,
                                  reserve_per_record=0) as j:
        for i in range(40):
            await j.append(b"u%d" % i * 1000)
        old = segs(d)[:-1]
        assert old
        for seg in old:          # only what it holds (a block's rounding), no reserve
            assert blocks(seg) < seg.stat().st_size + 8192
        assert blocks(segs(d)[-1]) >= segs(d)[-1].stat().st_size + (256 << 10)
        assert j.stats.reserve_bytes >= 256 << 10


async def test_the_reserve_is_taken_again_after_a_restart_cut_a_torn_tail(
        fs: Path, allow_log_warnings: None) -> None:
    d = fs / "journal"
    async with await Journal.open(d, reserve=256 << 10, reserve_per_record=0) as j:
        seq = await j.append(b"kept" * 100)
    (seg,) = segs(d)
    with seg.open("ab") as f:               # a torn group: truncated at the next open
        f.write(b"\xa7WJ1" + b"\0" * 40)
    async with await Journal.open(d, reserve=256 << 10, reserve_per_record=0) as j:
        assert j.replay_report.torn_tail
        assert list(j.pending_seqs()) == [seq]
        assert blocks(seg) >= seg.stat().st_size + (256 << 10)
        assert j.stats.reserve_bytes >= 256 << 10


async def test_users_and_internal_records_in_one_group_on_a_full_disk(
        fs: Path, allow_log_warnings: None) -> None:
    """Concurrent appends share commit groups: in a group without room the users'
    appends fail and the internal ones are durable; a replay finds exactly those."""
    d = fs / "journal"
    opts: dict[str, Any] = dict(reserve=64 << 10, reserve_per_record=512)
    j = await Journal.open(d, **opts)
    durable = [await j.append(b"first" * 100)]
    fill(fs)
    with pytest.raises(OSError):     # use up what lies past the reserve
        for _ in range(10_000):
            durable.append(await j.append(b"x" * 250))
    outcome: dict[str, Any] = {}

    async def one(name: str, internal: bool) -> None:
        try:
            outcome[name] = await j.append(name.encode() * 50, internal=internal)
        except OSError as exc:
            outcome[name] = exc

    into_reserve = j.stats.reserve_writes
    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(one, f"user{i}", False)
            nursery.start_soon(one, f"bind{i}", True)
    users = [outcome[f"user{i}"] for i in range(8)]
    binds = [outcome[f"bind{i}"] for i in range(8)]
    assert all(isinstance(s, int) for s in binds)
    assert all(isinstance(u, int) or u.errno == errno.ENOSPC for u in users)
    assert any(isinstance(u, OSError) for u in users)
    assert j.stats.reserve_writes > into_reserve    # groups whose users were refused
    durable += [s for s in users + binds if isinstance(s, int)]
    assert list(j.pending_seqs()) == sorted(durable)
    await j.close()
    async with await Journal.open(d, **opts) as j:
        assert list(j.pending_seqs()) == sorted(durable)
        assert [j.read_sync(s) for s in binds] == [b"bind%d" % i * 50 for i in range(8)]


async def test_compaction_on_a_full_disk_waits_and_loses_nothing(fs: Path) -> None:
    d = fs / "journal"
    opts: dict[str, Any] = dict(segment_size=32 << 10, reserve=64 << 10, reserve_per_record=0)
    j = await Journal.open(d, **opts)
    stuck = await j.append(b"stuck" * 100)
    done = [await j.append(b"%d" % i * 1000) for i in range(100)]
    fill(fs)
    await j.complete(done[:-1])            # the oldest segment keeps only `stuck`
    await j.compact()                      # no room for its copy: it waits
    assert list(j.pending_seqs()) == [stuck, done[-1]]
    await j.close()
    unfill(fs)
    async with await Journal.open(d, **opts) as j:
        assert list(j.pending_seqs()) == [stuck, done[-1]]
        assert j.read_sync(stuck) == b"stuck" * 100
        assert await j.compact() >= 1      # room again: it moves
        assert j.read_sync(stuck) == b"stuck" * 100


async def test_no_reserve_when_asked_for_none_or_nothing_is_pending(tmp_path: Path) -> None:
    d = tmp_path / "journal"
    async with await Journal.open(d, reserve=0, reserve_per_record=0) as j:
        seq = await j.append(b"a" * 10_000)
        (seg,) = segs(d)
        assert blocks(seg) < seg.stat().st_size + 8192 and j.stats.reserve_bytes == 0
        await j.complete([seq])
    async with await Journal.open(d, reserve=1 << 20) as j:
        seq = await j.append(b"a" * 10_000)
        assert j.stats.reserve_bytes >= 1 << 20
        await j.complete([seq])            # all done: every byte given back
        assert sum(blocks(p) for p in segs(d)) == 0 and j.stats.reserve_bytes == 0


async def test_a_file_system_that_cannot_preallocate_runs_without_a_reserve(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        allow_log_warnings: None) -> None:
    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(jmod, "_fallocate", unsupported)
    d = tmp_path / "journal"
    async with await Journal.open(d) as j:
        seqs = [await j.append(b"a" * 1000) for _ in range(20)]
        seqs.append(await j.append(b"b", internal=True))
        assert j.stats.reserve_bytes == 0 and j.stats.disk_refusals == 0
    warned = [r for r in caplog.get_records("call") if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "cannot preallocate" in warned[0].getMessage()
    monkeypatch.undo()
    async with await Journal.open(d) as j:
        assert list(j.pending_seqs()) == seqs


# --- the write-back layer on a full cache disk -----------------------------------------

@asynccontextmanager
async def stack(tmp_path: Path, journal_dir: Path, fake: FakeNfs, *options: str,
                crash: bool = False, journal: Journal | None = None
                ) -> AsyncIterator[Store]:
    """A store with write-back over `fake`, its journal in `journal_dir`; `crash` ends
    it without flushing or marking anything done (what kill -9 leaves behind)."""
    cfg = build_config("fake:/x", "/mnt", [f"cache_dir={tmp_path}", "writeback_delay=60",
                                           *options])
    if journal is None:
        journal = await Journal.open(journal_dir)
    try:
        async with trio.open_nursery() as nursery:
            parts = await build(fake, cfg, nursery, journal=journal)  # type: ignore[arg-type]
            fake.stats.reset()
            try:
                yield parts.store
            finally:
                if not crash:
                    assert parts.flusher is not None and parts.writeback is not None
                    await parts.flusher.stop()
                    await parts.writeback.drain()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await journal.close()


def wb(store: Store) -> WriteBack:
    assert isinstance(store.writes, WriteBack)
    return store.writes


def stats(store: Store) -> FlushStats:
    return wb(store).flusher.stats


async def settle(store: Store) -> None:
    """Flush everything now; return once nothing is pending or a flush had to be
    retried (polling the flusher's state, with a generous guard)."""
    wb(store).flusher.hurry_all()
    with trio.fail_after(20):
        while wb(store).pending_ops and not stats(store).retries:
            await trio.sleep(0.01)


def record_ops(journal: Journal) -> list[Op]:
    out = []
    for seq in journal.pending_seqs():
        n = header_length(journal.read_sync(seq, 0, PREFIX))
        out.append(decode_op(seq, journal.read_sync(seq, 0, PREFIX + n),
                             journal.record_length(seq)))
    return out


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
async def test_a_full_cache_disk_loses_nothing_across_kill_9(
        tmp_path: Path, kind: str, allow_log_warnings: None) -> None:
    """The soak's loss: with the cache disk full the flusher still binds what it made
    on the server and marks its changes done; after kill -9 and a remount nothing is
    replayed, nothing goes to lost+found, and the server has every acknowledged change
    (the write the full disk refused was never acknowledged)."""
    fake = FakeNfs()
    with small_fs(tmp_path / "fs", kind, 8 * MIB) as where:
        jdir = where / "journal"
        async with stack(tmp_path, jdir, fake, crash=True) as store:
            made: dict[str, Any] = {}
            for i in range(20):
                d, _ = await store.mkdir(store.root, b"d%d" % i, 0o755, ROOT)
                sub, _ = await store.mkdir(d, b"sub", 0o755, ROOT)
                f, _ = await store.create(sub, b"f", 0o644, ROOT, exclusive=True)
                await store.write(f, 0, b"data %d" % i * 100, ROOT)
                made[f"d{i}"] = {"sub": {"f": b"data %d" % i * 100}}
            fill(where)
            with pytest.raises(OSError) as info:        # the disk is full for users
                await store.write(f, 0, b"\1" * 600_000, ROOT)
            assert info.value.errno == errno.ENOSPC
            assert wb(store).journal.stats.disk_refusals == 1
            await settle(store)
            assert stats(store).retries == 0 and wb(store).pending_ops == 0
            await wb(store).drain()                      # the markers are written too
            assert not wb(store).journal.pending_seqs()
        assert fake.tree() == made
        async with stack(tmp_path, jdir, fake) as store:   # the disk is still full
            assert wb(store).pending_ops == 0
            assert stats(store).lost == 0
        assert set(fake.calls()) <= {"GETATTR", "LOOKUP"}
        assert fake.tree() == made
        assert not (tmp_path / "lost+found").exists()


class FailingBinds:
    """Journal.append that refuses BIND records with ENOSPC while armed."""

    def __init__(self, journal: Journal) -> None:
        self.real = journal.append
        self.armed = True
        self.refused = 0

    async def __call__(self, record: bytes, **kw: Any) -> int:
        op = decode_op(0, record[:PREFIX + header_length(record[:PREFIX])], len(record))
        if self.armed and op.kind == "bind":
            self.refused += 1
            await trio.lowlevel.checkpoint()
            raise OSError(errno.ENOSPC, "No space left on device")
        return await self.real(record, **kw)


async def test_a_failed_bind_leaves_the_node_local(tmp_path: Path,
                                                   allow_log_warnings: None) -> None:
    """The BIND of a directory made on the server failed: the node must not claim a
    handle no durable record gives it (records appended meanwhile name it by its local
    id), and after kill -9 the replay makes it again (EEXIST: it is ours) and loses
    nothing."""
    fake = FakeNfs()
    jdir = tmp_path / "journal"
    journal = await Journal.open(jdir)
    failing = FailingBinds(journal)
    journal.append = failing  # type: ignore[method-assign]
    async with stack(tmp_path, jdir, fake, crash=True, journal=journal) as store:
        d, _ = await store.mkdir(store.root, b"d", 0o755, ROOT)
        f, _ = await store.create(d, b"f", 0o644, ROOT, exclusive=True)
        await store.write(f, 0, b"first", ROOT)
        await settle(store)
        assert failing.refused >= 1 and stats(store).retries >= 1
        assert fake.tree() == {"d": {}}                 # MKDIR done, its BIND not
        assert d.is_local and wb(store).overlay.get(d) is not None
        assert wb(store).overlay.get(d).local          # type: ignore[union-attr]
        g, _ = await store.create(d, b"g", 0o644, ROOT, exclusive=True)
        await store.write(g, 0, b"second", ROOT)
        ops = record_ops(journal)
        assert not [op for op in ops if op.kind == "bind"]
        assert [op.parent for op in ops if op.kind == "create"] == \
            [f"l{d.local_id}", f"l{d.local_id}"]       # never by a handle not journaled
    async with stack(tmp_path, jdir, fake) as store:
        with trio.fail_after(20):
            await wb(store).sync()
        assert stats(store).lost == 0
    assert fake.tree() == {"d": {"f": b"first", "g": b"second"}}
    assert not (tmp_path / "lost+found").exists()


async def test_a_failed_bind_is_retried_and_the_changes_finish(
        tmp_path: Path, allow_log_warnings: None) -> None:
    fake = FakeNfs()
    jdir = tmp_path / "journal"
    journal = await Journal.open(jdir)
    failing = FailingBinds(journal)
    journal.append = failing  # type: ignore[method-assign]
    async with stack(tmp_path, jdir, fake, journal=journal) as store:
        d, _ = await store.mkdir(store.root, b"d", 0o755, ROOT)
        f, _ = await store.create(d, b"f", 0o644, ROOT, exclusive=True)
        await store.write(f, 0, b"first", ROOT)
        await settle(store)
        assert failing.refused >= 1
        failing.armed = False
        with trio.fail_after(20):
            await wb(store).sync()
        assert not d.is_local and not f.is_local
        assert stats(store).lost == 0
    assert fake.tree() == {"d": {"f": b"first"}}
    assert fake.created.count(b"d") == 1


async def test_failed_completions_are_written_later(tmp_path: Path,
                                                     allow_log_warnings: None) -> None:
    """A COMPLETE that failed (ENOSPC, EIO) was dropped: its records replayed after the
    next restart, and a BIND marked done meanwhile left them naming "a file that is
    gone".  They are kept and written with the next completions."""
    fake = FakeNfs()
    jdir = tmp_path / "journal"
    journal = await Journal.open(jdir)
    real = journal.complete
    fails = [1]

    async def complete(seqs: Any) -> None:
        if fails[0]:
            fails[0] -= 1
            await trio.lowlevel.checkpoint()
            raise OSError(errno.ENOSPC, "No space left on device")
        await real(seqs)

    journal.complete = complete  # type: ignore[method-assign]
    async with stack(tmp_path, jdir, fake, crash=True, journal=journal) as store:
        d, _ = await store.mkdir(store.root, b"d", 0o755, ROOT)
        f, _ = await store.create(d, b"f", 0o644, ROOT, exclusive=True)
        await store.write(f, 0, b"data", ROOT)
        with trio.fail_after(20):
            await wb(store).sync()
            while journal.pending_seqs():   # the failed batch is written with a later one
                await trio.sleep(0.01)
        assert fails == [0]
    async with stack(tmp_path, jdir, fake) as store:
        assert wb(store).pending_ops == 0
    assert fake.tree() == {"d": {"f": b"data"}}


async def test_drain_waits_for_the_completion_being_written(tmp_path: Path) -> None:
    """drain() returned while the batch of completions was being written (the queue was
    already empty), so the records it was waiting for were still pending."""
    fake = FakeNfs()
    jdir = tmp_path / "journal"
    journal = await Journal.open(jdir)
    real = journal.complete
    taken, gate = trio.Event(), trio.Event()

    async def complete(seqs: Any) -> None:
        taken.set()
        await gate.wait()
        await real(seqs)

    journal.complete = complete  # type: ignore[method-assign]
    async with stack(tmp_path, jdir, fake, crash=True, journal=journal) as store:
        f, _ = await store.create(store.root, b"f", 0o644, ROOT, exclusive=True)
        await store.write(f, 0, b"data", ROOT)
        with trio.fail_after(20):
            await wb(store).sync()
            await taken.wait()                      # the batch is being written
        drained = trio.Event()

        async def drain() -> None:
            await wb(store).drain()
            drained.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await trio.testing.wait_all_tasks_blocked()
            assert not drained.is_set() and journal.pending_seqs()
            gate.set()
        assert not journal.pending_seqs()
