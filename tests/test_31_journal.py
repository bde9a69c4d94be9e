"""The write-back journal: durability, group commit, replay checking, reading records back,
giving space back, compaction, the size cap, ENOSPC, and a crash model checker."""

from __future__ import annotations

import errno
import inspect
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wancache.cache import journal as jmod
from wancache.cache.journal import (
    HEADER_SIZE,
    MARKER_COST,
    Journal,
    JournalCorruptError,
    JournalError,
    NotPendingError,
)

REPO = Path(__file__).resolve().parent.parent


def payload(run: int, i: int) -> bytes:
    """A record whose content says which (run, i) it is, 50..1549 bytes long."""
    n = 50 + (i * 7919) % 1500
    head = f"{run}:{i}:".encode()
    return (head * (n // len(head) + 1))[:n]


def is_payload(data: bytes) -> bool:
    run, i, _ = data.split(b":", 2)
    return data == payload(int(run), int(i))


def segments(d: Path) -> list[Path]:
    return sorted(d.glob("seg-*.wj"))


def frame(n: int) -> int:
    """On-disk size of a record with an n-byte payload."""
    return HEADER_SIZE + n


async def test_append_reopen_complete_reopen(tmp_path: Path) -> None:
    d = tmp_path / "journal"
    recs = [payload(0, i) for i in range(20)]
    async with await Journal.open(d) as j:
        seqs = [await j.append(r) for r in recs[:10]]
        seqs += await j.append_many(recs[10:])
        assert seqs == sorted(seqs) and len(set(seqs)) == 20
        assert j.stats.records_pending == 20
        assert j.stats.bytes_pending == sum(map(len, recs))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert [stat.S_IMODE(p.stat().st_mode) for p in segments(d)] == [0o600]

    async with await Journal.open(d) as j:
        assert j.pending() == list(zip(seqs, recs, strict=True))
        assert j.replay_report.pending == 20 and j.replay_report.damaged == []
        done = seqs[::3]
        await j.complete(done)
        await j.complete(done)  # completing again is a no-op
        assert j.stats.records_pending == 20 - len(done)
        assert j.stats.bytes_pending == sum(len(r) for s, r in zip(seqs, recs, strict=True)
                                            if s not in done)
        with pytest.raises(ValueError, match="never appended"):
            await j.complete([j.next_seq])
        new = await j.append(b"after")
        assert new > max(seqs)
    async with await Journal.open(d) as j:
        expect = [(s, r) for s, r in zip(seqs, recs, strict=True) if s not in done]
        assert j.pending() == [*expect, (new, b"after")]
        assert j.next_seq > new


async def test_second_open_and_closed_journal_are_refused(tmp_path: Path) -> None:
    j = await Journal.open(tmp_path / "j")
    with pytest.raises(JournalError, match="in use"):
        await Journal.open(tmp_path / "j")
    await j.close()
    await j.close()
    with pytest.raises(JournalError, match="closed"):
        await j.append(b"x")
    await (await Journal.open(tmp_path / "j")).close()


async def test_cancelled_append_still_reports_its_seq(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path / "j") as j:
        got = []
        with trio.CancelScope() as scope:
            scope.cancel()
            got.append(await j.append(b"durable"))  # shielded: returns, cancel comes later
            await trio.sleep(0)
            pytest.fail("cancellation was lost")
        assert got and j.pending() == [(got[0], b"durable")]


async def test_group_commit_500_concurrent_appends(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = os.fdatasync

    def counting(fd: int) -> None:
        nonlocal calls
        calls += 1
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    async with await Journal.open(tmp_path / "j") as j:
        seqs: list[int] = []

        async def one(i: int) -> None:
            seqs.append(await j.append(payload(1, i)))

        async with trio.open_nursery() as nursery:
            for i in range(500):
                nursery.start_soon(one, i)
        print(f"500 concurrent appends: {calls} fdatasyncs, {j.stats.commits} commits")
        assert len(set(seqs)) == 500
        assert calls <= 20
        assert calls == j.stats.commits  # each commit is one write and one fdatasync
        assert j.stats.fsyncs <= 21  # plus the directory fsync of the new segment
    async with await Journal.open(tmp_path / "j") as j:
        assert sorted(s for s, _ in j.pending()) == sorted(seqs)
        assert all(is_payload(r) for _, r in j.pending())


async def test_throughput_1000_concurrent_4k_appends(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path / "j") as j:
        data = [os.urandom(4096) for _ in range(1000)]

        async def one(i: int) -> None:
            await j.append(data[i])

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(one, i)
        elapsed = time.perf_counter() - t0
        print(f"1000 x 4 KiB concurrent appends: {elapsed * 1000:.1f} ms, "
              f"{j.stats.fsyncs} fsyncs, {j.stats.commits} commits")
        assert j.stats.appends == 1000
        assert j.stats.fsyncs <= 20
        assert elapsed < 1.0


CHILD = """
import sys, trio
from pathlib import Path
from wancache.cache.journal import Journal

PAYLOAD

async def main():
    run = int(sys.argv[2])
    j = await Journal.open(Path(sys.argv[1]), segment_size=int(sys.argv[3]))
    old = [s for s, _ in j.pending()]
    print("ready", flush=True)
    counter = iter(range(10**9))

    async def finish_old():
        for k in range(0, len(old), 40):
            print("c", *old[k:k + 40], flush=True)
            await j.complete(old[k:k + 40])
            print("C", *old[k:k + 40], flush=True)

    async def worker():
        while True:
            i = next(counter)
            if i % 10 == 9:
                seqs = await j.append_many([payload(run, i), payload(run, i + 10**6)])
                print("A", seqs[0], i, flush=True)
                print("A", seqs[1], i + 10**6, flush=True)
                continue
            seq = await j.append(payload(run, i))
            print("A", seq, i, flush=True)
            if i % 3 == 0:
                print("c", seq, flush=True)
                await j.complete([seq])
                print("C", seq, flush=True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish_old)
        for _ in range(8):
            nursery.start_soon(worker)

trio.run(main)
""".replace("PAYLOAD", inspect.getsource(payload))


@pytest.mark.slow
async def test_sigkill_at_random_points_loses_no_acknowledged_record(
        tmp_path: Path, allow_log_warnings: None) -> None:
    d = tmp_path / "journal"
    rng = random.Random(31)
    expected: dict[int, bytes] = {}  # appends acknowledged, with no complete() begun
    completed: set[int] = set()  # complete() acknowledged
    max_acked = 0
    torn_reported = 0
    for run in range(20):
        out = tmp_path / f"child{run}.out"
        with out.open("wb") as f:
            proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(d), str(run), str(64 << 10)],
                stdout=f, stderr=subprocess.PIPE, cwd=REPO)
        deadline = time.monotonic() + 20
        while b"ready\n" not in out.read_bytes():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            await trio.sleep(0.005)
        await trio.sleep(rng.uniform(0.0, 0.12))
        proc.send_signal(signal.SIGKILL)
        await trio.to_thread.run_sync(proc.wait)
        assert proc.stderr is not None
        proc.stderr.close()

        lines = out.read_bytes().split(b"\n")[:-1]  # a line cut by the kill has no newline
        for line in lines[1:]:
            kind, *nums = line.split()
            if kind == b"A":
                seq, i = int(nums[0]), int(nums[1])
                expected[seq] = payload(run, i)
                max_acked = max(max_acked, seq)
            else:  # "c": complete() called (may or may not be durable), "C": it returned
                for s in map(int, nums):
                    expected.pop(s, None)
                    if kind == b"C":
                        completed.add(s)

        if run % 2:  # as if the machine had died mid-write: an unsynced group left half-way
            seg = segments(d)[-1]
            with seg.open("ab") as f:
                f.write(rng.choice([b"\0" * rng.randrange(1, 9000),
                                    rng.randbytes(rng.randrange(1, 9000)),
                                    jmod.MAGIC + rng.randbytes(30)]))

        j = await Journal.open(d, segment_size=64 << 10)
        try:
            report = j.replay_report
            assert not report.middle_damage, report.damaged
            if run % 2:
                assert report.torn_tail and report.bytes_discarded > 0, report
            torn_reported += report.torn_tail
            pending = dict(j.pending())
            for seq, data in expected.items():
                assert pending.get(seq) == data, f"run {run}: acknowledged seq {seq} lost"
            assert not completed & pending.keys()
            assert all(is_payload(data) for data in pending.values())
            assert j.next_seq > max_acked
            assert j.stats.segments == len(segments(d))
        finally:
            await j.close()
    print(f"20 SIGKILLs: {len(expected)} records pending, {len(completed)} completed, "
          f"{torn_reported} torn tails reported, {len(segments(d))} segment files")
    assert completed and expected


async def five_records(d: Path) -> list[tuple[int, bytes]]:
    """Five records, each its own commit group, in one segment; returns (seq, record)."""
    async with await Journal.open(d) as j:
        return [(await j.append(payload(2, i)), payload(2, i)) for i in range(5)]


def offset_of(recs: list[tuple[int, bytes]], k: int) -> int:
    return sum(frame(len(r)) for _, r in recs[:k])


@pytest.mark.parametrize("where", [HEADER_SIZE + 5, 0, 24])  # payload, magic, length field
async def test_middle_damage_refused_then_forced(tmp_path: Path, where: int,
                                                 allow_log_warnings: None) -> None:
    d = tmp_path / "j"
    recs = await five_records(d)
    (seg,) = segments(d)
    raw = bytearray(seg.read_bytes())
    at = offset_of(recs, 1) + where
    raw[at] ^= 0xFF
    seg.write_bytes(raw)

    with pytest.raises(JournalCorruptError) as info:
        await Journal.open(d)
    msg = str(info.value)
    assert seg.name in msg and f"offset {offset_of(recs, 1)}-{offset_of(recs, 2)}" in msg
    assert f"DATA records {recs[1][0]}..{recs[1][0]} may be lost" in msg
    assert seg.read_bytes() == raw  # refusing changed nothing

    async with await Journal.open(d, force=True) as j:
        report = j.replay_report
        assert report.middle_damage and not report.torn_tail
        assert report.bytes_discarded == frame(len(recs[1][1]))
        assert len(report.damaged) == 1 and seg.name in report.damaged[0]
        assert j.pending() == [recs[0], *recs[2:]]
        new = await j.append(b"new")
        assert new > recs[-1][0]
        assert len(segments(d)) == 2  # never appends to the damaged segment
    assert seg.read_bytes() == raw

    with pytest.raises(JournalCorruptError):  # reported on every open until reclaimed
        await Journal.open(d)
    async with await Journal.open(d, force=True) as j:
        assert j.pending() == [recs[0], *recs[2:], (new, b"new")]
        await j.complete([s for s, _ in j.pending()][:-1])
        assert segments(d)[0] != seg
    async with await Journal.open(d) as j:
        assert j.pending() == [(new, b"new")]
        assert j.replay_report.damaged == []


async def test_damage_at_the_end_of_an_older_segment_is_not_a_torn_tail(
        tmp_path: Path, allow_log_warnings: None) -> None:
    d = tmp_path / "j"
    async with await Journal.open(d, segment_size=1000) as j:
        seqs = [await j.append(payload(3, i)) for i in range(8)]
    first = segments(d)[0]
    raw = bytearray(first.read_bytes())
    raw[-3] ^= 0x01
    first.write_bytes(raw)
    with pytest.raises(JournalCorruptError, match=first.name):
        await Journal.open(d, segment_size=1000)
    async with await Journal.open(d, segment_size=1000, force=True) as j:
        assert j.replay_report.middle_damage
        kept = [s for s, _ in j.pending()]
        assert len(kept) == 7 and set(kept) < set(seqs)


async def test_stale_record_with_an_old_seq_is_damage(tmp_path: Path,
                                                      allow_log_warnings: None) -> None:
    d = tmp_path / "j"
    recs = await five_records(d)
    stale = jmod._encode_group([(jmod.DATA, recs[0][0], b"stale")], 100, 0)
    (d / f"seg-{100:020d}.wj").write_bytes(stale)  # checks out, but its seq went backwards
    with pytest.raises(JournalCorruptError, match="out of order"):
        await Journal.open(d)
    async with await Journal.open(d, force=True) as j:
        assert j.pending() == recs


@pytest.mark.parametrize("cut", [10, HEADER_SIZE - 4, HEADER_SIZE + 1])
async def test_torn_tail_is_reported_truncated_and_journal_goes_on(
        tmp_path: Path, cut: int, caplog: pytest.LogCaptureFixture,
        allow_log_warnings: None) -> None:
    d = tmp_path / "j"
    recs = await five_records(d)
    (seg,) = segments(d)
    good = offset_of(recs, 4)
    os.truncate(seg, good + cut)

    async with await Journal.open(d) as j:
        report = j.replay_report
        assert report.torn_tail and not report.middle_damage
        assert report.bytes_discarded == cut
        assert len(report.damaged) == 1 and "torn tail" in report.damaged[0]
        assert f"offset {good}" in report.damaged[0]
        assert any("torn tail" in r.getMessage() for r in caplog.records
                   if r.levelname == "WARNING")
        assert seg.stat().st_size == good
        assert j.pending() == recs[:4]
        more = await j.append_many([b"m1", b"m2"])
        assert min(more) > recs[3][0]
    async with await Journal.open(d) as j:
        assert j.replay_report.damaged == []
        assert j.pending() == [*recs[:4], (more[0], b"m1"), (more[1], b"m2")]


async def test_damaged_last_group_is_dropped_whole(tmp_path: Path,
                                                    allow_log_warnings: None) -> None:
    d = tmp_path / "j"
    async with await Journal.open(d) as j:
        first = await j.append(b"before")
        batch = await j.append_many([b"a" * 100, b"b" * 100, b"c" * 100])
    (seg,) = segments(d)
    raw = bytearray(seg.read_bytes())
    raw[frame(6) + frame(100) + HEADER_SIZE + 50] ^= 0xFF  # inside "b": "c" is intact
    seg.write_bytes(raw)
    async with await Journal.open(d) as j:
        assert j.replay_report.torn_tail and not j.replay_report.middle_damage
        assert j.pending() == [(first, b"before")]  # append_many is all or nothing
        assert j.next_seq > max(batch)


async def test_records_embedding_journal_frames_do_not_fool_resync(
        tmp_path: Path, allow_log_warnings: None) -> None:
    await five_records(tmp_path / "other")
    foreign = segments(tmp_path / "other")[0].read_bytes()
    d = tmp_path / "j"
    async with await Journal.open(d) as j:
        first = await j.append(b"x")
        await j.append(foreign + foreign)  # e.g. a backup of a cache dir written to the share
        await j.append(foreign)
    (seg,) = segments(d)
    os.truncate(seg, seg.stat().st_size - len(foreign) // 2)  # tear the last record
    async with await Journal.open(d) as j:
        report = j.replay_report
        assert report.torn_tail and not report.middle_damage, report
        assert [s for s, _ in j.pending()] == [first, first + 1]


async def test_segments_roll_and_are_reclaimed_oldest_first(tmp_path: Path) -> None:
    d = tmp_path / "j"
    size = 600  # three records of 600 + 36 bytes per 2048-byte segment
    j = await Journal.open(d, segment_size=2048)
    seqs = [await j.append(bytes([i]) * size) for i in range(12)]
    names = [p.name for p in segments(d)]
    assert len(names) == 4
    assert names == [f"seg-{s:020d}.wj" for s in seqs[::3]]
    assert all(p.stat().st_size <= 2048 for p in segments(d))
    done: set[int] = set()
    ever = set(names)

    def check() -> None:
        files = [p.name for p in segments(d)]
        assert files == sorted(ever)[len(ever) - len(files):]  # only ever the oldest go
        firsts = [int(n[4:-3]) for n in sorted(ever)]
        for name, lo, hi in zip(sorted(ever), firsts, [*firsts[1:], 1 << 64], strict=True):
            inside = {s for s in seqs if lo <= s < hi}
            if name not in files:
                assert inside <= done, f"{name} deleted with records pending"
        if len(files) > 1:  # the oldest file survives only for a pending record
            lo = int(files[0][4:-3])
            assert any(lo <= s < int(files[1][4:-3]) and s not in done for s in seqs)
        assert j.stats.records_pending == len(seqs) - len(done)
        assert j.stats.bytes_pending == size * (len(seqs) - len(done))

    reclaimed: list[int] = []

    async def complete(*idx: int) -> None:
        nonlocal j
        await j.complete([seqs[i] for i in idx])
        reclaimed.append(j.stats.reclaimed_segments)
        done.update(seqs[i] for i in idx)
        ever.update(p.name for p in segments(d))
        check()
        await j.close()  # nothing pending is lost across a reopen
        j = await Journal.open(d, segment_size=2048)
        assert [s for s, _ in j.pending()] == [s for s in seqs if s not in done]
        check()

    await complete(4)
    await complete(3, 5)  # segment 2 is all done, but segment 1 is not: both stay
    assert len(segments(d)) >= 4 and segments(d)[1].name == names[1]
    await complete(11, 0, 1)
    assert segments(d)[0].name == names[0]
    assert reclaimed == [0, 0, 0]
    await complete(2)  # now segments 1 and 2 go, oldest first
    assert names[0] not in {p.name for p in segments(d)}
    assert names[1] not in {p.name for p in segments(d)}
    assert reclaimed[-1] == 2
    await complete(6, 7, 8, 9, 10)
    assert j.pending() == []
    (left,) = segments(d)  # all given back: only a new, empty newest segment is left
    assert left.name not in names and left.stat().st_size == 0
    await j.close()


class FlakyWrite:
    """os.pwrite that, once armed, writes half a big group and then reports ENOSPC."""

    def __init__(self, min_len: int) -> None:
        self.real = os.pwrite
        self.min_len = min_len
        self.state = "armed"

    def __call__(self, fd: int, data: bytes, offset: int) -> int:
        if self.state == "armed" and len(data) >= self.min_len:
            self.state = "half"
            return self.real(fd, bytes(data[:len(data) // 2]), offset)
        if self.state == "half":
            self.state = "spent"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd, data, offset)


async def test_enospc_fails_the_whole_group_and_journal_stays_usable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "j"
    j = await Journal.open(d)
    ok = [await j.append(b"one")]
    flaky = FlakyWrite(min_len=3 * frame(1000))
    monkeypatch.setattr(os, "pwrite", flaky)
    errors: list[int] = []

    async def one(i: int) -> None:
        try:
            ok.append(await j.append(bytes([i]) * 1000))
        except OSError as err:
            errors.append(err.errno or 0)

    async with trio.open_nursery() as nursery:  # the first leads alone, the rest fail as one
        for i in range(5):
            nursery.start_soon(one, i)
    assert flaky.state == "spent"
    assert errors == [errno.ENOSPC] * 4 and len(ok) == 2
    (seg,) = segments(d)
    assert seg.stat().st_size == frame(3) + frame(1000)  # no half group left behind
    with pytest.raises(OSError) as info:  # append_many: all fail together
        flaky.state = "armed"
        await j.append_many([b"x" * 1000] * 3)
    assert info.value.errno == errno.ENOSPC
    ok.append(await j.append(b"after"))
    assert [s for s, _ in j.pending()] == ok
    await j.close()
    async with await Journal.open(d) as j:
        assert j.replay_report.damaged == []
        assert [s for s, _ in j.pending()] == ok
        assert j.pending()[-1][1] == b"after"


async def test_failed_fdatasync_is_reported_and_cut_back(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "j"
    j = await Journal.open(d)
    first = await j.append(b"first")
    real = os.fdatasync
    failed: list[int] = []

    def eio_once(fd: int) -> None:
        if not failed:
            failed.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", eio_once)
    with pytest.raises(OSError) as info:
        await j.append(b"lost")
    assert info.value.errno == errno.EIO
    second = await j.append(b"second")
    await j.complete([first])
    await j.close()
    async with await Journal.open(d) as j:
        assert j.replay_report.damaged == []
        assert j.pending() == [(second, b"second")]


# --- reading pending records back -------------------------------------------------------

def disk_usage(d: Path) -> int:
    """Bytes the journal's files really take on disk (allocated blocks)."""
    return sum(p.stat().st_blocks * 512 for p in d.iterdir())


def file_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in segments(d))


async def test_read_back_pending_records(tmp_path: Path) -> None:
    d = tmp_path / "j"
    recs = [payload(4, i) for i in range(30)]
    async with await Journal.open(d, segment_size=8192) as j:
        seqs = await j.append_many(recs[:10])
        seqs += [await j.append(r) for r in recs[10:]]
        assert len(segments(d)) > 1
        for s, r in zip(seqs, recs, strict=True):
            assert j.record_length(s) == len(r)
            assert await j.read(s) == r
            assert await j.read(s, 7, 20) == r[7:27]
            assert await j.read(s, 5, verify=False) == r[5:]
            assert await trio.to_thread.run_sync(j.read_sync, s, len(r), 0) == b""
        with pytest.raises(ValueError, match="has"):
            await j.read(seqs[0], 0, len(recs[0]) + 1)
        with pytest.raises(ValueError, match="has"):
            await j.read(seqs[0], -1, 2)
        await j.complete(seqs[:5])
        with pytest.raises(NotPendingError):
            await j.read(seqs[0])
        with pytest.raises(NotPendingError):
            j.record_length(seqs[0])
        with pytest.raises(NotPendingError):
            await j.read(j.next_seq)
        assert list(j.pending_seqs()) == seqs[5:]
    with pytest.raises(JournalError, match="closed"):
        await j.read(seqs[6])
    async with await Journal.open(d, segment_size=8192) as j:
        assert list(j.pending_seqs()) == seqs[5:]
        for s, r in zip(seqs[5:], recs[5:], strict=True):
            assert await j.read(s) == r
        assert j.pending() == list(zip(seqs[5:], recs[5:], strict=True))


async def test_read_notices_a_record_the_disk_changed(tmp_path: Path) -> None:
    d = tmp_path / "j"
    async with await Journal.open(d) as j:
        first = await j.append(b"a" * 100)
        second = await j.append(b"b" * 100)
        (seg,) = segments(d)
        raw = bytearray(seg.read_bytes())
        raw[frame(100) + HEADER_SIZE + 10] ^= 1
        seg.write_bytes(raw)
        with pytest.raises(OSError) as info:
            await j.read(second, 50, 10)
        assert info.value.errno == errno.EIO and seg.name in str(info.value)
        assert (await j.read(second, verify=False))[10] == ord("b") ^ 1
        assert await j.read(first) == b"a" * 100


async def test_open_reads_in_bounded_memory(tmp_path: Path) -> None:
    d = tmp_path / "j"
    big = os.urandom(9 << 20)  # larger than the scan buffer: its checksum is streamed
    async with await Journal.open(d) as j:
        seqs = [await j.append(big)]
        for _ in range(4):
            seqs += await j.append_many([os.urandom(64 << 10) for _ in range(128)])
        await j.complete(seqs[1::2])
    assert file_bytes(d) > 40 << 20
    tracemalloc.start()
    try:
        j = await Journal.open(d)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    async with j:
        print(f"open of {file_bytes(d) >> 20} MiB: peak {peak >> 10} KiB traced")
        assert list(j.pending_seqs()) == [seqs[0], *seqs[2::2]]
        assert j.stats.bytes_pending == len(big) + 256 * (64 << 10)
        assert await j.read(seqs[0]) == big
    assert peak < 2 * jmod.SCAN_BUFFER + (2 << 20)


def damaged_journal(root: Path, seed: int) -> Path:
    """A journal of random records with bytes flipped in random places (tail included)."""
    rng = random.Random(seed)
    d = root / "src"

    async def build() -> None:
        async with await Journal.open(d, segment_size=6000) as j:
            seqs: list[int] = []
            for _ in range(40):
                sizes = [rng.choice([0, 5, 300, 2000, 9000]) for _ in range(rng.randint(1, 3))]
                seqs += await j.append_many([rng.randbytes(n) for n in sizes])
                if rng.random() < 0.3:
                    await j.complete(rng.sample(seqs, k=min(len(seqs), 3)))

    trio.run(build)
    for seg in segments(d):
        raw = bytearray(seg.read_bytes())
        for _ in range(rng.randint(0, 2)):
            if raw:
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        seg.write_bytes(raw)
    return d


@pytest.mark.parametrize("seed", range(6))
def test_a_tiny_scan_buffer_finds_exactly_the_same(
        tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch,
        allow_log_warnings: None) -> None:
    src = damaged_journal(tmp_path, seed)
    found = []
    for buffer in (jmod.SCAN_BUFFER, HEADER_SIZE, 100):
        monkeypatch.setattr(jmod, "SCAN_BUFFER", buffer)
        d = tmp_path / f"copy{buffer}"
        shutil.copytree(src, d)

        async def replay(d: Path = d) -> tuple[object, ...]:
            async with await Journal.open(d, force=True) as j:
                r = j.replay_report
                return (r.damaged, r.bytes_discarded, r.torn_tail, r.middle_damage, r.records,
                        j.pending(), j.next_seq)

        found.append(trio.run(replay))
    assert found[0] == found[1] == found[2]


@pytest.mark.slow
def test_index_costs_about_21_bytes_a_pending_record() -> None:
    index = jmod._Index()
    for s in range(1, 1_000_001):
        index.put(s, 3, 36 + 4096 * s, 4096)
    used = index.nbytes()
    print(f"index of 1 M pending records: {used / 1e6:.1f} bytes a record")
    assert index.count == 1_000_000
    assert used / 1e6 < 22
    for s in range(2, 1_000_001, 2):  # every other one completed: chunks shrink with them
        index.pop(s)
    assert index.nbytes() / 500_000 < 22
    assert index.get(777_777) == (3, 36 + 4096 * 777_777, 4096)
    assert len(index.pop_range(1, 999_000)) == 499_500
    assert list(index.seqs()) == list(range(999_001, 1_000_001, 2))


class SmallIndex(jmod._Index):
    SPLIT = 4
    MERGE = 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "pop", "range", "get"]),
                          st.integers(1, 60), st.integers(0, 8)), max_size=120))
