"""Write-back: changes are journaled durably on local disk, answered at once, and
flushed to the server in the background.

Every create, mkdir, symlink, mknod, link, write, setattr, remove, rmdir and
rename becomes an `Op`: it is appended to the journal (fdatasync, group commit)
before the application gets its answer, and applied to the overlay (overlay.py),
so reads and listings see it at once.

The flusher replays ops in journal order where it matters and in parallel where it
does not: each op reads and writes *keys* (("o", node) for an object, ("n", dir,
name) for a name), and waits for the last earlier writer of any key it uses (and
writers wait for earlier readers).  So a file's CREATE precedes its WRITEs, a
directory's MKDIR precedes what is created in it, an RMDIR follows what is removed
from it, a RENAME follows what it renames; independent files flush side by side.
Consecutive WRITEs of one file are coalesced into wsize UNSTABLE WRITEs (all in
flight) and one COMMIT whose verifier is checked (data is re-sent if the server
rebooted).  A file created here has a placeholder handle until its CREATE returns
the real one (a BIND op records it, so a replay after a crash needs no guessing).
Ops wait `writeback_delay` before they may run, so short-lived temp files die
locally: a REMOVE of a file whose CREATE has not started cancels all of its ops.

Failures: transient ones (server unreachable, timeouts, JUKEBOX) are retried with
capped exponential backoff; when the server is down, ops simply wait.  A file that
changed on the server since we based our changes on it is a *conflict*: the server's
file is kept and ours is written next to it as `NAME.wancache-conflict-<host>-<time>`.
An op the server refuses for good (EACCES, EROFS, ENOSPC, ...) is logged and its
data saved under `cache_dir/lost+found`: nothing a user wrote is dropped silently.

Crash safety: at mount, `replay()` rebuilds the overlay and the queue from the
journal's pending records.  A CREATE whose fate is unknown is repeated; EEXIST then
means it had run (a GUARDED create of a name that did not exist when it was
journaled), a REMOVE's ENOENT means the same; writes are idempotent.
"""

from __future__ import annotations

import errno
import heapq
import json
import logging
import math
import os
import secrets
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from wancache.config import Config
from wancache.nfs_backend import nfs3
from wancache.nfs_backend.errors import (
    NfsError,
    ProtocolError,
    TransportError,
    UnknownOutcomeError,
)
from wancache.nfs_backend.nfs3 import Fattr3, Ftype3, Nfsstat3, NfsTime, Sattr3, StableHow
from wancache.nfs_backend.transport import Cred

from .attrs import content_version, data_version
from .journal import Journal
from .node import Node, local_fh
from .overlay import WHITEOUT, FileOverlay, NodeOverlay

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)

MAGIC = b"WBO1"
JOBS = 64                   # flush jobs in flight
FOREGROUND_JOBS = 4         # ... while applications keep changing files here
FOREGROUND_WINDOW = 0.25    # seconds after a local change that count as busy
WRITES_PER_FILE = 16        # WRITEs in flight for one file
SMALL_WRITE = 64 << 10      # a flush of one WRITE up to this size is FILE_SYNC
COMPLETE_EVERY = 0.2        # seconds between journal writes marking ops done
EAGER_BYTES = 1 << 20       # a file with this much dirty data is not a temp file: no delay
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
TRANSIENT = {Nfsstat3.NFS3ERR_JUKEBOX, Nfsstat3.NFS3ERR_SERVERFAULT, Nfsstat3.NFS3ERR_IO}
CREATES = ("create", "mkdir", "symlink", "mknod")
Key = tuple[Any, ...]


class Unresolvable(Exception):
    """An op refers to a node whose creation failed: it cannot reach the server."""


# -- ops and their records -------------------------------------------------------------

@dataclass
class Op:
    """One journaled change.  Node references are 'f<hex handle>' or 'l<local id>'."""

    kind: str
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    time_ns: int = 0
    node: str = ""
    parent: str = ""
    name: bytes = b""
    parent2: str = ""
    name2: bytes = b""
    offset: int = 0
    ftype: int = 0
    mode: int = 0
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    sattr: dict[str, int] = field(default_factory=dict)
    base: str = ""
    fh: bytes = b""
    data: memoryview = field(default_factory=lambda: memoryview(b""))
    seq: int = 0

    @property
    def cred(self) -> Cred:
        return Cred(self.uid, self.gid, self.groups)


_BYTES_FIELDS = ("name", "name2", "target", "fh")
_SKIP = ("data", "seq")


def encode_op(op: Op) -> bytes:
    """MAGIC | u32 header length | JSON header | raw data."""
    head: dict[str, Any] = {}
    defaults = Op(op.kind)
    for f in op.__dataclass_fields__:
        if f in _SKIP:
            continue
        value = getattr(op, f)
        if value == getattr(defaults, f) and f != "kind":
            continue
        head[f] = value.hex() if f in _BYTES_FIELDS else value
    raw = json.dumps(head, separators=(",", ":")).encode()
    return b"".join((MAGIC, struct.pack("<I", len(raw)), raw, op.data))


def decode_op(seq: int, record: bytes) -> Op:
    """The Op of a journal record (ValueError if it is not one)."""
    if record[:4] != MAGIC or len(record) < 8:
        raise ValueError("not a write-back record")
    (n,) = struct.unpack_from("<I", record, 4)
    head = json.loads(record[8:8 + n])
    for f in _BYTES_FIELDS:
        if f in head:
            head[f] = bytes.fromhex(head[f])
    if "groups" in head:
        head["groups"] = tuple(head["groups"])
    if "rdev" in head:
        head["rdev"] = tuple(head["rdev"])
    return Op(**head, data=memoryview(record)[8 + n:], seq=seq)


# -- scheduling ----------------------------------------------------------------------

@dataclass(eq=False)
class Pending:
    """An op waiting for (or being given to) the server."""

    op: Op
    nodes: tuple[Node, ...]
    reads: tuple[Key, ...]
    writes: tuple[Key, ...]
    due: float
    deps: set[Pending] = field(default_factory=set)
    dependents: set[Pending] = field(default_factory=set)
    started: bool = False
    urgent: bool = False
    failed: str = ""
    done: trio.Event = field(default_factory=trio.Event)
    attempts: int = 0


