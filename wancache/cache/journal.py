"""The durable, append-only operation journal (write-ahead log) of the write-back layer.

The write-back layer serializes each operation (CREATE, WRITE with its data, RENAME, ...)
into an opaque record and `append`s it; the application is answered only once the
record is on disk.  When the operation has reached the server, `complete` marks it
done.  Until then the record stays *pending* and its bytes are read back from disk with
`read` (``pread``): the journal keeps no payload in memory, only a small index of where
each pending record lies.  After a crash, `Journal.open` finds what was appended and not
completed (`pending_seqs`), which is what the restart must replay.

On-disk format
--------------
The directory holds segment files ``seg-<name, 20 digits>.wj`` (mode 0600).  A segment
is a run of records, each a 36-byte little-endian header and a payload::

    magic   4s   b"\\xa7WJ1"
    type    u8   1 = DATA (payload: one record of the caller), 2 = COMPLETE
                 (payload: (first, last) u64 pairs, inclusive seq ranges now done),
                 3 = COPY (payload: a pending DATA record moved here by compaction,
                 under the same seq)
    flags   u8   bit 0: last record of its commit group
    -       u16  zero
    seq     u64  the record's sequence number (0 for COMPLETE)
    group   u64  offset in the segment of the first record of its commit group
    length  u32  payload length
    check   u64  xxh3_64 of the 28 header bytes above plus the payload, seeded with
                 the segment's name and the record's offset, so a record only
                 checks out at its own place (never a copy of a record inside some
                 payload, or a record copied from another segment)

Names increase with age.  A new segment is named after the first DATA seq written to it
(or the next seq to be given out), raised above the newest existing name if needed; the
next open continues seqs above every name and seq it finds.  Fresh DATA seqs increase
through the whole journal; a COPY's seq is always below its segment's name.

Durability and group commit
---------------------------
`append` returns only after the record was written (``os.pwrite``) and the segment
``os.fdatasync``-ed; when a group starts a new segment, the new file's directory entry is
fsync-ed first.  Callers queue their records into the *filling* group; one caller at a
time (the leader) takes the oldest queued group and writes it with one ``pwrite`` and
one ``fdatasync`` in a worker thread; whoever arrives meanwhile queues into the next
group, which the first of them to wake writes next.  So N concurrent appends cost a
handful of fdatasyncs, not N.  A group is closed once it holds a segment's worth of
bytes, so no segment grows beyond ``segment_size`` (unless one `append_many` is larger,
or internal records went on in the disk reserve, below).
The waits are shielded from cancellation: an append either returns its seq or raises,
so a durable record is never orphaned by a cancelled caller.

Two sequences must stay free of ``await`` (trio switches tasks only at an ``await``):

* assigning seqs and queueing the records into the filling group (`append_many`,
  `complete`), so seqs reach the file in increasing order and a group never misses
  part of an `append_many`;
* taking the oldest group and marking a flush as running (`_flush`), and, after the
  worker thread returns, applying its outcome to the in-memory state (`_write_group`).

The index of pending records is changed only by the leader (and `open`); threads that
read records (`read_sync`, compaction) look it up under a lock.  A segment's read file
descriptor is closed only when no reader uses it, so a read never lands in another file.

Reclaiming space
----------------
A segment file is deleted once no pending record lies in it *and* every older segment is
already deleted.  Deletion is strictly oldest-first, with a directory fsync after each
unlink, because the COMPLETE markers of a segment's records may live in any later
segment: if a later segment were deleted first (or its unlink became durable first)
while an older one survived, the older one's records would lose their markers and be
replayed on the next start, re-applying stale operations over newer data.  Deleting
oldest-first means every record a deleted segment's markers complete has already gone
with an older (or the same) segment.

Once nothing is pending or being appended, the newest segment goes too: the journal
first creates a new, empty newest segment (its name keeps the seqs increasing; its
directory entry fsync-ed), then deletes every older one oldest-first as above.  A crash
in between leaves a suffix of the segments, whose records' markers are all in it.

The disk reserve
----------------
Some records say what already happened on the server: COMPLETE markers, and DATA records
appended as ``internal`` (the write-back layer's BIND, the handle the server gave a node
made here, and BASE).  Refusing one of those for lack of disk, while users' writes took
the last bytes, loses track of the server's state across a crash.  So while records are
pending, the active segment keeps ``reserve`` + ``reserve_per_record`` bytes per record
not yet completed (defaults 1 MiB + 512: one marker and one small internal record each)
allocated past its end with fallocate(2) ``FALLOC_FL_KEEP_SIZE`` (the file size, all
that replay and the cap see, is unchanged; writes into those blocks cannot fail for lack
of room, on ext4 and tmpfs alike). Before each group is written, the group plus the
reserve is allocated (``RESERVE_SLACK`` more at a time). If the disk has not that much
room, compaction's copies wait first (background compaction tries again after
``COPY_RETRY``); if it still has not, the users' records of the group are left out and
their appends fail with ENOSPC (nothing of them is written or acknowledged; a warning at
most every ``REFUSAL_LOG_EVERY``), and the internal records are written into the
reserve; a group that would start a new segment then stays in the active one, past
``segment_size``. A new segment takes the reserve before the old one gives its own back
(ftruncate to its size frees what lies past the end). After a restart, `open` allocates
the reserve again.  With nothing pending no reserve is kept, so a finished journal still
takes no disk.  The reserve is sized, not unbounded: internal records beyond it (say, a
BASE at every retry of a long outage while the disk stays full) can still fail with
ENOSPC, as any failed write does.  A file system that cannot preallocate (EOPNOTSUPP,
EINVAL) is logged once and runs without a reserve.

Compaction
----------
One long-pending record would keep its segment, and by the oldest-first rule every later
segment, on disk.  Compaction *evacuates* the oldest segment: its still-pending records
are read back (checksums verified) and written again at the head as COPY records with
their SAME seqs, a few MiB per commit group, prepended to whatever group the leader
writes next; the index then points at the copies; once the whole segment has been read,
nothing pending lies in it and it is deleted as above.  It runs when the garbage
(bytes on disk that are not pending records) exceeds the pending bytes plus two
segments, when an append waits for room under ``max_bytes``, and on `compact`.

Why a crash at any point loses nothing and revives nothing:

* The copies are durable (fdatasync) before the old segment can be deleted.  Until then
  both exist; replay reads segments oldest first and the newest copy of a seq wins (the
  bytes are the same).  A torn copy group is a torn tail like any other: dropped whole,
  the originals still intact.
* A COPY is written only of a record that is pending in memory, that is whose COMPLETE
  has not been written yet; a COMPLETE queued meanwhile lands in the same group after
  the copies (they are prepended) or in a later group.  So in log order every
  COMPLETE(s) follows every COPY(s): replay never revives a completed record, and the
  COMPLETE markers in a deleted segment complete only records whose every copy is in
  that segment or an older one, already deleted.

The cap
-------
With ``max_bytes`` the segment files never hold more than that many bytes (file sizes;
the filesystem may round each file up to its block size).  ``segment_size`` is lowered
to a quarter of the cap if it is larger.  The accounting: P = records pending or being
appended, minus those whose COMPLETE is queued; D = bytes of the segment files plus
bytes queued to be written.  A COMPLETE for n records takes at most 36 + 16 n <= 52 n
bytes, so 52 bytes per record in P are reserved for it.  An append of X bytes (n
records) is admitted only when D + X + 52 (P + n) <= max_bytes - segment_size; it
otherwise waits (oldest first), cancellably, until completions, deletions or compaction
make room, or fails with ENOSPC at the `deadline` its caller passed.  COMPLETE records
are always admitted: they cost no more than their reservation.  (The cap counts file
sizes: the disk reserve, allocated past the end, is outside it, and is at most a quarter
of the cap plus ``reserve_per_record`` per pending record.)  The segment_size
held back pays for compaction: it copies at most one segment (<= segment_size) before
that segment is deleted, and each copy group is checked against the cap before it is
written.  An append larger than a segment is refused with ENOSPC under a cap.

Replay checking
---------------
`open` verifies every record, streaming each file through a bounded buffer (4 MiB; a
record's payload is never kept, only COMPLETE payloads are decoded).  A group is written
only after the previous one was fdatasync-ed, so at a crash only the *last commit group
of the last segment* can be torn (half written, zero filled, or missing its end
marker); the last segment is read twice, first to find where that group starts.  Damage
confined to that group is a torn tail: the whole group is truncated away (so an
`append_many` is all or nothing), reported in `ReplayReport.damaged` and logged at
WARNING.  None of its appends had returned (unless the disk rotted the very last group
after it was synced: then it is still reported, never silently dropped).

Any other damage (a bad record followed by a later commit group, damage in an older
segment, a segment ending mid-group, a fresh DATA seq that goes backwards, a COPY whose
seq is not below its segment's name) means acknowledged data is gone, and replaying
around the hole could apply later operations without earlier ones, or re-apply completed
ones whose COMPLETE marker was lost.  So `open` refuses with `JournalCorruptError`,
listing file, offsets, reason and the seqs that may be lost.  With ``force=True`` it
resyncs on the next record that checks out, keeps every intact record, reports the
damaged ranges, and never appends to a damaged segment again; the damage is reported (and
needs ``force``) on every open until the segment is reclaimed.  Seqs continue after the
highest seen, torn tails included.

Memory
------
The index of pending records holds, sorted by seq in chunks of parallel arrays, 8 bytes
of seq, 8 of place (segment, offset) and 4 of length: about 21 bytes a record (1 M
pending records: about 21 MB), plus 8 bytes (and a set entry) per record still being
appended.  `pending()` reads every pending payload at once: it is the memory-hungry
path, kept for callers that have not moved to `pending_seqs` and `read`.

Errors
------
A failed write or fdatasync (ENOSPC, EIO) cuts the segment back to the end of the last
durable group and fdatasyncs it (and allocates the reserve again), then fails every caller
of that group with an ``OSError`` of the same errno; none of them is durable and the
journal stays usable.  If
that cutting back fails too, the journal is disabled (`JournalError`) and the next
`open` treats the leftover as a torn tail.  A failure to delete, create or compact a
segment is logged and leaves the files as they were (nothing is lost, space is not yet
given back).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import math
import os
import re
import struct
import sys
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import xxhash

log = logging.getLogger(__name__)

MAGIC = b"\xa7WJ1"
DATA = 1
COMPLETE = 2
COPY = 3
FLAG_END_OF_GROUP = 0x01
_PREFIX = struct.Struct("<4sBBHQQI")  # header up to (not including) the checksum
_CHECK = struct.Struct("<Q")
HEADER_SIZE = _PREFIX.size + _CHECK.size
_RANGE = struct.Struct("<QQ")
MAX_RECORD = 0xFFFF_FFFF
MARKER_COST = HEADER_SIZE + _RANGE.size  # the most a record's completion can add on disk
MAX_RANGES = 1 << 16  # ranges in one COMPLETE record (payload <= 1 MiB)
# Groups of up to INLINE_BYTES are written (and fdatasync-ed) on the trio thread
# while the disk's recent fdatasync time stays under INLINE_SYNC: for a sequential
# writer (tar) that is cheaper than a worker-thread round trip; a slow disk goes
# back to the worker thread so it never stalls the event loop for long.
INLINE_BYTES = 256 << 10
INLINE_SYNC = 0.001
SCAN_BUFFER = 4 << 20  # read buffer of open and compaction
COPY_CHUNK = 4 << 20  # compaction copies about this much per commit group ...
COPY_SCAN = 16 << 20  # ... and reads at most this much of the old segment for it
COPY_RETRY = 1.0  # seconds background compaction waits after the disk had no room for it
MIN_MAX_BYTES = 4096
_SEGMENT_RE = re.compile(r"seg-(\d{1,20})\.wj")
_MASK64 = (1 << 64) - 1
_OFFSET_BITS = 40  # an index place is segment ident << 40 | payload offset
_MASK_OFFSET = (1 << _OFFSET_BITS) - 1
_MAX_IDENT = 1 << (64 - _OFFSET_BITS)
# The disk reserve (see "The disk reserve" in the module doc): while records are pending
# the active segment keeps RESERVE + RESERVE_PER_RECORD bytes a pending record allocated
# past its end, for the internal records (BIND, COMPLETE, ...) that must never meet a full
# disk; it grows RESERVE_SLACK at a time, so most appends need no fallocate.
RESERVE = 1 << 20
RESERVE_PER_RECORD = 512    # a COMPLETE marker, and one small internal record with its own
RESERVE_SLACK = 256 << 10
REFUSAL_LOG_EVERY = 60.0  # seconds between warnings that users' appends are refused
_FALLOC_FL_KEEP_SIZE = 0x01
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # no KEEP_SIZE here

_Item = tuple[int, int, bytes]  # (type, seq, payload) of one record to write


class JournalError(Exception):
    """The journal cannot be used: closed, in use by another process, or disabled."""


class JournalCorruptError(JournalError):
    """`open` found damage other than a torn tail; `damaged` describes each place."""

    def __init__(self, message: str, damaged: list[str]) -> None:
        super().__init__(message)
        self.damaged = damaged


class NotPendingError(LookupError):
    """`read` or `record_length` of a seq that is not pending (completed, failed, unknown)."""


@dataclass
class ReplayReport:
    """What `Journal.open` found."""

    segments: int = 0  # segment files read
    records: int = 0  # intact records read and kept (DATA, COPY and COMPLETE)
    copies: int = 0  # COPY records among them (records moved by compaction)
    pending: int = 0  # DATA records not completed: pending_seqs() right after open
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
    bytes_on_disk: int = 0  # sizes of the segment files
    max_bytes: int = 0  # the cap (0: none)
    fsyncs: int = 0  # fdatasync and fsync calls, directory fsyncs included
    appends: int = 0  # DATA records made durable
    commits: int = 0  # groups written, each with one pwrite and one fdatasync
    bytes_written: int = 0
    reclaimed_segments: int = 0  # segment files deleted
    compactions: int = 0  # segments evacuated by compaction
    bytes_copied: int = 0  # record bytes compaction wrote again
    space_waits: int = 0  # appends that waited for room under max_bytes
    space_refusals: int = 0  # appends refused with ENOSPC under max_bytes
    disk_refusals: int = 0  # users' appends refused with ENOSPC: no room for the reserve
    reserve_writes: int = 0  # groups written into the reserve (the disk had no more room)
    reserve_bytes: int = 0  # allocated past the end of the active segment


@dataclass(eq=False)
class _Segment:
    ident: int  # names the segment in the index (per open journal)
    first_seq: int  # its name; seeds its checksums
    path: Path
    size: int  # bytes of durable records
    live: int = 0  # pending records whose newest copy lies in it
    live_bytes: int = 0  # their header and payload bytes
    rfd: int = -1  # read descriptor, opened on the first read
    readers: int = 0  # reads using rfd right now
    gone: bool = False  # deleted: the last reader closes rfd
    stuck: bool = False  # compaction found it damaged: never compact it again
    allocated: int = 0  # bytes from 0 known to be allocated (the reserve past `size`)


class _Group:
    """Records queued for one write + fdatasync, and the outcome for their callers."""

    __slots__ = ("completed", "copied_to", "done", "error", "items", "nbytes", "refused",
                 "starved", "user")

    def __init__(self) -> None:
        self.items: list[_Item] = []
        self.nbytes = 0  # on-disk bytes of the items
        self.completed: list[int] = []  # seqs the COMPLETE items of this group complete
        self.copied_to: int | None = None  # compaction cursor once its COPY items are durable
        self.done = False
        self.error: BaseException | None = None
        self.user: set[int] = set()  # DATA seqs of users' appends (not `internal`)
        self.refused: set[int] = set()  # of those, the ones left out for lack of room
        self.starved = False  # no room for its COPY items, and nothing else was written


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
    # the disk reserve (see the module doc)
    reserve: int = 0  # bytes to keep allocated after the group (0: none)
    user: set[int] = field(default_factory=set)  # the users' DATA seqs among `items`
    allocated: int = 0  # the segment written to is allocated up to here (known)
    old_path: Path | None = None  # a new segment: the active one it follows ...
    old_first_seq: int = 0
    old_size: int = 0
    old_allocated: int = 0
    refused: list[int] = field(default_factory=list)  # users' seqs left out: no room
    dropped_copies: bool = False  # COPY items left out: no room
    into_reserve: bool = False  # written without room for the reserve after it
    released_old: bool = False  # the old active segment's reserve was given back
    unsupported: bool = False  # the file system cannot preallocate


@dataclass
class _Compaction:
    seg: _Segment  # the oldest segment, being evacuated
    cursor: int = 0  # everything pending before this offset has been copied


@dataclass(slots=True)
class _Head:
    """A record that checked out (its payload stays on disk)."""

    offset: int
    end: int
    rtype: int
    flags: int
    seq: int
    group: int


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
    index: _Index
    next_seq: int
    active_fd: int
    report: ReplayReport
    fsyncs: int


# --- the index of pending records ----------------------------------------------------

class _Index:
    """seq -> (segment ident, payload offset, payload length) of the pending records.

    Sorted by seq, in chunks of three parallel arrays (8 + 8 + 4 bytes a record): a new
    largest seq (every append) is added to the last chunk; anything else is a bisect
    and a memmove within one chunk.
    """

    SPLIT = 2048  # a chunk longer than this is cut in two
    MERGE = 256  # a chunk shorter than this joins its predecessor if they fit in SPLIT

    def __init__(self) -> None:
        self._seqs: list[array[int]] = []
        self._places: list[array[int]] = []
        self._lengths: list[array[int]] = []
        self._maxes: list[int] = []  # the last seq of each chunk
        self.count = 0

    def _find(self, seq: int) -> tuple[int, int, bool]:
        """(chunk, position, found) of `seq`; chunk == number of chunks: after the end."""
        c = bisect_left(self._maxes, seq)
        if c == len(self._maxes):
            return c, 0, False
        seqs = self._seqs[c]
        i = bisect_left(seqs, seq)
        return c, i, seqs[i] == seq

    def get(self, seq: int) -> tuple[int, int, int] | None:
        """(segment ident, payload offset, length) of `seq`, or None if it is not pending."""
        c, i, found = self._find(seq)
        if not found:
            return None
        place = self._places[c][i]
        return place >> _OFFSET_BITS, place & _MASK_OFFSET, self._lengths[c][i]

    def put(self, seq: int, ident: int, offset: int, length: int) -> tuple[int, int] | None:
        """Add `seq`, or move it if present: returns its previous (ident, length)."""
        place = ident << _OFFSET_BITS | offset
        c, i, found = self._find(seq)
        if found:
            old = (self._places[c][i] >> _OFFSET_BITS, self._lengths[c][i])
            self._places[c][i] = place
            self._lengths[c][i] = length
            return old
        self.count += 1
        if c == len(self._maxes):  # a new largest seq
            if not self._maxes or len(self._seqs[-1]) >= self.SPLIT:
                self._seqs.append(array("Q"))
                self._places.append(array("Q"))
                self._lengths.append(array("I"))
                self._maxes.append(seq)
            self._seqs[-1].append(seq)
            self._places[-1].append(place)
            self._lengths[-1].append(length)
            self._maxes[-1] = seq
            return None
        self._seqs[c].insert(i, seq)
        self._places[c].insert(i, place)
        self._lengths[c].insert(i, length)
        if len(self._seqs[c]) > self.SPLIT:
            self._split(c)
        return None

    def pop(self, seq: int) -> tuple[int, int] | None:
        """Remove `seq`: returns its (ident, length), or None if it was not pending."""
        c, i, found = self._find(seq)
        if not found:
            return None
        old = (self._places[c][i] >> _OFFSET_BITS, self._lengths[c][i])
        self._cut(c, i, i + 1)
        return old

    def pop_range(self, first: int, last: int) -> list[tuple[int, int]]:
        """Remove every pending seq in first..last: their (ident, length)."""
        out: list[tuple[int, int]] = []
        while True:
            c = bisect_left(self._maxes, first)
            if c == len(self._maxes):
                return out
            seqs = self._seqs[c]
            i = bisect_left(seqs, first)
            j = bisect_right(seqs, last)
            if i == j:
                return out
            out += [(p >> _OFFSET_BITS, n)
                    for p, n in zip(self._places[c][i:j], self._lengths[c][i:j], strict=True)]
            self._cut(c, i, j)

    def items(self) -> Iterator[tuple[int, int, int, int]]:
        """(seq, ident, offset, length) in seq order; do not change the index meanwhile."""
        for seqs, places, lengths in zip(self._seqs, self._places, self._lengths, strict=True):
            for seq, place, length in zip(seqs, places, lengths, strict=True):
                yield seq, place >> _OFFSET_BITS, place & _MASK_OFFSET, length

    def seqs(self) -> array[int]:
        """Every pending seq, in order (a copy)."""
        out = array("Q")
        for seqs in self._seqs:
            out.extend(seqs)
        return out

    def nbytes(self) -> int:
        """Bytes of memory the index takes (arrays, chunk lists and chunk maxima)."""
        parts = (self._seqs, self._places, self._lengths)
        return sum(sys.getsizeof(a) for part in parts for a in part) + \
            sum(sys.getsizeof(x) for x in (*parts, self._maxes, *self._maxes))

    def _cut(self, c: int, i: int, j: int) -> None:
        for part in (self._seqs, self._places, self._lengths):
            del part[c][i:j]
        self.count -= j - i
        seqs = self._seqs[c]
        if not seqs:
            for lst in (self._seqs, self._places, self._lengths, self._maxes):
                del lst[c]
            return
        self._maxes[c] = seqs[-1]
        if c > 0 and len(seqs) < self.MERGE and len(self._seqs[c - 1]) + len(seqs) <= self.SPLIT:
            for part in (self._seqs, self._places, self._lengths):
                part[c - 1].extend(part[c])
                del part[c]
            del self._maxes[c - 1]
        elif sys.getsizeof(seqs) > 2 * seqs.itemsize * len(seqs) + 256:
            # An array keeps its allocation when it shrinks: give back what half emptied.
            for part in (self._seqs, self._places, self._lengths):
                part[c] = part[c][:]

    def _split(self, c: int) -> None:
        half = len(self._seqs[c]) // 2
        for part in (self._seqs, self._places, self._lengths):
            a = part[c]
            part.insert(c + 1, a[half:])
            del a[half:]
        self._maxes.insert(c, self._seqs[c][-1])


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


def _encode_ranges(seqs: list[int]) -> list[bytes]:
    """COMPLETE payloads (of at most MAX_RANGES ranges each) for sorted, distinct `seqs`."""
    ranges: list[bytes] = []
    start = prev = seqs[0]
    for s in seqs[1:]:
        if s != prev + 1:
            ranges.append(_RANGE.pack(start, prev))
            start = s
        prev = s
    ranges.append(_RANGE.pack(start, prev))
    return [b"".join(ranges[i:i + MAX_RANGES]) for i in range(0, len(ranges), MAX_RANGES)]


def _decode_ranges(payload: bytes) -> list[tuple[int, int]]:
    return [_RANGE.unpack_from(payload, i) for i in range(0, len(payload), _RANGE.size)]


def _frames(items: Iterable[_Item]) -> int:
    return sum(HEADER_SIZE + len(p) for _, _, p in items)


# --- reading segment files through a bounded buffer ------------------------------------

def _pread_all(fd: int, n: int, offset: int) -> bytes:
    """Up to `n` bytes at `offset` (fewer only at the end of the file)."""
    parts: list[bytes] = []
    while n > 0:
        chunk = os.pread(fd, n, offset)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _SegmentReader:
    """Random access to one segment file through one buffer of at most SCAN_BUFFER bytes."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._base = 0
        self._buf = b""

    def window(self, offset: int, n: int) -> tuple[bytes, int]:
        """A buffer holding file bytes offset..offset+n (n <= SCAN_BUFFER), and where."""
        start = offset - self._base
        if start < 0 or start + n > len(self._buf):
            want = max(n, min(SCAN_BUFFER, self.size - offset))
            self._buf = b""  # one buffer at a time
            self._buf = _pread_all(self.fd, want, offset)
            if len(self._buf) < n:
                raise OSError(errno.EIO, f"segment file shrank below {offset + n} bytes")
            self._base, start = offset, 0
        return self._buf, start

    def read(self, offset: int, n: int) -> bytes:
        if n > SCAN_BUFFER:
            return _pread_all(self.fd, n, offset)
        buf, i = self.window(offset, n)
        return buf[i:i + n]

    def hash(self, check: xxhash.xxh3_64, offset: int, n: int) -> None:
        """Feed file bytes offset..offset+n to `check`, a buffer at a time."""
        while n > 0:
            k = min(n, SCAN_BUFFER)
            buf, i = self.window(offset, k)
            check.update(memoryview(buf)[i:i + k])
            del buf  # one buffer at a time
            offset += k
            n -= k

    def find(self, needle: bytes, start: int) -> int:
        """The first offset >= `start` where `needle` begins, or -1."""
        pos = start
        while pos + len(needle) <= self.size:
            n = min(SCAN_BUFFER, self.size - pos)
            buf, i = self.window(pos, n)
            hit = buf.find(needle, i, i + n)
            del buf  # one buffer at a time
            if hit >= 0:
                return pos + hit - i
            pos += n - len(needle) + 1
        return -1


