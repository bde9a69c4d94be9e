"""Local changes not yet on the server: what users see before the flusher is done.

Every change is recorded twice: durably, as a journal record, and here, as an
overlay over the server's state, so reads see local writes at once and lookups
and listings show local creates, removes and renames.  The overlay holds no file
data: an `Extent` says which journal record holds the bytes, and the reader
fetches them from there (the journal is on local disk, like S3QL's dirty blocks).

A file's data changes are kept as the ordered list of its pending writes and
truncates, folded over the server's bytes: the server's size under them
(`base_size`), the smallest size they cut the file to (`base_limit`: server bytes
count below it, zeros above), the extents that survive, the size that results.
When the flusher has put a prefix of those changes on the server, they leave the
list and the rest is folded again over the server's new size.  While a batch is in
flight the server may hold any part of it: reading server bytes only below
`base_limit` and outside every extent is still right, because no pending change
touches those bytes (a write there left an extent; a truncate there lowered
`base_limit`).

Pure data structures: no I/O, no awaits.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from wancache.nfs_backend.nfs3 import Fattr3

from .node import Node

WHITEOUT = None   # a name removed locally
SERVER = -1       # Piece.source: the server's bytes
ZERO = -2         # Piece.source: zeros


class Piece(NamedTuple):
    """`length` bytes of a file at `start`, from journal record `source` (at `skip` in
    its payload), or from the SERVER, or ZERO."""

    start: int
    length: int
    source: int
    skip: int = 0


@dataclass(slots=True)
class Extent:
    """Bytes written locally at `start`, held at `skip` in journal record `seq`."""

    start: int
    length: int
    seq: int
    skip: int

    @property
    def end(self) -> int:
        return self.start + self.length

    def cut(self, lo: int, hi: int) -> Extent:
        """The part of this extent within [lo, hi)."""
        lo, hi = max(lo, self.start), min(hi, self.end)
        return Extent(lo, hi - lo, self.seq, self.skip + lo - self.start)


@dataclass(frozen=True, slots=True)
class FileOp:
    """One pending data change: a write of `length` bytes at `offset` (held at
    `skip` in record `seq`), or a truncate to `offset` (length -1)."""

    seq: int
    offset: int
    length: int = -1
    skip: int = 0

    @property
    def is_truncate(self) -> bool:
        return self.length < 0


class FileOverlay:
    """Data changes folded over the server's bytes (see the module docstring)."""

    def __init__(self, base_size: int) -> None:
        self.base_size = base_size
        self.size = base_size
        self.base_limit = base_size
        self._extents: list[Extent] = []   # sorted by start, disjoint
        self._starts: list[int] = []

    @classmethod
    def fold(cls, base_size: int, ops: Iterable[FileOp]) -> FileOverlay:
        f = cls(base_size)
        for op in ops:
            f.apply(op)
        return f

    @property
    def extents(self) -> list[Extent]:
        return list(self._extents)

    def apply(self, op: FileOp) -> None:
        if op.is_truncate:
            self.truncate(op.offset)
        else:
            self.write(op.offset, op.length, op.seq, op.skip)

    def write(self, offset: int, length: int, seq: int, skip: int) -> None:
        """Later writes win where they overlap earlier ones."""
        if length <= 0:
            return
        end = offset + length
        lo = max(0, bisect.bisect_right(self._starts, offset) - 1)
        hi = bisect.bisect_left(self._starts, end)
        old = self._extents[lo:hi]
        kept = [e.cut(e.start, offset) for e in old if e.start < offset]
        kept.append(Extent(offset, length, seq, skip))
        kept += [e.cut(end, e.end) for e in old if e.end > end]
        self._extents[lo:hi] = kept
        self._starts[lo:hi] = [e.start for e in kept]
        self.size = max(self.size, end)

    def truncate(self, size: int) -> None:
        """Cut (or extend with zeros) to `size`."""
        if size < self.size:
            i = bisect.bisect_left(self._starts, size)
            del self._extents[i:], self._starts[i:]
            if self._extents and self._extents[-1].end > size:
                last = self._extents[-1]
                self._extents[-1] = last.cut(last.start, size)
            self.base_limit = min(self.base_limit, size)
        self.size = size

    def pieces(self, offset: int, length: int) -> list[Piece]:
        """Where each byte of [offset, offset+length) comes from (cut at the size)."""
        end = min(offset + length, self.size)
        out: list[Piece] = []
        pos = offset
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        for e in self._extents[i:]:
            if pos >= end or e.start >= end:
                break
            if e.end <= pos:
                continue
            if e.start > pos:
                out.extend(self._gap(pos, e.start))
                pos = e.start
            part = e.cut(pos, end)
            out.append(Piece(part.start, part.length, part.seq, part.skip))
            pos = part.end
        if pos < end:
            out.extend(self._gap(pos, end))
        return out

    def _gap(self, lo: int, hi: int) -> Iterator[Piece]:
        """Bytes no pending write covers: the server's below base_limit, else zeros."""
        mid = min(max(lo, self.base_limit), hi)
        if mid > lo:
            yield Piece(lo, mid - lo, SERVER)
        if hi > mid:
            yield Piece(mid, hi - mid, ZERO)

    def runs(self, max_len: int) -> list[list[Extent]]:
        """The extents merged where adjacent, in runs of at most `max_len` bytes
        (each run one WRITE)."""
        runs: list[list[Extent]] = []
        size = 0
        for e in self._extents:
            for lo in range(e.start, e.end, max_len):
                part = e.cut(lo, min(e.end, lo + max_len))
                if runs and runs[-1][-1].end == part.start and size + part.length <= max_len:
                    runs[-1].append(part)
                    size += part.length
                else:
                    runs.append([part])
                    size = part.length
        return runs


