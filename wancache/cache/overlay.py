"""Local changes not yet on the server: what users see before the flusher is done.

The write-back layer records every change twice: durably, as a journal record, and
here, as an overlay over the server's state, so reads see local writes at once
(read-your-writes) and so lookups and listings show local creates, removes and
renames.  Every piece of overlay state carries the sequence number of the record
that produced it; when the flusher has put all of a node's records on the server,
the node's overlay is dropped and the server's (freshly revalidated) state shows
through again.

Pure data structures: no I/O, no awaits.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from wancache.nfs_backend.nfs3 import Fattr3

from .node import Node

WHITEOUT = None   # a name removed locally


@dataclass(slots=True)
class Extent:
    """Bytes written locally at `start` (by the record `seq`)."""

    start: int
    data: memoryview
    seq: int

    @property
    def end(self) -> int:
        return self.start + len(self.data)


@dataclass
class FileOverlay:
    """A file's local data and attributes.

    The file reads as: the server's bytes up to `base_limit` (the smallest size it
    was truncated to locally), zeros beyond, then `extents` applied in order, all
    cut at `size`.
    """

    size: int
    base_limit: int
    extents: list[Extent] = field(default_factory=list)   # sorted by start, no overlaps
    dirty_bytes: int = 0

    def write(self, offset: int, data: memoryview, seq: int) -> None:
        """Record a write; later writes win where they overlap earlier ones."""
        if not data:
            return
        end = offset + len(data)
        kept: list[Extent] = []
        for e in self._overlapping(offset, end):
            if e.start < offset:
                kept.append(Extent(e.start, e.data[:offset - e.start], e.seq))
            if e.end > end:
                kept.append(Extent(end, e.data[end - e.start:], e.seq))
        self._remove_range(offset, end)
        for e in [*kept, Extent(offset, data, seq)]:
            bisect.insort(self.extents, e, key=lambda x: x.start)
        self.dirty_bytes += len(data)
        self.size = max(self.size, end)

    def truncate(self, size: int) -> None:
        """Local truncate (or extend) to `size`."""
        if size < self.size:
            cut: list[Extent] = []
            for e in self.extents:
                if e.end <= size:
                    cut.append(e)
                elif e.start < size:
                    cut.append(Extent(e.start, e.data[:size - e.start], e.seq))
            self.extents = cut
            self.base_limit = min(self.base_limit, size)
        self.size = size

    def _overlapping(self, start: int, end: int) -> list[Extent]:
        return [e for e in self.extents if e.start < end and e.end > start]

    def _remove_range(self, start: int, end: int) -> None:
        self.extents = [e for e in self.extents if not (e.start < end and e.end > start)]

    def apply(self, offset: int, length: int, base: bytes) -> bytes:
        """`length` bytes of the file's local contents at `offset` (fewer at its end),
        given the server's bytes `base` there (possibly short)."""
        want = max(0, min(length, self.size - offset))
        buf = bytearray(base[:max(0, min(len(base), self.base_limit - offset))])
        if len(buf) > want:
            del buf[want:]
        elif len(buf) < want:
            buf.extend(bytes(want - len(buf)))
        end = offset + want
        for e in self._overlapping(offset, end):
            lo, hi = max(e.start, offset), min(e.end, end)
            buf[lo - offset:hi - offset] = e.data[lo - e.start:hi - e.start]
        return bytes(buf)

    def base_span(self, offset: int, length: int) -> tuple[int, int]:
        """The part of a read of `length` bytes at `offset` that needs server bytes."""
        end = min(offset + length, self.size, self.base_limit)
        return offset, max(offset, end)

    def ranges(self, max_len: int) -> list[tuple[int, bytes]]:
        """The dirty extents, merged where adjacent, in pieces of at most `max_len`
        bytes (each piece one copy of the data)."""
        runs: list[tuple[int, list[memoryview], int]] = []
        for e in self.extents:
            for i in range(0, len(e.data), max_len):
                part = e.data[i:i + max_len]
                start = e.start + i
                if runs and runs[-1][0] + runs[-1][2] == start and \
                        runs[-1][2] + len(part) <= max_len:
                    runs[-1][1].append(part)
                    runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + len(part))
                else:
                    runs.append((start, [part], len(part)))
        return [(start, b"".join(parts)) for start, parts, _ in runs]


@dataclass
class NodeOverlay:
    """Everything pending for one node."""

    node: Node
    local: bool                       # created here, not on the server yet
    attrs: Fattr3                     # the node's attributes as users see them now
    file: FileOverlay | None = None   # local data, once written or truncated
    entries: dict[bytes, Node | None] = field(default_factory=dict)   # dirs: names
    entry_seq: dict[bytes, int] = field(default_factory=dict)
    base_version: str | None = None   # content version our changes apply to (conflicts)
    base_blocks: str | None = None    # block cache version of the data they apply to
    target: bytes = b""               # symlinks created here
    seqs: set[int] = field(default_factory=set)   # records of this node not yet done