def _check_at(rd: _SegmentReader, offset: int, first_seq: int) -> _Head | str:
    """The record at `offset` of segment `first_seq`, or why there is none."""
    if offset + HEADER_SIZE > rd.size:
        return "truncated record header"
    buf, i = rd.window(offset, HEADER_SIZE)
    head = buf[i:i + HEADER_SIZE]
    del buf  # one buffer at a time
    magic, rtype, flags, _zero, seq, group, length = _PREFIX.unpack(head[:_PREFIX.size])
    if magic != MAGIC:
        return "bad magic"
    end = offset + HEADER_SIZE + length
    if end > rd.size:
        return "record runs past the end of the file"
    (want,) = _CHECK.unpack_from(head, _PREFIX.size)
    check = xxhash.xxh3_64(head[:_PREFIX.size], seed=_seed(first_seq, offset))
    rd.hash(check, offset + HEADER_SIZE, length)
    if check.intdigest() != want:
        return "checksum mismatch"
    if rtype not in (DATA, COMPLETE, COPY) or group > offset or (
            rtype == COMPLETE and length % _RANGE.size):
        return "malformed record"
    return _Head(offset, end, rtype, flags, seq, group)


def _scan(rd: _SegmentReader, first_seq: int) -> Iterator[_Head | _Damage]:
    """Every intact record of a segment, and the damaged ranges between them, in order.

    After a bad record the scan resyncs on the next magic where a record checks out.
    """
    offset = 0
    while offset < rd.size:
        got = _check_at(rd, offset, first_seq)
        if isinstance(got, _Head):
            yield got
            offset = got.end
            continue
        nxt = offset
        while True:
            nxt = rd.find(MAGIC, nxt + 1)
            if nxt < 0 or isinstance(_check_at(rd, nxt, first_seq), _Head):
                break
        end = rd.size if nxt < 0 else nxt
        yield _Damage(offset, end, got)
        offset = end


