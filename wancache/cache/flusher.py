"""The flusher: puts journaled changes on the server, in an order that keeps their
meaning, as fast as the link allows.

It owns the dependency graph.  Each change reads and writes *keys* (("o", node) for
an object, ("n", dir, name) for a name) and waits for the last earlier writer of
any key it uses (writers also wait for earlier readers).  So a file's CREATE
precedes its data, a directory's MKDIR what is created in it, an RMDIR follows
what empties it, a RENAME follows what it renames; independent files flush side by
side.

Ordering rule for a file's data: the server receives a file's changes in the order
the application made them.  A run of one file's writes, truncates and attribute
changes by one user is one batch: the writes between two truncates are coalesced
(where they overlap, the later bytes win) and sent as disjoint WRITEs, UNSTABLE and
all in flight; each truncate is sent once the writes before it are answered, and
before the writes after it; one COMMIT (its verifier checked) and one SETATTR with
the final mode, owner and times end the batch.  Sending a batch again after it was
partly applied (a lost reply, a crash, a server that lost UNSTABLE data) gives the
same result, so a batch is retried whole.

A file's mtime stays what the application set or caused: the final SETATTR carries
it as the client's time (sent as the file's owner; that part is best effort).

Failures: transient ones (server unreachable, timeouts, JUKEBOX) are retried with
capped exponential backoff; a stale handle is looked up again by path.  A change
that may have reached the server before its reply was lost is checked against the
server's state on the next attempt (EEXIST, ENOENT).  Regular files are created
EXCLUSIVE with a verifier derived from their local id, so a repeated CREATE of our
own file succeeds and one of another client's file fails.  What the server refuses
for good goes to the `lost` hook; a file another client changed since our changes'
base goes to a conflict copy.  Outcomes are reported through `FlushHooks`.
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from wancache.config import Config
from wancache.creds import Cred
from wancache.nfs_backend import nfs3
from wancache.nfs_backend.client import NfsClient, patient
from wancache.nfs_backend.errors import (
    NfsError,
    ProtocolError,
    TransportError,
    XdrError,
)
from wancache.nfs_backend.nfs3 import Fattr3, Ftype3, Nfsstat3, NfsTime, Sattr3, StableHow
from wancache.nfs_backend.transport import track_sends

from .attrs import content_version, content_version_of
from .budget import ByteBudget
from .node import Node
from .nodes import STALE, NodeTable
from .overlay import Extent, FileOp, FileOverlay

log = logging.getLogger(__name__)

JOBS = 64                   # flush jobs in flight
FOREGROUND_JOBS = 4         # ... while applications keep changing files here
FOREGROUND_WINDOW = 0.25    # seconds after a local change that count as busy
WRITES_PER_FILE = 16        # WRITEs in flight for one file
WRITE_BYTES = 16 << 20      # data of the WRITEs in flight, all files together (RAM:
                            # each byte is held twice, the data and its RPC record)
SMALL_WRITE = 64 << 10      # a batch of one WRITE up to this size is FILE_SYNC
BATCH_CHANGES = 4096        # changes in one batch at most
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
TRANSIENT = {Nfsstat3.NFS3ERR_JUKEBOX, Nfsstat3.NFS3ERR_SERVERFAULT, Nfsstat3.NFS3ERR_IO}
STALE_ATTEMPTS = 3          # a handle still stale after this many tries is gone
OWNER_ONLY = {Nfsstat3.NFS3ERR_PERM, Nfsstat3.NFS3ERR_ACCES}   # a SETATTR not as the owner
CREATES = ("create", "mkdir", "symlink", "mknod")
DATA = ("write", "setattr")
NOW = -1                    # an attribute time meaning "now"
Key = tuple[Any, ...]
TREE: Key = ("tree",)       # written by every move of a directory to another one


class Unresolvable(Exception):
    """A change names a node whose creation never reached the server."""


@dataclass(eq=False, slots=True)
class Change:
    """One journaled change, as the flusher sees it (nodes resolved)."""

    seq: int
    kind: str
    cred: Cred
    time_ns: int
    node: Node
    parent: Node | None = None
    name: bytes = b""
    parent2: Node | None = None
    name2: bytes = b""
    replaced: Node | None = None
    ftype: Ftype3 | None = None
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    mode: int | None = None            # create: its mode; setattr: the new mode
    file_op: FileOp | None = None      # a write or truncate
    attrs: dict[str, int] = field(default_factory=dict)   # uid, gid, atime, mtime (NOW)
    mtime_after: int | None = None     # the file's mtime as users saw it after this
    mode_after: int | None = None      # ... and its permission bits
    base: str = ""                     # content version the change applies to
    replayed: bool = False             # from before a restart: maybe on the server
    local_refs: tuple[int, ...] = ()   # local ids its record names (kept until done)


@dataclass(eq=False)
class Pending:
    """A change waiting for (or being given to) the server."""

    change: Change
    nodes: tuple[Node, ...]
    reads: tuple[Key, ...]
    writes: tuple[Key, ...]
    due: float
    deps: set[Pending] = field(default_factory=set)
    dependents: set[Pending] = field(default_factory=set)
    started: bool = False
    executed: bool = False             # its calls are done (the directories' mtimes next)
    urgent: bool = False               # skips writeback_delay
    waited: bool = False               # someone waits for it (runs even when paused)
    attempts: int = 0
    maybe_sent: bool = False           # a call of an earlier attempt went out whole
    failed: str = ""
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class Outcome:
    """What a batch left on the server."""

    server_size: int | None = None     # data batches: the file's size now
    after: Fattr3 | None = None        # the node's attributes after it, if known
    sent: float = 0.0                  # when the call that returned `after` was sent
    conflict: bool = False             # the node's changes went to a conflict copy


@dataclass
class FlushHooks:
    """What the flusher needs from, and reports to, the rest of the mount."""

    read_data: Callable[[int, int, int], Awaitable[bytes]]        # (seq, skip, length)
    flushing: Callable[[Node, str], Awaitable[None]]   # a batch will leave this version
    server_size: Callable[[Node], int]      # server's size under the node's pending data
    local_attrs: Callable[[Node], Fattr3]   # attributes as users here see them
    server_attrs: Callable[[Node], Fattr3 | None]   # ... as the server last showed them
    read_ours: Callable[[Node, int, int], Awaitable[bytes]]       # the file, our version
    bound: Callable[[Node, bytes, Fattr3], Awaitable[None]]       # created on the server
    renamed: Callable[[Node, bytes], None]  # our new node lost its name to another's
    done: Callable[[list[Change], Outcome], None]
    lost: Callable[[list[Change], str], Awaitable[None]]          # never raises
    dir_changed: Callable[..., None]
    own_dir: Callable[[Node, Fattr3], None]
    file_changed: Callable[..., None]       # (node, attrs after or None, sent; nlink=)


@dataclass
class FlushStats:
    ops_flushed: int = 0
    bytes_flushed: int = 0
    conflicts: int = 0
    lost: int = 0
    cancelled: int = 0
    retries: int = 0
    resent_after_reboot: int = 0
    server_down: bool = False
    write_bytes_in_flight: int = 0      # WRITE data read from the journal, not yet acked
    max_write_bytes_in_flight: int = 0  # ... the most at once (at most WRITE_BYTES)


def verifier(local_id: int) -> bytes:
    """The EXCLUSIVE CREATE verifier of the file created here as `local_id`."""
    return struct.pack(">Q", local_id & 0xFFFF_FFFF_FFFF_FFFF)


def keys_of(c: Change) -> tuple[tuple[Key, ...], tuple[Key, ...], tuple[Node, ...]]:
    """(keys read, keys written, nodes involved) of a change."""
    node, parent = c.node, c.parent
    if c.kind in CREATES:
        assert parent is not None
        return (("o", parent),), (("n", parent, c.name), ("o", node)), (parent, node)
    if c.kind == "link":
        assert parent is not None
        return (("o", parent), ("o", node)), (("n", parent, c.name),), (parent, node)
    if c.kind in ("remove", "rmdir"):
        assert parent is not None
        return (("o", parent),), (("n", parent, c.name), ("o", node)), (parent, node)
    if c.kind == "rename":
        assert parent is not None and c.parent2 is not None
        writes: tuple[Key, ...] = (("n", parent, c.name), ("n", c.parent2, c.name2))
        nodes: tuple[Node, ...] = (parent, c.parent2, node)
        if c.replaced is not None:
            writes += (("o", c.replaced),)
            nodes += (c.replaced,)
        if node.is_dir and parent is not c.parent2:
            # It changes which directories are in which: such moves go in their order
            # (else one could reach the server before a move it needs, e.g. mv x/y y;
            # mv x y/x, and be refused as moving a directory into itself).
            writes += (TREE,)
        return (("o", parent), ("o", c.parent2), ("o", node)), writes, nodes
    return (), (("o", node),), (node,)


class _ReadyQueue:
    """Changes whose dependencies are done: due ones by seq (journal order), the rest
    by due time.  Removal is lazy: an entry whose token is not its change's current
    one is skipped when it surfaces."""

    def __init__(self) -> None:
        self._due: list[tuple[int, int, Pending]] = []
        self._later: list[tuple[float, int, int, Pending]] = []
        self._tokens: dict[Pending, int] = {}
        self._next = 0

    def __contains__(self, p: Pending) -> bool:
        return p in self._tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def add(self, p: Pending) -> None:
        """Queue `p` (due at once if urgent and not waiting out a backoff)."""
        if p not in self._tokens:
            if p.urgent and not p.attempts:
                p.due = min(p.due, trio.current_time())
            self._next += 1
            self._tokens[p] = self._next
            heapq.heappush(self._later, (p.due, p.change.seq, self._next, p))

    def discard(self, p: Pending) -> None:
        self._tokens.pop(p, None)

    def _requeue(self, move: Callable[[Pending], bool], now: float) -> None:
        """Make every queued change for which `move(p)` holds due at `now`."""
        for p in [p for p in self._tokens if move(p)]:
            p.due = min(p.due, now)
            del self._tokens[p]
            self.add(p)

    def retry_now(self, now: float) -> None:
        """Changes waiting out a retry's backoff may go at once."""
        self._requeue(lambda p: p.attempts > 0, now)

    def hurry(self, now: float) -> None:
        """Urgent changes (someone waits for them) skip writeback_delay."""
        self._requeue(lambda p: p.urgent and p.due > now, now)

    def first_waited(self) -> Pending | None:
        """The queued change someone waits for that came first (a scan: for a paused
        flusher only)."""
        waited = [p for p in self._tokens if p.waited and not p.started]
        return min(waited, key=lambda p: p.change.seq) if waited else None

    def head(self, now: float) -> tuple[Pending | None, float]:
        """The first due change still queued, and when the next falls due."""
        while self._later and self._later[0][0] <= now:
            _, seq, token, p = heapq.heappop(self._later)
            if self._tokens.get(p) == token:
                heapq.heappush(self._due, (seq, token, p))
        while self._due:
            _, token, p = self._due[0]
            if self._tokens.get(p) == token and not p.started:
                return p, math.inf
            heapq.heappop(self._due)
        while self._later and self._tokens.get(self._later[0][3]) != self._later[0][2]:
            heapq.heappop(self._later)
        return None, self._later[0][0] if self._later else math.inf


