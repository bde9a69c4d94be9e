"""Write-back: a change is journaled durably on local disk, shown at once through the
overlay, and put on the server in the background by the flusher.

Every create, mkdir, symlink, mknod, link, write, setattr, remove, rmdir and
rename becomes an `Op` record (records.py), appended to the journal (fdatasync,
group commit) before the application gets its answer.  It is then applied to the
overlay (overlay.py: what users see; a write's bytes stay in the journal) and
handed to the flusher (flusher.py) as a `Change`.  When the flusher reports a
change done, it leaves the overlay and its record is marked done in the journal;
when a node has nothing pending, its overlay goes and the server's state shows
through again.

A node created here has a placeholder handle until its creation reaches the
server; a BIND record then gives its handle, so a replay after a crash resolves
the records that name it.  Changes wait `writeback_delay` first, so a temporary
file created and removed within it never crosses the WAN.

What the server refuses for good is logged, its data saved in
`cache_dir/lost+found`, and the file's next fsync and close answer EIO.

Crash safety: at mount, `replay()` reads the headers of the pending records (the
data stays in the journal) and rebuilds the overlay and the flusher's queue.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from wancache.config import Config
from wancache.creds import Cred
from wancache.nfs_backend.errors import NfsError, TransportError
from wancache.nfs_backend.nfs3 import Fattr3, Ftype3, Nfsstat3, NfsTime

from .attrs import AttrCache, content_version, data_version
from .flusher import NOW, Change, Flusher, FlushHooks, Outcome, Unresolvable
from .journal import Journal, NotPendingError
from .node import Node, local_fh
from .nodes import NodeTable
from .overlay import SERVER, WHITEOUT, ZERO, FileOp, NodeOverlay, Overlay
from .records import CREATES, PREFIX, Op, decode_op, encode_op, header_length

log = logging.getLogger(__name__)

COMPLETE_EVERY = 0.2        # seconds between journal writes marking changes done
EAGER_BYTES = 1 << 20       # a file with this much new data is not a temp file: no delay
MAX_PENDING = 65536         # changes not yet on the server before writers wait
HEADER_MAX = 64 << 10       # bytes of a record read to find its header
REPLAY_CALLS = 64           # calls in flight while a replay asks the server
ReadServer = Callable[[Node, int, int], Awaitable[bytes]]


def _removes(op: Op) -> tuple[str, ...]:
    """The node references whose name `op` removes (a remove, or a rename over it)."""
    if op.kind in ("remove", "rmdir"):
        return (op.node,)
    if op.kind == "rename" and op.target:
        return (op.target.decode(errors="replace"),)
    return ()


def _ref(node: Node) -> str:
    """How a record names `node`."""
    if node.local_id is not None and node.is_local:
        return f"l{node.local_id}"
    return "f" + node.fh.hex()


class WriteBack:
    """The write-back policy of one mount: journal, overlay, hand-off to the flusher."""

    def __init__(self, cfg: Config, nodes: NodeTable, attrs: AttrCache, journal: Journal,
                 flusher: Flusher) -> None:
        self.cfg = cfg
        self.nodes = nodes
        self.attrs = attrs
        self.journal = journal
        self.flusher = flusher
        self.overlay = Overlay()
        self.dirty_bytes = 0
        # Wired by the composition root: the server's bytes (through the caches), what
        # to do when a node's changes are all on the server, and how the server's
        # attributes are shown here (the times of our own changes kept).
        self.read_server: ReadServer | None = None
        self.read_cached: Callable[[Node, str, int, int], Awaitable[bytes | None]] | None = None
        self.settled: Callable[[Node, Fattr3], None] = lambda node, attrs: None
        self.shown: Callable[[Node, Fattr3, bool], Fattr3] = lambda node, attrs, stale: attrs
        self.hold: Callable[[Node, bool], None] = lambda node, held: None
        self._failures: weakref.WeakKeyDictionary[Node, str] = weakref.WeakKeyDictionary()
        self._lrefs: dict[int, int] = {}           # local id -> unfinished records naming it
        self._binds: dict[int, int] = {}           # local id -> seq of its BIND record
        self._base_records: dict[Node, int] = {}   # node -> seq of its pending BASE record
        self._base_also: dict[str, set[str]] = {}  # replay: versions BASE records gave
        self._done_on_server: set[int] = set()     # replay: links/removes found done
        self._room = trio.Event()
        self._to_complete: list[int] = []
        self._completing = trio.Event()
        self._completed = trio.Event()
        self._complete_failed = False     # the last journal.complete failed (kept, retried)
        self._marking = 0                 # records whose marking done is being written
        self._lost_dir = (cfg.cache_dir or Path("/tmp")) / "lost+found"
        flusher.base_version = self._current_base
        flusher.also_ours = self._also_ours

    def hooks(self, **others: Any) -> FlushHooks:
        """The flusher's hooks this layer answers (the caches' come in `others`)."""
        return FlushHooks(read_data=self._read_record, server_size=self._server_size,
                          flushing=self._flushing,
                          local_attrs=self.attrs_of, server_attrs=self._server_attrs,
                          read_ours=functools.partial(self._read_local, ours_only=True),
                          bound=self._bound, renamed=self._renamed, done=self._done,
                          lost=self._lost, **others)

    # -- queries (no awaits) ------------------------------------------------------------

    @property
    def pending_ops(self) -> int:
        return self.flusher.pending_count

    def attrs_of(self, node: Node) -> Fattr3:
        """A node's attributes with local changes (the overlay's, else the cache's)."""
        ov = self.overlay.get(node)
        if ov is not None:
            return ov.attrs
        entry = self.attrs.peek(node.fh)
        if entry is None:
            raise OSError(errno.EIO, "no attributes for a node being changed")
        return self.shown(node, entry.attrs, entry.before_our_change)

    def _server_attrs(self, node: Node) -> Fattr3 | None:
        """A node's attributes as the server last showed them (None: not known)."""
        entry = self.attrs.peek(node.fh)
        return entry.attrs if entry is not None else None

    def release(self, node: Node) -> None:
        """The last open of `node` was closed (nothing to do: data is journaled)."""

    def take_failure(self, node: Node) -> str | None:
        """Why changes to `node` could not be written (once: fsync, close)."""
        return self._failures.pop(node, None)

    def _server_size(self, node: Node) -> int:
        ov = self.overlay.get(node)
        if ov is not None and ov.file is not None:
            return ov.file.base_size
        return self.attrs_of(node).size if not node.is_local else 0

    def _current_base(self, node: Node) -> str | None:
        ov = self.overlay.get(node)
        return ov.base_version if ov is not None else None

    def _also_ours(self, node: Node) -> set[str]:
        """Content versions our own flushes before a restart may have left (BASE)."""
        ov = self.overlay.get(node)
        return ov.base_also if ov is not None else set()

    # -- reading local data ----------------------------------------------------------

    async def read(self, node: Node, offset: int, size: int, read_server: ReadServer) -> bytes:
        """`size` bytes at `offset` as users here see the file (fewer at its end)."""
        while True:
            try:
                return await self._read_once(node, offset, size, read_server)
            except NotPendingError:
                continue    # flushed meanwhile: the overlay now says where those bytes are

    async def _read_once(self, node: Node, offset: int, size: int,
                         read_server: ReadServer) -> bytes:
        ov = self.overlay.get(node)
        if ov is None or ov.file is None:
            return await read_server(node, offset, size)
        parts: list[bytes] = []
        for piece in ov.file.pieces(offset, size):
            if piece.source == ZERO:
                parts.append(bytes(piece.length))
            elif piece.source == SERVER:
                got = await read_server(node, piece.start, piece.length)
                parts.append(got.ljust(piece.length, b"\0"))
            else:
                parts.append(await self.journal.read(piece.source, piece.skip, piece.length,
                                                     verify=False))
        return b"".join(parts)

    async def _read_record(self, seq: int, skip: int, length: int) -> bytes:
        """A write's bytes for the server: read back from the journal, its checksum
        verified (a disk that changed them fails the flush, which is retried)."""
        return await self.journal.read(seq, skip, length)

    async def _read_local(self, node: Node, offset: int, size: int, *,
                          ours_only: bool = False) -> bytes:
        """The file as users here see it; `ours_only` (a conflict copy): server bytes
        only of the version our changes apply to, from the block cache (zeros where it
        has none: the server's are another client's now)."""
        ov = self.overlay.get(node)
        if ov is None or ov.file is None:
            return await self._read_server(node, offset, size)
        if not ours_only:
            return await self.read(node, offset, size, self._read_server)
        version = ov.base_data

        async def base(node: Node, offset: int, size: int) -> bytes:
            got = await self.read_cached(node, version, offset, size) \
                if self.read_cached is not None and version else None
            if got is None:
                log.warning("conflict copy of %r: bytes we never read are zeros in it",
                            node.path())
                return bytes(size)
            return got

        return await self.read(node, offset, size, base)

    async def _read_server(self, node: Node, offset: int, size: int) -> bytes:
        """The server's bytes under our changes (lost+found): zeros for what it can no
        longer give (logged)."""
        if node.is_local or self.read_server is None:
            return bytes(size)
        try:
            return await self.read_server(node, offset, size)
        except (NfsError, TransportError) as exc:
            log.warning("saving %r: the server's bytes under our changes are gone (%s); "
                        "zeros stand for them", node.path(), exc)
            return bytes(size)

    # -- recording changes ----------------------------------------------------------------

    async def _record(self, op: Op, data: bytes = b"") -> None:
        """Append `op` durably, then apply it; the local ids it names stay referenced
        until it is done, so their BIND records are kept for a replay meanwhile."""
        op.time_ns = op.time_ns or time.time_ns()
        ids = op.local_ids()
        for local_id in ids:
            self._lrefs[local_id] = self._lrefs.get(local_id, 0) + 1
        record = encode_op(op, data)
        try:
            op.seq = await self.journal.append(
                record, deadline=trio.current_time() + self.cfg.dirty_wait)
        except BaseException:
            self._release_ids(ids)
            raise
        op.data_len = len(data)
        op.data_skip = len(record) - len(data)
        self._apply(op, replaying=False)

    async def create(self, parent: Node, name: bytes, ftype: Ftype3, mode: int, cred: Cred,
                     *, target: bytes = b"", rdev: tuple[int, int] = (0, 0)
                     ) -> tuple[Node, Fattr3]:
        """A new file, directory, symlink or device node, created here."""
        await self._wait_for_room(0)
        local_id = secrets.randbits(61) | 1
        kind = {Ftype3.REG: "create", Ftype3.DIR: "mkdir", Ftype3.LNK: "symlink"}.get(
            ftype, "mknod")
        await self._record(Op(kind, cred.uid, cred.gid, cred.groups, node=f"l{local_id}",
                              parent=_ref(parent), name=name, ftype=int(ftype),
                              mode=mode & 0o7777, target=target, rdev=rdev))
        node = self.nodes.local(local_id)
        assert node is not None
        return node, self.attrs_of(node)

    async def link(self, node: Node, parent: Node, name: bytes, cred: Cred) -> Fattr3:
        await self._wait_for_room(0)
        await self._record(Op("link", cred.uid, cred.gid, cred.groups, node=_ref(node),
                              parent=_ref(parent), name=name))
        return self.attrs_of(node)

    async def remove(self, parent: Node, name: bytes, node: Node, cred: Cred, *,
                     is_dir: bool) -> None:
        await self._record(Op("rmdir" if is_dir else "remove", cred.uid, cred.gid,
                              cred.groups, node=_ref(node), parent=_ref(parent), name=name))

    async def rename(self, src: Node, src_name: bytes, dst: Node, dst_name: bytes,
                     node: Node, replaced: Node | None, cred: Cred) -> None:
        await self._wait_for_room(0)
        await self._record(Op("rename", cred.uid, cred.gid, cred.groups, node=_ref(node),
                              parent=_ref(src), name=src_name, parent2=_ref(dst),
                              name2=dst_name,
                              target=_ref(replaced).encode() if replaced is not None else b""))

    async def write(self, node: Node, offset: int, data: bytes, cred: Cred) -> int:
        """Journal a write (waiting for room under max_dirty first)."""
        await self._wait_for_room(len(data))
        await self._record(Op("write", cred.uid, cred.gid, cred.groups, node=_ref(node),
                              offset=offset, base=self._base_version(node)), data)
        return len(data)

    async def setattr(self, node: Node, fields: dict[str, int], cred: Cred) -> Fattr3:
        """Journal an attribute change: mode, uid, gid, size, atime, mtime (a time of
        NOW means now)."""
        await self._wait_for_room(0)
        base = self._base_version(node) if "size" in fields else ""
        await self._record(Op("setattr", cred.uid, cred.gid, cred.groups, node=_ref(node),
                              sattr=dict(fields), base=base))
        return self.attrs_of(node)

    def _base_version(self, node: Node) -> str:
        """The content version data changes to a server file apply to (conflicts)."""
        if node.local_id is not None:
            return ""      # created here: not checked (see the README)
        ov = self.overlay.get(node)
        if ov is not None and ov.base_version is not None:
            return ov.base_version
        entry = self.attrs.peek(node.fh)     # the server's, not as shown here
        if entry is None:
            raise OSError(errno.EIO, "no attributes for a node being changed")
        return content_version(entry.attrs)

    async def _wait_for_room(self, size: int) -> None:
        """Writers wait while max_dirty bytes (or MAX_PENDING changes) are unflushed;
        ENOSPC after dirty_wait."""
        def full() -> bool:
            return (self.dirty_bytes + size > self.cfg.max_dirty and self.dirty_bytes > 0) \
                or self.flusher.pending_count >= MAX_PENDING
        if not full():
            return
        self.flusher.hurry_all()
        with trio.move_on_after(self.cfg.dirty_wait):
            while full():
                if self._room.is_set():
                    self._room = trio.Event()
                await self._room.wait()
            return
        raise OSError(errno.ENOSPC, f"{self.dirty_bytes} bytes not yet flushed (max_dirty)")

    # -- sync points ----------------------------------------------------------------------

    async def sync(self, node: Node | None = None) -> None:
        """Wait until `node`'s changes (all changes: None) are on the server; OSError
        (EIO) if some could not be written (see lost+found)."""
        failed = await self.flusher.sync(node)
        if node is not None:
            failure = self.take_failure(node)
            if failure is not None:
                failed.append(failure)
        if failed:
            raise OSError(errno.EIO, f"{len(failed)} changes could not be written to the "
                          f"server: {failed[0]}")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Mark finished records done in the journal, many at a time (start it in the
        mount's nursery)."""
        task_status.started()
        while True:
            await self._completing.wait()
            # Completions are not urgent: gathering them keeps the journal free for the
            # appends applications are waiting for.
            await trio.sleep(COMPLETE_EVERY)
            self._completing = trio.Event()
            seqs, self._to_complete = self._to_complete, []
            if not seqs:
                continue
            self._marking = len(seqs)
            try:
                await self.journal.complete(seqs)
            except OSError as exc:
                # Kept for the next try: dropped, a later BIND's completion could leave
                # these records naming a local id no record binds any more.
                if not self._complete_failed:
                    log.warning("could not mark %d write-back records done (tried again): "
                                "%s", len(seqs), exc)
                self._complete_failed = True
                self._to_complete[:0] = seqs
                self._completing.set()
            except Exception as exc:   # the journal is closed or disabled
                log.warning("could not mark %d write-back records done: %s", len(seqs), exc)
            else:
                self._complete_failed = False
            self._marking = 0
            self._completed.set()
            self._completed = trio.Event()

    async def _flushing(self, node: Node, version: str) -> None:
        """A data batch of a file others may change is about to be sent, and will leave
        it at content version `version`: journal that first (a BASE record), so a
        replay after a crash takes the server's file at that version for ours."""
        seq = await self.journal.append(encode_op(Op("base", node=_ref(node), base=version,
                                                     time_ns=time.time_ns())),
                                        internal=True)      # (the disk reserve may take it)
        old = self._base_records.get(node)
        if old is not None:
            self._complete([old])
        if self.overlay.get(node) is None:
            self._complete([seq])
        else:
            self._base_records[node] = seq

    async def drain(self) -> None:
        """Wait until every finished change is also marked done in the journal (or
        marking them failed: they stay queued; after a restart they replay, as after a
        crash)."""
        while (self._to_complete or self._marking) and not self._complete_failed:
            await self._completed.wait()

    def _complete(self, seqs: list[int]) -> None:
        self._to_complete.extend(seqs)
        self._completing.set()

    def _release_ids(self, ids: list[int]) -> None:
        """A record naming these local ids is done: a BIND nobody needs is done too."""
        for local_id in ids:
            left = self._lrefs.get(local_id, 1) - 1
            if left > 0:
                self._lrefs[local_id] = left
                continue
            self._lrefs.pop(local_id, None)
            node = self.nodes.local(local_id)
            if node is not None and not node.is_local:
                self.nodes.forget_local(local_id)
                bind = self._binds.pop(local_id, None)
                if bind is not None:
                    self._complete([bind])

    # -- applying a record to the overlay and the flusher (no awaits) -------------------

    def _node(self, ref: str) -> Node:
        """The node a reference names (Unresolvable if its creation failed)."""
        if ref.startswith("l"):
            node = self.nodes.local(int(ref[1:]))
            if node is None:
                raise Unresolvable(ref)
            return node
        node = self.nodes.get(bytes.fromhex(ref[1:]))
        if node is None:
            raise Unresolvable(ref)
        return node

    def _ov(self, node: Node) -> NodeOverlay:
        return self.overlay.add(node, self.attrs_of(node))

    def _touch(self, node: Node, now: NfsTime, seq: int, **changes: Any) -> NodeOverlay:
        """`node` changed locally by record `seq` at `now` (its ctime, and `changes`)."""
        ov = self._ov(node)
        ov.attrs = replace(ov.attrs, ctime=now, **changes)
        ov.seqs.add(seq)
        return ov

    def _dir_entry(self, parent: Node, name: bytes, child: Node | None, seq: int,
                   now: NfsTime, nlink: int = 0) -> None:
        ov = self._touch(parent, now, seq, mtime=now)
        ov.attrs = replace(ov.attrs, nlink=max(2, ov.attrs.nlink + nlink))
        ov.entries[name] = child
        ov.entry_seq[name] = seq

    def _apply(self, op: Op, *, replaying: bool) -> None:
        """Put record `op` into the overlay and hand it to the flusher."""
        if op.kind in ("bind", "base"):
            return
        if op.base and not replaying:
            # What the change applies to now: a flush may have completed while its
            # record was being appended (the record keeps the base for a replay).
            op.base = self._base_version(self._node(op.node))
        change = getattr(self, f"_apply_{op.kind if op.kind not in CREATES else 'create'}")(
            op, NfsTime.from_ns(op.time_ns))
        if change is None:
            return
        change.replayed = replaying
        ov = self.overlay.get(change.node)
        change.mode_after = ov.attrs.mode if ov is not None else None
        p = self.flusher.submit(change, delay=self.cfg.writeback_delay)
        if op.kind == "write" and not replaying:
            ov = self.overlay.get(change.node)
            if ov is not None and ov.file is not None and \
                    sum(o.length for o in ov.file_ops if not o.is_truncate) > EAGER_BYTES:
                self.flusher.hurry([p], waited=False)

    def _change(self, op: Op, node: Node, **fields: Any) -> Change:
        return Change(op.seq, op.kind, op.cred, op.time_ns, node,
                      local_refs=tuple(op.local_ids()), **fields)

    def _apply_create(self, op: Op, now: NfsTime) -> Change:
        parent = self._node(op.parent)
        ftype = Ftype3(op.ftype)
        pattrs = self.attrs_of(parent)
        setgid = bool(pattrs.mode & 0o2000)
        mode = op.mode | (0o2000 if ftype is Ftype3.DIR and setgid else 0)
        size = len(op.target) if ftype is Ftype3.LNK else 0
        local_id = int(op.node[1:])
        attrs = Fattr3(ftype, mode & 0o7777, 2 if ftype is Ftype3.DIR else 1, op.uid,
                       pattrs.gid if setgid else op.gid, size, size, op.rdev, pattrs.fsid,
                       (1 << 62) | local_id, now, now, now)
        node = Node(local_fh(local_id), attrs.fileid, attrs.fsid, ftype, parent, op.name,
                    local_id=local_id)
        self.nodes.register(node)
        ov = self.overlay.add(node, attrs, local=True)
        ov.target = op.target
        ov.seqs.add(op.seq)
        if ftype is Ftype3.REG:
            ov.add_file_op(FileOp(op.seq, 0), 0)
        self._dir_entry(parent, op.name, node, op.seq, now, 1 if ftype is Ftype3.DIR else 0)
        return self._change(op, node, parent=parent, name=op.name, ftype=ftype,
                            target=op.target, rdev=op.rdev, mode=mode & 0o7777,
                            mtime_after=op.time_ns if ftype is Ftype3.REG else None)

    def _apply_touch(self, op: Op, now: NfsTime) -> Change:
        """Replay of a create that reached the server (its BIND says so) when the crash
        may have come before the rest of its run: a new file's mode and times (an
        EXCLUSIVE create carries neither) and its directory's mtime (the flusher keeps
        the one shown here, as after any change of names)."""
        parent, node = self._node(op.parent), self._node(op.node)
        # Its name is its own again from here on: an earlier record replayed before it
        # (a rename or remove of what had the name then) must not hide it.  (The
        # server's link counts have it already.)
        self._dir_entry(parent, op.name, node, op.seq, now)
        ftype = Ftype3(op.ftype)
        if ftype is not Ftype3.REG:
            return self._change(op, node, parent=parent, name=op.name, ftype=ftype)
        mode = op.mode & 0o7777
        self._touch(node, now, op.seq, mode=mode, atime=now, mtime=now)
        return self._change(op, node, parent=parent, name=op.name, ftype=ftype, mode=mode,
                            attrs={"atime": op.time_ns, "mtime": op.time_ns})

    def _apply_link(self, op: Op, now: NfsTime) -> Change:
        node, parent = self._node(op.node), self._node(op.parent)
        self._dir_entry(parent, op.name, node, op.seq, now)
        ov = self._touch(node, now, op.seq)
        if op.seq not in self._done_on_server:    # (else the server's nlink counts it)
            ov.attrs = replace(ov.attrs, nlink=ov.attrs.nlink + 1)
        return self._change(op, node, parent=parent, name=op.name)

    def _apply_remove(self, op: Op, now: NfsTime) -> Change | None:
        node, parent = self._node(op.node), self._node(op.parent)
        cancelled = self.flusher.cancel_temporary(node)
        if cancelled is not None:     # a temporary file: nothing of it reaches the server
            self._touch(parent, now, op.seq, mtime=now)
            self._forget(cancelled, drop=node)
            # but its directory's mtime, which changed here (as after any change of names)
            return replace(self._change(op, parent, parent=parent, name=op.name,
                                        ftype=Ftype3.DIR), kind="touch")
        is_dir = op.kind == "rmdir"
        done = op.seq in self._done_on_server     # (the server's nlinks count it)
        self._dir_entry(parent, op.name, WHITEOUT, op.seq, now, -1 if is_dir and not done else 0)
        ov = self._touch(node, now, op.seq)
        if is_dir or not done:
            ov.attrs = replace(ov.attrs, nlink=0 if is_dir else max(0, ov.attrs.nlink - 1))
        return self._change(op, node, parent=parent, name=op.name)

    _apply_rmdir = _apply_remove

    def _apply_rename(self, op: Op, now: NfsTime) -> Change:
        node, src, dst = self._node(op.node), self._node(op.parent), self._node(op.parent2)
        try:
            replaced = self._node(op.target.decode()) if op.target else None
        except Unresolvable:     # (a replay: the file it replaced is gone already)
            replaced = None
        moved_dir = node.is_dir and src is not dst
        self._dir_entry(src, op.name, WHITEOUT, op.seq, now, -1 if moved_dir else 0)
        gone_dir = replaced is not None and replaced.is_dir
        self._dir_entry(dst, op.name2, node, op.seq, now,
                        (1 if moved_dir else 0) - (1 if gone_dir else 0))
        node.parent, node.name = dst, op.name2
        self._touch(node, now, op.seq)
        if replaced is not None:
            rov = self._touch(replaced, now, op.seq)
            rov.attrs = replace(rov.attrs, nlink=0 if gone_dir else max(0, rov.attrs.nlink - 1))
        return self._change(op, node, parent=src, name=op.name, parent2=dst, name2=op.name2,
                            replaced=replaced)

    def _base(self, node: Node, ov: NodeOverlay, base: str) -> None:
        """Our data changes to a server file start: remember what they apply to."""
        if ov.base_version is None and base:
            ov.base_version = base
            ov.base_also = self._base_also.get(_ref(node), set())
            entry = self.attrs.peek(node.fh)
            ov.base_data = data_version(entry.attrs) if entry is not None else ""
            self.hold(node, True)

    def _apply_write(self, op: Op, now: NfsTime) -> Change:
        node = self._node(op.node)
        ov = self._touch(node, now, op.seq, mtime=now)
        self._base(node, ov, op.base)
        file_op = FileOp(op.seq, op.offset, op.data_len, op.data_skip)
        file = ov.add_file_op(file_op, ov.attrs.size)
        ov.attrs = replace(ov.attrs, size=file.size, used=max(ov.attrs.used, file.size))
        self.dirty_bytes += op.data_len
        return self._change(op, node, file_op=file_op, mtime_after=op.time_ns, base=op.base)

    def _apply_setattr(self, op: Op, now: NfsTime) -> Change:
        node = self._node(op.node)
        a = op.sattr
        changes: dict[str, Any] = {k: a[k] for k in ("mode", "uid", "gid") if k in a}
        times = {k: op.time_ns if a[k] == NOW else a[k] for k in ("atime", "mtime") if k in a}
        changes.update({k: NfsTime.from_ns(v) for k, v in times.items()})
        ov = self._touch(node, now, op.seq, **changes)
        file_op = None
        if "size" in a:
            self._base(node, ov, op.base)
            file_op = FileOp(op.seq, a["size"])
            ov.add_file_op(file_op, ov.attrs.size)
            ov.attrs = replace(ov.attrs, size=a["size"])
        return self._change(op, node, mode=a.get("mode"), file_op=file_op,
                            attrs={k: a[k] for k in ("uid", "gid", "atime", "mtime") if k in a},
                            mtime_after=times.get("mtime"), base=op.base)

    # -- what the flusher reports -------------------------------------------------------

    async def _bound(self, node: Node, fh: bytes, attrs: Fattr3) -> None:
        """A node created here exists on the server now: record its handle (durably,
        before its creation's record is marked done) for the records that name it."""
        assert node.local_id is not None
        local_id = node.local_id
        self._lrefs[local_id] = self._lrefs.get(local_id, 0) + 1
        try:
            # The BIND is durable before the node takes its handle: records appended
            # meanwhile name it by its local id, and a BIND that fails (the flusher
            # retries: EEXIST, ours) leaves it local, as no record on disk gives a handle.
            # It is internal: the journal's disk reserve takes it when users filled it.
            self._binds[local_id] = await self.journal.append(
                encode_op(Op("bind", node=f"l{local_id}", fh=fh, time_ns=time.time_ns())),
                internal=True)
            self.nodes.rebind(node, fh, attrs)
            ov = self.overlay.get(node)
            if ov is not None:
                ov.local = False
        finally:
            self._release_ids([local_id])

    def _renamed(self, node: Node, name: bytes) -> None:
        """Our new node lost its name to another client's: it is now called `name`."""
        parent = node.parent
        ov = self.overlay.get(parent) if parent is not None else None
        if ov is not None and ov.entries.get(node.name) is node:
            seq = ov.entry_seq.pop(node.name)
            del ov.entries[node.name]
            ov.entries[name], ov.entry_seq[name] = node, seq
        node.name = name

    def _done(self, changes: list[Change], outcome: Outcome) -> None:
        """Changes are on the server: out of the overlay, marked done in the journal."""
        seqs = {c.seq for c in changes}
        node = changes[0].node
        ov = self.overlay.get(node)
        if ov is not None and outcome.conflict:
            ov.file_ops, ov.file = [], None
        elif ov is not None and outcome.server_size is not None:
            ov.file_ops_done(seqs, outcome.server_size)
        if ov is not None and outcome.after is not None and \
                (node.local_id is None or ov.base_version is not None):
            # (a node created here has no base, unless a replayed record gave it one)
            ov.base_version = content_version(outcome.after)
        self._forget(changes)

    def _forget(self, changes: list[Change], drop: Node | None = None) -> None:
        """`changes` need nothing more: their records are done; overlays with nothing
        left pending go (`drop`: a node that is gone whatever is left)."""
        for c in changes:
            if c.kind == "write" and c.file_op is not None:
                self.dirty_bytes -= c.file_op.length
            for node in (c.node, c.parent, c.parent2, c.replaced):
                ov = self.overlay.get(node) if node is not None else None
                if ov is None:
                    continue
                ov.seqs.discard(c.seq)
                for name in [n for n, s in ov.entry_seq.items() if s == c.seq]:
                    del ov.entries[name], ov.entry_seq[name]
                if ov.idle or node is drop:
                    self.overlay.drop(ov.node)
                    base = self._base_records.pop(ov.node, None)
                    if base is not None:
                        self._complete([base])
                    if ov.base_data:
                        self.hold(ov.node, False)
                    if not ov.node.is_local:
                        self.settled(ov.node, ov.attrs)
        seqs = [c.seq for c in changes]
        for c in changes:
            # exactly the ids its record named: a node bound since keeps its local id,
            # and records made after the BIND name it by handle
            self._release_ids(list(c.local_refs))
        self._complete(seqs)
        self._room.set()

    async def _lost(self, changes: list[Change], why: str) -> None:
        """The server refuses these for good: save what users wrote in lost+found,
        fail the file's next fsync and close, show the server's state again."""
        node = changes[0].node
        ov = self.overlay.get(node)
        if ov is not None and ov.file is not None and node.ftype is Ftype3.REG:
            try:
                path = await self._save_lost(node)
            except OSError as exc:
                raise OSError(exc.errno, f"could not save the data of {node.path()!r} in "
                              f"{self._lost_dir} ({exc.strerror or exc}); it stays in the "
                              "journal") from exc
            log.error("could not write %r to the server (%s); its data is saved in %s",
                      node.path(), why, path)
            ov.file_ops, ov.file = [], None
        else:
            log.error("could not apply %s of %r on the server: %s", changes[0].kind,
                      node.path(), why)
        for c in changes:
            self._failures[c.node] = why
        self._forget(changes)

    async def _save_lost(self, node: Node) -> Path:
        size = self.attrs_of(node).size
        name = node.name.decode(errors="replace").replace("/", "_") or "file"
        path = self._lost_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{name}"
        await trio.to_thread.run_sync(lambda: self._lost_dir.mkdir(mode=0o700, parents=True,
                                                                    exist_ok=True))
        fd = await trio.to_thread.run_sync(
            lambda: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            step = 1 << 20
            for off in range(0, size, step):
                data = await self._read_local(node, off, min(step, size - off))
                await trio.to_thread.run_sync(os.pwrite, fd, data, off)
            await trio.to_thread.run_sync(os.fsync, fd)
        finally:
            os.close(fd)
        return path

    # -- replay after a restart ------------------------------------------------------------

    async def replay(self) -> int:
        """Rebuild the overlay and the flusher's queue from the journal's pending
        records; returns the changes queued.  Records that cannot be read or resolved
        are saved in lost+found and marked done (never left to pin the journal)."""
        ops, unreadable = await trio.to_thread.run_sync(self._read_headers)
        for seq, why in unreadable:
            await self._give_up(seq, None, f"unreadable record ({why})")
        alias: dict[str, str] = {}           # 'l<id>' -> 'f<handle>' a BIND gave it
        for op in ops:
            if op.kind == "bind":
                self._binds[int(op.node[1:])] = op.seq
                alias[op.node] = "f" + op.fh.hex()
        known = await self._know_nodes(ops)   # (held here: the node table is weak)
        removed = {alias.get(r, r) for op in ops for r in _removes(op)}
        bases = {op.node: op for op in ops if op.kind == "base"}   # the last of each file
        self._base_also = {ref: {op.base for op in ops if op.kind == "base" and op.node == ref}
                           for ref in bases}
        queued = 0
        # A create with a BIND reached the server before the crash: what may be left
        # of it is its directory's mtime (the server's time of the CREATE, not ours).
        replayed = [replace(op, kind="touch") if op.kind in CREATES and op.node in alias
                    else op for op in ops if op.kind not in ("bind", "base")]
        # Every record's local ids are counted before any is applied: a record dropped
        # below must not release an id (and its BIND) that a later record still names.
        for op in replayed:
            for local_id in op.local_ids():
                self._lrefs[local_id] = self._lrefs.get(local_id, 0) + 1
        self._done_on_server = await self._found_done_all(replayed)
        for op in replayed:
            try:
                self._apply(op, replaying=True)
                queued += 1
            except Unresolvable as exc:
                self._release_ids(op.local_ids())
                if op.kind == "touch" or alias.get(op.node, op.node) in removed:
                    log.info("journal record %d (%s) needs no replay: its file is gone",
                             op.seq, op.kind)
                    self._complete([op.seq])
                else:
                    await self._give_up(op.seq, op, f"it names a file that is gone ({exc})")
        idle = [i for i in self._binds if not self._lrefs.get(i)]
        self._complete([self._binds.pop(i) for i in idle])
        self._keep_bases(ops, bases)
        del known
        # On disk before serving: a crash right after this remount must not replay
        # (and report) what this replay settled again.
        seqs, self._to_complete = self._to_complete, []
        if seqs:
            await self.journal.complete(seqs)
        if queued:
            log.info("replaying %d changes from the journal", queued)
        return queued

    def _keep_bases(self, ops: list[Op], last: dict[str, Op]) -> None:
        """BASE records stay pending while their file has replayed changes; older
        ones, and those of files with none, are done."""
        for op in ops:
            if op.kind != "base":
                continue
            try:
                node = self._node(op.node)
            except Unresolvable:
                node = None
            if node is not None and last[op.node] is op and self.overlay.get(node):
                self._base_records[node] = op.seq
            else:
                self._complete([op.seq])

    def _read_headers(self) -> tuple[list[Op], list[tuple[int, str]]]:
        """The Op of every pending record (headers only), and those that fail to read."""
        ops: list[Op] = []
        bad: list[tuple[int, str]] = []
        for seq in self.journal.pending_seqs():
            try:
                ops.append(self._header(seq, self.journal.record_length(seq)))
            except ValueError as exc:
                bad.append((seq, str(exc)))
        return ops, bad

    def _header(self, seq: int, length: int) -> Op:
        """(The journal checked every record when it opened.)"""
        n = header_length(self.journal.read_sync(seq, 0, PREFIX, verify=False))
        if n > min(HEADER_MAX, length - PREFIX):
            raise ValueError("header too long")
        return decode_op(seq, self.journal.read_sync(seq, 0, PREFIX + n, verify=False), length)

    async def _found_done_all(self, ops: list[Op]) -> set[int]:
        """The LINKs, REMOVEs and RMDIRs among `ops` the server already has (the
        lookups all in flight: over the WAN, one at a time took minutes)."""
        found: set[int] = set()
        limiter = trio.CapacityLimiter(REPLAY_CALLS)

        async def check(op: Op) -> None:
            async with limiter:
                try:
                    if await self._found_done(op):
                        found.add(op.seq)
                except Unresolvable:
                    pass

        async with trio.open_nursery() as nursery:
            for op in ops:
                if op.kind in ("link", "remove", "rmdir"):
                    nursery.start_soon(check, op)
        return found

    async def _found_done(self, op: Op) -> bool:
        """Did this replayed LINK (REMOVE, RMDIR) reach the server before the crash?
        Its name already names (no longer names) its node there.  Unknown: False."""
        node, parent = self._node(op.node), self._node(op.parent)
        if node.is_local or parent.is_local:
            return False
        try:
            res = await self.nodes.client.lookup(parent.fh, op.name, Cred.root())
        except NfsError as exc:
            return exc.status == Nfsstat3.NFS3ERR_NOENT and op.kind != "link"
        except TransportError:
            return False
        same = res.obj_attributes is not None and res.obj_attributes.fileid == node.fileid
        return same if op.kind == "link" else not same

    async def _know_nodes(self, ops: list[Op]) -> list[Node]:
        """Nodes for every handle the records name (cached attributes, else GETATTR),
        and the local ids whose BIND says what they became."""
        known: list[Node] = []
        fhs = {bytes.fromhex(r[1:]) for op in ops for r in op.refs() if r.startswith("f")}
        fhs |= {op.fh for op in ops if op.kind == "bind"}
        unknown = 0
        limiter = trio.CapacityLimiter(REPLAY_CALLS)

        async def know(fh: bytes) -> None:
            nonlocal unknown
            entry = self.attrs.peek(fh)
            try:
                if entry is not None:
                    attrs = entry.attrs
                else:
                    async with limiter:
                        attrs = await self.nodes.client.getattr(fh, Cred.root())
            except NfsError as exc:     # gone from the server: its records cannot apply
                log.info("a file the journal refers to is gone from the server (%s)", exc)
                return
            except TransportError as exc:
                unknown += 1
                log.warning("cannot look up a file the journal refers to (%s)", exc)
                return
            if entry is None:
                self.attrs.update(fh, attrs, None, trio.current_time())
            known.append(self.nodes.node_for(fh, attrs))

        async with trio.open_nursery() as nursery:   # (all in flight: see above)
            for fh in fhs:
                if self.nodes.get(fh) is None:
                    nursery.start_soon(know, fh)
        if unknown:
            raise OSError(errno.EHOSTUNREACH, "the journal refers to files whose attributes "
                          "are not cached and the server cannot be reached: mount again "
                          "when it can (the journal is kept)")
        for op in ops:
            if op.kind == "bind":
                node = self.nodes.get(op.fh)
                if node is not None:
                    node.local_id = int(op.node[1:])
                    self.nodes.register(node)
        return known

    async def _give_up(self, seq: int, op: Op | None, why: str) -> None:
        """A record replay cannot use: its data (if any) goes to lost+found, then it
        is marked done."""
        data_len = op.data_len if op is not None else 0
        if op is None or data_len:
            length = self.journal.record_length(seq)
            skip = op.data_skip if op is not None else 0
            data = await self.journal.read(seq, skip, data_len if op is not None else length)
            self._lost_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = self._lost_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-record-{seq}"
            if op is not None and op.kind == "write":
                path = path.with_name(f"{path.name}-write-at-{op.offset}")
            await trio.to_thread.run_sync(path.write_bytes, data)
            path.chmod(0o600)
            log.error("journal record %d cannot be replayed: %s; its data is saved in %s",
                      seq, why, path)
        else:
            log.error("journal record %d (%s) cannot be replayed: %s", seq, op.kind, why)
        self.flusher.stats.lost += 1
        self._complete([seq])