class _ReadyQueue:
    """Ops whose dependencies are done: due ones by seq (journal order), the rest
    by due time.  Removal is lazy (a removed op is skipped when it surfaces)."""

    def __init__(self) -> None:
        self._due: list[tuple[int, Pending]] = []
        self._later: list[tuple[float, int, Pending]] = []
        self._members: set[Pending] = set()

    def __contains__(self, p: Pending) -> bool:
        return p in self._members

    def __len__(self) -> int:
        return len(self._members)

    def add(self, p: Pending) -> None:
        if p not in self._members:
            self._members.add(p)
            if p.urgent and not p.attempts:
                heapq.heappush(self._due, (p.op.seq, p))
            else:
                heapq.heappush(self._later, (p.due, p.op.seq, p))

    def discard(self, p: Pending) -> None:
        self._members.discard(p)

    def promote_urgent(self) -> None:
        """Urgent ops (someone waits in fsync) skip writeback_delay (not a backoff)."""
        keep = []
        for item in self._later:
            p = item[2]
            if p.urgent and not p.attempts and p in self._members:
                heapq.heappush(self._due, (p.op.seq, p))
            else:
                keep.append(item)
        heapq.heapify(keep)
        self._later = keep

    def retry_now(self, now: float) -> None:
        """Ops waiting out a retry's backoff may go at once."""
        for item in self._later:
            if item[2].attempts:
                item[2].due = now
        self._later = [(p.due, seq, p) for _, seq, p in self._later]
        heapq.heapify(self._later)

    def head(self, now: float) -> tuple[Pending | None, float]:
        """The first due op (not removed from the queue), and when the next falls due."""
        while self._later and self._later[0][0] <= now:
            _, seq, p = heapq.heappop(self._later)
            heapq.heappush(self._due, (seq, p))
        while self._due:
            seq, p = self._due[0]
            if p in self._members and not p.started:
                return p, math.inf
            heapq.heappop(self._due)
        return None, self._later[0][0] if self._later else math.inf


@dataclass
class WriteBackStats:
    """What the write-back layer did (metrics, status)."""

    ops_flushed: int = 0
    bytes_flushed: int = 0
    conflicts: int = 0
    lost: int = 0
    cancelled: int = 0
    retries: int = 0
    resent_after_reboot: int = 0
    server_down: bool = False


def _others_may_change(node: Node) -> bool:
    """Only files that existed before we created them here are checked for conflicts
    (one created here could be changed by another client only after our CREATE
    reached the server: a risk this mount takes)."""
    return node.local_id is None


def _local_ids(op: Op) -> list[int]:
    """The local ids an op names (its 'l<id>' references)."""
    refs = (op.node, op.parent, op.parent2, op.target.decode(errors="replace"))
    return [int(r[1:]) for r in refs if r.startswith("l") and r[1:].isdigit()]


def _ref(node: Node) -> str:
    if node.local_id is not None and node.is_local:
        return f"l{node.local_id}"
    return "f" + node.fh.hex()