@dataclass(eq=False)
class NodeOverlay:
    """Everything pending for one node."""

    node: Node
    attrs: Fattr3                     # the node's attributes as users see them now
    local: bool                       # created here, not on the server yet
    file_ops: list[FileOp] = field(default_factory=list)   # pending data changes, in order
    file: FileOverlay | None = None   # their fold (None: no data change pending)
    entries: dict[bytes, Node | None] = field(default_factory=dict)   # dirs: names
    entry_seq: dict[bytes, int] = field(default_factory=dict)
    base_version: str | None = None   # content version our changes apply to (conflicts)
    base_data: str = ""               # the data version (block keys) they apply to
    base_also: set[str] = field(default_factory=set)   # versions our flushes left (replay)
    target: bytes = b""               # symlinks created here
    seqs: set[int] = field(default_factory=set)   # records of this node not yet done

    def add_file_op(self, op: FileOp, base_size: int) -> FileOverlay:
        if self.file is None:
            self.file = FileOverlay(base_size)
        self.file_ops.append(op)
        self.file.apply(op)
        return self.file

    def file_ops_done(self, seqs: set[int], server_size: int) -> None:
        """A prefix of the data changes reached the server, which now has
        `server_size` bytes: fold the rest over it."""
        self.file_ops = [op for op in self.file_ops if op.seq not in seqs]
        self.file = FileOverlay.fold(server_size, self.file_ops) if self.file_ops else None

    @property
    def idle(self) -> bool:
        """Nothing pending: the server's state shows through again."""
        return not self.seqs and not self.entries


class Overlay:
    """The overlays of one mount: node -> NodeOverlay."""

    def __init__(self) -> None:
        self._nodes: dict[Node, NodeOverlay] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def __bool__(self) -> bool:
        return bool(self._nodes)

    def get(self, node: Node) -> NodeOverlay | None:
        return self._nodes.get(node)

    def add(self, node: Node, attrs: Fattr3, *, local: bool = False) -> NodeOverlay:
        ov = self._nodes.get(node)
        if ov is None:
            ov = self._nodes[node] = NodeOverlay(node, attrs, local)
        return ov

    def drop(self, node: Node) -> None:
        self._nodes.pop(node, None)

    def entry(self, parent: Node, name: bytes) -> tuple[bool, Node | None]:
        """(known, node): whether the overlay decides `name` in `parent`, and what it
        is (None: removed here)."""
        ov = self._nodes.get(parent)
        if ov is None or name not in ov.entries:
            return False, None
        return True, ov.entries[name]

    def is_local_dir(self, node: Node) -> bool:
        ov = self._nodes.get(node)
        return ov is not None and ov.local

    def nodes(self) -> list[Node]:
        return list(self._nodes)