def _tail_start(last: _Head | None, damage: list[_Damage], size: int) -> int:
    """Where the torn last commit group of the last segment starts (`size`: none is torn)."""
    if last is None:
        return 0
    if not last.flags & FLAG_END_OF_GROUP:
        return last.group  # the group never got its end marker
    if last.end < size:
        return last.end  # an unreadable group after the last complete one
    if any(d.start >= last.group for d in damage):
        return last.group  # the last group is damaged inside
    return size


def _find_tail(rd: _SegmentReader, first_seq: int) -> tuple[int, str]:
    """Where the last segment's torn tail starts, and why it is torn."""
    last: _Head | None = None
    damage: list[_Damage] = []
    for ev in _scan(rd, first_seq):
        if isinstance(ev, _Damage):
            damage.append(ev)
        else:
            last = ev
    cut = _tail_start(last, damage, rd.size)
    return cut, next((d.reason for d in damage if d.end > cut), "commit group has no end")


# --- blocking work, run in worker threads ----------------------------------------------

def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        offset += n
        view = view[n:]


def _libc_fallocate() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate_fn = _libc_fallocate()


def _fallocate(fd: int, offset: int, length: int) -> None:
    """Allocate file bytes offset..offset+length without changing the file's size
    (fallocate(2) with FALLOC_FL_KEEP_SIZE): writes there cannot fail for lack of room."""
    if _fallocate_fn is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    while _fallocate_fn(fd, _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def _reserve_sync(plan: _WritePlan, fd: int) -> bool:
    """Allocate room for the group of `plan` and the reserve after it; False if the disk
    has not that much room (nothing is written then)."""
    end = plan.offset + _frames(plan.items)
    want = end + plan.reserve
    if not plan.reserve or want <= plan.allocated:
        return True
    for extra in (RESERVE_SLACK, 0):
        try:
            _fallocate(fd, plan.offset, want + extra - plan.offset)
        except OSError as err:
            if err.errno in _NO_FALLOCATE:
                plan.unsupported = True
                return True
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            continue
        plan.allocated = max(plan.allocated, want + extra)
        return True
    return False


def _room_sync(plan: _WritePlan, fd: int) -> bool:
    """`_reserve_sync`, and if that finds no room, again without compaction's copies
    (they wait: `plan.dropped_copies`)."""
    if _reserve_sync(plan, fd):
        return True
    if not any(rtype == COPY for rtype, _, _ in plan.items):
        return False
    plan.items = [it for it in plan.items if it[0] != COPY]
    plan.dropped_copies = True
    return _reserve_sync(plan, fd)


def _refuse_sync(plan: _WritePlan) -> None:
    """No room for the reserve: leave out the users' records (they fail with ENOSPC)
    and compaction's copies; the internal records (COMPLETE, DATA appended as internal)
    are written into the reserve."""
    keep = [it for it in plan.items if it[0] == COMPLETE or (
        it[0] == DATA and it[1] not in plan.user)]
    plan.refused = [seq for rtype, seq, _ in plan.items if rtype == DATA and seq in plan.user]
    plan.dropped_copies = plan.dropped_copies or any(
        rtype == COPY for rtype, _, _ in plan.items)
    plan.items = keep
    plan.into_reserve = bool(keep)


def _start_segment_sync(plan: _WritePlan) -> None:
    """Create the new segment of `plan` with room for its group and the reserve, make its
    name durable and give back the reserve of the segment it follows.  Without room,
    the internal records of the group go on in that segment's reserve instead."""
    try:
        fd = os.open(plan.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) or plan.close_fd < 0:
            raise
        fd = -1
    try:
        plan.allocated = 0
        room = fd >= 0 and _room_sync(plan, fd)
        if not room:
            _refuse_sync(plan)
            if plan.close_fd >= 0 or not plan.items:
                if fd >= 0:
                    os.close(fd)
                    fd = -1
                    with contextlib.suppress(OSError):
                        os.unlink(plan.path)
                        # gone for good before the active segment grows again: a
                        # later (empty) segment would make its last group a middle one
                        plan.fsyncs += 1
                        os.fsync(plan.dir_fd)
                if plan.close_fd >= 0:  # go on in the active segment
                    assert plan.old_path is not None
                    plan.fd, plan.close_fd = plan.close_fd, -1
                    plan.path, plan.first_seq = plan.old_path, plan.old_first_seq
                    plan.offset, plan.allocated = plan.old_size, plan.old_allocated
                return
            assert fd >= 0  # (a failed create falls back to the active segment)
        plan.fsyncs += 1
        os.fsync(plan.dir_fd)  # the new name is durable before any record in it is
    except BaseException:
        if fd >= 0:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(plan.path)
        raise
    plan.fd = plan.created_fd = fd
    if plan.close_fd >= 0:
        if plan.reserve and not plan.unsupported:
            with contextlib.suppress(OSError):  # its blocks past the end are free again
                os.ftruncate(plan.close_fd, plan.old_size)
                plan.released_old = True
        os.close(plan.close_fd)
        plan.close_fd = -1


def _create_sync(path: Path, dir_fd: int, close_fd: int) -> tuple[int, int]:
    """Create segment `path`, make its name durable, close `close_fd`: (fd, fsyncs)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fsync(dir_fd)  # the new name is durable before any record in it is
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    if close_fd >= 0:
        os.close(close_fd)
    return fd, 1


def _write_sync(plan: _WritePlan) -> None:
    """Write one group and fdatasync it; on failure cut the segment back to `plan.offset`.

    First the room: the group and the reserve after it are allocated; without room the
    users' records are left out (`plan.refused`) and the rest goes into the reserve."""
    if plan.fd < 0:
        _start_segment_sync(plan)
    elif not _room_sync(plan, plan.fd):
        _refuse_sync(plan)
    if not plan.items:
        return
    fd = plan.fd
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
        if plan.allocated > plan.offset:
            try:  # the cut gave back the blocks past the end: take the reserve again
                _fallocate(fd, plan.offset, plan.allocated - plan.offset)
            except OSError:
                plan.allocated = plan.offset
        raise
    plan.nbytes = len(data)


def _roll_sync(path: Path, dir_fd: int, close_fd: int, old_size: int,
               reserve: int) -> tuple[int, int, int]:
    """Create the empty segment `path` (durably named) with `reserve` bytes allocated,
    give back the reserve of the segment `close_fd` (`old_size` bytes) if that worked,
    close it: (fd, fsyncs, bytes allocated)."""
    fd, fsyncs = _create_sync(path, dir_fd, -1)
    allocated = 0
    if reserve:
        with contextlib.suppress(OSError):
            _fallocate(fd, 0, reserve)
            allocated = reserve
    if close_fd >= 0:
        if allocated:
            with contextlib.suppress(OSError):
                os.ftruncate(close_fd, old_size)
        os.close(close_fd)
    return fd, fsyncs, allocated


def _top_up_sync(fd: int, size: int, reserve: int) -> int:
    """Allocate `reserve` bytes past `size` (best effort): the end of what is allocated."""
    try:
        _fallocate(fd, size, reserve)
    except OSError:
        return size
    return size + reserve


def _unlink_sync(paths: list[Path], dir_fd: int,
                 close_fds: list[int]) -> tuple[int, int, OSError | None]:
    """Delete `paths` in order, each durably before the next, then close `close_fds`:
    (deleted, fsyncs, error)."""
    done = fsyncs = 0
    error: OSError | None = None
    for path in paths:
        try:
            os.unlink(path)
            done += 1
            fsyncs += 1
            os.fsync(dir_fd)
        except OSError as err:
            error = err
            break
    for fd in close_fds:
        os.close(fd)
    return done, fsyncs, error


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


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


# --- replay ----------------------------------------------------------------------------

def _lost_text(before: int, after: int | None) -> str:
    if before < 0:
        return "its content is ignored"
    if after is None:
        return f"DATA records after seq {before} may be lost"
    if after > before + 1:
        return f"DATA records {before + 1}..{after - 1} may be lost"
    return "no DATA seq is missing, but a COMPLETE marker may be (completed records may replay)"


class _Replayer:
    """Applies the records of the segments, oldest first, to a fresh index (for `_load`)."""

    def __init__(self, report: ReplayReport) -> None:
        self.report = report
        self.index = _Index()
        self.segments: list[_Segment] = []
        self.by_ident: dict[int, _Segment] = {}
        self.max_seq = 0
        self.last_data = 0  # the last fresh DATA seq
        self.middle: list[_Hole] = []
        self.waiting: list[_Hole] = []  # holes whose next DATA seq is not known yet

    def add_segment(self, first_seq: int, path: Path, size: int) -> _Segment:
        seg = _Segment(len(self.segments) + 1, first_seq, path, size)
        self.segments.append(seg)
        self.by_ident[seg.ident] = seg
        self.max_seq = max(self.max_seq, first_seq)
        return seg

    def segment(self, seg: _Segment, rd: _SegmentReader, is_last: bool) -> int:
        """Apply the records of `seg` before seg.size; returns how many damaged ranges."""
        last: _Head | None = None
        damaged = 0
        for ev in _scan(rd, seg.first_seq):
            if isinstance(ev, _Damage):
                if ev.start < seg.size:
                    self.damage(seg, ev.start, min(ev.end, seg.size), ev.reason)
                    damaged += 1
                continue
            if ev.end > seg.size:  # in the torn tail: its seqs are not given out again
                self.max_seq = max(self.max_seq, ev.seq)
                if ev.rtype == COMPLETE:
                    self.max_seq = max([self.max_seq, *(b for _, b in _decode_ranges(
                        rd.read(ev.offset + HEADER_SIZE, ev.end - ev.offset - HEADER_SIZE)))])
                continue
            last = ev
            self.record(seg, rd, ev)
        if not is_last and last is not None and last.end == rd.size and not (
                last.flags & FLAG_END_OF_GROUP):
            self.damage(seg, rd.size, rd.size, "segment ends inside a commit group")
            damaged += 1
        return damaged

    def damage(self, seg: _Segment, start: int, end: int, reason: str) -> None:
        self.report.middle_damage = True
        self.report.bytes_discarded += end - start
        hole = _Hole(f"{seg.path.name} offset {start}-{end}: {reason}", self.last_data)
        self.middle.append(hole)
        self.waiting.append(hole)

    def skip(self, seg: _Segment, rec: _Head, why: str) -> None:
        self.report.middle_damage = True
        self.middle.append(_Hole(f"{seg.path.name} offset {rec.offset}: {why}", -1))

    def record(self, seg: _Segment, rd: _SegmentReader, rec: _Head) -> None:
        length = rec.end - rec.offset - HEADER_SIZE
        if rec.rtype == COMPLETE:
            self.report.records += 1
            for a, b in _decode_ranges(rd.read(rec.offset + HEADER_SIZE, length)):
                self.max_seq = max(self.max_seq, b)
                for ident, n in self.index.pop_range(a, b):
                    done = self.by_ident[ident]
                    done.live -= 1
                    done.live_bytes -= HEADER_SIZE + n
            return
        self.max_seq = max(self.max_seq, rec.seq)
        if rec.rtype == COPY:
            if rec.seq >= seg.first_seq:
                self.skip(seg, rec, f"COPY of seq {rec.seq} out of place "
                                    f"(segment {seg.first_seq})")
                return
            self.report.copies += 1
        elif rec.seq <= self.last_data:
            self.skip(seg, rec, f"DATA seq {rec.seq} out of order (after {self.last_data})")
            return
        else:
            for hole in self.waiting:
                hole.after = rec.seq
            self.waiting.clear()
            self.last_data = rec.seq
        self.report.records += 1
        old = self.index.put(rec.seq, seg.ident, rec.offset + HEADER_SIZE, length)
        if old is not None:  # an older copy: the newest wins
            moved = self.by_ident[old[0]]
            moved.live -= 1
            moved.live_bytes -= HEADER_SIZE + old[1]
        seg.live += 1
        seg.live_bytes += HEADER_SIZE + length

    def damage_text(self) -> list[str]:
        extra = "; records moved there by compaction may be lost too" \
            if self.report.copies else ""
        return [f"{h.where}; {_lost_text(h.before, h.after)}{extra if h.before >= 0 else ''}"
                for h in self.middle]


def _load(directory: Path, dir_fd: int, force: bool) -> _Loaded:
    """Check every segment (streaming), truncate a torn tail, build the index."""
    names = sorted((int(m[1]), name) for name in os.listdir(directory)
                   if (m := _SEGMENT_RE.fullmatch(name)))
    report = ReplayReport(segments=len(names))
    rp = _Replayer(report)
    truncate: tuple[Path, int] | None = None
    damaged_last = False
    for idx, (first, name) in enumerate(names):
        path = directory / name
        is_last = idx == len(names) - 1
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            rd = _SegmentReader(fd, os.fstat(fd).st_size)
            cut, why = _find_tail(rd, first) if is_last else (rd.size, "")
            seg = rp.add_segment(first, path, cut)
            damaged_last = bool(rp.segment(seg, rd, is_last)) and is_last
        finally:
            os.close(fd)
        if cut < rd.size:
            report.torn_tail = True
            report.bytes_discarded += rd.size - cut
            report.damaged.append(
                f"{name} offset {cut}: torn tail ({why}), {rd.size - cut} bytes truncated")
            truncate = (path, cut)

    middle_text = rp.damage_text()
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
    active_fd = -1
    if rp.segments and not (force and damaged_last):
        active_fd = os.open(rp.segments[-1].path, os.O_WRONLY | os.O_CLOEXEC)
    report.pending = rp.index.count
    return _Loaded(rp.segments, rp.index, rp.max_seq + 1, active_fd, report, fsyncs)


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
                 max_bytes: int | None, limiter: trio.CapacityLimiter | None,
                 reserve: int = 0, reserve_per_record: int = 0) -> None:
        """Use `Journal.open`."""
        self.directory = directory
        self._dir_fd = dir_fd
        self._segment_size = segment_size
        self._max_bytes = max_bytes
        self._reserve = reserve
        self._reserve_per_record = reserve_per_record
        self._limiter = limiter
        self._sync_seconds = INLINE_SYNC     # recent write+fdatasync time (moving average)
        self._lock = threading.Lock()  # index and segment readers vs reading threads
        self._segments = loaded.segments  # oldest first
        self._by_ident = {seg.ident: seg for seg in self._segments}
        self._next_ident = len(self._segments) + 1
        self._index = loaded.index
        self._live_bytes = sum(seg.live_bytes for seg in self._segments)
        self._pending_bytes = sum(n for *_, n in self._index.items())
        self._next_seq = loaded.next_seq
        self._active_fd = loaded.active_fd  # fd of self._segments[-1], or -1: start a new one
        self._inflight: set[int] = set()  # DATA seqs queued or being written
        self._completing: dict[int, _Group] = {}  # seqs whose COMPLETE is queued or written
        self._queue: deque[_Group] = deque([_Group()])  # oldest first; the last one fills
        self._queued_bytes = 0
        self._flushing = False
        self._flush_done = trio.Event()
        self._space = trio.Event()  # set (and replaced) whenever room may have changed
        self._waiters: deque[object] = deque()  # appends waiting for room, oldest first
        self._compact: _Compaction | None = None
        self._copies_wait_until = -math.inf  # no room for copies: background compaction waits
        self._refusal_log_at = -math.inf  # when refusing users for lack of disk is logged next
        self._closing = False
        self._closed = False
        self._broken: JournalError | None = None
        self.replay_report = loaded.report
        self.stats = JournalStats(fsyncs=loaded.fsyncs, max_bytes=max_bytes or 0)
        self._update_stats()

    @classmethod
    async def open(cls, directory: Path, *, segment_size: int = 64 << 20,
                   max_bytes: int | None = None,
                   limiter: trio.CapacityLimiter | None = None,
                   force: bool = False, reserve: int = RESERVE,
                   reserve_per_record: int = RESERVE_PER_RECORD) -> Journal:
        """Open (creating it 0700 if needed) the journal in `directory` and replay-check it.

        `max_bytes` caps the segment files (see the module doc; `segment_size` is lowered
        to a quarter of it, and so is `reserve`).  `reserve` and `reserve_per_record`
        size the disk reserve for internal records (0 and 0: none).  Raises
        `JournalCorruptError` for damage other than a torn tail unless `force`.
        """
        if segment_size <= 0:
            raise ValueError("segment_size must be positive")
        if reserve < 0 or reserve_per_record < 0:
            raise ValueError("the reserve cannot be negative")
        if max_bytes is not None:
            if max_bytes < MIN_MAX_BYTES:
                raise ValueError(f"max_bytes must be at least {MIN_MAX_BYTES}")
            segment_size = min(segment_size, max_bytes // 4)
            reserve = min(reserve, max_bytes // 4)
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
        journal = cls(directory, dir_fd, loaded, segment_size=segment_size,
                      max_bytes=max_bytes, limiter=limiter, reserve=reserve,
                      reserve_per_record=reserve_per_record)
        with trio.CancelScope(shield=True):
            await journal._flush()  # give back what is already finished
            await journal._top_up()  # (a torn tail's cut gave the reserve back too)
        return journal

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

    # --- pending records ------------------------------------------------------------

    def pending_seqs(self) -> array[int]:
        """The seqs of every durable record whose completion is not durable, in order.

        A copy (8 bytes a record); read the records with `read` / `read_sync`.
        """
        with self._lock:
            return self._index.seqs()

    def record_length(self, seq: int) -> int:
        """Payload length of pending record `seq` (`NotPendingError` if it is not pending)."""
        with self._lock:
            got = self._index.get(seq)
        if got is None:
            raise NotPendingError(f"journal record {seq} is not pending")
        return got[2]

    async def read(self, seq: int, offset: int = 0, length: int | None = None, *,
                   verify: bool = True) -> bytes:
        """Bytes offset..offset+length (default: to the end) of pending record `seq`.

        Read from the segment file in a worker thread; see `read_sync`.
        """
        self._check_open()
        return await trio.to_thread.run_sync(
            functools.partial(self.read_sync, seq, offset, length, verify=verify),
            limiter=self._limiter)

    def read_sync(self, seq: int, offset: int = 0, length: int | None = None, *,
                  verify: bool = True) -> bytes:
        """`read` for worker threads (it blocks on ``pread``; safe from any thread).

        Valid while `seq` is pending: from when its append returned until its completion
        is durable (`NotPendingError` otherwise, ValueError for a range outside it).
        With `verify` the whole record is read and its checksum checked (OSError EIO if
        the disk changed it); without, only the bytes asked for are read.
        """
        seg, start, rlen = self._acquire(seq)
        try:
            if length is None:
                length = rlen - offset
            if offset < 0 or length < 0 or offset + length > rlen:
                raise ValueError(f"journal record {seq} has {rlen} bytes, not "
                                 f"{offset}..{offset + length}")
            if not verify:
                data = _pread_all(seg.rfd, length, start + offset)
            else:
                data = self._verified(seg, seq, start, rlen)[offset:offset + length]
            if len(data) != length:
                raise OSError(errno.EIO, f"journal {seg.path.name}: record {seq} cut short")
            return data
        finally:
            self._release(seg)

    def pending(self) -> list[tuple[int, bytes]]:
        """(seq, record) of every pending record, in order, read from disk right here.

        The memory-hungry path (every payload at once, and blocking reads on the calling
        thread): prefer `pending_seqs` and `read`.
        """
        self._check_open()
        return [(seq, self.read_sync(seq)) for seq in self.pending_seqs()]

    def _acquire(self, seq: int) -> tuple[_Segment, int, int]:
        """Pin the segment holding `seq` for a read: (segment, payload offset, length)."""
        with self._lock:
            if self._closed:
                raise JournalError(f"journal {self.directory} is closed")
            got = self._index.get(seq)
            if got is None:
                raise NotPendingError(f"journal record {seq} is not pending")
            seg = self._by_ident[got[0]]
            if seg.rfd < 0:
                seg.rfd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
            seg.readers += 1
            return seg, got[1], got[2]

    def _release(self, seg: _Segment) -> None:
        with self._lock:
            seg.readers -= 1
            if seg.gone and not seg.readers and seg.rfd >= 0:
                os.close(seg.rfd)
                seg.rfd = -1

    @staticmethod
    def _verified(seg: _Segment, seq: int, start: int, rlen: int) -> bytes:
        """The payload of the record at `start` of `seg`, after checking its frame."""
        frame = _pread_all(seg.rfd, HEADER_SIZE + rlen, start - HEADER_SIZE)
        where = f"journal {seg.path.name} offset {start - HEADER_SIZE}"
        if len(frame) != HEADER_SIZE + rlen:
            raise OSError(errno.EIO, f"{where}: record {seq} cut short")
        magic, rtype, _f, _z, got_seq, _g, length = _PREFIX.unpack_from(frame)
        check = xxhash.xxh3_64(frame[:_PREFIX.size], seed=_seed(seg.first_seq,
                                                               start - HEADER_SIZE))
        check.update(memoryview(frame)[HEADER_SIZE:])
        if (magic, got_seq, length) != (MAGIC, seq, rlen) or rtype not in (DATA, COPY) or \
                check.intdigest() != _CHECK.unpack_from(frame, _PREFIX.size)[0]:
            raise OSError(errno.EIO, f"{where}: record {seq} fails its checksum")
        return frame[HEADER_SIZE:]

    # --- appending and completing ---------------------------------------------------

    async def append(self, record: bytes, *, deadline: float | None = None,
                     internal: bool = False) -> int:
        """Append `record`; return its seq once it is durable (see `append_many`)."""
        return (await self.append_many([record], deadline=deadline, internal=internal))[0]

    async def append_many(self, records: Sequence[bytes], *,
                          deadline: float | None = None, internal: bool = False) -> list[int]:
        """Append `records` in one commit group: all durable, or none after a crash.

        Under ``max_bytes`` it first waits for room (cancellable; nothing is written
        yet), oldest caller first, until `deadline` (trio clock; None: no limit), then
        raises OSError ENOSPC.  Unless `internal`, it also raises OSError ENOSPC (nothing
        written) when the disk has no room for the records and the reserve after them;
        `internal` records (what already happened on the server) may use the reserve.
        """
        self._check_usable()
        payloads = [bytes(r) for r in records]
        if any(len(p) > MAX_RECORD for p in payloads):
            raise ValueError(f"journal records are limited to {MAX_RECORD} bytes")
        if not payloads:
            await trio.lowlevel.checkpoint()
            return []
        if self._max_bytes is not None:
            await self._admit(_frames((DATA, 0, p) for p in payloads), len(payloads), deadline)
            self._check_usable()
        # No await from here until queued: seqs are assigned in the order records reach
        # the file, and the whole batch lands in one group.
        first = self._next_seq
        seqs = list(range(first, first + len(payloads)))
        self._next_seq += len(payloads)
        group = self._enqueue([(DATA, seq, p) for seq, p in zip(seqs, payloads, strict=True)])
        if not internal:
            group.user.update(seqs)
        self._inflight.update(seqs)
        await self._commit(group)
        if seqs[0] in group.refused:
            self.stats.disk_refusals += 1
            raise OSError(errno.ENOSPC, f"journal {self.directory}: no room on the disk for "
                          f"{len(payloads)} records and the reserve kept for internal ones")
        return seqs

    async def complete(self, seqs: Iterable[int]) -> None:
        """Mark records done (they reached the server); returns once that is durable.

        Seqs already completed, or whose append failed, are ignored.
        """
        self._check_usable()
        wanted = sorted(set(seqs))
        if wanted and not 0 < wanted[0] <= wanted[-1] < self._next_seq:
            bad = wanted[0] if wanted[0] <= 0 else wanted[-1]
            raise ValueError(f"never appended: seq {bad}")
        # No await until queued (as in append_many).
        groups: list[_Group] = []
        todo: list[int] = []
        for s in wanted:
            other = self._completing.get(s)
            if other is not None:
                groups.append(other)  # already being completed: wait for that group
            elif s in self._inflight or self._index.get(s) is not None:
                todo.append(s)
        if todo:
            group = self._enqueue([(COMPLETE, 0, p) for p in _encode_ranges(todo)])
            group.completed += todo
            for s in todo:
                self._completing[s] = group
            groups.append(group)
        if not groups:
            await trio.lowlevel.checkpoint()
            return
        for group in dict.fromkeys(groups):
            await self._commit(group)

    async def compact(self) -> int:
        """Evacuate the oldest segment now (unless it is the only one and holds nothing
        but pending records); returns how many segment files were deleted."""
        self._check_usable()
        before = self.stats.reclaimed_segments
        with trio.CancelScope(shield=True):
            while self._broken is None:
                if self._flushing:
                    await self._flush_done.wait()
                    continue
                if self._compact is None and not self._start_compaction(forced=True):
                    break
                if not await self._flush(compact=True):
                    break
                if self._compact is None:
                    break
        return self.stats.reclaimed_segments - before

    async def close(self) -> None:
        """Write the outstanding groups, then close the files (idempotent)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closing = True
        self._wake()
        with trio.CancelScope(shield=True):
            while self._flushing or any(g.items for g in self._queue):
                if self._flushing:
                    await self._flush_done.wait()
                else:
                    await self._flush()
            if self._closed:
                return
            with self._lock:
                self._closed = True
                fds = [fd for fd in (self._active_fd, self._dir_fd) if fd >= 0]
                for seg in self._segments:
                    seg.gone = True  # a read still running closes its own
                    if seg.rfd >= 0 and not seg.readers:
                        fds.append(seg.rfd)
                        seg.rfd = -1
            self._active_fd = self._dir_fd = -1
            await trio.to_thread.run_sync(_close_fds, fds, limiter=self._limiter)

    # --- room under the cap ---------------------------------------------------------

    def _disk_bytes(self) -> int:
        return sum(seg.size for seg in self._segments)

    def _markers(self) -> int:
        """Records whose COMPLETE is still to be queued (52 bytes reserved for each)."""
        return self._index.count + len(self._inflight) - len(self._completing)

    def _reserve_need(self) -> int:
        """Bytes to keep allocated past the end of the active segment (0: none needed,
        nothing is pending or being appended)."""
        markers = self._markers()
        if markers <= 0 or not (self._reserve or self._reserve_per_record):
            return 0
        return self._reserve + self._reserve_per_record * markers

    async def _top_up(self) -> None:
        """Allocate the reserve past the active segment (best effort; at open)."""
        need = self._reserve_need()
        if self._active_fd < 0 or not need or not self._segments:
            return
        seg = self._segments[-1]
        if seg.allocated >= seg.size + need:
            return
        seg.allocated = await trio.to_thread.run_sync(
            _top_up_sync, self._active_fd, seg.size, need, limiter=self._limiter)
        self._update_stats()

    def _shortfall(self, nbytes: int, n: int) -> int:
        """How many bytes must be freed before an append of `nbytes` (`n` records) fits."""
        assert self._max_bytes is not None
        need = self._disk_bytes() + self._queued_bytes + nbytes + \
            MARKER_COST * (self._markers() + n)
        return need - (self._max_bytes - self._segment_size)

    async def _admit(self, nbytes: int, n: int, deadline: float | None) -> None:
        """Wait (oldest first) until an append of `nbytes` fits under the cap."""
        assert self._max_bytes is not None
        if nbytes > self._segment_size or \
                nbytes + MARKER_COST * n > self._max_bytes - self._segment_size:
            self.stats.space_refusals += 1
            raise OSError(errno.ENOSPC, f"journal {self.directory}: an append of {nbytes} "
                          f"bytes cannot fit under max_bytes={self._max_bytes}")
        if not self._waiters and self._shortfall(nbytes, n) <= 0:
            return
        ticket = object()
        self._waiters.append(ticket)
        self.stats.space_waits += 1
        try:
            while True:
                self._check_usable()
                first = self._waiters[0] is ticket
                short = self._shortfall(nbytes, n)
                if first and short <= 0:
                    return
                if first and not self._flushing and \
                        self._disk_bytes() - self._live_bytes >= short:
                    with trio.CancelScope(shield=True):  # compaction may make the room
                        if await self._flush(compact=True):
                            continue
                if deadline is not None and trio.current_time() >= deadline:
                    self.stats.space_refusals += 1
                    raise OSError(errno.ENOSPC, f"journal {self.directory} is full "
                                  f"(max_bytes={self._max_bytes}): changes wait for the "
                                  f"server")
                event = self._space
                with trio.move_on_at(math.inf if deadline is None else deadline):
                    await event.wait()
        finally:
            self._waiters.remove(ticket)
            self._wake()

    def _wake(self) -> None:
        """Let waiting appends look at the room again."""
        self._space.set()
        self._space = trio.Event()

    # --- group commit ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise JournalError(f"journal {self.directory} is closed")

    def _check_usable(self) -> None:
        if self._closing:
            raise JournalError(f"journal {self.directory} is closed")
        if self._broken is not None:
            raise JournalError(str(self._broken))

    def _enqueue(self, items: list[_Item]) -> _Group:
        """Queue `items` in the filling group, or a new one if that would pass a segment."""
        nbytes = _frames(items)
        group = self._queue[-1]
        if group.items and group.nbytes + nbytes > self._segment_size:
            group = _Group()
            self._queue.append(group)
        group.items += items
        group.nbytes += nbytes
        self._queued_bytes += nbytes
        return group

    def _take(self) -> _Group:
        """The oldest queued group (a fresh filling group takes its place if it was last)."""
        if len(self._queue) > 1:
            return self._queue.popleft()
        group = self._queue[0]
        self._queue[0] = _Group()
        return group

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

    async def _flush(self, *, compact: bool = False) -> bool:
        """As the only writer: write the oldest group (with a compaction step in front
        of it), then give back finished segments.  Returns whether anything changed."""
        # No await between taking the group and raising the flag.
        group = self._take()
        self._flushing = True
        changed = False
        try:
            if self._broken is None and not self._closing:
                changed = await self._copy_step(group, compact)
            if group.items:
                await self._write_group(group)
                changed = not group.starved  # (no room for compaction: no progress)
                if group.copied_to is not None and group.error is None and \
                        self._compact is not None:
                    self._advance(self._compact, group.copied_to)
            if self._broken is None:
                changed = await self._reclaim() or changed
        finally:
            self._flushing = False
            done, self._flush_done = self._flush_done, trio.Event()
            done.set()
            self._update_stats()
            self._wake()
        return changed

    def _plan(self, group: _Group) -> _WritePlan:
        """Where `group` goes: the active segment, or a new one once that one is full."""
        reserve = self._reserve_need()
        user = group.user & {s for t, s, _ in group.items if t == DATA}
        if self._active_fd >= 0:
            active = self._segments[-1]
            if not (active.size > 0 and active.size + group.nbytes > self._segment_size):
                return _WritePlan(list(group.items), active.path, active.first_seq,
                                  active.size, self._active_fd, self._dir_fd,
                                  reserve=reserve, user=user, allocated=active.allocated)
        name = self._new_name(next((s for t, s, _ in group.items if t == DATA), None))
        plan = _WritePlan(list(group.items), self.directory / f"seg-{name:020d}.wj", name, 0,
                          -1, self._dir_fd, close_fd=self._active_fd, reserve=reserve,
                          user=user)
        if self._active_fd >= 0:
            active = self._segments[-1]
            plan.old_path, plan.old_first_seq = active.path, active.first_seq
            plan.old_size, plan.old_allocated = active.size, active.allocated
        return plan

    def _new_name(self, first_data: int | None) -> int:
        """A new segment's name: its first DATA seq (or the next seq), above every name."""
        name = self._next_seq if first_data is None else first_data
        if self._segments:
            name = max(name, self._segments[-1].first_seq + 1)
        return name

    async def _write_group(self, group: _Group) -> None:
        """Write `group` in a worker thread and settle its outcome for its callers."""
        if self._broken is not None:
            self._settle(group, None, 0, self._broken)
            return
        plan = self._plan(group)
        started = time.perf_counter()
        try:
            if plan.fd >= 0 and self._sync_seconds < INLINE_SYNC and \
                    sum(len(p) for _, _, p in plan.items) <= INLINE_BYTES and \
                    (not plan.reserve or
                     plan.offset + group.nbytes + plan.reserve <= plan.allocated):
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
                seg.allocated = plan.allocated
            self._settle(group, None, 0, err)
        except BaseException as err:
            self._broken = JournalError(f"journal {self.directory} disabled: {err!r}")
            self._settle(group, None, 0, self._broken)
            raise
        else:
            self._sync_seconds = 0.8 * self._sync_seconds + \
                0.2 * (time.perf_counter() - started)
            self.stats.fsyncs += plan.fsyncs
            self._reserve_outcome(plan, group)
            seg = self._install(plan)
            if plan.items:
                assert seg is not None
                seg.size = plan.offset + plan.nbytes
                seg.allocated = max(plan.allocated, seg.size)
                self.stats.commits += 1
                self.stats.bytes_written += plan.nbytes
            self._settle(group, seg if plan.items else None, plan.offset, None, plan.items)

    def _reserve_outcome(self, plan: _WritePlan, group: _Group) -> None:
        """What the room check of a written group left out, and what it learnt."""
        if plan.unsupported and (self._reserve or self._reserve_per_record):
            log.warning("journal %s: the file system cannot preallocate; internal records "
                        "have no disk reserve", self.directory)
            self._reserve = self._reserve_per_record = 0
        if plan.refused:
            group.refused.update(plan.refused)
            now = trio.current_time()
            if now >= self._refusal_log_at:  # (near full, room comes and goes: once a while)
                log.warning("journal %s: the disk is full: users' changes are refused "
                            "(ENOSPC) while it is; its reserve is kept for records of what "
                            "is already on the server", self.directory)
                self._refusal_log_at = now + REFUSAL_LOG_EVERY
        if plan.dropped_copies:
            group.copied_to = None  # compaction goes on later, from where it was
            self._copies_wait_until = trio.current_time() + COPY_RETRY
            group.starved = not plan.items
        if plan.into_reserve:
            self.stats.reserve_writes += 1
        if plan.released_old and self._segments:
            old = self._segments[-1]
            old.allocated = old.size

    def _install(self, plan: _WritePlan) -> _Segment | None:
        """The segment `plan` wrote to, adding it if the thread created it."""
        if plan.created_fd >= 0:
            self._add_segment(plan.first_seq, plan.path, plan.created_fd)
        elif plan.fd < 0:
            return None  # creating the new segment failed; the old one stays active
        return self._segments[-1]

    def _add_segment(self, name: int, path: Path, fd: int) -> _Segment:
        """A new, empty newest segment written through `fd`."""
        if self._next_ident >= _MAX_IDENT:
            raise JournalError(f"journal {self.directory}: too many segments in one run")
        seg = _Segment(self._next_ident, name, path, 0)
        self._next_ident += 1
        with self._lock:
            self._segments.append(seg)
            self._by_ident[seg.ident] = seg
        self._active_fd = fd
        return seg

    def _settle(self, group: _Group, seg: _Segment | None, offset: int,
                error: BaseException | None, written: list[_Item] | None = None) -> None:
        """Record the outcome of `group`: `written` (default: all its items) durable at
        `offset` of `seg`, the rest left out; or failed (`seg` None)."""
        self._queued_bytes -= group.nbytes
        if seg is None:
            for rtype, seq, _ in group.items:
                if rtype == DATA:
                    self._inflight.discard(seq)
                    self._completing.pop(seq, None)
            for seq in group.completed:
                if self._completing.get(seq) is group:
                    del self._completing[seq]
        else:
            for seq in group.refused:
                self._inflight.discard(seq)
                self._completing.pop(seq, None)
            with self._lock:
                pos = offset
                for rtype, seq, payload in group.items if written is None else written:
                    if rtype != COMPLETE:
                        self._place(seq, rtype, seg, pos, len(payload))
                    pos += HEADER_SIZE + len(payload)
                for seq in group.completed:
                    if self._completing.get(seq) is group:
                        del self._completing[seq]
                    done = self._index.pop(seq)
                    if done is not None:
                        self._unplace(self._by_ident[done[0]], done[1])
                        self._live_bytes -= HEADER_SIZE + done[1]
                        self._pending_bytes -= done[1]
        group.error = error
        group.done = True

    def _place(self, seq: int, rtype: int, seg: _Segment, pos: int, length: int) -> None:
        """Index the durable DATA or COPY record `seq` at `pos` of `seg` (under the lock)."""
        frame = HEADER_SIZE + length
        old = self._index.put(seq, seg.ident, pos + HEADER_SIZE, length)
        if old is not None:
            self._unplace(self._by_ident[old[0]], old[1])
        else:
            self._live_bytes += frame
            self._pending_bytes += length
        seg.live += 1
        seg.live_bytes += frame
        if rtype == DATA:
            self._inflight.discard(seq)
            self.stats.appends += 1
        else:
            self.stats.bytes_copied += frame

    @staticmethod
    def _unplace(seg: _Segment, length: int) -> None:
        seg.live -= 1
        seg.live_bytes -= HEADER_SIZE + length

    # --- compaction -----------------------------------------------------------------

    def _start_compaction(self, *, forced: bool) -> bool:
        """Pick the oldest segment for evacuation if that is worth it (see module doc)."""
        if not self._segments or self._closing:
            return False
        oldest = self._segments[0]
        if oldest.stuck or not oldest.live:
            return False  # nothing to move: _reclaim deletes it (or it is the only one)
        head = oldest is self._segments[-1]
        if forced:
            worth = not head or oldest.size > oldest.live_bytes
        else:
            garbage = self._disk_bytes() - self._live_bytes
            worth = not head and garbage > self._live_bytes + 2 * self._segment_size
        if worth:
            self._compact = _Compaction(oldest)
        return worth

    def _copy_budget(self, group: _Group) -> int:
        """How many bytes of COPY records may join `group`."""
        budget = self._segment_size - group.nbytes
        if self._max_bytes is not None:
            budget = min(budget, self._max_bytes - self._disk_bytes() - self._queued_bytes
                         - MARKER_COST * self._markers())
        return budget

    async def _copy_step(self, group: _Group, forced: bool) -> bool:
        """Put the next COPY records of the segment being evacuated in front of `group`."""
        if not forced and trio.current_time() < self._copies_wait_until:
            return False  # the disk had no room for them just now
        comp = self._compact
        if comp is not None and (not self._segments or comp.seg is not self._segments[0]):
            comp = self._compact = None  # deleted meanwhile: its records were completed
        if comp is None:
            if not self._start_compaction(forced=forced):
                return False
            comp = self._compact
            assert comp is not None
        if comp.seg is self._segments[-1] and not await self._roll():
            return False  # never copy into the segment being evacuated
        hard = self._copy_budget(group)
        if hard <= 0:
            return False
        try:
            copies, cursor = await trio.to_thread.run_sync(
                self._collect, comp.seg, comp.cursor, hard, limiter=self._limiter)
        except (OSError, _CompactionError) as err:
            log.warning("journal %s: cannot compact %s: %s", self.directory,
                        comp.seg.path.name, err)
            comp.seg.stuck = True
            self._compact = None
            return False
        if cursor == comp.cursor:
            return False  # the next record does not fit this group
        if copies:
            items = [(COPY, seq, payload) for seq, payload in copies]
            nbytes = _frames(items)
            group.items[:0] = items
            group.nbytes += nbytes
            self._queued_bytes += nbytes
            group.copied_to = cursor
        else:
            self._advance(comp, cursor)
        return True

    def _advance(self, comp: _Compaction, cursor: int) -> None:
        """Everything pending in `comp.seg` before `cursor` now has a durable copy."""
        if self._compact is not comp:
            return
        comp.cursor = cursor
        if cursor < comp.seg.size:
            return
        self._compact = None
        if comp.seg.live:
            log.error("journal %s: compaction of %s left %d records behind", self.directory,
                      comp.seg.path.name, comp.seg.live)
            comp.seg.stuck = True
        else:
            self.stats.compactions += 1

    def _collect(self, seg: _Segment, start: int, hard: int) -> tuple[list[tuple[int, bytes]],
                                                                      int]:
        """(In a worker thread.) The pending records of `seg` from `start` on, at most
        `hard` bytes (about COPY_CHUNK), and the offset after the last one looked at."""
        with self._lock:
            if seg.rfd < 0:
                seg.rfd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
            seg.readers += 1
        try:
            rd = _SegmentReader(seg.rfd, seg.size)
            out: list[tuple[int, bytes]] = []
            total = 0
            offset = start
            while offset < seg.size and total < COPY_CHUNK and offset - start < COPY_SCAN:
                rec = _check_at(rd, offset, seg.first_seq)
                if isinstance(rec, str):
                    raise _CompactionError(f"offset {offset}: {rec}")
                if rec.rtype != COMPLETE and self._lies_at(rec.seq, seg, rec.offset):
                    if total + rec.end - rec.offset > hard:
                        break
                    out.append((rec.seq, rd.read(rec.offset + HEADER_SIZE,
                                                 rec.end - rec.offset - HEADER_SIZE)))
                    total += rec.end - rec.offset
                offset = rec.end
            return out, offset
        finally:
            self._release(seg)

    def _lies_at(self, seq: int, seg: _Segment, offset: int) -> bool:
        """Whether pending record `seq`'s newest copy is the record at `offset` of `seg`."""
        with self._lock:
            got = self._index.get(seq)
        return got is not None and got[0] == seg.ident and got[1] == offset + HEADER_SIZE

    # --- giving space back ----------------------------------------------------------

    async def _roll(self) -> bool:
        """Start a new, empty newest segment (durably named); False if that failed."""
        name = self._new_name(None)
        path = self.directory / f"seg-{name:020d}.wj"
        old = self._segments[-1] if self._segments and self._active_fd >= 0 else None
        try:
            fd, fsyncs, allocated = await trio.to_thread.run_sync(
                _roll_sync, path, self._dir_fd, self._active_fd,
                old.size if old is not None else 0, self._reserve_need(),
                limiter=self._limiter)
        except OSError as err:
            log.warning("journal %s: cannot start segment %s: %s", self.directory,
                        path.name, err)
            return False
        self.stats.fsyncs += fsyncs
        if old is not None and allocated:
            old.allocated = old.size
        self._add_segment(name, path, fd).allocated = allocated
        return True

    async def _reclaim(self) -> bool:
        """Delete finished segments, strictly oldest first (see the module doc); once
        nothing is pending, the newest one too (after starting an empty one)."""
        last = self._segments[-1] if self._segments else None
        if last is not None and not self._index.count and not self._inflight and (
                last.size or self._active_fd < 0):
            await self._roll()
        victims: list[_Segment] = []
        for seg in self._segments[:-1]:
            if seg.live:
                break
            victims.append(seg)
        if not victims:
            return False
        with self._lock:
            fds = []
            for seg in victims:
                if seg.rfd >= 0 and not seg.readers:
                    fds.append(seg.rfd)
                    seg.rfd = -1
        done, fsyncs, err = await trio.to_thread.run_sync(
            _unlink_sync, [s.path for s in victims], self._dir_fd, fds, limiter=self._limiter)
        if err is not None:
            log.warning("journal %s: could not delete finished segment: %s", self.directory, err)
        with self._lock:
            for seg in victims[:done]:
                seg.gone = True
                del self._by_ident[seg.ident]
            del self._segments[:done]
        self.stats.fsyncs += fsyncs
        self.stats.reclaimed_segments += done
        return done > 0

    def _update_stats(self) -> None:
        st = self.stats
        st.records_pending = self._index.count
        st.bytes_pending = self._pending_bytes
        st.segments = len(self._segments)
        st.bytes_on_disk = self._disk_bytes()
        active = self._segments[-1] if self._segments and self._active_fd >= 0 else None
        st.reserve_bytes = max(0, active.allocated - active.size) if active else 0


class _CompactionError(Exception):
    """A segment being evacuated does not read back as written."""