class Flusher:
    """Flushes submitted changes until stopped (see the module docstring)."""

    def __init__(self, client: NfsClient, cfg: Config, nodes: NodeTable) -> None:
        self.client = client
        self.cfg = cfg
        self.nodes = nodes
        self.hooks: FlushHooks | None = None      # wired by the composition root
        self.base_version: Callable[[Node], str | None] = lambda node: None
        self.also_ours: Callable[[Node], set[str]] = lambda node: set()
        self.stats = FlushStats()
        self._write_budget = ByteBudget(WRITE_BYTES)
        self.last_local_change = -math.inf       # trio time of the last change submitted
        self._pending: dict[int, Pending] = {}
        self._by_node: dict[Node, list[Pending]] = {}
        self._writer: dict[Key, Pending] = {}
        self._readers: dict[Key, list[Pending]] = {}
        self._ready = _ReadyQueue()
        self._wakeup = trio.Event()
        self._running = 0
        self.paused = False
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self._host = socket.gethostname().split(".")[0] or "client"

    @property
    def _h(self) -> FlushHooks:
        assert self.hooks is not None, "the flusher's hooks were not wired"
        return self.hooks

    # -- what is pending (no awaits) ------------------------------------------------------

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def oldest_age(self) -> float:
        """Seconds the oldest unflushed change has waited (0 if none)."""
        if not self._pending:
            return 0.0
        oldest = min(p.change.time_ns for p in self._pending.values())
        return max(0.0, (time.time_ns() - oldest) / 1e9)

    def pending_of(self, node: Node) -> list[Pending]:
        return list(self._by_node.get(node, ()))

    def graph_size(self) -> int:
        """Entries in the dependency maps (bounded by the pending changes)."""
        return len(self._writer) + sum(len(r) for r in self._readers.values())

    # -- taking changes -------------------------------------------------------------------

    def submit(self, change: Change, *, delay: float) -> Pending:
        """Queue `change` behind what it depends on, due in `delay` seconds."""
        reads, writes, nodes = keys_of(change)
        p = Pending(change, nodes, reads, writes, due=trio.current_time() + delay)
        for key in reads + writes:
            w = self._writer.get(key)
            if w is not None:
                p.deps.add(w)
        for key in writes:
            p.deps.update(self._readers.get(key, ()))
            self._writer[key] = p
            self._readers[key] = []
        for key in reads:
            self._readers.setdefault(key, []).append(p)
        p.deps.discard(p)
        for d in p.deps:
            d.dependents.add(p)
        self._pending[change.seq] = p
        for node in nodes:
            self._by_node.setdefault(node, []).append(p)
        if not p.deps:
            self._ready.add(p)
        if change.kind != "bind":
            self.last_local_change = trio.current_time()
        self._wake()
        return p

    def cancel_temporary(self, node: Node) -> list[Change] | None:
        """A file created here and removed before any of its changes started never
        needs to reach the server: drop them all and return them (None: not so).
        Not if an earlier attempt may have reached the server (a retry, or a replay
        after a restart): the file may be there, and only its REMOVE takes it away."""
        ops = self._by_node.get(node, [])
        if not node.is_local or not ops or \
                any(p.started or p.maybe_sent or p.change.replayed for p in ops):
            return None
        if any(p.change.kind not in ("create", "write", "setattr", "symlink", "mknod")
               or p.change.node is not node for p in ops):
            return None
        if any(d for p in ops for d in p.dependents if node not in d.nodes):
            return None
        if any(k[0] == "n" for d in ops[0].deps for k in d.writes):
            return None    # it replaced a name an earlier change still has to change
        cancelled = list(ops)      # (_finish empties `ops`)
        self.stats.cancelled += len(cancelled) + 1     # and the remove itself
        for p in cancelled:
            self._finish(p)
        return [p.change for p in cancelled]

    # -- sync points ----------------------------------------------------------------------

    def hurry(self, targets: Iterable[Pending], *, waited: bool = True) -> None:
        """Let these changes (and what they wait for) skip writeback_delay; `waited`:
        someone waits for them, so they go even while paused."""
        stack = list(targets)
        while stack:
            p = stack.pop()
            if not p.urgent or (waited and not p.waited):
                p.urgent = True
                p.waited = p.waited or waited
                stack.extend(p.deps)
        self._ready.hurry(trio.current_time())
        self._wake()

    def hurry_all(self) -> None:
        self.hurry(list(self._pending.values()))

    async def sync(self, node: Node | None = None) -> list[str]:
        """Wait until `node`'s changes (all changes: None) and what they depend on are
        on the server; the reasons of those that failed."""
        targets = self.pending_of(node) if node is not None else list(self._pending.values())
        self.hurry(targets)
        for p in targets:
            await p.done.wait()
        return [p.failed for p in targets if p.failed]

    # -- running --------------------------------------------------------------------------

    def pause(self) -> None:
        """Start no new flush jobs until `resume()`, but for what someone waits for
        (fsync, flush): as a very slow link would (tests let changes pile up)."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._wake()

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
        """Stop flushing (changes in flight are abandoned: they stay journaled)."""
        if self._scope is not None:
            self._scope.cancel()
            await self._stopped.wait()

    def _wake(self) -> None:
        self._wakeup.set()

    def _job_limit(self, batch: list[Pending]) -> int:
        """Jobs allowed in flight: few while applications are busy here (they come
        first: this process and the CPU are shared), all when idle or when someone
        waits for these changes."""
        busy = trio.current_time() - self.last_local_change < FOREGROUND_WINDOW
        return JOBS if not busy or any(p.urgent for p in batch) else FOREGROUND_JOBS

    async def _watch_server(self) -> None:
        """When the server comes back, retry what waits for it now."""
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

    def _next_batch(self) -> tuple[list[Pending], float]:
        """Changes to run now (one batch), and when the next falls due.  A file's
        CREATE and the run of its data and attribute changes by one user that depend
        only on each other are one batch."""
        now = trio.current_time()
        if self.paused:     # only what someone waits for
            p, next_due = self._ready.first_waited(), math.inf
        else:
            p, next_due = self._ready.head(now)
        if p is None:
            return [], next_due
        batch = [p]
        c = p.change
        if c.kind in DATA or (c.kind == "create" and c.ftype is Ftype3.REG):
            for q in self._by_node.get(c.node, []):
                if q.change.seq <= batch[-1].change.seq or q.started:
                    continue
                if q.change.kind not in DATA or q.change.node is not c.node or \
                        q.change.cred != c.cred or q.deps - set(batch) or \
                        (q.due > now and not q.urgent) or len(batch) >= BATCH_CHANGES or \
                        (self.paused and not q.waited):
                    break
                batch.append(q)
        return batch, next_due

    async def _job(self, batch: list[Pending]) -> None:
        if log.isEnabledFor(logging.DEBUG):
            c = batch[0].change
            log.debug("flushing %s of %r: %s", "+".join(p.change.kind for p in batch),
                      c.node.path(), " ".join(
                          f"{p.change.seq}{'L' if p.change.node.is_local else ''}"
                          f"{'m' if p.maybe_sent else ''}{'r' if p.change.replayed else ''}"
                          f"/{p.attempts}" for p in batch))
        try:
            try:
                with patient(), track_sends() as wire:   # (patient: no application
                    outcome = await self._execute(batch)  # waits on one call)
                    for p in batch:
                        p.executed = True
                    await self._keep_times(batch)
            except BaseExceptionGroup as group:      # from the WRITEs in flight
                raise _first_error(group) from None
        except Exception as exc:
            if wire.sent:      # this attempt may have changed something on the server
                for p in batch:
                    p.maybe_sent = True
            await self._failed(batch, exc)
        else:
            self.stats.server_down = False
            self.stats.ops_flushed += len(batch)
            self._h.done([p.change for p in batch], outcome)
            for p in batch:
                self._finish(p)
        finally:
            self._running -= 1
            self._wake()

    async def _failed(self, batch: list[Pending], exc: Exception) -> None:
        """Retry what may work later; give up (the `lost` hook saves the data) on
        what never will.  Never raises: a failing flush must not end the mount."""
        log.debug("flush of %s (seqs %s) failed: %r", batch[0].change.kind,
                  [p.change.seq for p in batch], exc)
        try:
            if isinstance(exc, NfsError) and exc.status in STALE and \
                    self._removed(batch[0].change.node):
                # Its last name is gone here too (removed while this waited): there is
                # nothing left to change.
                self._h.done([p.change for p in batch], Outcome())
                for p in batch:
                    self._finish(p)
                return
            verdict = verdict_of(exc, batch[0].attempts)
            if verdict == "retry":
                self._retry(batch, exc)
                return
            if verdict == "bug":
                log.error("write-back of %s failed unexpectedly", batch[0].change.kind,
                          exc_info=exc)
            await self._lose(batch, f"the server refused {batch[0].change.kind}: {exc}"
                             if isinstance(exc, NfsError) else
                             "its directory could not be created on the server"
                             if isinstance(exc, Unresolvable) else f"internal error: {exc}")
        except Exception:
            log.exception("handling a failed write-back of %s of %r failed; it is kept "
                          "and tried again", batch[0].change.kind, batch[0].change.node.path())
            self._retry(batch, exc)

    def _removed(self, node: Node) -> bool:
        """Has `node` no name left, as users here see it?"""
        try:
            return node.gone or self._h.local_attrs(node).nlink == 0
        except OSError:
            return False

    def _retry(self, batch: list[Pending], exc: BaseException) -> None:
        first = batch[0]
        first.attempts += 1
        self.stats.retries += 1
        if isinstance(exc, TransportError):
            if not self.stats.server_down:
                log.warning("server unreachable; %d changes wait in the journal (%s)",
                            len(self._pending), exc)
            self.stats.server_down = True
        elif isinstance(exc, OSError) and not isinstance(exc, NfsError):
            log.warning("write-back of %s will be retried: %s", first.change.kind, exc)
        else:
            log.info("write-back of %s will be retried: %s", first.change.kind, exc)
        delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(first.attempts, 10))
        for p in batch:
            p.started = False
            p.attempts = max(p.attempts, 1)
            p.due = trio.current_time() + delay
            self._ready.add(p)
        self._wake()

    async def _lose(self, batch: list[Pending], why: str) -> None:
        """Changes the server will never take: the hook saves what users wrote (if it
        cannot, they are kept and tried again); the node's later changes that build
        on them go with them."""
        self._take_later(batch)
        try:
            await self._h.lost([p.change for p in batch], why)
        except OSError as exc:
            self._retry(batch, exc)
            return
        self.stats.lost += 1
        for p in batch:
            self._finish(p, failed=why)

    def _take_later(self, batch: list[Pending]) -> None:
        """Add to `batch` the not yet started changes of its node that would build on
        it (its data, or everything naming a node whose creation failed)."""
        first = batch[0].change
        node = first.node
        for q in self._by_node.get(node, []):
            if q in batch or q.started or q.change.node is not node:
                continue
            if first.kind in CREATES or q.change.kind in DATA:
                q.started = True
                self._ready.discard(q)
                batch.append(q)

    def _finish(self, p: Pending, *, failed: str = "") -> None:
        """`p` is done (or never will be): out of the graph, waiters woken."""
        p.failed = p.failed or failed
        self._pending.pop(p.change.seq, None)
        self._ready.discard(p)
        for node in p.nodes:
            ops = self._by_node.get(node)
            if ops is not None:
                if p in ops:
                    ops.remove(p)
                if not ops:
                    del self._by_node[node]
        for key in p.reads:
            readers = self._readers.get(key)
            if readers is not None and p in readers:
                readers.remove(p)
        for key in p.reads + p.writes:
            if self._writer.get(key) is p:
                del self._writer[key]
            if not self._readers.get(key, True) and key not in self._writer:
                del self._readers[key]
        p.done.set()
        for d in p.dependents:
            d.deps.discard(p)
            if not d.deps and not d.started and not d.done.is_set():
                self._ready.add(d)
        p.dependents.clear()
        p.deps.clear()
        self._wake()

    # -- executing changes on the server ----------------------------------------------------

    def _fh(self, node: Node | None) -> bytes:
        if node is None or node.is_local:
            raise Unresolvable(node.path() if node is not None else b"?")
        return node.fh

    async def _execute(self, batch: list[Pending]) -> Outcome:
        c = batch[0].change
        if c.kind in DATA or (c.kind == "create" and c.ftype is Ftype3.REG):
            return await self._data(batch)
        if c.kind in CREATES:
            await self._create(batch[0])
        elif c.kind in ("remove", "rmdir"):
            await self._remove(batch[0])
        elif c.kind == "rename":
            await self._rename(batch[0])
        elif c.kind == "link":
            await self._link(batch[0])
        elif c.kind == "touch":
            return await self._touch(batch[0])
        else:
            raise ValueError(f"unknown kind of change {c.kind!r}")
        return Outcome()

    async def _keep_times(self, batch: list[Pending]) -> None:
        """A directory's mtime on the server is the server's time of our last change
        in it, a new directory's, symlink's or device's its creation's: once a
        directory has no more changes of its names pending, and for what was created,
        send the mtime users here saw (as the owner; best effort), so it stays what
        it was here, also after a remount."""
        changes = [p.change for p in batch]
        nodes = {n for c in changes if c.kind not in DATA
                 for n in (c.parent, c.parent2) if n is not None}
        nodes |= {c.node for c in changes if c.kind in (*CREATES, "touch")
                  and c.ftype is not Ftype3.REG}
        for node in nodes:
            if node.is_local or node.gone or any(
                    not p.executed and p not in batch and
                    node in (p.change.parent, p.change.parent2)
                    for p in self._by_node.get(node, ())):
                continue     # the last change of its names to be done sets it
            attrs = self._h.local_attrs(node)
            try:
                res, sent = await self._setattr_as_owner(node, Sattr3(mtime=attrs.mtime))
            except NfsError as exc:
                log.debug("could not keep the mtime of %r: %s", node.path(), exc)
                continue
            self._h.file_changed(node, res.obj_wcc.after, sent)

    async def _touch(self, p: Pending) -> Outcome:
        """A replayed create the server has: a new file's mode and times (its directory's
        mtime: `_keep_times`, as for every change of names); best effort: it may be
        gone or changed since.  The version it leaves is ours (`Outcome.after`)."""
        c = p.change
        if c.ftype is not Ftype3.REG:
            return Outcome()
        sattr = Sattr3(mode=c.mode, atime=_time(c.attrs["atime"], True),
                       mtime=_time(c.attrs["mtime"], True))
        sent = trio.current_time()
        try:
            res = await self._setattr(c.node, sattr, c.cred)
        except NfsError as exc:
            log.info("could not set the mode and times of %r after a restart: %s",
                     c.node.path(), exc)
            return Outcome()
        self._h.file_changed(c.node, res.obj_wcc.after, sent)
        return Outcome(after=res.obj_wcc.after, sent=sent)

    async def _lookup(self, parent: Node, name: bytes, cred: Cred) -> nfs3.LookupRes | None:
        try:
            return await self.nodes.on(parent, cred,
                                       lambda fh: self.client.lookup(fh, name, cred))
        except NfsError as exc:
            if exc.status == Nfsstat3.NFS3ERR_NOENT:
                return None
            raise

    async def _create(self, p: Pending) -> None:
        """CREATE (EXCLUSIVE: safe to repeat), MKDIR, SYMLINK or MKNOD; a name another
        client took meanwhile is left to it and ours gets a conflict name."""
        c = p.change
        assert c.parent is not None and c.ftype is not None
        name = c.name
        for attempt in range(2):
            try:
                res = await self._send_create(c, name)
                break
            except NfsError as exc:
                if exc.status != Nfsstat3.NFS3ERR_EXIST:
                    raise
                if await self._ours_already(p, name):
                    return
                if c.ftype is Ftype3.DIR and await self._merge_dir(c, name):
                    return
                if attempt:
                    raise
                name = self._conflict_name(c.name)
                self.stats.conflicts += 1
                log.warning("conflict: %r was created on the server by another client; "
                            "ours is written as %r", c.parent.child_path(c.name), name)
                self._h.renamed(c.node, name)
        fh, attrs = res.object, res.obj_attributes
        if fh is None or attrs is None:
            look = await self._lookup(c.parent, name, c.cred)
            if look is None or look.obj_attributes is None:
                raise NfsError(Nfsstat3.NFS3ERR_IO, "CREATE returned no handle")
            fh, attrs = look.fh, look.obj_attributes
        await self._bind(c, fh, attrs, name, res.dir_wcc)

    async def _send_create(self, c: Change, name: bytes) -> nfs3.DirOpRes:
        parent, cred, ftype = c.parent, c.cred, c.ftype
        assert parent is not None and ftype is not None
        sattr = Sattr3(mode=(c.mode or 0) & 0o7777)
        if ftype is Ftype3.REG:
            assert c.node.local_id is not None
            return await self.nodes.on(parent, cred, lambda fh: self.client.create(
                fh, name, cred, mode=nfs3.CreateMode.EXCLUSIVE,
                verf=verifier(c.node.local_id or 0)))
        if ftype is Ftype3.DIR:
            return await self.nodes.on(parent, cred,
                                       lambda fh: self.client.mkdir(fh, name, sattr, cred))
        if ftype is Ftype3.LNK:
            return await self.nodes.on(parent, cred, lambda fh: self.client.symlink(
                fh, name, c.target, Sattr3(), cred))
        spec = c.rdev if ftype in (Ftype3.CHR, Ftype3.BLK) else None
        return await self.nodes.on(parent, cred, lambda fh: self.client.mknod(
            fh, name, ftype, sattr, cred, spec))

    async def _ours_already(self, p: Pending, name: bytes) -> bool:
        """EEXIST after an attempt that may have reached the server: is what is there
        the object we created?  (Regular files never get here: EXCLUSIVE says.)"""
        c = p.change
        if not (p.maybe_sent or c.replayed) or c.ftype is Ftype3.REG:
            return False
        assert c.parent is not None
        look = await self._lookup(c.parent, name, c.cred)
        if look is None or look.obj_attributes is None or look.obj_attributes.type != c.ftype:
            return False
        if c.ftype is Ftype3.LNK:
            target = await self.client.readlink(look.fh, c.cred)
            if target != c.target:
                return False
        await self._bind(c, look.fh, look.obj_attributes, name, nfs3.WccData())
        return True

    async def _merge_dir(self, c: Change, name: bytes) -> bool:
        """Another client made a directory of the name ours has: ours is merged into it."""
        assert c.parent is not None
        look = await self._lookup(c.parent, name, c.cred)
        if look is None or look.obj_attributes is None or \
                look.obj_attributes.type is not Ftype3.DIR:
            return False
        log.info("directory %r already exists on the server: merging ours into it",
                 c.parent.child_path(name))
        await self._bind(c, look.fh, look.obj_attributes, name, nfs3.WccData())
        return True

    async def _bind(self, c: Change, fh: bytes, attrs: Fattr3, name: bytes,
                    wcc: nfs3.WccData) -> None:
        assert c.parent is not None
        await self._h.bound(c.node, fh, attrs)
        if c.ftype is Ftype3.DIR:
            self._h.own_dir(c.node, attrs)
        self._h.dir_changed(c.parent, wcc, name, added=c.node, added_attrs=attrs)

    async def _remove(self, p: Pending) -> None:
        c = p.change
        assert c.parent is not None
        call = self.client.remove if c.kind == "remove" else self.client.rmdir
        done = await self._done_before(p, c.parent, c.name)
        if done is not None:
            self._h.dir_changed(c.parent, nfs3.WccData(), c.name, removed=done)
            return
        try:
            res = await self.nodes.on(c.parent, c.cred, lambda fh: call(fh, c.name, c.cred))
        except NfsError as exc:
            if exc.status == Nfsstat3.NFS3ERR_NOENT:
                self._h.dir_changed(c.parent, nfs3.WccData(), c.name, removed=True)
                return     # already gone (a repeat, or another client removed it)
            if exc.status in (Nfsstat3.NFS3ERR_NOTEMPTY, Nfsstat3.NFS3ERR_EXIST):
                log.warning("not removing %r: another client put files in it",
                            c.parent.child_path(c.name))
                return
            raise
        self._h.dir_changed(c.parent, res.dir_wcc, c.name, removed=True)
        if c.kind == "remove":
            self._h.file_changed(c.node, None, None, nlink=-1)     # and its ctime

    async def _rename(self, p: Pending) -> None:
        c = p.change
        src, dst = c.parent, c.parent2
        assert src is not None and dst is not None
        done = await self._done_before(p, src, c.name)
        if done is not None:
            self._h.dir_changed(src, nfs3.WccData(), c.name, removed=done)
            await self._settle_name(dst, c.name2, c.node, c.cred)
            return
        try:
            res = await self.nodes.on(src, c.cred, lambda fh: self.client.rename(
                fh, c.name, self._fh(dst), c.name2, c.cred))
        except NfsError as exc:
            if exc.status != Nfsstat3.NFS3ERR_NOENT:
                raise
            there = await self._is(dst, c.name2, c.node, c.cred)
            if not (there or p.maybe_sent or c.replayed):
                raise
            # A repeat: it had been renamed (and maybe renamed on, before a restart).
            self._h.dir_changed(src, nfs3.WccData(), c.name, removed=True)
            await self._settle_name(dst, c.name2, c.node, c.cred)
            return
        self._h.dir_changed(src, res.fromdir_wcc, c.name, removed=True)
        self._h.dir_changed(dst, res.todir_wcc, c.name2, removed=c.replaced is not None,
                            added=c.node)
        self._h.file_changed(c.node, None, None)     # its ctime changed
        if c.replaced is not None and c.replaced is not c.node and not c.replaced.is_dir:
            self._h.file_changed(c.replaced, None, None, nlink=-1)     # and its ctime

    async def _link(self, p: Pending) -> None:
        c = p.change
        parent = c.parent
        assert parent is not None
        sent = trio.current_time()
        try:
            res = await self.nodes.on(c.node, c.cred, lambda fh: self.client.link(
                fh, self._fh(parent), c.name, c.cred))
        except NfsError as exc:
            if exc.status != Nfsstat3.NFS3ERR_EXIST:
                raise
            if await self._is(parent, c.name, c.node, c.cred):
                return     # a repeat: the link is there
            if not self._replaced_since(p, ("n", parent, c.name)):
                raise
            # A repeat after a restart (or a lost reply) whose name a later change,
            # which waited for it and may have run, has taken or removed since.
            log.info("link %r was made before: the name has changed since",
                     parent.child_path(c.name))
            return
        self._h.dir_changed(parent, res.linkdir_wcc, c.name, added=c.node,
                            added_attrs=res.file_attributes)
        self._h.file_changed(c.node, res.file_attributes, sent)    # nlink, ctime

    @staticmethod
    def _replaced_since(p: Pending, key: Key) -> bool:
        """Has a later change of name `key`, one that waited for `p` (so ran only once
        `p` had run), possibly reached the server (replayed, or sent before)?"""
        if not (p.maybe_sent or p.change.replayed):
            return False
        return any(key in d.writes and (d.maybe_sent or d.change.replayed)
                   for d in p.dependents)

    async def _done_before(self, p: Pending, parent: Node, name: bytes) -> bool | None:
        """A REMOVE or RENAME that may have reached the server already (replayed after a
        restart, or sent before a lost reply) must not hit whatever took `name` since
        (a file created there later).  None: `name` still names its node (send it);
        True: done, the name is free; False: done, the name is another file's now
        (which the listing must keep)."""
        c = p.change
        if not (p.maybe_sent or c.replayed) or c.node.is_local or parent.is_local:
            return None
        look = await self._lookup(parent, name, c.cred)
        if look is None:
            return True
        if look.obj_attributes is not None and look.obj_attributes.fileid != c.node.fileid:
            return False
        return None

    async def _settle_name(self, parent: Node, name: bytes, node: Node, cred: Cred) -> None:
        """After a change found done before: what `name` names on the server now goes
        into `parent`'s listing (our node, nothing, or, unknown to us, another file's:
        then the listing is dropped unless ours only changed it)."""
        look = await self._lookup(parent, name, cred)
        if look is None:
            self._h.dir_changed(parent, nfs3.WccData(), name, removed=True)
        elif look.obj_attributes is not None and look.obj_attributes.fileid == node.fileid:
            self._h.dir_changed(parent, nfs3.WccData(), name, added=node)
        else:
            self._h.dir_changed(parent, nfs3.WccData(), name)

    async def _is(self, parent: Node, name: bytes, node: Node, cred: Cred) -> bool:
        look = await self._lookup(parent, name, cred)
        return look is not None and look.obj_attributes is not None and \
            look.obj_attributes.fileid == node.fileid

    # -- a file's data and attributes ------------------------------------------------------

    async def _data(self, batch: list[Pending]) -> Outcome:
        """A (new) file's run of data and attribute changes: see the ordering rule."""
        changes = [p.change for p in batch]
        node = changes[0].node
        created = changes[0].kind == "create"
        if created and changes[0].node.is_local:   # (not when an earlier attempt did it:
            await self._create(batch[0])           # WRITEs changed its verifier's times)
        cred = changes[-1].cred
        base = next((c.base for c in changes if c.base), "")
        if base and not created and not self._in_doubt(batch) and \
                await self._conflicted(node, base):
            return await self._conflict(node, batch)
        ops = [c.file_op for c in changes if c.file_op is not None]
        size = 0 if created else self._h.server_size(node)
        mtime = next((c.mtime_after for c in reversed(changes) if c.mtime_after is not None),
                     None)
        if base and ops and mtime is not None:
            await self._h.flushing(node, content_version_of(
                mtime, FileOverlay.fold(size, ops).size))
        for _round in range(3):
            sent = await self._send_data(node, ops, size, cred)
            if sent is not None:
                break
            self.stats.resent_after_reboot += 1
            log.warning("server rebooted during a flush of %r: sending it again", node.path())
        else:
            raise NfsError(Nfsstat3.NFS3ERR_IO, "COMMIT")
        after, when = await self._final_setattr(node, changes, cred)
        return Outcome(server_size=sent if ops or created else None, after=after, sent=when)

    async def _send_data(self, node: Node, ops: list[FileOp], size: int,
                         cred: Cred) -> int | None:
        """Send a file's writes and truncates in their order: the writes between two
        truncates coalesced (later bytes win), all in flight; each truncate after the
        writes before it.  The file's size then, or None if the server lost UNSTABLE
        data in a reboot (the caller sends it all again: the result is the same)."""
        segments: list[tuple[FileOverlay, int | None]] = []   # writes, then the truncate
        fold = FileOverlay(size)
        for op in ops:
            if op.is_truncate:
                segments.append((fold, op.offset))
                fold = FileOverlay(op.offset)
            else:
                fold.write(op.offset, op.length, op.seq, op.skip)
        segments.append((fold, None))
        runs = [fold.runs(self.client.info.wsize) for fold, _ in segments]
        small = sum(len(r) for r in runs) == 1 and \
            sum(e.length for r in runs for run in r for e in run) <= SMALL_WRITE
        stable = StableHow.FILE_SYNC if small else StableHow.UNSTABLE
        verfs: list[bytes] = []
        for (fold, truncate), fold_runs in zip(segments, runs, strict=True):
            verfs += await self._write_runs(node, fold_runs, cred, stable)
            if truncate is not None and truncate != fold.size:
                await self._setattr(node, Sattr3(size=truncate), cred)
        if verfs:
            commit = await self.nodes.on(node, cred, lambda fh: self.client.commit(fh, cred))
            if any(v != commit.verf for v in verfs):
                return None
        return segments[-1][0].size

    async def _setattr(self, node: Node, sattr: Sattr3, cred: Cred) -> nfs3.SetattrRes:
        return await self.nodes.on(node, cred,
                                   lambda fh: self.client.setattr(fh, sattr, cred))

    def _owners(self, node: Node) -> list[Cred]:
        """Who may set `node`'s times on the server: its owner there, as the server
        last showed it (our own chown of it may still wait: the owner users here see
        cannot set them yet), then the owner users here see (if the former is stale)."""
        owners: list[Cred] = []
        for attrs in (self._h.server_attrs(node), self._h.local_attrs(node)):
            if attrs is not None and all(o.uid != attrs.uid for o in owners):
                owners.append(Cred(attrs.uid, attrs.gid, (attrs.gid,)))
        return owners

    async def _setattr_as_owner(self, node: Node,
                                sattr: Sattr3) -> tuple[nfs3.SetattrRes, float]:
        """SETATTR `sattr` as `node`'s owner (`_owners`); the reply and when it was sent."""
        owners = self._owners(node)
        for owner in owners:
            sent = trio.current_time()
            try:
                return await self._setattr(node, sattr, owner), sent
            except NfsError as exc:
                if owner is owners[-1] or exc.status not in OWNER_ONLY:
                    raise
        raise AssertionError("a node has an owner")

    async def _final_setattr(self, node: Node, changes: list[Change],
                             cred: Cred) -> tuple[Fattr3 | None, float]:
        """One SETATTR with what the run changed: mode, owner, times.  What the server
        may have changed by itself is put back as users here saw it, as the file's
        owner: the mtime of our writes, setuid/setgid bits a WRITE cleared there."""
        owner: dict[str, int] = {}
        times: dict[str, int] = {}
        mode: int | None = None
        for c in changes:
            mode = c.mode if c.mode is not None else mode
            owner.update({k: v for k, v in c.attrs.items() if k in ("uid", "gid")})
            times.update({k: v for k, v in c.attrs.items() if k in ("atime", "mtime")})
            if c.kind == "create":
                times["atime"] = c.time_ns     # EXCLUSIVE kept its verifier there
        mtime = next((c.mtime_after for c in reversed(changes) if c.mtime_after is not None),
                     times.get("mtime"))
        last_mode = changes[-1].mode_after
        if mode is None and last_mode is not None and last_mode & 0o6000 and \
                any(c.file_op is not None for c in changes):
            mode = last_mode             # a WRITE may have cleared setuid/setgid there
        may_set = cred.uid == 0 or cred.uid == self._h.local_attrs(node).uid
        sattr = Sattr3(mode=mode if may_set else None, uid=owner.get("uid"),
                       gid=owner.get("gid"), atime=_time(times.get("atime"), may_set),
                       mtime=_time(mtime, may_set))
        if owner and sattr.mode is not None and sattr.mode & 0o6000:
            # A server applies a SETATTR's mode before its owner, and a chown clears
            # setuid/setgid: the owner first, then the mode users here see.
            await self._setattr(node, Sattr3(uid=sattr.uid, gid=sattr.gid), cred)
            sattr = replace(sattr, uid=None, gid=None)
        sent = trio.current_time()
        after: Fattr3 | None = None
        if sattr != Sattr3():
            after = (await self._setattr(node, sattr, cred)).obj_wcc.after
        if not may_set and (mtime is not None or mode is not None):
            after, sent = await self._restore(node, mtime, mode, after, sent)
        self._h.file_changed(node, after, sent)
        return after, sent

    async def _restore(self, node: Node, mtime: int | None, mode: int | None,
                       after: Fattr3 | None, sent: float) -> tuple[Fattr3 | None, float]:
        """Set the mtime (and mode) users saw as the file's owner: a writer who is not
        the owner may not set them on the server (best effort for the mtime)."""
        sattr = Sattr3(mode=mode,
                       mtime=NfsTime.from_ns(mtime) if mtime not in (None, NOW) else None)
        try:
            res, sent = await self._setattr_as_owner(node, sattr)
            return res.obj_wcc.after, sent
        except NfsError as exc:
            if mode is not None:
                raise
            log.debug("could not keep the mtime of %r: %s", node.path(), exc)
            return after, sent

    async def _write_runs(self, node: Node, runs: list[list[Extent]], cred: Cred,
                          stable: StableHow) -> list[bytes]:
        """WRITE disjoint runs, WRITES_PER_FILE in flight; their UNSTABLE verifiers."""
        verfs: list[bytes] = []
        slots = trio.Semaphore(WRITES_PER_FILE)

        async def send(run: list[Extent]) -> None:
            async with slots:
                verfs.extend(await self._write_run(node, run, cred, stable))

        async with trio.open_nursery() as nursery:
            for run in runs:
                nursery.start_soon(send, run)
        self.stats.bytes_flushed += sum(e.length for run in runs for e in run)
        return verfs

    async def _write_run(self, node: Node, run: list[Extent], cred: Cred,
                         stable: StableHow) -> list[bytes]:
        """WRITE one run of adjacent extents (the rest again after a short WRITE);
        the write verifiers of UNSTABLE replies.  Its bytes are read from the journal
        only once they fit in the WRITE budget, and held until the WRITE is answered."""
        try:
            async with self._write_budget.take(sum(e.length for e in run)):
                self._note_in_flight()
                return await self._write_held_run(node, run, cred, stable)
        finally:
            self._note_in_flight()

    def _note_in_flight(self) -> None:
        self.stats.write_bytes_in_flight = self._write_budget.in_use
        self.stats.max_write_bytes_in_flight = self._write_budget.peak

    async def _write_held_run(self, node: Node, run: list[Extent], cred: Cred,
                              stable: StableHow) -> list[bytes]:
        parts = [await self._h.read_data(e.seq, e.skip, e.length) for e in run]
        data = b"".join(parts)          # (one part: the same object, not a copy)
        del parts
        offset = run[0].start
        verfs: list[bytes] = []
        while data:
            res = await self.nodes.on(node, cred, functools.partial(
                self.client.write, offset=offset, data=data, cred=cred, stable=stable))
            if res.count <= 0 or res.count > len(data):
                raise NfsError(Nfsstat3.NFS3ERR_IO, f"WRITE wrote {res.count} bytes")
            if res.committed == StableHow.UNSTABLE:
                verfs.append(res.verf)
            offset += res.count
            data = data[res.count:]     # (a copy only after a short WRITE)
        return verfs

    # -- conflicts ----------------------------------------------------------------------

    def _in_doubt(self, batch: list[Pending]) -> bool:
        """May an earlier attempt of this batch have changed the file on the server
        (a reply lost, or a crash while it was sent: its BASE record says)?  Then
        the server's version may be ours, half applied: no conflict check (sending
        the batch again from its start gives the same file)."""
        return any(p.maybe_sent for p in batch) or \
            (any(p.change.replayed for p in batch) and bool(self.also_ours(batch[0].change.node)))

    async def _conflicted(self, node: Node, base: str) -> bool:
        """Did someone else change `node` since the version our changes apply to?"""
        expected = {self.base_version(node) or base} | self.also_ours(node)
        current = await self.nodes.on(node, Cred.root(),
                                      lambda fh: self.client.getattr(fh, Cred.root()))
        return content_version(current) not in expected

    def _conflict_name(self, name: bytes) -> bytes:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        suffix = f".wancache-conflict-{self._host}-{stamp}".encode()
        return name[:max(1, 255 - len(suffix))] + suffix

    async def _conflict(self, node: Node, batch: list[Pending]) -> Outcome:
        """Someone else changed the file: keep theirs, write ours next to it."""
        self._take_later(batch)
        # (a file known by its handle only, after a restart: the copy goes to the root)
        parent = node.parent or self.nodes.root
        name = self._conflict_name(node.name or f"file-{node.fileid}".encode())
        self.stats.conflicts += 1
        log.warning("conflict: %r changed on the server since we cached it; keeping the "
                    "server's file and writing ours as %r", node.path(), parent.child_path(name))
        if parent.is_local:
            raise Unresolvable(node.path())
        attrs = self._h.local_attrs(node)
        cred = batch[0].change.cred
        for n in range(1, 100):
            try:
                res = await self.nodes.on(parent, cred, functools.partial(
                    self.client.create, name=name if n == 1 else name + f"-{n}".encode(),
                    cred=cred, attrs=Sattr3(mode=attrs.mode & 0o7777),
                    mode=nfs3.CreateMode.GUARDED))
                break
            except NfsError as exc:
                if exc.status != Nfsstat3.NFS3ERR_EXIST or n == 99:
                    raise
        fh = res.object
        assert fh is not None
        wsize = self.client.info.wsize
        for start in range(0, attrs.size, wsize):
            n = min(wsize, attrs.size - start)
            async with self._write_budget.take(n):
                await self._write_all(fh, start, await self._h.read_ours(node, start, n), cred)
        return Outcome(conflict=True)

    async def _write_all(self, fh: bytes, offset: int, data: bytes, cred: Cred) -> None:
        """FILE_SYNC WRITEs of `data` at `offset`, again from where a short one ended."""
        while data:
            res = await self.client.write(fh, offset, data, cred, stable=StableHow.FILE_SYNC)
            if res.count <= 0 or res.count > len(data):
                raise NfsError(Nfsstat3.NFS3ERR_IO, f"WRITE wrote {res.count} bytes")
            offset, data = offset + res.count, data[res.count:]