def test_index_matches_a_dict(ops: list[tuple[str, int, int]]) -> None:
    index = SmallIndex()
    model: dict[int, tuple[int, int, int]] = {}
    for i, (op, seq, k) in enumerate(ops):
        if op == "put":
            assert index.put(seq, k, 36 + i, i) == (
                (model[seq][0], model[seq][2]) if seq in model else None)
            model[seq] = (k, 36 + i, i)
        elif op == "pop":
            old = model.pop(seq, None)
            assert index.pop(seq) == (None if old is None else (old[0], old[2]))
        elif op == "range":
            gone = sorted(s for s in model if seq <= s <= seq + k)
            assert index.pop_range(seq, seq + k) == [(model[s][0], model[s][2]) for s in gone]
            for s in gone:
                del model[s]
        else:
            assert index.get(seq) == model.get(seq)
        assert index.count == len(model)
        assert list(index.seqs()) == sorted(model)
        assert [(s, *rest) for s, *rest in index.items()] == [
            (s, *model[s]) for s in sorted(model)]


# --- giving space back (issue 14) ---------------------------------------------------------

async def test_everything_completed_gives_every_byte_back(tmp_path: Path) -> None:
    d = tmp_path / "j"
    async with await Journal.open(d) as j:  # one big segment, as in issue 14
        seqs = [await j.append(os.urandom(1 << 20)) for _ in range(8)]
        assert disk_usage(d) >= 8 << 20 and j.stats.bytes_on_disk == file_bytes(d)
        await j.complete(seqs[:4])
        assert disk_usage(d) >= 8 << 20  # still pending records in it
        await j.complete(seqs[4:])
        assert disk_usage(d) == 0
        assert j.stats.bytes_on_disk == 0 and j.stats.segments == 1
        again = await j.append(b"x")
        assert again > max(seqs)
        await j.complete([again])
        assert disk_usage(d) == 0
    async with await Journal.open(d, segment_size=64 << 10) as j:
        assert j.next_seq > again and not j.pending_seqs()
        seqs = [await j.append(os.urandom(10_000)) for _ in range(50)]
        assert len(segments(d)) > 5
        await j.complete(seqs[25:])
        await j.complete(seqs[:25])
        assert disk_usage(d) == 0 and len(segments(d)) == 1


