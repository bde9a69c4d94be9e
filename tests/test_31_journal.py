"""The write-back journal: durability, group commit, replay checking, reclaiming, ENOSPC."""

from __future__ import annotations

import errno
import inspect
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from wancache.cache import journal as jmod
from wancache.cache.journal import HEADER_SIZE, Journal, JournalCorruptError, JournalError

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
    assert len(segments(d)) == 1  # the newest segment is always kept
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