def verdict_of(exc: Exception, attempts: int) -> str:
    """What a failed flush of a batch calls for: "retry" (the server is away or
    busy, a handle went stale, the local disk failed: the data is kept), "lose" (the
    server refuses it for good, or it names a node that never reached the server),
    "bug" (anything else; lost too, with a traceback logged)."""
    if isinstance(exc, Unresolvable):
        return "lose"
    if isinstance(exc, NfsError):
        stale = exc.status in STALE and attempts < STALE_ATTEMPTS
        return "retry" if exc.status in TRANSIENT or stale else "lose"
    if isinstance(exc, XdrError):
        return "bug"          # we could not encode the call: sending it again cannot help
    if isinstance(exc, TransportError | ProtocolError | OSError):
        return "retry"
    return "bug"


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error a failed group of calls stands for: its first one that is not a
    cancellation (a group of cancellations only is raised as it is)."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            stack[:0] = list(exc.exceptions)
        else:
            leaves.append(exc)
    return next((e for e in leaves if not isinstance(e, trio.Cancelled)), group)


def _time(value: int | None, may_set: bool) -> NfsTime | nfs3.TimeHow | None:
    """An attribute time to send: the client's when the caller may set times, else
    the server's clock ("now" is all a writer who is not the owner may ask for)."""
    if value is None:
        return None
    if value == NOW or not may_set:
        return nfs3.TimeHow.SET_TO_SERVER_TIME
    return NfsTime.from_ns(value)


__all__ = ["Change", "FlushHooks", "Flusher", "Outcome", "Pending", "Unresolvable", "verifier"]
