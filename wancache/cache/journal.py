"""The durable, append-only operation journal (write-ahead log) of the write-back layer.

The write-back layer serializes each operation (CREATE, WRITE with its data, RENAME, ...)
into an opaque record and `append`s it; the application is answered only once the
record is on disk.  When the operation has reached the server, `complete` marks it
done.  After a crash, `Journal.open` finds what was appended and not completed
(`pending()`), which is what the restart must replay.

On-disk format
--------------
The directory holds segment files ``seg-<first seq, 20 digits>.wj`` (mode 0600).  A
segment is a run of records, each a 36-byte little-endian header and a payload::

    magic   4s   b"\\xa7WJ1"
    type    u8   1 = DATA (payload: one record of the caller), 2 = COMPLETE
                 (payload: (first, last) u64 pairs, inclusive seq ranges now done)
    flags   u8   bit 0: last record of its commit group
    -       u16  zero
    seq     u64  the record's sequence number (0 for COMPLETE)
    group   u64  offset in the segment of the first record of its commit group
    length  u32  payload length
    check   u64  xxh3_64 of the 28 header bytes above plus the payload, seeded with
                 the segment's first seq and the record's offset, so a record only
                 checks out at its own place (never a copy of a record inside some
                 payload, or a record copied from another segment)

Durability and group commit
---------------------------
`append` returns only after the record was written (``os.pwrite``) and the segment
``os.fdatasync``-ed; when a group starts a new segment, the new file's directory entry is
fsync-ed first.  Callers queue their records into the *filling* group; one caller at a
time (the leader) takes the whole filling group and writes it with one ``pwrite`` and
one ``fdatasync`` in a worker thread; whoever arrives meanwhile queues into the next
group, which the first of them to wake writes next.  So N concurrent appends cost a
handful of fdatasyncs, not N.  The waits are shielded from cancellation: an append either
returns its seq or raises, so a durable record is never orphaned by a cancelled caller.

Two sequences must stay free of ``await`` (trio switches tasks only at an ``await``):

* assigning seqs and queueing the records into the filling group (`append_many`,
  `complete`), so seqs reach the file in increasing order and a group never misses
  part of an `append_many`;
* taking the filling group and marking a flush as running (`_flush`), and, after the
  worker thread returns, applying its outcome to the in-memory state (`_write_group`).

Reclaiming space
----------------
A segment file is deleted once every DATA record in it is completed *and* every older
segment is already deleted; it is never the last (newest) segment.  Deletion is strictly
oldest-first, with a directory fsync after each unlink, because the COMPLETE markers of a
segment's records may live in any later segment: if a later segment were deleted first
(or its unlink became durable first) while an older one survived, the older one's records
would lose their markers and be replayed on the next start, re-applying stale operations
over newer data.  Deleting oldest-first means every record a deleted segment's markers
complete has already gone with an older (or the same) segment.

Replay checking
---------------
`open` verifies every record.  A group is written only after the previous one was
fdatasync-ed, so at a crash only the *last commit group of the last segment* can be torn
(half written, zero filled, or missing its end marker).  Damage confined to that group is
a torn tail: the whole group is truncated away (so an `append_many` is all or nothing),
reported in `ReplayReport.damaged` and logged at WARNING.  None of its appends had
returned (unless the disk rotted the very last group after it was synced: then it is
still reported, never silently dropped).

Any other damage (a bad record followed by a later commit group, damage in an older
segment, a segment ending mid-group) means acknowledged data is gone, and replaying
around the hole could apply later operations without earlier ones, or re-apply completed
ones whose COMPLETE marker was lost.  So `open` refuses with `JournalCorruptError`,
listing file, offsets, reason and the seqs that may be lost.  With ``force=True`` it
resyncs on the next record that checks out, keeps every intact record, reports the
damaged ranges, and never appends to a damaged segment again; the damage is reported (and
needs ``force``) on every open until the segment is reclaimed.  Seqs continue after the
highest seen, torn tails included.

Errors
------
A failed write or fdatasync (ENOSPC, EIO) cuts the segment back to the end of the last
durable group and fdatasyncs it, then fails every caller of that group with an
``OSError`` of the same errno; none of them is durable and the journal stays usable.  If
that cutting back fails too, the journal is disabled (`JournalError`) and the next
`open` treats the leftover as a torn tail.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio
import xxhash

log = logging.getLogger(__name__)

MAGIC = b"\xa7WJ1"
DATA = 1
COMPLETE = 2
FLAG_END_OF_GROUP = 0x01
_PREFIX = struct.Struct("<4sBBHQQI")  # header up to (not including) the checksum
_CHECK = struct.Struct("<Q")
HEADER_SIZE = _PREFIX.size + _CHECK.size
_RANGE = struct.Struct("<QQ")
MAX_RECORD = 0xFFFF_FFFF
# Groups of up to INLINE_BYTES are written (and fdatasync-ed) on the trio thread
# while the disk's recent fdatasync time stays under INLINE_SYNC: for a sequential
# writer (tar) that is cheaper than a worker-thread round trip; a slow disk goes
# back to the worker thread so it never stalls the event loop for long.
INLINE_BYTES = 256 << 10
INLINE_SYNC = 0.001
_SEGMENT_RE = re.compile(r"seg-(\d{1,20})\.wj")
_MASK64 = (1 << 64) - 1

_Item = tuple[int, int, bytes]  # (type, seq, payload) of one record to write


class JournalError(Exception):
    """The journal cannot be used: closed, in use by another process, or disabled."""


class JournalCorruptError(JournalError):
    """`open` found damage other than a torn tail; `damaged` describes each place."""

    def __init__(self, message: str, damaged: list[str]) -> None:
        super().__init__(message)
        self.damaged = damaged


@dataclass
class ReplayReport:
    """What `Journal.open` found."""

    segments: int = 0  # segment files read
    records: int = 0  # intact records read and kept (DATA and COMPLETE)
    pending: int = 0  # DATA records not completed: pending() right after open
    damaged: list[str] = field(default_factory=list)  # "file offset: reason; consequence"
    bytes_discarded: int = 0  # torn tails truncated plus damaged ranges skipped
    torn_tail: bool = False
    middle_damage: bool = False  # only with force=True (else open raises)


@dataclass
class JournalStats:
    """Counters of one open journal (updated in place)."""

    records_pending: int = 0
    bytes_pending: int = 0  # payload bytes of the pending records
    segments: int = 0
    fsyncs: int = 0  # fdatasync and fsync calls, directory fsyncs included
    appends: int = 0  # DATA records made durable
    commits: int = 0  # groups written, each with one pwrite and one fdatasync
    bytes_written: int = 0
    reclaimed_segments: int = 0


@dataclass(eq=False)
class _Segment:
    first_seq: int
    path: Path
    size: int  # bytes of durable records
    live: int = 0  # DATA records in it not yet completed


class _Group:
    """Records queued for one write + fdatasync, and the outcome for their callers."""

    __slots__ = ("completed", "done", "error", "items")

    def __init__(self) -> None:
        self.items: list[_Item] = []
        self.completed: list[int] = []  # seqs the COMPLETE items of this group complete
        self.done = False
        self.error: BaseException | None = None


@dataclass
class _WritePlan:
    """One group write, prepared on the trio side and carried out in a worker thread."""

    items: list[_Item]
    path: Path
    first_seq: int
    offset: int
    fd: int  # -1: create `path` first
    dir_fd: int
    close_fd: int = -1  # the previous segment's fd, closed once the new one exists
    created_fd: int = -1
    nbytes: int = 0
    fsyncs: int = 0
    recovery_error: OSError | None = None


@dataclass(slots=True)
class _Rec:
    offset: int
    end: int
    rtype: int
    flags: int
    seq: int
    group: int
    payload: bytes


@dataclass(slots=True)
class _Damage:
    start: int
    end: int
    reason: str


@dataclass
class _Hole:
    """Middle damage found by `_load`: where, and the DATA seqs around it."""

    where: str
    before: int  # last DATA seq before it; -1: nothing can be lost (a skipped record)
    after: int | None = None


@dataclass
class _Loaded:
    segments: list[_Segment]
    records: dict[int, tuple[bytes, _Segment]]
    next_seq: int
    active_fd: int
    report: ReplayReport
    fsyncs: int
    reclaimed: int


# --- encoding and decoding (pure) ---------------------------------------------------

def _seed(first_seq: int, offset: int) -> int:
    return (first_seq * 0x9E3779B97F4A7C15 + offset) & _MASK64


def _encode_group(items: list[_Item], first_seq: int, start: int) -> bytes:
    """The frames of one commit group written at `start` of segment `first_seq`."""
    parts: list[bytes] = []
    offset = start
    last = len(items) - 1
    for i, (rtype, seq, payload) in enumerate(items):
        flags = FLAG_END_OF_GROUP if i == last else 0
        head = _PREFIX.pack(MAGIC, rtype, flags, 0, seq, start, len(payload))
        check = xxhash.xxh3_64(head, seed=_seed(first_seq, offset))
        check.update(payload)
        parts += (head, _CHECK.pack(check.intdigest()), payload)
        offset += HEADER_SIZE + len(payload)
    return b"".join(parts)


def _encode_ranges(seqs: list[int]) -> bytes:
    """COMPLETE payload for sorted, distinct `seqs`."""
    out = bytearray()
    start = prev = seqs[0]
    for s in seqs[1:]:
        if s != prev + 1:
            out += _RANGE.pack(start, prev)
            start = s
        prev = s
    out += _RANGE.pack(start, prev)
    return bytes(out)


def _decode_ranges(payload: bytes) -> list[tuple[int, int]]:
    return [_RANGE.unpack_from(payload, i) for i in range(0, len(payload), _RANGE.size)]


def _parse_at(data: bytes, offset: int, first_seq: int) -> _Rec | str:
    """The record at `offset` of segment `first_seq`, or why there is none."""
    if offset + HEADER_SIZE > len(data):
        return "truncated record header"
    magic, rtype, flags, _zero, seq, group, length = _PREFIX.unpack_from(data, offset)
    if magic != MAGIC:
        return "bad magic"
    end = offset + HEADER_SIZE + length
    if end > len(data):
        return "record runs past the end of the file"
    view = memoryview(data)
    check = xxhash.xxh3_64(view[offset:offset + _PREFIX.size], seed=_seed(first_seq, offset))
    check.update(view[offset + HEADER_SIZE:end])
    if check.intdigest() != _CHECK.unpack_from(data, offset + _PREFIX.size)[0]:
        return "checksum mismatch"
    if rtype not in (DATA, COMPLETE) or group > offset or (
            rtype == COMPLETE and length % _RANGE.size):
        return "malformed record"
    return _Rec(offset, end, rtype, flags, seq, group, data[offset + HEADER_SIZE:end])


def _scan_segment(data: bytes, first_seq: int) -> tuple[list[_Rec], list[_Damage]]:
    """All intact records of a segment, and the damaged ranges between them.

    After a bad record the scan resyncs on the next magic where a record checks out.
    """
    recs: list[_Rec] = []
    damage: list[_Damage] = []
    offset = 0
    while offset < len(data):
        got = _parse_at(data, offset, first_seq)
        if isinstance(got, _Rec):
            recs.append(got)
            offset = got.end
            continue
        nxt = offset
        while True:
            nxt = data.find(MAGIC, nxt + 1)
            if nxt < 0 or isinstance(_parse_at(data, nxt, first_seq), _Rec):
                break
        end = len(data) if nxt < 0 else nxt
        damage.append(_Damage(offset, end, got))
        offset = end
    return recs, damage


def _tail_start(recs: list[_Rec], damage: list[_Damage], size: int) -> int:
    """Where the torn last commit group of the last segment starts (`size`: none is torn)."""
    if not recs:
        return 0
    last = recs[-1]
    if not last.flags & FLAG_END_OF_GROUP:
        return last.group  # the group never got its end marker
    if last.end < size:
        return last.end  # an unreadable group after the last complete one
    if any(d.start >= last.group for d in damage):
        return last.group  # the last group is damaged inside
    return size


# --- blocking work, run in worker threads ----------------------------------------------

def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        offset += n
        view = view[n:]


def _write_sync(plan: _WritePlan) -> None:
    """Write one group and fdatasync it; on failure cut the segment back to `plan.offset`."""
    fd = plan.fd
    if fd < 0:
        fd = os.open(plan.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            plan.fsyncs += 1
            os.fsync(plan.dir_fd)  # the new name is durable before any record in it is
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(plan.path)
            raise
        plan.created_fd = fd
        if plan.close_fd >= 0:
            os.close(plan.close_fd)
    data = _encode_group(plan.items, plan.first_seq, plan.offset)
    try:
        _pwrite_all(fd, data, plan.offset)
        plan.fsyncs += 1
        os.fdatasync(fd)
    except OSError:
        # Never leave part of a group behind a later one: cut back to the last good end.
        try:
            os.ftruncate(fd, plan.offset)
            plan.fsyncs += 1
            os.fdatasync(fd)
        except OSError as err:
            plan.recovery_error = err
        raise
    plan.nbytes = len(data)


def _unlink_sync(paths: list[Path], dir_fd: int) -> tuple[int, int, OSError | None]:
    """Delete `paths` in order, each durably before the next: (deleted, fsyncs, error)."""
    done = fsyncs = 0
    for path in paths:
        try:
            os.unlink(path)
            done += 1
            fsyncs += 1
            os.fsync(dir_fd)
        except OSError as err:
            return done, fsyncs, err
    return done, fsyncs, None


def _open_dir(directory: Path) -> int:
    """Create `directory` (0700) if needed, open it and lock it against a second journal."""
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True)
        parent = os.open(directory.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(parent)
        finally:
            os.close(parent)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(dir_fd)
        raise JournalError(f"journal {directory} is in use by another Journal") from None
    return dir_fd


def _lost_text(before: int, after: int | None) -> str:
    if before < 0:
        return "its content is ignored"
    if after is None:
        return f"DATA records after seq {before} may be lost"
    if after > before + 1:
        return f"DATA records {before + 1}..{after - 1} may be lost"
    return "no DATA seq is missing, but a COMPLETE marker may be (completed records may replay)"


def _load(directory: Path, dir_fd: int, force: bool) -> _Loaded:
    """Read and check every segment, truncate a torn tail, reclaim finished segments."""
    names = sorted((int(m[1]), name) for name in os.listdir(directory)
                   if (m := _SEGMENT_RE.fullmatch(name)))
    report = ReplayReport(segments=len(names))
    segments: list[_Segment] = []
    records: dict[int, tuple[bytes, _Segment]] = {}
    max_seq = max((first for first, _ in names), default=0)
    last_data = 0
    middle: list[_Hole] = []
    waiting: list[_Hole] = []  # holes whose next DATA seq is not known yet
    truncate: tuple[Path, int] | None = None
    damaged_last = False

    for idx, (first, name) in enumerate(names):
        path = directory / name
        data = path.read_bytes()
        recs, damage = _scan_segment(data, first)
        is_last = idx == len(names) - 1
        cut = _tail_start(recs, damage, len(data)) if is_last else len(data)
        seg = _Segment(first, path, cut)
        segments.append(seg)
        for rec in recs:
            if rec.rtype == DATA:
                max_seq = max(max_seq, rec.seq)
            else:
                max_seq = max([max_seq, *(b for _, b in _decode_ranges(rec.payload))])
        bad = [_Damage(d.start, min(d.end, cut), d.reason) for d in damage if d.start < cut]
        if not is_last and recs and recs[-1].end == len(data) and not (
                recs[-1].flags & FLAG_END_OF_GROUP):
            bad.append(_Damage(len(data), len(data), "segment ends inside a commit group"))
        damaged_last = is_last and bool(bad)
        if cut < len(data):
            why = next((d.reason for d in damage if d.end > cut), "commit group has no end")
            report.torn_tail = True
            report.bytes_discarded += len(data) - cut
            report.damaged.append(
                f"{name} offset {cut}: torn tail ({why}), {len(data) - cut} bytes truncated")
            truncate = (path, cut)

        events: list[tuple[int, _Rec | _Damage]] = [(r.offset, r) for r in recs if r.end <= cut]
        events += [(d.start, d) for d in bad]
        events.sort(key=lambda e: e[0])
        for _, ev in events:
            if isinstance(ev, _Damage):
                report.middle_damage = True
                report.bytes_discarded += ev.end - ev.start
                hole = _Hole(f"{name} offset {ev.start}-{ev.end}: {ev.reason}", last_data)
                middle.append(hole)
                waiting.append(hole)
                continue
            report.records += 1
            if ev.rtype == COMPLETE:
                for a, b in _decode_ranges(ev.payload):
                    hits = (range(a, b + 1) if b - a < len(records)
                            else [s for s in records if a <= s <= b])
                    for s in hits:
                        done = records.pop(s, None)
                        if done is not None:
                            done[1].live -= 1
                continue
            if ev.seq <= last_data:
                report.records -= 1
                report.middle_damage = True
                middle.append(_Hole(f"{name} offset {ev.offset}: DATA seq {ev.seq} out of "
                                    f"order (after {last_data})", -1))
                continue
            for hole in waiting:
                hole.after = ev.seq
            waiting.clear()
            last_data = ev.seq
            records[ev.seq] = (ev.payload, seg)
            seg.live += 1

    middle_text = [f"{h.where}; {_lost_text(h.before, h.after)}" for h in middle]
    if middle_text and not force:
        raise JournalCorruptError(
            f"journal {directory} is damaged (not just a torn tail): " + "; ".join(middle_text)
            + ". Open with force=True to keep the intact records and skip the damage.",
            middle_text)
    report.damaged[:0] = middle_text
    fsyncs = 0
    if truncate is not None:
        fd = os.open(truncate[0], os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, truncate[1])
            fsyncs += 1
            os.fdatasync(fd)
        finally:
            os.close(fd)

    victims: list[Path] = []
    for seg in segments[:-1]:
        if seg.live:
            break
        victims.append(seg.path)
    reclaimed, n, err = _unlink_sync(victims, dir_fd)
    fsyncs += n
    if err is not None:
        log.warning("journal %s: could not delete finished segment: %s", directory, err)
    segments = segments[reclaimed:]

    active_fd = -1
    if segments and not (force and damaged_last):
        active_fd = os.open(segments[-1].path, os.O_WRONLY | os.O_CLOEXEC)
    report.pending = len(records)
    return _Loaded(segments, records, max_seq + 1, active_fd, report, fsyncs, reclaimed)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _caller_error(err: BaseException) -> BaseException:
    """A fresh exception for one caller of a failed group (each caller raises its own)."""
    if isinstance(err, OSError):
        return OSError(err.errno, f"journal write failed: {err.strerror or err}")
    return JournalError(str(err))


# --- the journal ---------------------------------------------------------------------

class Journal:
    """Durable append-only journal of opaque records in one directory (see module doc)."""

    replay_report: ReplayReport
    stats: JournalStats

    def __init__(self, directory: Path, dir_fd: int, loaded: _Loaded, *, segment_size: int,
                 limiter: trio.CapacityLimiter | None) -> None:
        """Use `Journal.open`."""
        self.directory = directory
        self._dir_fd = dir_fd
        self._segment_size = segment_size
        self._limiter = limiter
        self._sync_seconds = INLINE_SYNC     # recent write+fdatasync time (moving average)
        self._segments = loaded.segments
        self._records = loaded.records
        self._next_seq = loaded.next_seq
        self._active_fd = loaded.active_fd  # fd of self._segments[-1], or -1: start a new one
        self._inflight: set[int] = set()  # seqs queued or being written
        self._filling = _Group()
        self._flushing = False
        self._flush_done = trio.Event()
        self._closing = False
        self._closed = False
        self._broken: JournalError | None = None
        self.replay_report = loaded.report
        self.stats = JournalStats(
            records_pending=len(self._records),
            bytes_pending=sum(len(rec) for rec, _ in self._records.values()),
            segments=len(self._segments), fsyncs=loaded.fsyncs,
            reclaimed_segments=loaded.reclaimed)

    @classmethod
    async def open(cls, directory: Path, *, segment_size: int = 64 << 20,
                   limiter: trio.CapacityLimiter | None = None,
                   force: bool = False) -> Journal:
        """Open (creating it 0700 if needed) the journal in `directory` and replay-check it.

        Raises `JournalCorruptError` for damage other than a torn tail unless `force`.
        """
        if segment_size <= 0:
            raise ValueError("segment_size must be positive")
        directory = Path(directory)
        dir_fd = await trio.to_thread.run_sync(_open_dir, directory, limiter=limiter)
        try:
            loaded = await trio.to_thread.run_sync(_load, directory, dir_fd, force,
                                                   limiter=limiter)
        except BaseException:
            os.close(dir_fd)
            raise
        for line in loaded.report.damaged:
            log.warning("journal %s: %s", directory, line)
        return cls(directory, dir_fd, loaded, segment_size=segment_size, limiter=limiter)

    async def __aenter__(self) -> Journal:
        """The journal itself; `close` on exit."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the journal."""
        await self.close()

    @property
    def next_seq(self) -> int:
        """The seq the next appended record will get."""
        return self._next_seq

    def pending(self) -> list[tuple[int, bytes]]:
        """(seq, record) of every durable record whose completion is not durable, in order.

        The records are the caller's own bytes objects (or those read by `open`), not copies.
        """
        return [(seq, rec) for seq, (rec, _seg) in self._records.items()]

    def pending_items(self) -> list[tuple[int, int]]:
        """(seq, length) of every pending record, in order."""
        return [(seq, len(rec)) for seq, (rec, _seg) in self._records.items()]

    def read_sync(self, seq: int, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` of pending record `seq`."""
        found = self._records.get(seq)
        if found is None:
            raise JournalError(f"journal record {seq} is not pending")
        return bytes(found[0][offset:offset + length])

    async def read(self, seq: int, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` of pending record `seq`."""
        await trio.lowlevel.checkpoint()
        return self.read_sync(seq, offset, length)

    async def append(self, record: bytes) -> int:
        """Append `record`; return its seq once it is durable."""
        return (await self.append_many([record]))[0]

    async def append_many(self, records: Sequence[bytes]) -> list[int]:
        """Append `records` in one commit group: all durable, or none after a crash."""
        self._check_usable()
        payloads = [bytes(r) for r in records]
        if any(len(p) > MAX_RECORD for p in payloads):
            raise ValueError(f"journal records are limited to {MAX_RECORD} bytes")
        if not payloads:
            await trio.lowlevel.checkpoint()
            return []
        # No await from here until queued: seqs are assigned in the order records reach
        # the file, and the whole batch lands in one group.
        first = self._next_seq
        seqs = list(range(first, first + len(payloads)))
        self._next_seq += len(payloads)
        group = self._filling
        group.items += [(DATA, seq, p) for seq, p in zip(seqs, payloads, strict=True)]
        self._inflight.update(seqs)
        await self._commit(group)
        return seqs

    async def complete(self, seqs: Iterable[int]) -> None:
        """Mark records done (they reached the server); returns once that is durable.

        Seqs already completed, or whose append failed, are ignored.
        """
        self._check_usable()
        wanted = set(seqs)
        bad = [s for s in wanted if not 0 < s < self._next_seq]
        if bad:
            raise ValueError(f"never appended: seq {min(bad)}")
        todo = sorted(s for s in wanted if s in self._records or s in self._inflight)
        if not todo:
            await trio.lowlevel.checkpoint()
            return
        # No await until queued (as in append_many).
        group = self._filling
        group.items.append((COMPLETE, 0, _encode_ranges(todo)))
        group.completed += todo
        await self._commit(group)

    async def close(self) -> None:
        """Write the outstanding group, then close the files (idempotent)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closing = True
        with trio.CancelScope(shield=True):
            while self._flushing or self._filling.items:
                if self._flushing:
                    await self._flush_done.wait()
                else:
                    await self._flush()
            if self._closed:
                return
            self._closed = True
            fds = [fd for fd in (self._active_fd, self._dir_fd) if fd >= 0]
            self._active_fd = self._dir_fd = -1
            await trio.to_thread.run_sync(_close_fds, fds, limiter=self._limiter)

    # --- group commit ---------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closing:
            raise JournalError(f"journal {self.directory} is closed")
        if self._broken is not None:
            raise JournalError(str(self._broken))

    async def _commit(self, group: _Group) -> None:
        """Wait until `group` is written, leading the write if no one else is writing."""
        with trio.CancelScope(shield=True):
            while not group.done:
                if self._flushing:
                    await self._flush_done.wait()
                else:
                    await self._flush()
        if group.error is not None:
            raise _caller_error(group.error) from group.error

    async def _flush(self) -> None:
        """Write the filling group (as the only writer), then reclaim finished segments."""
        # No await between taking the group and raising the flag.
        group, self._filling = self._filling, _Group()
        self._flushing = True
        try:
            if group.items:
                await self._write_group(group)
                await self._reclaim()
        finally:
            self._flushing = False
            done, self._flush_done = self._flush_done, trio.Event()
            done.set()

    def _plan(self, group: _Group) -> _WritePlan:
        """Where `group` goes: the active segment, or a new one once that one is full."""
        size = sum(HEADER_SIZE + len(p) for _, _, p in group.items)
        name = next((seq for t, seq, _ in group.items if t == DATA), self._next_seq)
        if self._active_fd >= 0:
            active = self._segments[-1]
            # Segment names are first seqs, so roll only once a new seq exists.
            full = active.size > 0 and active.size + size > self._segment_size
            if not (full and name > active.first_seq):
                return _WritePlan(group.items, active.path, active.first_seq, active.size,
                                  self._active_fd, self._dir_fd)
        return _WritePlan(group.items, self.directory / f"seg-{name:020d}.wj", name, 0, -1,
                          self._dir_fd, close_fd=self._active_fd)

    async def _write_group(self, group: _Group) -> None:
        """Write `group` in a worker thread and settle its outcome for its callers."""
        if self._broken is not None:
            self._settle(group, None, self._broken)
            return
        plan = self._plan(group)
        started = time.perf_counter()
        try:
            if plan.fd >= 0 and self._sync_seconds < INLINE_SYNC and \
                    sum(len(p) for _, _, p in plan.items) <= INLINE_BYTES:
                # A small group on a fast disk: writing it here costs less than the
                # hop to a worker thread and back (see INLINE_SYNC).
                _write_sync(plan)
                await trio.lowlevel.checkpoint()
            else:
                await trio.to_thread.run_sync(_write_sync, plan, limiter=self._limiter)
        except OSError as err:
            # No await from here on: the in-memory state follows what the thread did.
            self.stats.fsyncs += plan.fsyncs
            seg = self._install(plan)
            if plan.recovery_error is not None:
                self._broken = JournalError(
                    f"journal {self.directory} disabled: writing {plan.path.name} failed "
                    f"({err}) and cutting it back to {plan.offset} failed "
                    f"({plan.recovery_error})")
                log.exception("%s", self._broken)
            elif seg is not None:
                seg.size = plan.offset
            self._settle(group, None, err)
        except BaseException as err:
            self._broken = JournalError(f"journal {self.directory} disabled: {err!r}")
            self._settle(group, None, self._broken)
            raise
        else:
            self._sync_seconds = 0.8 * self._sync_seconds + \
                0.2 * (time.perf_counter() - started)
            self.stats.fsyncs += plan.fsyncs
            seg = self._install(plan)
            assert seg is not None
            seg.size = plan.offset + plan.nbytes
            self.stats.commits += 1
            self.stats.bytes_written += plan.nbytes
            self._settle(group, seg, None)

    def _install(self, plan: _WritePlan) -> _Segment | None:
        """The segment `plan` wrote to, adding it if the thread created it."""
        if plan.created_fd >= 0:
            self._segments.append(_Segment(plan.first_seq, plan.path, 0))
            self._active_fd = plan.created_fd
            self.stats.segments = len(self._segments)
        elif plan.fd < 0:
            return None  # creating the new segment failed; the old one stays active
        return self._segments[-1]

    def _settle(self, group: _Group, seg: _Segment | None, error: BaseException | None) -> None:
        """Record the outcome of `group` (durable in `seg`, or failed with `error`)."""
        st = self.stats
        for rtype, seq, payload in group.items:
            if rtype == DATA:
                self._inflight.discard(seq)
                if seg is not None:
                    self._records[seq] = (payload, seg)
                    seg.live += 1
                    st.appends += 1
                    st.records_pending += 1
                    st.bytes_pending += len(payload)
        if seg is not None:
            for seq in group.completed:
                done = self._records.pop(seq, None)
                if done is not None:
                    done[1].live -= 1
                    st.records_pending -= 1
                    st.bytes_pending -= len(done[0])
        group.error = error
        group.done = True

    async def _reclaim(self) -> None:
        """Delete finished segments, strictly oldest first (see the module doc)."""
        victims: list[_Segment] = []
        for seg in self._segments[:-1]:
            if seg.live:
                break
            victims.append(seg)
        if not victims:
            return
        done, fsyncs, err = await trio.to_thread.run_sync(
            _unlink_sync, [s.path for s in victims], self._dir_fd, limiter=self._limiter)
        if err is not None:
            log.warning("journal %s: could not delete finished segment: %s", self.directory, err)
        del self._segments[:done]
        self.stats.fsyncs += fsyncs
        self.stats.reclaimed_segments += done
        self.stats.segments = len(self._segments)