async def test_open_gives_back_a_finished_journal(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "j"

    async def keep(self: Journal) -> bool:
        return False

    async with await Journal.open(d) as j:  # as the journal of an older version kept it
        seqs = [await j.append(os.urandom(100_000)) for _ in range(5)]
        monkeypatch.setattr(Journal, "_reclaim", keep)
        await j.complete(seqs)
    monkeypatch.undo()
    assert disk_usage(d) >= 500_000
    async with await Journal.open(d) as j:
        assert disk_usage(d) == 0 and j.stats.reclaimed_segments == 1
        assert j.next_seq > max(seqs)


# --- compaction ---------------------------------------------------------------------------

async def test_one_stuck_record_does_not_pin_the_journal(tmp_path: Path) -> None:
    d = tmp_path / "j"
    size = 64 << 10
    async with await Journal.open(d, segment_size=size) as j:
        stuck = await j.append(b"stuck" * 100)
        most = 0
        for _ in range(400):  # 1.6 MiB through 64 KiB segments
            s = await j.append(os.urandom(4096))
            await j.complete([s])
            most = max(most, file_bytes(d))
        print(f"one stuck record: at most {most >> 10} KiB on disk, "
              f"{j.stats.compactions} compactions, {j.stats.bytes_copied} bytes copied")
        assert most <= 4 * size
        assert j.stats.compactions >= 5
        assert j.stats.bytes_copied == j.stats.compactions * frame(500)
        assert list(j.pending_seqs()) == [stuck]
        assert await j.read(stuck) == b"stuck" * 100
    async with await Journal.open(d, segment_size=size) as j:
        assert j.replay_report.copies == 1
        assert j.pending() == [(stuck, b"stuck" * 100)]
        await j.complete([stuck])
        assert disk_usage(d) == 0


async def test_compact_moves_pending_records_under_their_seqs(tmp_path: Path) -> None:
    d = tmp_path / "j"
    recs = [payload(5, i) for i in range(12)]
    async with await Journal.open(d, segment_size=4096) as j:
        seqs = [await j.append(r) for r in recs]
        first = segments(d)[0]
        await j.complete(seqs[1:8])
        assert await j.compact() >= 1
        assert first not in segments(d)
        assert j.stats.compactions == 1
        assert list(j.pending_seqs()) == [seqs[0], *seqs[8:]]
        for s, r in zip(seqs, recs, strict=True):
            if s in (seqs[0], *seqs[8:]):
                assert await j.read(s) == r
        await j.complete([seqs[0]])
    async with await Journal.open(d, segment_size=4096) as j:
        assert j.pending() == list(zip(seqs[8:], recs[8:], strict=True))


async def test_crash_between_copy_and_delete_keeps_one_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, allow_log_warnings: None) -> None:
    d = tmp_path / "j"

    def no_unlink(paths: list[Path], dir_fd: int, fds: list[int]) -> tuple[int, int, None]:
        jmod._close_fds(fds)
        return 0, 0, None  # as if the process died before deleting

    async with await Journal.open(d, segment_size=4096) as j:
        seqs = [await j.append(payload(6, i)) for i in range(12)]
        await j.complete(seqs[1:])
        monkeypatch.setattr(jmod, "_unlink_sync", no_unlink)
        await j.compact()
        assert j.stats.compactions == 1
    monkeypatch.undo()
    both = sorted(d.iterdir())
    assert len(both) > 2
    saved = {p.name: p.read_bytes() for p in both}

    async with await Journal.open(d, segment_size=4096) as j:  # both copies on disk
        assert j.replay_report.copies == 1 and j.replay_report.damaged == []
        assert j.pending() == [(seqs[0], payload(6, 0))]
        assert len(segments(d)) == 1  # the old segments are deleted now
    for p in segments(d):
        p.unlink()
    for name, data in saved.items():
        (d / name).write_bytes(data)
    head = sorted(segments(d))[-1]
    os.truncate(head, head.stat().st_size - 3)  # the copy's group is torn
    async with await Journal.open(d, segment_size=4096) as j:
        assert j.replay_report.torn_tail and j.replay_report.copies == 0
        assert j.pending() == [(seqs[0], payload(6, 0))]