class WriteBack:
    """The write-back layer of one mount: journal, overlay, flusher."""

    def __init__(self, store: Store, cfg: Config, journal: Journal) -> None:
        self.store = store
        self.client = store.client
        self.cfg = cfg
        self.journal = journal
        self.overlays: dict[Node, NodeOverlay] = {}
        self.stats = WriteBackStats()
        self.dirty_bytes = 0
        self._locals: dict[int, Node] = {}
        self._binds: dict[int, int] = {}           # local id -> seq of its BIND record
        self._lrefs: dict[int, int] = {}           # local id -> unfinished ops naming it
        self._pending: dict[int, Pending] = {}      # seq -> pending op
        self._by_node: dict[Node, list[Pending]] = {}
        self._writer: dict[Key, Pending] = {}
        self._readers: dict[Key, list[Pending]] = {}
        self._ready = _ReadyQueue()
        self._urgent = False
        self._wakeup = trio.Event()
        self._room = trio.Event()
        self._running = 0                 # flush jobs in flight
        self.last_local_change = -math.inf   # trio time of the last change journaled
        self._replayed_up_to = 0     # ops up to this seq come from before a restart
        self._to_complete: list[int] = []
        self._completer_running = False
        self._completed = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self._resumed = trio.Event()
        self._resumed.set()
        self._lost_dir = (cfg.cache_dir or Path("/tmp")) / "lost+found"
        self._host = socket.gethostname().split(".")[0] or "client"

    # -- queries used by the store (no awaits) ----------------------------------------

    @property
    def pending_ops(self) -> int:
        return len(self._pending)

    def oldest_age(self) -> float:
        """Seconds the oldest unflushed op has waited (0 if none)."""
        if not self._pending:
            return 0.0
        oldest = min(p.op.time_ns for p in self._pending.values())
        return max(0.0, (time.time_ns() - oldest) / 1e9)

    def overlay(self, node: Node) -> NodeOverlay | None:
        return self.overlays.get(node)

    def entry(self, parent: Node, name: bytes) -> tuple[bool, Node | None]:
        """(known, node): whether the overlay decides `name` in `parent`, and what it
        is (None: removed here)."""
        ov = self.overlays.get(parent)
        if ov is None or name not in ov.entries:
            return False, None
        return True, ov.entries[name]

    def is_local_dir(self, node: Node) -> bool:
        ov = self.overlays.get(node)
        return ov is not None and ov.local

    # -- recording changes --------------------------------------------------------------

    async def _record(self, op: Op, record: bytes | None = None) -> int:
        """Append `op` durably; returns its seq.

        The local ids it names stay referenced from before the append until the op
        is finished, so their BIND records are kept for a replay meanwhile.
        """
        op.time_ns = op.time_ns or time.time_ns()
        if op.kind != "bind":     # our own bookkeeping is not an application at work
            self.last_local_change = trio.current_time()
        ids = _local_ids(op)
        for local_id in ids:
            self._lrefs[local_id] = self._lrefs.get(local_id, 0) + 1
        try:
            return await self.journal.append(record or encode_op(op))
        except BaseException:
            self._release_ids(ids)
            raise

    def _release_ids(self, ids: Iterable[int]) -> None:
        """An op naming these local ids is finished: a BIND nobody needs is done."""
        for local_id in ids:
            left = self._lrefs.get(local_id, 1) - 1
            if left > 0:
                self._lrefs[local_id] = left
                continue
            self._lrefs.pop(local_id, None)
            node = self._locals.get(local_id)
            bind = self._binds.get(local_id)
            if bind is not None and node is not None and not node.is_local:
                del self._binds[local_id]
                self._schedule_complete([bind])

    def _overlay_for(self, node: Node, attrs: Fattr3, *, local: bool = False) -> NodeOverlay:
        ov = self.overlays.get(node)
        if ov is None:
            ov = NodeOverlay(node, local, attrs)
            self.overlays[node] = ov
        return ov

    def _base_attrs(self, node: Node) -> Fattr3:
        """The attributes changes to a server node start from (the freshest we have)."""
        entry = self.store.attrs.peek(node.fh)
        if entry is None:
            raise OSError(errno.EIO, "no attributes for a node being changed")
        return entry.attrs

    def _new_local(self, parent: Node, name: bytes, ftype: Ftype3, mode: int, cred: Cred,
                   local_id: int, now: NfsTime, *, size: int = 0,
                   rdev: tuple[int, int] = (0, 0)) -> tuple[Node, Fattr3]:
        parent_attrs = self.attrs_of(parent)
        gid = parent_attrs.gid if parent_attrs.mode & 0o2000 else cred.gid
        if ftype is Ftype3.DIR and parent_attrs.mode & 0o2000:
            mode |= 0o2000
        attrs = Fattr3(ftype, mode & 0o7777, 2 if ftype is Ftype3.DIR else 1, cred.uid, gid,
                       size, size, rdev, parent_attrs.fsid, (1 << 62) | local_id,
                       now, now, now)
        node = Node(local_fh(local_id), attrs.fileid, attrs.fsid, ftype, parent, name,
                    local_id=local_id)
        self._locals[local_id] = node
        self.store.register(node)
        ov = self._overlay_for(node, attrs, local=True)
        if ftype is Ftype3.REG:
            ov.file = FileOverlay(size=0, base_limit=0)
        return node, attrs

    def attrs_of(self, node: Node) -> Fattr3:
        """A node's attributes with local changes (the overlay's, else the cache's)."""
        ov = self.overlays.get(node)
        return ov.attrs if ov is not None else self._base_attrs(node)

    def _dir_changed(self, parent: Node, name: bytes, child: Node | None, seq: int,
                     now: NfsTime, *, nlink: int = 0) -> None:
        ov = self._overlay_for(parent, self.attrs_of(parent), local=False)
        ov.entries[name] = child
        ov.entry_seq[name] = seq
        ov.seqs.add(seq)
        ov.attrs = replace(ov.attrs, mtime=now, ctime=now, nlink=max(2, ov.attrs.nlink + nlink))

    async def create(self, parent: Node, name: bytes, ftype: Ftype3, mode: int, cred: Cred,
                     *, target: bytes = b"", rdev: tuple[int, int] = (0, 0)
                     ) -> tuple[Node, Fattr3]:
        """A new file, directory, symlink or device node, created here."""
        local_id = secrets.randbits(61) | 1
        kind = {Ftype3.REG: "create", Ftype3.DIR: "mkdir", Ftype3.LNK: "symlink"}.get(
            ftype, "mknod")
        op = Op(kind, cred.uid, cred.gid, cred.groups, node=f"l{local_id}",
                parent=_ref(parent), name=name, ftype=int(ftype), mode=mode & 0o7777,
                target=target, rdev=rdev)
        seq = await self._record(op)
        op.seq = seq
        self._apply(op, replaying=False)
        node = self._locals[local_id]
        return node, self.overlays[node].attrs

    async def link(self, node: Node, parent: Node, name: bytes, cred: Cred) -> Fattr3:
        op = Op("link", cred.uid, cred.gid, cred.groups, node=_ref(node), parent=_ref(parent),
                name=name)
        op.seq = await self._record(op)
        self._apply(op, replaying=False)
        return self.attrs_of(node)

    async def remove(self, parent: Node, name: bytes, node: Node, cred: Cred, *,
                     is_dir: bool) -> None:
        op = Op("rmdir" if is_dir else "remove", cred.uid, cred.gid, cred.groups,
                node=_ref(node), parent=_ref(parent), name=name)
        op.seq = await self._record(op)
        self._apply(op, replaying=False)

    async def rename(self, src: Node, src_name: bytes, dst: Node, dst_name: bytes,
                     node: Node, replaced: Node | None, cred: Cred) -> None:
        op = Op("rename", cred.uid, cred.gid, cred.groups, node=_ref(node), parent=_ref(src),
                name=src_name, parent2=_ref(dst), name2=dst_name,
                target=_ref(replaced).encode() if replaced is not None else b"")
        op.seq = await self._record(op)
        self._apply(op, replaying=False)

    async def write(self, node: Node, offset: int, data: bytes, cred: Cred) -> int:
        """Journal a write (waiting for room under max_dirty first)."""
        await self._wait_for_room(len(data))
        base = self._base_version(node) if _others_may_change(node) else ""
        op = Op("write", cred.uid, cred.gid, cred.groups, node=_ref(node), offset=offset,
                base=base, data=memoryview(data))
        record = encode_op(op)
        op.seq = await self._record(op, record)
        op.data = memoryview(record)[len(record) - len(data):]
        self._apply(op, replaying=False)
        return len(data)

    async def setattr(self, node: Node, sattr: Sattr3, cred: Cred) -> Fattr3:
        fields: dict[str, int] = {}
        for name in ("mode", "uid", "gid", "size"):
            value = getattr(sattr, name)
            if value is not None:
                fields[name] = value
        for name in ("atime", "mtime"):
            value = getattr(sattr, name)
            if isinstance(value, NfsTime):
                fields[name] = value.to_ns()
            elif value is not None:
                fields[name] = -1     # the server's time
        if "size" in fields:
            await self._wait_for_room(0)
        base = self._base_version(node) if "size" in fields and _others_may_change(node) \
            else ""
        op = Op("setattr", cred.uid, cred.gid, cred.groups, node=_ref(node), sattr=fields,
                base=base)
        op.seq = await self._record(op)
        self._apply(op, replaying=False)
        return self.attrs_of(node)

    def _base_version(self, node: Node) -> str:
        ov = self.overlays.get(node)
        if ov is not None and ov.base_version is not None:
            return ov.base_version
        return content_version(self._base_attrs(node))

    async def _wait_for_room(self, size: int) -> None:
        if self.dirty_bytes + size <= self.cfg.max_dirty or self.dirty_bytes == 0:
            return
        for p in self._pending.values():
            p.urgent = True
        self._urgent = True
        self._wake()
        with trio.move_on_after(self.cfg.dirty_wait):
            while self.dirty_bytes + size > self.cfg.max_dirty and self.dirty_bytes:
                self._room = trio.Event() if self._room.is_set() else self._room
                await self._room.wait()
            return
        raise OSError(errno.ENOSPC, f"{self.dirty_bytes} bytes not yet flushed (max_dirty)")

    # -- applying an op to the overlay and the queue (no awaits) ----------------------

    def _node(self, ref: str) -> Node:
        """The node a reference names (Unresolvable if its creation failed)."""
        if ref.startswith("l"):
            node = self._locals.get(int(ref[1:]))
            if node is None:
                raise Unresolvable(ref)
            return node
        return self.store.node_by_fh(bytes.fromhex(ref[1:]))

    def _apply(self, op: Op, *, replaying: bool) -> None:
        """Put `op` into the overlay and the flush queue."""
        now = NfsTime.from_ns(op.time_ns)
        seq = op.seq
        kind = op.kind
        cred = op.cred
        if kind in CREATES:
            parent = self._node(op.parent)
            local_id = int(op.node[1:])
            ftype = Ftype3(op.ftype)
            size = len(op.target) if ftype is Ftype3.LNK else 0
            node, _ = self._new_local(parent, op.name, ftype, op.mode, cred, local_id, now,
                                      size=size, rdev=op.rdev)
            self._dir_changed(parent, op.name, node, seq, now,
                              nlink=1 if ftype is Ftype3.DIR else 0)
            ov = self.overlays[node]
            ov.target = op.target
            ov.seqs.add(seq)
            self._queue(op, (parent, node), reads=(("o", parent),),
                        writes=(("n", parent, op.name), ("o", node)))
        elif kind == "link":
            node, parent = self._node(op.node), self._node(op.parent)
            self._dir_changed(parent, op.name, node, seq, now)
            ov = self._overlay_for(node, self.attrs_of(node))
            ov.attrs = replace(ov.attrs, nlink=ov.attrs.nlink + 1, ctime=now)
            ov.seqs.add(seq)
            self._queue(op, (parent, node), reads=(("o", parent), ("o", node)),
                        writes=(("n", parent, op.name),))
        elif kind in ("remove", "rmdir"):
            node, parent = self._node(op.node), self._node(op.parent)
            if self._cancel_temporary(node, op):
                self._release_ids(_local_ids(op))
                self._schedule_complete([seq])
                return
            self._dir_changed(parent, op.name, WHITEOUT, seq, now,
                              nlink=-1 if kind == "rmdir" else 0)
            ov = self._overlay_for(node, self.attrs_of(node))
            ov.attrs = replace(ov.attrs, nlink=max(0, ov.attrs.nlink - 1), ctime=now)
            ov.seqs.add(seq)
            self._queue(op, (parent, node), reads=(("o", parent),),
                        writes=(("n", parent, op.name), ("o", node)))
        elif kind == "rename":
            node, src, dst = self._node(op.node), self._node(op.parent), self._node(op.parent2)
            replaced = self._node(op.target.decode()) if op.target else None
            self._dir_changed(src, op.name, WHITEOUT, seq, now)
            self._dir_changed(dst, op.name2, node, seq, now)
            node.parent, node.name = dst, op.name2
            ov = self._overlay_for(node, self.attrs_of(node))
            ov.attrs = replace(ov.attrs, ctime=now)
            ov.seqs.add(seq)
            writes: tuple[Key, ...] = (("n", src, op.name), ("n", dst, op.name2))
            nodes: tuple[Node, ...] = (src, dst, node)
            if replaced is not None:
                rov = self._overlay_for(replaced, self.attrs_of(replaced))
                rov.attrs = replace(rov.attrs, nlink=max(0, rov.attrs.nlink - 1), ctime=now)
                rov.seqs.add(seq)
                writes += (("o", replaced),)
                nodes += (replaced,)
            self._queue(op, nodes, reads=(("o", src), ("o", dst), ("o", node)), writes=writes)
        elif kind == "write":
            node = self._node(op.node)
            ov = self._overlay_for(node, self.attrs_of(node))
            file = ov.file or self._start_file(node, ov)
            if ov.base_version is None and op.base:
                ov.base_version = op.base
            file.write(op.offset, op.data, seq)
            size = file.size
            ov.attrs = replace(ov.attrs, size=size, used=max(ov.attrs.used, size),
                               mtime=now, ctime=now)
            ov.seqs.add(seq)
            self.dirty_bytes += len(op.data)
            self._queue(op, (node,), reads=(), writes=(("o", node),))
            if file.dirty_bytes > EAGER_BYTES and not replaying:
                self._hurry(self._by_node.get(node, []))
        elif kind == "setattr":
            node = self._node(op.node)
            ov = self._overlay_for(node, self.attrs_of(node))
            a = op.sattr
            changes: dict[str, Any] = {"ctime": now}
            for name in ("mode", "uid", "gid"):
                if name in a:
                    changes[name] = a[name]
            for name in ("atime", "mtime"):
                if name in a:
                    changes[name] = now if a[name] < 0 else NfsTime.from_ns(a[name])
            if "size" in a:
                file = ov.file or self._start_file(node, ov)
                if ov.base_version is None and op.base:
                    ov.base_version = op.base
                file.truncate(a["size"])
                changes["size"] = a["size"]
                changes.setdefault("mtime", now)
            ov.attrs = replace(ov.attrs, **changes)
            ov.seqs.add(seq)
            self._queue(op, (node,), reads=(), writes=(("o", node),))
        elif kind == "bind":
            return
        else:
            log.error("unknown write-back op %r (seq %d) skipped", kind, seq)

    def _start_file(self, node: Node, ov: NodeOverlay) -> FileOverlay:
        """A server file gets local data: remember which server version it sits on."""
        ov.file = FileOverlay(size=ov.attrs.size, base_limit=ov.attrs.size)
        entry = self.store.attrs.peek(node.fh)
        if entry is not None and not node.is_local:
            ov.base_blocks = data_version(entry.attrs)
        return ov.file

    def _queue(self, op: Op, nodes: tuple[Node, ...], *, reads: tuple[Key, ...],
               writes: tuple[Key, ...]) -> None:
        delay = self.cfg.writeback_delay
        p = Pending(op, nodes, reads, writes, due=trio.current_time() + delay)
        for key in reads + writes:
            w = self._writer.get(key)
            if w is not None and not w.done.is_set():
                p.deps.add(w)
        for key in writes:
            p.deps.update(r for r in self._readers.get(key, ()) if not r.done.is_set())
            self._writer[key] = p
            self._readers[key] = []
        for key in reads:
            self._readers.setdefault(key, []).append(p)
        for d in p.deps:
            d.dependents.add(p)
        self._pending[op.seq] = p
        for node in nodes:
            self._by_node.setdefault(node, []).append(p)
        if not p.deps:
            self._ready.add(p)
        self._wake()

    def _cancel_temporary(self, node: Node, remove: Op) -> bool:
        """A file created here and removed before any of its ops reached the server
        never needs to: drop its ops.  True if that happened."""
        ops = self._by_node.get(node, [])
        if not node.is_local or not ops or any(p.started for p in ops):
            return False
        if any(p.op.kind not in ("create", "write", "setattr", "symlink", "mknod")
               for p in ops):
            return False
        if any(d for p in ops for d in p.dependents if node not in d.nodes):
            return False
        create = ops[0]
        if any(k[0] == "n" for d in create.deps for k in d.writes):
            return False    # it replaced a name an earlier op still has to change
        self.stats.cancelled += len(ops) + 1
        for p in list(ops):
            self._finish(p)
        return True

    # -- finishing ops ---------------------------------------------------------------------

    def _finish(self, p: Pending, *, error: str = "") -> None:
        """`p` reached the server (or never will): update the overlay, wake waiters."""
        p.failed = error
        seq = p.op.seq
        self._release_ids(_local_ids(p.op))
        self._pending.pop(seq, None)
        self._ready.discard(p)
        if p.op.kind == "write":
            self.dirty_bytes -= len(p.op.data)
            self._room.set()
        for node in p.nodes:
            ops = self._by_node.get(node)
            if ops is not None:
                if p in ops:
                    ops.remove(p)
                if not ops:
                    del self._by_node[node]
            ov = self.overlays.get(node)
            if ov is None:
                continue
            ov.seqs.discard(seq)
            for name in [n for n, s in ov.entry_seq.items() if s == seq]:
                del ov.entries[name]
                del ov.entry_seq[name]
            if not ov.seqs and not ov.entries:
                self._drop_overlay(node, ov)
        p.done.set()
        for d in p.dependents:
            d.deps.discard(p)
            if not d.deps and not d.started and not d.done.is_set():
                self._ready.add(d)
        self._schedule_complete([seq])
        self._wake()

    def _drop_overlay(self, node: Node, ov: NodeOverlay) -> None:
        del self.overlays[node]
        if node.is_local:
            return    # never made it to the server: keep the node's local view
        self.store.attrs.expire(node.fh)

    def _schedule_complete(self, seqs: list[int]) -> None:
        """Mark `seqs` done in the journal soon: one background task takes whatever
        has gathered, so many finished ops share one journal write."""
        self._to_complete.extend(seqs)
        if not self._completer_running:
            self._completer_running = True
            self.store.nursery.start_soon(self._completer)

    async def _completer(self) -> None:
        try:
            while self._to_complete:
                # Completions are not urgent: gathering them keeps the journal free
                # for the appends applications are waiting for.
                await trio.sleep(COMPLETE_EVERY)
                seqs, self._to_complete = self._to_complete, []
                try:
                    await self.journal.complete(seqs)
                except Exception as exc:   # the ops are on the server; a replay is harmless
                    log.warning("could not mark %d write-back records done: %s",
                                len(seqs), exc)
        finally:
            self._completer_running = False
            self._completed.set()
            self._completed = trio.Event()

    async def drain(self) -> None:
        """Wait until every finished op is also marked done in the journal."""
        while self._completer_running:
            await self._completed.wait()

    # -- sync points -----------------------------------------------------------------------

    def _hurry(self, targets: Iterable[Pending]) -> None:
        """Let these ops (and what they wait for) skip writeback_delay."""
        stack = list(targets)
        while stack:
            p = stack.pop()
            if not p.urgent:
                p.urgent = True
                stack.extend(p.deps)
        self._urgent = True
        self._wake()

    async def sync(self, node: Node | None = None) -> None:
        """Wait until `node`'s changes (all changes: None) and what they depend on are
        on the server.  OSError(EIO) if some could not be written (see lost+found)."""
        targets = list(self._by_node.get(node, [])) if node is not None \
            else list(self._pending.values())
        self._hurry(targets)
        for p in targets:
            await p.done.wait()
        failed = [p for p in targets if p.failed]
        if failed:
            raise OSError(errno.EIO, f"{len(failed)} changes could not be written to the "
                          f"server: {failed[0].failed}")

    # -- the flusher -----------------------------------------------------------------------

    def _wake(self) -> None:
        self._wakeup.set()

    def _next_batch(self) -> tuple[list[Pending], float]:
        """Ops to run now (one batch), and when the next op falls due.  A run of a
        file's WRITEs (or of its SETATTRs) that depend only on each other is one
        batch."""
        now = trio.current_time()
        if self._urgent:
            self._urgent = False
            self._ready.promote_urgent()
        p, next_due = self._ready.head(now)
        if p is None:
            return [], next_due
        batch = [p]
        if p.op.kind in ("write", "setattr"):
            for q in self._by_node.get(p.nodes[0], []):
                if q.op.seq <= batch[-1].op.seq or q.started:
                    continue
                if q.op.kind != p.op.kind or q.deps - set(batch) or \
                        (q.due > now and not q.urgent):
                    break
                batch.append(q)
        return batch, next_due

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Flush until `stop()` (start it in the mount's nursery)."""
        with trio.CancelScope() as self._scope:
            task_status.started()
            try:
                await self._flush_forever()
            finally:
                self._stopped.set()

    async def stop(self) -> None:
        """Stop flushing (ops in flight are abandoned: they stay journaled)."""
        if self._scope is not None:
            self._scope.cancel()
            await self._stopped.wait()

    def pause(self) -> None:
        """Start no new flush jobs until `resume()` (tests: let changes pile up)."""
        if self._resumed.is_set():
            self._resumed = trio.Event()

    def resume(self) -> None:
        self._resumed.set()

    @property
    def paused(self) -> bool:
        return not self._resumed.is_set()

    def _job_limit(self, batch: list[Pending]) -> int:
        """Jobs allowed in flight: few while applications are busy here (they come
        first: this process and the CPU are shared), all when idle or when someone
        waits in fsync."""
        busy = trio.current_time() - self.last_local_change < FOREGROUND_WINDOW
        return JOBS if not busy or any(p.urgent for p in batch) else FOREGROUND_JOBS

    async def _watch_server(self) -> None:
        """When the server comes back, retry what waits for it now, not after the
        backoff."""
        transport = self.client.transport
        while hasattr(transport, "wait_changed"):
            await transport.wait_changed()
            if self.client.up:
                self._ready.retry_now(trio.current_time())
                self._wake()

    async def _flush_forever(self) -> None:
        async with trio.open_nursery() as jobs:
            jobs.start_soon(self._watch_server)
            while True:
                await self._resumed.wait()
                self._wakeup = trio.Event()
                batch, next_due = self._next_batch()
                if not batch:
                    with trio.move_on_at(next_due):
                        await self._wakeup.wait()
                    continue
                if self._running >= self._job_limit(batch):
                    with trio.move_on_after(FOREGROUND_WINDOW):
                        await self._wakeup.wait()
                    continue
                self._running += 1
                for p in batch:
                    p.started = True
                    self._ready.discard(p)
                jobs.start_soon(self._job, batch)

    async def _job(self, batch: list[Pending]) -> None:
        try:
            await self._execute(batch)
        except (TransportError, ProtocolError) as exc:
            self._retry(batch, exc)
        except NfsError as exc:
            if exc.status in TRANSIENT:
                self._retry(batch, exc)
            else:
                await self._lose(batch, f"the server refused {batch[0].op.kind}: {exc}")
        except Unresolvable:
            await self._lose(batch, "its directory could not be created on the server")
        except OSError as exc:
            await self._lose(batch, f"{batch[0].op.kind} failed: {exc}")
        except Exception as exc:   # a bug: keep the data, keep the mount
            log.exception("write-back of %s failed unexpectedly", batch[0].op.kind)
            await self._lose(batch, f"internal error: {exc}")
        else:
            self.stats.server_down = False
            for p in batch:
                self.stats.ops_flushed += 1
                self._finish(p)
        finally:
            self._running -= 1
            self._wake()

    def _retry(self, batch: list[Pending], exc: BaseException) -> None:
        first = batch[0]
        first.attempts += 1
        self.stats.retries += 1
        if isinstance(exc, TransportError):
            if not self.stats.server_down:
                log.warning("server unreachable; %d changes wait in the journal (%s)",
                            len(self._pending), exc)
            self.stats.server_down = True
        else:
            log.info("write-back of %s will be retried: %s", first.op.kind, exc)
        delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(first.attempts, 10))
        for p in batch:
            p.started = False
            p.due = trio.current_time() + delay
            self._ready.add(p)
        self._wake()

    # -- executing ops on the server -----------------------------------------------------

    def _fh(self, ref: str) -> bytes:
        node = self._node(ref)
        if node.is_local:
            raise Unresolvable(ref)
        return node.fh

    async def _execute(self, batch: list[Pending]) -> None:
        op = batch[0].op
        cred = op.cred
        client = self.client
        kind = op.kind
        if kind in CREATES:
            await self._create(op, cred)
        elif kind == "write":
            await self._flush_data(batch)
        elif kind == "setattr":
            node = self._node(op.node)
            a = {k: v for p in batch for k, v in p.op.sattr.items()}   # later ones win
            base = next((p.op.base for p in batch if "size" in p.op.sattr and p.op.base), "")
            if base and await self._conflicted(node, base):
                return await self._conflict(node, batch)
            times = {k: (nfs3.TimeHow.SET_TO_SERVER_TIME if a[k] < 0
                         else NfsTime.from_ns(a[k])) for k in ("atime", "mtime") if k in a}
            sattr = Sattr3(mode=a.get("mode"), uid=a.get("uid"), gid=a.get("gid"),
                           size=a.get("size"), **times)
            await client.setattr(self._fh(op.node), sattr, batch[-1].op.cred)
            await self._remember_version(node)
        elif kind in ("remove", "rmdir"):
            parent = self._node(op.parent)
            gone: nfs3.DirWccRes
            try:
                if kind == "remove":
                    gone = await client.remove(self._fh(op.parent), op.name, cred)
                else:
                    gone = await client.rmdir(self._fh(op.parent), op.name, cred)
            except NfsError as exc:
                if exc.status == Nfsstat3.NFS3ERR_NOENT:
                    return     # already gone (a replay, or another client removed it)
                if exc.status in (Nfsstat3.NFS3ERR_NOTEMPTY, Nfsstat3.NFS3ERR_EXIST):
                    log.warning("not removing %r: another client put files in it",
                                parent.path() + b"/" + op.name)
                    return
                raise
            self.store.server_changed_dir(parent, gone.dir_wcc, op.name, removed=True)
        elif kind == "rename":
            src, dst, node = self._node(op.parent), self._node(op.parent2), self._node(op.node)
            try:
                moved = await client.rename(self._fh(op.parent), op.name,
                                            self._fh(op.parent2), op.name2, cred)
            except NfsError as exc:
                if exc.status == Nfsstat3.NFS3ERR_NOENT and await self._exists_as(
                        dst, op.name2, node, cred):
                    return     # a replay: it had been renamed
                raise
            self.store.server_changed_dir(src, moved.fromdir_wcc, op.name, removed=True)
            self.store.server_changed_dir(dst, moved.todir_wcc, op.name2, added=node)
        elif kind == "link":
            node, parent = self._node(op.node), self._node(op.parent)
            try:
                linked = await client.link(self._fh(op.node), self._fh(op.parent), op.name,
                                           cred)
            except NfsError as exc:
                if exc.status == Nfsstat3.NFS3ERR_EXIST and await self._exists_as(
                        parent, op.name, node, cred):
                    return
                raise
            self.store.server_changed_dir(parent, linked.linkdir_wcc, op.name, added=node)

    async def _exists_as(self, parent: Node, name: bytes, node: Node, cred: Cred) -> bool:
        try:
            res = await self.client.lookup(self._fh(_ref(parent)), name, cred)
        except NfsError:
            return False
        return res.obj_attributes is not None and res.obj_attributes.fileid == node.fileid

    async def _create(self, op: Op, cred: Cred) -> None:
        parent = self._node(op.parent)
        node = self._node(op.node)
        ftype = Ftype3(op.ftype)
        pfh = self._fh(op.parent)
        sattr = Sattr3(mode=op.mode)
        name = op.name
        res: nfs3.DirOpRes
        for attempt in range(2):
            try:
                if ftype is Ftype3.REG:
                    res = await self.client.create(pfh, name, cred, attrs=sattr,
                                                   mode=nfs3.CreateMode.GUARDED)
                elif ftype is Ftype3.DIR:
                    res = await self.client.mkdir(pfh, name, sattr, cred)
                elif ftype is Ftype3.LNK:
                    res = await self.client.symlink(pfh, name, op.target, Sattr3(), cred)
                else:
                    spec = op.rdev if ftype in (Ftype3.CHR, Ftype3.BLK) else None
                    res = await self.client.mknod(pfh, name, ftype, sattr, cred, spec)
                break
            except (NfsError, UnknownOutcomeError) as exc:
                if isinstance(exc, NfsError) and exc.status != Nfsstat3.NFS3ERR_EXIST:
                    raise
                fate_unknown = isinstance(exc, UnknownOutcomeError) or \
                    op.seq <= self._replayed_up_to
                if fate_unknown or ftype is Ftype3.DIR:
                    # Ours from before (a replay, a lost reply), or a directory to merge.
                    look = await self.client.lookup(pfh, name, cred)
                    fh, attrs = look.object, look.obj_attributes
                    if fh is not None and attrs is not None and attrs.type is ftype:
                        self._bind(node, fh, attrs, op)
                        return
                if attempt:
                    raise
                name = self._conflict_name(op.name)   # someone else's file: keep it
                self.stats.conflicts += 1
                log.warning("conflict: %r was created on the server by another client; "
                            "ours is written as %r", parent.path() + b"/" + op.name, name)
                self.store.rename_local_entry(parent, op.name, name, node)
        fh = res.object
        attrs = res.obj_attributes
        if fh is None or attrs is None:
            look = await self.client.lookup(pfh, name, cred)
            fh, attrs = look.object, look.obj_attributes
        assert fh is not None and attrs is not None
        self._bind(node, fh, attrs, op)
        if ftype is Ftype3.DIR:
            self.store.install_own_listing(node, attrs)
        self.store.server_changed_dir(parent, res.dir_wcc, name, added=node)

    def _bind(self, node: Node, fh: bytes, attrs: Fattr3, op: Op) -> None:
        """A locally created node now exists on the server as `fh`."""
        assert node.local_id is not None
        self.store.rebind(node, fh, attrs)
        ov = self.overlays.get(node)
        if ov is not None:
            ov.local = False
            ov.base_version = None
        bind = Op("bind", node=f"l{node.local_id}", fh=fh)
        self.store.nursery.start_soon(self._record_bind, node.local_id, bind)

    async def _record_bind(self, local_id: int, bind: Op) -> None:
        try:
            self._binds[local_id] = await self._record(bind)
        except OSError as exc:
            log.warning("could not journal a new file's handle: %s", exc)
            return
        self._release_ids([local_id])      # (the BIND op itself named it)

    async def _conflicted(self, node: Node, base: str) -> bool:
        """Did someone else change `node` since our changes' base version?"""
        if not _others_may_change(node):
            return False
        ov = self.overlays.get(node)
        expected = ov.base_version if ov is not None and ov.base_version else base
        current = await self.client.getattr(node.fh, Cred.root())
        log.debug("conflict check of %r: expected %s, server %s (op base %s)", node.path(),
                  expected, content_version(current), base)
        return content_version(current) != expected

    async def _remember_version(self, node: Node) -> None:
        """After our own change to a file others may change too: its contents' version
        now, the base of the next conflict check.  Asked for with a GETATTR: post-op
        attributes of WRITE and COMMIT replies may lag behind (ganesha's do)."""
        ov = self.overlays.get(node)
        if ov is None or not _others_may_change(node):
            return
        after = await self.client.getattr(node.fh, Cred.root())
        ov.base_version = content_version(after)

    async def _flush_data(self, batch: list[Pending]) -> None:
        """Coalesce a run of WRITEs of one file into wsize UNSTABLE WRITEs + COMMIT."""
        node = self._node(batch[0].op.node)
        base = next((p.op.base for p in batch if p.op.base), "")
        if base and await self._conflicted(node, base):
            await self._conflict(node, batch)
            return
        fh = self._fh(batch[0].op.node)
        cred = batch[-1].op.cred
        merged = FileOverlay(size=0, base_limit=0)
        for p in batch:
            merged.write(p.op.offset, p.op.data, p.op.seq)
        pieces = merged.ranges(self.client.info.wsize)
        if len(pieces) == 1 and len(pieces[0][1]) <= SMALL_WRITE:
            offset, data = pieces[0]     # one small WRITE: stable at once, no COMMIT
            res = await self.client.write(fh, offset, data, cred,
                                          stable=StableHow.FILE_SYNC)
            if res.count != len(data):
                raise OSError(errno.EIO, f"short WRITE ({res.count} of {len(data)})")
            await self._remember_version(node)
            self.stats.bytes_flushed += len(data)
            return
        for _round in range(3):
            verfs: list[bytes] = []
            slots = trio.Semaphore(WRITES_PER_FILE)

            async def send(offset: int, data: bytes, slots: trio.Semaphore = slots,
                           verfs: list[bytes] = verfs) -> None:
                async with slots:
                    res = await self.client.write(fh, offset, data, cred)
                    if res.count != len(data):
                        raise OSError(errno.EIO, f"short WRITE ({res.count} of {len(data)})")
                    verfs.append(res.verf)

            async with trio.open_nursery() as nursery:
                for offset, data in pieces:
                    nursery.start_soon(send, offset, data)
            commit = await self.client.commit(fh, cred)
            if all(v == commit.verf for v in verfs):
                await self._remember_version(node)
                self.stats.bytes_flushed += sum(len(d) for _, d in pieces)
                return
            self.stats.resent_after_reboot += 1
            log.warning("server rebooted during a flush of %r: sending it again",
                        node.path())
        raise NfsError(Nfsstat3.NFS3ERR_IO, "COMMIT")

    # -- conflicts and lost data -----------------------------------------------------------

    def _conflict_name(self, name: bytes) -> bytes:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        suffix = f".wancache-conflict-{self._host}-{stamp}".encode()
        return name[:max(1, 255 - len(suffix))] + suffix

    async def local_content(self, node: Node) -> tuple[bytes, bool]:
        """The file as users here see it, and whether every byte of it was known
        (a server byte we never cached reads as zero)."""
        ov = self.overlays.get(node)
        if ov is None or ov.file is None:
            return b"", True
        complete = True
        size = ov.file.size
        base = bytearray()
        if not node.is_local and ov.file.base_limit and ov.base_blocks:
            blocks = self.store.data.blocks if self.store.data is not None else None
            bs = self.cfg.block_size
            for idx in range((min(size, ov.file.base_limit) + bs - 1) // bs):
                block = await blocks.get(node.key, ov.base_blocks, idx) if blocks else None
                if block is None:
                    complete = False
                    block = bytes(min(bs, ov.file.base_limit - idx * bs))
                base += block
        return ov.file.apply(0, size, bytes(base)), complete

    async def _conflict(self, node: Node, batch: list[Pending]) -> None:
        """Someone else changed the file: keep theirs, write ours next to it."""
        content, complete = await self.local_content(node)
        parent = node.parent
        name = self._conflict_name(node.name)
        self.stats.conflicts += 1
        log.warning("conflict: %r changed on the server since we cached it; keeping the "
                    "server's file and writing ours as %r%s", node.path(), name,
                    "" if complete else " (bytes we never had read as zeros)")
        cred = batch[0].op.cred
        if parent is None or parent.is_local:
            await self._save_lost(node, content, "its directory is gone")
        else:
            for n in range(1, 100):
                try:
                    res = await self.client.create(
                        parent.fh, name if n == 1 else name + f"-{n}".encode(), cred,
                        attrs=Sattr3(mode=self.attrs_of(node).mode),
                        mode=nfs3.CreateMode.GUARDED)
                    break
                except NfsError as exc:
                    if exc.status != Nfsstat3.NFS3ERR_EXIST or n == 99:
                        raise
            fh = res.object
            assert fh is not None
            for off in range(0, len(content), self.client.info.wsize):
                await self.client.write(fh, off, content[off:off + self.client.info.wsize],
                                        cred, stable=StableHow.FILE_SYNC)
        self._abandon_data(node, batch)

    def _abandon_data(self, node: Node, batch: list[Pending]) -> None:
        """Drop the node's queued data changes (they were saved elsewhere)."""
        later = [p for p in self._by_node.get(node, [])
                 if p not in batch and not p.started and p.op.kind in ("write", "setattr")]
        for p in later:
            self._finish(p)
        ov = self.overlays.get(node)
        if ov is not None:
            ov.file = None

    async def _save_lost(self, node: Node, content: bytes, why: str) -> Path:
        self._lost_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = node.name.decode(errors="replace").replace("/", "_") or "file"
        path = self._lost_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{name}"
        await trio.to_thread.run_sync(path.write_bytes, content)
        path.chmod(0o600)
        self.stats.lost += 1
        log.error("could not write %r to the server (%s); its data is saved in %s",
                  node.path(), why, path)
        return path

    async def _lose(self, batch: list[Pending], why: str) -> None:
        """An op the server will never take: save what users wrote, then move on."""
        op = batch[0].op
        try:
            node = self._node(op.node) if op.node else None
        except Unresolvable:
            node = None
        if node is not None and op.kind in ("write", "setattr", "create") and \
                self.overlays.get(node) is not None and self.overlays[node].file is not None:
            content, _ = await self.local_content(node)
            await self._save_lost(node, content, why)
            self._abandon_data(node, batch)
        else:
            log.error("could not apply %s of %r on the server: %s", op.kind,
                      op.name or op.node, why)
        for p in batch:
            self._finish(p, error=why)

    # -- replay after a restart ------------------------------------------------------------

    async def replay(self) -> int:
        """Rebuild the overlay and the queue from the journal; returns ops queued."""
        ops: list[Op] = []
        unreadable: list[str] = []
        for seq, record in self.journal.pending():
            try:
                ops.append(decode_op(seq, record))
            except ValueError as exc:
                unreadable.append(f"{seq} ({exc})")
        if unreadable:
            log.error("unreadable write-back records skipped: %s", ", ".join(unreadable))
        bound = {int(op.node[1:]): op.fh for op in ops if op.kind == "bind"}
        for op in ops:
            if op.kind == "bind":
                self._binds[int(op.node[1:])] = op.seq
        unknown: set[bytes] = set()
        for fh in {bytes.fromhex(r[1:]) for op in ops
                   for r in (op.node, op.parent, op.parent2, op.target.decode(errors="replace"))
                   if r.startswith("f")} | set(bound.values()):
            try:
                await self.store.ensure_node(fh)
            except (TransportError, NfsError) as exc:
                unknown.add(fh)
                log.warning("cannot look up a file the journal refers to (%s)", exc)
        if unknown:
            raise OSError(errno.EHOSTUNREACH, "the journal refers to files whose attributes "
                          "are not cached and the server cannot be reached: mount again "
                          "when it can (the journal is kept)")
        for local_id, fh in bound.items():     # created before the crash: known now
            node = self.store.node_by_fh(fh)
            node.local_id = local_id
            self._locals[local_id] = node
        queued = 0
        skipped: list[str] = []
        for op in ops:
            if op.kind == "bind":
                continue
            try:
                if op.kind in CREATES and int(op.node[1:]) in bound:
                    self._replay_bound_create(op, bound[int(op.node[1:])])
                    continue
                for local_id in _local_ids(op):
                    self._lrefs[local_id] = self._lrefs.get(local_id, 0) + 1
                self._apply(op, replaying=True)
                queued += 1
            except Unresolvable as exc:
                skipped.append(f"{op.seq} {op.kind} ({exc})")
        if skipped:
            log.error("write-back records referring to unknown files skipped: %s",
                      ", ".join(skipped))
        self._replayed_up_to = max((op.seq for op in ops), default=0)
        idle = [i for i in self._binds if not self._lrefs.get(i)]
        if idle:
            self._schedule_complete([self._binds.pop(i) for i in idle])
        if queued:
            log.info("replaying %d changes from the journal", queued)
        return queued

    def _replay_bound_create(self, op: Op, fh: bytes) -> None:
        """A create that reached the server before the crash (its BIND says so)."""
        self._schedule_complete([op.seq])