async def test_copy_above_its_segment_is_damage(tmp_path: Path,
                                                allow_log_warnings: None) -> None:
    d = tmp_path / "j"
    recs = await five_records(d)
    bogus = jmod._encode_group([(jmod.COPY, 100, b"x")], 100, 0)
    (d / f"seg-{100:020d}.wj").write_bytes(bogus)
    with pytest.raises(JournalCorruptError, match="out of place"):
        await Journal.open(d)
    async with await Journal.open(d, force=True) as j:
        assert j.pending() == recs


async def test_groups_never_pass_a_segment(tmp_path: Path) -> None:
    d = tmp_path / "j"
    async with await Journal.open(d, segment_size=10_000) as j:
        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(j.append, bytes([i]) * 900)
        assert j.stats.commits < 60  # still group commit
        assert all(p.stat().st_size <= 10_000 for p in segments(d))


async def test_a_large_completion_is_split(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jmod, "MAX_RANGES", 3)
    d = tmp_path / "j"
    async with await Journal.open(d) as j:
        seqs = await j.append_many([b"r"] * 20)
        await j.complete(seqs[::2])  # 10 ranges: 4 COMPLETE records
        assert file_bytes(d) == 20 * frame(1) + 4 * HEADER_SIZE + 10 * 16
    async with await Journal.open(d) as j:
        assert list(j.pending_seqs()) == seqs[1::2]


# --- the size cap ---------------------------------------------------------------------------

async def test_cap_makes_appends_wait_then_fail_with_enospc(tmp_path: Path) -> None:
    d = tmp_path / "j"
    cap = 64 << 10  # segment_size becomes 16 KiB
    async with await Journal.open(d, max_bytes=cap) as j:
        assert j.stats.max_bytes == cap
        seqs: list[int] = []
        with pytest.raises(OSError) as info:
            while True:
                seqs.append(await j.append(os.urandom(1000), deadline=trio.current_time()))
        assert info.value.errno == errno.ENOSPC and "max_bytes" in str(info.value)
        assert j.stats.space_refusals == 1
        used = file_bytes(d) + MARKER_COST * len(seqs)
        assert cap * 3 // 4 - frame(1000) - MARKER_COST < used <= cap * 3 // 4

        got: list[int] = []

        async def waiter() -> None:
            got.append(await j.append(os.urandom(5000)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert not got and j.stats.space_waits == 2
            await j.complete(seqs[:10])  # room only once compaction frees the first segment
        assert got and j.stats.compactions >= 1
        assert file_bytes(d) <= cap
        with pytest.raises(OSError, match="cannot fit"):
            await j.append(b"x" * (cap // 4))


async def test_cap_holds_under_a_stuck_record_and_concurrent_writers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "j"
    cap = 256 << 10
    peak = 0
    real = os.pwrite

    def measuring(fd: int, data: bytes, offset: int) -> int:
        nonlocal peak
        n = real(fd, data, offset)
        peak = max(peak, file_bytes(d))
        return n

    monkeypatch.setattr(os, "pwrite", measuring)
    async with await Journal.open(d, max_bytes=cap) as j:
        stuck = await j.append(b"old" * 1000)
        kept: dict[int, bytes] = {}
        rng = random.Random(14)

        async def writer(w: int) -> None:
            for i in range(150):
                data = payload(w, i)
                seq = await j.append(data, deadline=trio.current_time() + 30)
                if rng.random() < 0.97:
                    await j.complete([seq])
                else:
                    kept[seq] = data
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            for w in range(8):
                nursery.start_soon(writer, w)
        print(f"cap {cap >> 10} KiB: peak {peak >> 10} KiB, {j.stats.compactions} "
              f"compactions, {j.stats.space_waits} waits, {j.stats.bytes_copied} bytes copied")
        assert peak <= cap
        assert j.stats.compactions > 0
        assert j.pending() == sorted([(stuck, b"old" * 1000), *kept.items()])
        await j.complete([stuck, *kept])
        assert disk_usage(d) == 0


# --- a model checker: random appends, completions, compactions and crashes -------------------

Op = tuple[Any, ...]  # ("append", sizes), ("complete", picks), ...


class Crash(BaseException):
    """Simulated power loss at a system call (not an OSError: nothing may handle it)."""


class CrashOS:
    """Stands in for `os` inside journal.py, in one journal directory.

    It raises `Crash` at the chosen mutating call (a pwrite may first write a random part
    of its data) and at every one after it, and remembers what is durable: file bytes up
    to the last fdatasync/fsync of the file, directory entries up to the last fsync of a
    directory.  `power_loss` then does what a power cut may do to the rest: keep a random
    part of unsynced bytes (some zeroed or garbled), forget unsynced truncations,
    creations and unlinks (each independently), and `settle` starts over from the result.
    It also records the largest total size of the segment files after any write.
    """

    def __init__(self, directory: Path, rng: random.Random) -> None:
        self.dir = directory
        self.rng = rng
        self.countdown: int | None = None
        self.dead = False
        self.paths: dict[int, Path] = {}  # open fds
        self.synced: dict[str, int] = {}
        self.cut: dict[str, tuple[int, bytes]] = {}  # truncated below synced, not yet synced
        self.created: set[str] = set()  # not yet in a directory fsync
        self.unlinked: dict[str, bytes] = {}  # not yet in a directory fsync
        self.peak = 0
        self.crashes = 0
        self.settle()

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def settle(self) -> None:
        """After a restart: what is on disk now is durable."""
        self.synced = {p.name: p.stat().st_size for p in segments(self.dir)}
        self.cut.clear()
        self.created.clear()
        self.unlinked.clear()
        self.countdown = None
        self.dead = False

    def _tick(self) -> None:
        if self.dead:
            raise Crash
        if self.countdown is not None:
            if self.countdown <= 0:
                self.dead = True
                self.crashes += 1
                raise Crash
            self.countdown -= 1

    def open(self, path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        if flags & os.O_CREAT:
            self._tick()
        fd = os.open(path, flags, mode)
        self.paths[fd] = Path(path)
        if flags & os.O_CREAT:
            self.created.add(Path(path).name)
        return fd

    def close(self, fd: int) -> None:
        self.paths.pop(fd, None)
        os.close(fd)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        if not self.dead and self.countdown == 0 and len(data):
            os.pwrite(fd, bytes(data[:self.rng.randrange(len(data))]), offset)
        self._tick()
        n = os.pwrite(fd, data, offset)
        self.peak = max(self.peak, file_bytes(self.dir))
        return n

    def fdatasync(self, fd: int) -> None:
        self._tick()
        os.fdatasync(fd)
        self._synced(fd)

    def fsync(self, fd: int) -> None:
        self._tick()
        os.fsync(fd)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            self.created.clear()
            self.unlinked.clear()
        else:
            self._synced(fd)

    def _synced(self, fd: int) -> None:
        name = self.paths[fd].name
        self.synced[name] = os.fstat(fd).st_size
        self.cut.pop(name, None)

    def ftruncate(self, fd: int, length: int) -> None:
        self._tick()
        path = self.paths[fd]
        synced = self.synced.get(path.name, 0)
        if length < synced and path.name not in self.cut:
            self.cut[path.name] = (length, path.read_bytes()[length:synced])
        os.ftruncate(fd, length)

    def unlink(self, path: Path) -> None:
        self._tick()
        data = Path(path).read_bytes()
        os.unlink(path)
        self.unlinked[Path(path).name] = data

    def power_loss(self) -> None:
        """Close what the dead journal held open, then lose what a power cut may lose."""
        for fd in list(self.paths):
            self.close(fd)
        rng = self.rng
        for name, data in self.unlinked.items():
            if rng.random() < 0.5:
                (self.dir / name).write_bytes(data)
        for name in self.created:
            if (self.dir / name).exists() and rng.random() < 0.5:
                (self.dir / name).unlink()
        for p in segments(self.dir):
            data = p.read_bytes()
            if p.name in self.cut and rng.random() < 0.5:
                length, lost = self.cut[p.name]
                data = data[:length] + lost
            synced = self.synced.get(p.name, 0)
            if len(data) > synced:
                tail = bytearray(data[synced:rng.randint(synced, len(data))])
                if tail and rng.random() < 0.5:
                    a = rng.randrange(len(tail))
                    b = rng.randint(a, len(tail))
                    tail[a:b] = bytes(b - a) if rng.random() < 0.5 else rng.randbytes(b - a)
                data = data[:synced] + bytes(tail)
            p.write_bytes(data)
        self.settle()


def model_payload(ident: int, size: int) -> bytes:
    return ident.to_bytes(8, "big") + random.Random(ident).randbytes(size)


class JournalModel:
    """What must survive: appends acknowledged (and not being completed) must be pending
    with their bytes; completions acknowledged must never come back; anything in doubt
    (an append or completion that did not return) may go either way, with its own bytes."""

    def __init__(self, directory: Path, rng: random.Random, segment_size: int,
                 cap: int | None) -> None:
        self.dir = directory
        self.fs = CrashOS(directory, rng)
        self.segment_size = segment_size
        self.cap = cap
        self.acked: dict[int, bytes] = {}
        self.doubtful: dict[int, bytes] = {}  # completion begun, not returned
        self.unknown: dict[bytes, bytes] = {}  # ident -> payload of appends that raised
        self.done: set[int] = set()
        self.max_seq = 0
        self.idents = iter(range(1, 10**9))
        self.journal: Journal | None = None

    async def open(self) -> None:
        while True:
            try:
                self.journal = await Journal.open(self.dir, segment_size=self.segment_size,
                                                  max_bytes=self.cap)
                break
            except Crash:
                self.fs.power_loss()
        self.check_replay(self.journal)

    def check_replay(self, j: Journal) -> None:
        pending = dict(j.pending())
        assert j.replay_report.pending == len(pending)
        for seq, data in self.acked.items():
            assert pending.get(seq) == data, f"acknowledged append {seq} lost"
        assert not self.done & pending.keys(), "a completed record came back"
        known = self.acked | self.doubtful
        for seq, data in pending.items():
            if seq in known:
                assert data == known[seq]
            else:
                assert self.unknown.pop(data[:8]) == data, f"record {seq} was never appended"
        assert j.next_seq > max([self.max_seq, *pending])
        self.done |= self.doubtful.keys() - pending.keys()
        self.acked = pending
        self.doubtful.clear()
        self.unknown.clear()

    def check(self) -> None:
        j = self.journal
        assert j is not None
        files = segments(self.dir)
        assert j.stats.segments == len(files)
        assert j.stats.bytes_on_disk == file_bytes(self.dir)
        assert sorted(j.pending_seqs()) == sorted(self.acked)
        assert j.stats.records_pending == len(self.acked)
        assert j.stats.bytes_pending == sum(map(len, self.acked.values()))
        for seq, data in self.acked.items():
            assert j.read_sync(seq) == data
        if self.cap is not None:
            assert self.fs.peak <= self.cap

    async def append(self, sizes: list[int]) -> None:
        assert self.journal is not None
        records = [model_payload(next(self.idents), n) for n in sizes]
        deadline = trio.current_time() if self.cap is not None else None
        try:
            seqs = await self.journal.append_many(records, deadline=deadline)
        except OSError as err:
            assert err.errno == errno.ENOSPC and self.cap is not None
            return
        except (Crash, JournalError):  # JournalError: disabled by a crash in another call
            assert self.fs.dead
            self.unknown.update((r[:8], r) for r in records)
            raise
        self.acked.update(zip(seqs, records, strict=True))
        self.max_seq = max(self.max_seq, *seqs)

    async def complete(self, seqs: list[int]) -> None:
        assert self.journal is not None
        for s in seqs:
            self.doubtful[s] = self.acked.pop(s)
        await self.journal.complete(seqs)
        for s in seqs:
            del self.doubtful[s]
            self.done.add(s)

    async def step(self, op: Op) -> None:
        j = self.journal
        assert j is not None
        kind = op[0]
        if kind == "append":
            await self.append(op[1])
        elif kind == "complete":
            acked = sorted(self.acked)
            picks = {acked[i % len(acked)] for i in op[1]} if acked else set()
            await self.complete(sorted(picks))
        elif kind == "complete_all":
            await self.complete(sorted(self.acked))
            assert file_bytes(self.dir) == 0 and disk_usage(self.dir) == 0
        elif kind == "compact":
            await j.compact()
        elif kind == "burst":
            await self.burst(op[1], op[2])
        elif kind == "churn":  # garbage behind old records: compaction and the cap at work
            rng = random.Random(op[2])
            for _ in range(op[1]):
                await self.append([rng.choice([10, 300, 1200, 2500])])
                if self.acked and rng.random() < 0.8:
                    await self.complete([rng.choice(sorted(self.acked))])
        elif kind == "reopen":
            await j.close()
            await self.open()
        elif kind == "crash_at":
            self.fs.countdown = op[1]
        elif kind == "power_cut":
            raise Crash

    async def burst(self, sizes: list[int], k: int) -> None:
        crashed = False

        async def run(coro: Awaitable[None]) -> None:
            nonlocal crashed
            try:
                await coro
            except (Crash, JournalError):
                assert self.fs.dead
                crashed = True

        done = sorted(self.acked)[:k]
        async with trio.open_nursery() as nursery:
            for n in sizes:
                nursery.start_soon(run, self.append([n]))
            if done:
                nursery.start_soon(run, self.complete(done))
        if crashed:
            raise Crash

    async def run(self, ops: list[Op]) -> None:
        saved = jmod.os
        jmod.os = self.fs  # type: ignore[assignment]
        try:
            await self.open()
            for op in ops:
                try:
                    await self.step(op)
                except (Crash, JournalError):
                    assert self.fs.dead or op[0] == "power_cut"
                    self.fs.power_loss()
                    await self.open()
                self.check()
            assert self.journal is not None
            await self.journal.close()
        finally:
            jmod.os = saved


sizes = st.integers(0, 2500)
appends = st.tuples(st.just("append"), st.lists(sizes, min_size=1, max_size=3))
completes = st.tuples(st.just("complete"), st.lists(st.integers(0, 1000), min_size=1, max_size=6))
ops = st.one_of(
    appends, appends, appends, completes, completes,
    st.tuples(st.just("burst"), st.lists(sizes, min_size=2, max_size=6), st.integers(0, 4)),
    st.tuples(st.just("churn"), st.integers(1, 60), st.integers(0, 2**32)),
    st.just(("complete_all",)),
    st.just(("compact",)),
    st.just(("reopen",)),
    st.tuples(st.just("crash_at"), st.integers(0, 14)),
    st.just(("power_cut",)),
)
SHM = Path("/dev/shm")
runs = iter(range(10**9))


def run_model(tmp_path: Path, program: list[Op], cap: int | None,
              segment_size: int, seed: int) -> JournalModel:
    base = SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else tmp_path
    d = base / f"wancache-journal-model-{os.getpid()}-{next(runs)}"
    try:
        model = JournalModel(d, random.Random(seed), segment_size, cap)
        trio.run(model.run, program)
        return model
    finally:
        shutil.rmtree(d, ignore_errors=True)


MODEL = settings(max_examples=150, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])


@pytest.mark.slow
@MODEL
@given(program=st.lists(ops, max_size=40), cap=st.sampled_from([None, 16 << 10, 48 << 10]),
       segment_size=st.sampled_from([1500, 4096]), seed=st.integers(0, 2**32))
def test_model_random_appends_completions_compactions_and_crashes(
        tmp_path: Path, program: list[Op], cap: int | None,
        segment_size: int, seed: int, allow_log_warnings: None) -> None:
    run_model(tmp_path, program, cap, segment_size, seed)


@pytest.mark.long
@pytest.mark.timeout(3600)
@settings(MODEL, max_examples=3000)
@given(program=st.lists(ops, max_size=120), cap=st.sampled_from([None, 16 << 10, 48 << 10]),
       segment_size=st.sampled_from([1500, 4096, 16384]), seed=st.integers(0, 2**32))
def test_model_long(tmp_path: Path, program: list[Op], cap: int | None,
                    segment_size: int, seed: int, allow_log_warnings: None) -> None:
    run_model(tmp_path, program, cap, segment_size, seed)


def test_model_crashes_inside_compaction_and_give_back(tmp_path: Path,
                                                       allow_log_warnings: None) -> None:
    """Every crash point of one compaction and one give-back, deterministically."""
    for point in range(40):
        program: list[Op] = [
            ("append", [300, 300]), ("append", [900]), ("append", [1200]), ("append", [700]),
            ("append", [1400]), ("complete", [1, 2, 3, 4]), ("crash_at", point),
            ("compact",), ("append", [100]), ("complete_all",), ("append", [5])]
        model = run_model(tmp_path, program, None, 1500, point)
        if not model.fs.crashes:
            break
    assert point > 5, "the program ran out of crash points too early"
