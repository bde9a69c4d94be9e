"""The cached view of the server that the FUSE layer talks to.

`Store` offers every file system operation on `Node`s, with the caller's
credentials, and decides what goes to the server.  With `cache=off` everything does
(the pass-through baseline).  Otherwise attributes come from the attribute cache
while their lease holds, names from cached directory listings (revalidated with one
GETATTR of the directory when its lease ran out), missing names from the negative
cache, and listings are read whole with READDIRPLUS, which also refreshes every
child's attributes, so `ls -l` never costs one GETATTR per file.

Changes go through the write policy the store was built with (write-back:
journaled here and flushed later; write-through: sent now).  Before handing a
change on, the store makes the checks a local file system makes at the system
call, so what it acknowledges is what the server will take.  Local changes not yet
on the server (the policy's overlay) are shown over the server's state.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import trio
from cachetools import LRUCache

from wancache.config import Config
from wancache.creds import Cred
from wancache.nfs_backend import nfs3
from wancache.nfs_backend.client import NfsClient
from wancache.nfs_backend.errors import NfsError, TransportError
from wancache.nfs_backend.nfs3 import Fattr3, Ftype3, Nfsstat3

from . import checks
from .attrs import AttrCache, data_version, version
from .data import DataCache, VersionChanged
from .dirs import DirCache, DirRecord, Listing
from .flight import SingleFlight
from .node import LOCAL_PREFIX, Node
from .nodes import NodeTable
from .overlay import Overlay
from .ownchanges import OwnChanges
from .persist import SavedState
from .readahead import ReadAhead
from .types import AttrChange, Attrs, FsStats, ftype_of_mode

log = logging.getLogger(__name__)

READDIR_PAGE = 512       # entries handed to the FUSE layer per readdir step
# Attributes with local changes are not cached by the kernel: it asks us (no RPC).
LOCAL_ATTR_TTL = 0.0
READ_LISTING_ATTEMPTS = 10
SIBLING_ENTRIES = 100_000   # directories whose small files were read ahead lately
NOENT = Nfsstat3.NFS3ERR_NOENT
ReadServer = Callable[[Node, int, int], Awaitable[bytes]]


class StoreError(OSError):
    """A failure the store detects itself (not an NFS status), with its errno."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


class WritePolicy(Protocol):
    """Where changes go: journaled here (write-back) or to the server now."""

    overlay: Overlay
    dirty_bytes: int

    @property
    def pending_ops(self) -> int: ...

    def take_failure(self, node: Node) -> str | None: ...

    async def create(self, parent: Node, name: bytes, ftype: Ftype3, mode: int, cred: Cred,
                     *, target: bytes = b"", rdev: tuple[int, int] = (0, 0)
                     ) -> tuple[Node, Fattr3]: ...

    async def link(self, node: Node, parent: Node, name: bytes, cred: Cred) -> Fattr3: ...

    async def remove(self, parent: Node, name: bytes, node: Node, cred: Cred, *,
                     is_dir: bool) -> None: ...

    async def rename(self, src: Node, src_name: bytes, dst: Node, dst_name: bytes,
                     node: Node, replaced: Node | None, cred: Cred) -> None: ...

    async def write(self, node: Node, offset: int, data: bytes, cred: Cred) -> int: ...

    async def setattr(self, node: Node, fields: dict[str, int], cred: Cred) -> Fattr3: ...

    async def sync(self, node: Node | None) -> None: ...

    async def read(self, node: Node, offset: int, size: int,
                   read_server: ReadServer) -> bytes: ...

    def release(self, node: Node) -> None: ...


@dataclass(slots=True)
class DirEntry:
    """One directory entry; `node`/`attrs` are None when the server sent no handle.

    `offset` is the cursor position after this entry: what the kernel passes back
    to continue (telldir/seekdir) on the same open directory.
    """

    name: bytes
    fileid: int
    offset: int
    node: Node | None
    attrs: Attrs | None


@dataclass
class DirCursor:
    """State of one open directory (one `opendir`).

    Positions handed to the kernel are ours, 1, 2, 3, ... (NFS cookies are
    64-bit unsigned, the kernel's offsets signed): cached mode reads a snapshot of
    the listing taken at the start, pass-through keeps each position's cookie.
    """

    node: Node
    verf: bytes = bytes(8)
    records: list[DirRecord] | None = None
    cookies: list[int] = field(default_factory=list)


class Store:
    """Every operation the FUSE layer needs, on Nodes, for one mount."""

    def __init__(self, client: NfsClient, cfg: Config, nodes: NodeTable, attrs: AttrCache,
                 dirs: DirCache, data: DataCache | None, own: OwnChanges, writes: WritePolicy,
                 nursery: trio.Nursery | None = None, *, journaled: bool = False,
                 direct: WritePolicy | None = None) -> None:
        self.client = client
        self.cfg = cfg
        self.info = client.info
        self.caching = cfg.cache
        self.nodes = nodes
        self.root = nodes.root
        self.attrs = attrs
        self.dirs = dirs
        self.data = data
        self.own = own
        self.writes = writes
        self.overlay = writes.overlay
        # Write-back acknowledges before the server sees a change: the store checks
        # what the server would check (names, existence) first.
        self.journaled = journaled
        # Changes the server may refuse in ways the store cannot foresee go to it
        # before the call returns (write-back: `_sent_at_once`).
        self.direct = direct
        self._nursery = nursery
        self._listings: SingleFlight[bytes, Listing] = SingleFlight()
        self._prefetch_slots = trio.Semaphore(max(1, cfg.prefetch_concurrency))
        self._silly_counter = 0
        self._open_versions: LRUCache[str, str] = LRUCache(cfg.attr_entries)
        self.name_max = client.info.name_max
        self._siblings_read: LRUCache[bytes, float] = LRUCache(SIBLING_ENTRIES)
        self._dir_locks: weakref.WeakKeyDictionary[Node, trio.Lock] = \
            weakref.WeakKeyDictionary()
        self._fsstat: tuple[float, nfs3.FsstatRes] | None = None

    def restore(self, saved: SavedState) -> None:
        """Start the metadata caches from a saved state (all of it expired)."""
        for fh, attrs in saved.attrs.items():
            self.attrs.load(fh, attrs)
        for fh, (dir_version, records) in saved.listings.items():
            if self.dirs.get(fh) is None:
                self.dirs.put(fh, Listing.of(records, dir_version))
        self.nodes.load_names(saved.names)

    def saved_state(self) -> SavedState:
        """The metadata caches, to be saved (nodes created here are left out)."""
        attrs = self.attrs.saved(lambda fh: not fh.startswith(LOCAL_PREFIX))
        listings = {fh: (listing.version, [r for r in listing.records
                                           if r.fh is None or not r.fh.startswith(LOCAL_PREFIX)])
                    for fh, listing in self.dirs.items()}
        names = {k: fh for k, fh in self.nodes.names().items()
                 if not fh.startswith(LOCAL_PREFIX)}
        return SavedState(export=self.cfg.spec, info=self.info, attrs=attrs,
                          listings=listings, names=names)

    @property
    def offline(self) -> bool:
        """The server is known to be unreachable: serve what we have instead of
        waiting for a timeout per request."""
        return self.client.offline

    async def probe_name_max(self) -> None:
        """PATHCONF's name_max may promise more than the server's disk takes (ganesha
        says 1024 over ext4's 255): one LOOKUP of a 256-byte name tells."""
        if self.name_max <= 255:
            return
        with contextlib.suppress(TransportError):
            try:
                await self.client.lookup(self.root.fh, b"n" * 256, Cred.root())
            except NfsError as exc:
                if exc.status == Nfsstat3.NFS3ERR_NAMETOOLONG:
                    self.name_max = 255

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None
        return self._nursery

    # -- nodes and what users see of them ----------------------------------------------------

    def node_by_fh(self, fh: bytes) -> Node:
        """The Node of a handle whose attributes are cached (KeyError otherwise)."""
        node = self.nodes.get(fh)
        if node is not None:
            return node
        entry = self.attrs.peek(fh)
        if entry is None:
            raise KeyError(fh)
        return self.nodes.node_for(fh, entry.attrs)

    async def ensure_node(self, fh: bytes) -> Node:
        """The Node of a handle, asking the server for its attributes if needed."""
        try:
            return self.node_by_fh(fh)
        except KeyError:
            attrs = await self.client.getattr(fh, Cred.root())
            return self.nodes.node_for(fh, attrs)

    def _seen(self, node: Node, server: Fattr3, *, stale: bool = False) -> Fattr3:
        """`node`'s attributes as users here see them: local changes first, then the
        server's (with the times of our own flushed changes kept; `stale`: see
        `Times.show`)."""
        ov = self.overlay.get(node)
        if ov is not None:
            return ov.attrs
        return self.own.times.show(node.fh, server, stale=stale)

    def attr_ttl(self, node: Node) -> float:
        """Seconds the kernel may trust `node`'s attributes: what is left of our lease
        (none for files in cto mode, whose attributes each open may refresh)."""
        if not self.caching or (self.cfg.consistency == "cto" and not node.is_dir):
            return 0.0
        if self.overlay.get(node) is not None:
            return LOCAL_ATTR_TTL   # local changes: the kernel sees them all anyway
        return self.attrs.remaining(node.fh)

    def entry_ttl(self, parent: Node, name: bytes) -> float:
        """Seconds the kernel may trust the name -> inode binding: the directory's lease."""
        return self.attrs.remaining(parent.fh) if self.caching else 0.0

    def negative_ttl(self, parent: Node, name: bytes) -> float:
        """Seconds the kernel may remember that `name` is missing (0: do not)."""
        if not self.caching:
            return 0.0
        known, node = self.overlay.entry(parent, name)
        if (known and node is None) or (not known and self.overlay.is_local_dir(parent)):
            return self.cfg.lease_bounds(True)[0]   # only we can change that name
        left = self.dirs.missing_for(parent.fh, name)
        listing = self.dirs.get(parent.fh)
        if listing is not None and name not in listing.by_name:
            left = max(left, listing.trusted_until - trio.current_time())
            entry = self.attrs.peek(parent.fh)
            if entry is not None and version(entry.attrs) == listing.version:
                confirmed = entry.fetched + self.cfg.neg_lease - trio.current_time()
                left = max(left, min(confirmed, entry.remaining(trio.current_time())))
        return max(0.0, left)

    # -- metadata ------------------------------------------------------------------

    async def getattr(self, node: Node, cred: Cred, *, fresh: bool = False) -> Attrs:
        """Attributes of `node` as users see them: cached within their lease unless
        `fresh`."""
        return Attrs.of(await self._attrs(node, cred, fresh=fresh))

    async def _attrs(self, node: Node, cred: Cred, *, fresh: bool = False) -> Fattr3:
        ov = self.overlay.get(node)
        if ov is not None:
            return ov.attrs
        return self._seen(node, await self._server_attrs(node, cred, fresh=fresh))

    async def server_attrs(self, node: Node, cred: Cred) -> Fattr3:
        """The server's attributes of `node` (a node not there yet: the local ones)."""
        ov = self.overlay.get(node)
        if node.is_local and ov is not None:
            return ov.attrs
        return await self._server_attrs(node, cred)

    async def _server_attrs(self, node: Node, cred: Cred, *, fresh: bool = False) -> Fattr3:
        """The server's attributes of `node` (without local changes).  While the
        server cannot be reached, expired ones are served as they are."""
        if self.caching and not fresh:
            entry = self.attrs.get(node.fh)
            if entry is not None:
                return entry.attrs
        return await self._revalidate(node, cred)

    async def _revalidate(self, node: Node, cred: Cred) -> Fattr3:
        """GETATTR, or the expired attributes if the server is unreachable."""
        stale = self.attrs.peek(node.fh) if self.caching else None
        if stale is not None and self.offline:
            return stale.attrs
        try:
            return await self.nodes.on(node, cred, lambda fh: self.client.getattr(fh, cred))
        except TransportError:
            if stale is None:
                raise
            log.debug("server unreachable: serving cached attributes of %r", node.path())
            return stale.attrs

    async def lookup(self, parent: Node, name: bytes, cred: Cred) -> tuple[Node, Attrs]:
        """The child `name` of `parent` (NfsError NOENT if there is none)."""
        node, attrs = await self._lookup(parent, name, cred)
        return node, Attrs.of(attrs)

    async def _lookup(self, parent: Node, name: bytes, cred: Cred) -> tuple[Node, Fattr3]:
        if name == b".":
            return parent, await self._attrs(parent, cred)
        if name != b"..":
            known, node = self.overlay.entry(parent, name)
            if known and node is not None:
                return node, await self._attrs(node, cred)
            if known or self.overlay.is_local_dir(parent):
                raise NfsError(NOENT, "LOOKUP")
        if self.caching and name != b"..":
            found = await self._cached_lookup(parent, name, cred)
            if found is not None:
                return found[0], self._seen(found[0], found[1])
            if self.dirs.missing_for(parent.fh, name):
                raise NfsError(NOENT, "LOOKUP")
            if self.offline:
                found = self._remembered(parent, name)
                if found is not None:
                    return found
            self._list_ahead(parent, cred)
        sent = trio.current_time()
        try:
            res = await self.nodes.on(parent, cred,
                                      lambda fh: self.client.lookup(fh, name, cred))
        except NfsError as exc:
            if exc.status == NOENT:
                self.dirs.remember_missing(parent.fh, name, sent)
            raise
        except TransportError:
            found = self._remembered(parent, name)
            if found is None:
                raise
            return found
        attrs = res.obj_attributes or await self.client.getattr(res.fh, cred)
        if name == b"..":
            node = self.nodes.node_for(res.fh, attrs)
        else:
            node = self.nodes.node_for(res.fh, attrs, parent, name)
        return node, self._seen(node, attrs)

    def _remembered(self, parent: Node, name: bytes) -> tuple[Node, Fattr3] | None:
        """While disconnected: what `name` was the last time we looked it up."""
        fh = self.nodes.named(parent, name)
        entry = self.attrs.peek(fh) if fh is not None else None
        if fh is None or entry is None:
            return None
        log.debug("server unreachable: %r as last seen", parent.child_path(name))
        node = self.nodes.node_for(fh, entry.attrs, parent, name)
        return node, self._seen(node, entry.attrs, stale=entry.before_our_change)

    async def _cached_lookup(self, parent: Node, name: bytes,
                             cred: Cred) -> tuple[Node, Fattr3] | None:
        """Answer from the parent's cached listing; None if it cannot tell."""
        listing = await self._valid_names(parent, cred)
        if listing is None:
            self.dirs.stats.misses += 1
            return None
        self.dirs.stats.hits += 1
        rec = listing.by_name.get(name)
        if rec is None:
            entry = self.attrs.peek(parent.fh)
            assert entry is not None
            if entry.fetched + self.cfg.neg_lease <= trio.current_time() and \
                    listing.trusted_until <= trio.current_time() and not self.offline:
                # Trust a listing's silence only as long as a negative lookup.
                await self.nodes.on(parent, cred, lambda fh: self.client.getattr(fh, cred))
                if await self._valid_names(parent, cred) is not listing:
                    return None
            raise NfsError(NOENT, "LOOKUP")
        if rec.fh is None:
            return None
        entry = self.attrs.get(rec.fh)
        if entry is not None:
            return self.nodes.node_for(rec.fh, entry.attrs, parent, name), entry.attrs
        stale = self.attrs.peek(rec.fh)
        if stale is not None and self.offline:
            return self.nodes.node_for(rec.fh, stale.attrs, parent, name), stale.attrs
        try:
            attrs = await self.client.getattr(rec.fh, cred)
        except NfsError as exc:
            if exc.status in (Nfsstat3.NFS3ERR_STALE, Nfsstat3.NFS3ERR_BADHANDLE):
                self.dirs.drop(parent.fh)
                return None
            raise
        return self.nodes.node_for(rec.fh, attrs, parent, name), attrs

    async def _valid_names(self, parent: Node, cred: Cred) -> Listing | None:
        """The cached listing of `parent` if it still holds (one GETATTR decides
        when the directory's lease ran out), else None."""
        listing = self.dirs.get(parent.fh)
        if listing is None:
            return None
        if listing.trusted_until > trio.current_time():
            return listing
        attrs = self.attrs.valid(parent.fh)
        if attrs is None:
            attrs = await self._revalidate(parent, cred)
        if version(attrs) == listing.version or self.offline:
            return listing
        self._listing_changed(parent, listing, None)
        return None

    def _listing_changed(self, parent: Node, old: Listing, new: Listing | None) -> None:
        """Drop (or replace) a listing; tell the kernel which names went away."""
        if new is None:
            self.dirs.drop(parent.fh)
        gone = [n for n, rec in old.by_name.items() if new is None or
                new.by_name.get(n) is None or new.by_name[n].fh != rec.fh]
        for name in gone:
            for listener in self.own.entry_listeners:
                listener(parent, name)

    async def setattr(self, node: Node, change: AttrChange, cred: Cred, *,
                      fd_writable: bool | None = None) -> Attrs:
        """Change attributes, after the checks chmod, chown, truncate and utimensat
        make on a local file system (`fd_writable`: through an fd, see checks)."""
        async with self._locked(node):
            current = await self._alive(node, cred)   # the base the change applies to
            fields = checks.setattr_fields(self._state(current), change, cred,
                                           fd_writable=fd_writable,
                                           max_size=self.info.max_file_size)
            forced = {}
            if "mode" in fields and cred.uid not in (0, current.uid):
                forced["mode"] = fields.pop("mode")   # setuid/setgid a truncate cleared
            if fields and self._sent_at_once(current, fields):
                current = await self._setattr_at_once(node, current, fields, cred)
            elif fields:
                current = await self.writes.setattr(node, fields, cred)
            if forced:
                current = await self._force_mode(node, current, forced["mode"])
            return Attrs.of(current)

    def _sent_at_once(self, current: Fattr3, fields: dict[str, int]) -> bool:
        """The mode or owner of a device node: nfs-ganesha refuses (INVAL) them once
        the name the node was made under is gone and another link remains, which
        nothing here can tell; acknowledged and refused later, the change was lost."""
        return self.direct is not None and current.type in (Ftype3.CHR, Ftype3.BLK) and \
            not fields.keys().isdisjoint(("mode", "uid", "gid"))

    async def _setattr_at_once(self, node: Node, shown: Fattr3, fields: dict[str, int],
                               cred: Cred) -> Fattr3:
        """SETATTR on the server now, after the node's pending changes.  Shown from
        now on: the server's attributes with the mtime shown before (unless set) and
        this change's ctime, as for every change made here (`OwnChanges.times`)."""
        assert self.direct is not None
        await self.writes.sync(node)
        after = await self.direct.setattr(node, fields, cred)
        local = replace(
            after, ctime=nfs3.NfsTime.from_ns(time.time_ns()),
            mtime=after.mtime if "mtime" in fields else shown.mtime)
        self.own.times.keep(node.fh, local, after)
        return local

    async def _force_mode(self, node: Node, current: Fattr3, mode: int) -> Fattr3:
        """Clear setuid/setgid as a write or truncate by someone else than the owner
        does: the kernel needs no ownership for it, a server does (it is sent as the
        owner's)."""
        return await self.writes.setattr(node, {"mode": mode},
                                         Cred(current.uid, current.gid, (current.gid,)))

    @staticmethod
    def _state(a: Fattr3) -> checks.FileState:
        return checks.FileState(Attrs.of(a).mode, a.uid, a.gid, a.size)

    async def access(self, node: Node, mode: int, cred: Cred) -> bool:
        """access(2): may `cred` do `mode` (R_OK, W_OK, X_OK; F_OK: exists) to `node`?
        The server decides (ACCESS), except for nodes it does not have yet."""
        mask = (nfs3.ACCESS3_READ if mode & os.R_OK else 0) | \
            (nfs3.ACCESS3_MODIFY if mode & os.W_OK else 0)
        if mode & os.X_OK:
            mask |= nfs3.ACCESS3_LOOKUP if node.is_dir else nfs3.ACCESS3_EXECUTE
        if not mask:
            await self._attrs(node, cred)
            return True
        if node.is_local:
            return True   # not on the server yet: the kernel checked the mode bits
        granted = await self.nodes.on(node, cred,
                                      lambda fh: self.client.access(fh, mask, cred))
        return granted & mask == mask

    async def readlink(self, node: Node, cred: Cred) -> bytes:
        ov = self.overlay.get(node)
        if ov is not None and ov.target:
            return ov.target
        return await self.nodes.on(node, cred, lambda fh: self.client.readlink(fh, cred))

    async def statfs(self, cred: Cred) -> FsStats:
        """FSSTAT, kept for the shortest file lease (df, find and build tools ask
        often); the last answer while the server cannot be reached."""
        fs = await self._fsstat_res(cred)
        return FsStats(fs.tbytes, fs.fbytes, fs.abytes, fs.tfiles, fs.ffiles, fs.afiles)

    async def _fsstat_res(self, cred: Cred) -> nfs3.FsstatRes:
        cached = self._fsstat
        now = trio.current_time()
        if cached is not None and self.caching and \
                (cached[0] + self.cfg.lease_bounds(False)[0] > now or self.offline):
            return cached[1]
        try:
            res = await self.client.fsstat(cred)
        except TransportError:
            if cached is None:
                raise
            return cached[1]
        self._fsstat = (now, res)
        return res

    # -- namespace -----------------------------------------------------------------

    async def _existing(self, parent: Node, name: bytes,
                        cred: Cred) -> tuple[Node, Fattr3] | None:
        """The child `name` of `parent` as users see it now, or None."""
        try:
            return await self._lookup(parent, name, cred)
        except NfsError as exc:
            if exc.status == NOENT:
                return None
            raise

    def _check_name(self, name: bytes) -> None:
        checks.name(name, self.name_max)

    @contextlib.asynccontextmanager
    async def _locked(self, *dirs: Node | None) -> AsyncIterator[None]:
        """Changes to these directories' names and to these nodes one at a time: what
        a change checks (is the name free, is the directory empty, has the node a
        name left) still holds when it is applied, whatever other requests do
        meanwhile.  Locks are taken in one global order."""
        async with contextlib.AsyncExitStack() as stack:
            for d in sorted({d for d in dirs if d is not None}, key=id):
                lock = self._dir_locks.get(d)
                if lock is None:
                    lock = self._dir_locks[d] = trio.Lock()
                await stack.enter_async_context(lock)
            yield

    async def _new(self, parent: Node, name: bytes, ftype: Ftype3, mode: int, cred: Cred, *,
                   exclusive: bool = True, target: bytes = b"",
                   rdev: tuple[int, int] = (0, 0)) -> tuple[Node, Attrs]:
        """Create `name` in `parent` (EEXIST if it exists, unless a non-exclusive
        create of a regular file, which opens what is there)."""
        self._check_name(name)
        async with self._locked(parent):
            if self.journaled:
                found = await self._existing(parent, name, cred)
                if found is not None:
                    if exclusive or ftype is not Ftype3.REG:
                        raise StoreError(errno.EEXIST, "exists")
                    return found[0], Attrs.of(found[1])
            create = functools.partial(self.writes.create, parent, name, ftype, mode, cred,
                                       target=target, rdev=rdev)
            if not self.journaled and ftype is Ftype3.REG:
                create = functools.partial(create, exclusive=exclusive)
            node, attrs = await create()
        return node, Attrs.of(attrs)

    async def create(self, parent: Node, name: bytes, mode: int, cred: Cred, *,
                     exclusive: bool) -> tuple[Node, Attrs]:
        """A new regular file (EEXIST if `exclusive` and it exists)."""
        return await self._new(parent, name, Ftype3.REG, mode & 0o7777, cred,
                               exclusive=exclusive)

    async def mkdir(self, parent: Node, name: bytes, mode: int,
                    cred: Cred) -> tuple[Node, Attrs]:
        return await self._new(parent, name, Ftype3.DIR, mode & 0o7777, cred)

    async def symlink(self, parent: Node, name: bytes, target: bytes,
                      cred: Cred) -> tuple[Node, Attrs]:
        checks.symlink_target(target)
        return await self._new(parent, name, Ftype3.LNK, 0o777, cred, target=target)

    async def mknod(self, parent: Node, name: bytes, mode: int, rdev: int,
                    cred: Cred) -> tuple[Node, Attrs]:
        """A device node, fifo or socket (`mode` with its type bits)."""
        ftype = ftype_of_mode(mode)
        if ftype is None or ftype in (Ftype3.DIR, Ftype3.LNK, Ftype3.REG):
            raise StoreError(errno.EINVAL, "not a special file type")
        return await self._new(parent, name, ftype, mode & 0o7777, cred,
                               rdev=(os.major(rdev), os.minor(rdev)))

    async def link(self, node: Node, parent: Node, name: bytes, cred: Cred) -> Attrs:
        self._check_name(name)
        async with self._locked(parent, node):
            if self.journaled:
                if await self._existing(parent, name, cred) is not None:
                    raise StoreError(errno.EEXIST, "exists")
                await self._alive(node, cred)
            return Attrs.of(await self.writes.link(node, parent, name, cred))

    async def _alive(self, node: Node, cred: Cred) -> Fattr3:
        """`node`'s attributes; ENOENT if its last name went meanwhile (a path looked
        up before another request removed it)."""
        if node.gone:
            raise NfsError(NOENT, "removed")
        attrs = await self._attrs(node, cred)
        if attrs.nlink == 0:
            raise NfsError(NOENT, "removed")
        return attrs

    async def remove(self, parent: Node, name: bytes, cred: Cred) -> None:
        while True:
            child, _ = await self._child(parent, name, cred, "REMOVE")
            async with self._locked(parent, child):
                node, attrs = await self._child(parent, name, cred, "REMOVE")
                if node is not child:
                    continue       # replaced meanwhile: lock that one instead
                if attrs.type is Ftype3.DIR:
                    raise StoreError(errno.EISDIR, "is a directory")
                await self.writes.remove(parent, name, node, cred, is_dir=False)
                break
        if attrs.nlink <= 1:
            self.own.file_removed(node)

    async def rmdir(self, parent: Node, name: bytes, cred: Cred) -> None:
        while True:
            child, _ = await self._child(parent, name, cred, "RMDIR")
            async with self._locked(parent, child if child.is_dir else None):
                node, attrs = await self._child(parent, name, cred, "RMDIR")
                if node is not child:
                    continue       # replaced meanwhile: lock that one instead
                if self.journaled:
                    if attrs.type is not Ftype3.DIR:
                        raise StoreError(errno.ENOTDIR, "not a directory")
                    if await self._has_entries(node, cred):
                        raise NfsError(Nfsstat3.NFS3ERR_NOTEMPTY, "RMDIR")
                await self.writes.remove(parent, name, node, cred, is_dir=True)
                self.own.file_removed(node)
                return

    async def _child(self, parent: Node, name: bytes, cred: Cred,
                     proc: str) -> tuple[Node, Fattr3]:
        found = await self._existing(parent, name, cred)
        if found is None:
            raise NfsError(NOENT, proc)
        return found

    async def rename(self, src: Node, src_name: bytes, dst: Node, dst_name: bytes,
                     cred: Cred, *, noreplace: bool = False) -> None:
        """RENAME; with `noreplace`, EEXIST if the target exists (checked first:
        NFSv3 has no atomic no-replace rename, so a racing creator can still lose)."""
        self._check_name(dst_name)
        while True:
            moved, _ = await self._child(src, src_name, cred, "RENAME")
            target = await self._existing(dst, dst_name, cred)
            seen = target[0] if target is not None else None
            async with self._locked(src, dst, moved, seen):
                found, _ = await self._child(src, src_name, cred, "RENAME")
                target = await self._existing(dst, dst_name, cred)
                if found is not moved or (target[0] if target else None) is not seen:
                    continue       # changed meanwhile: lock what is there now
                await self._rename_checked(src, src_name, dst, dst_name, target, cred,
                                           noreplace=noreplace)
                return

    async def _rename_checked(self, src: Node, src_name: bytes, dst: Node, dst_name: bytes,
                              target: tuple[Node, Fattr3] | None, cred: Cred, *,
                              noreplace: bool) -> None:
        node, attrs = await self._child(src, src_name, cred, "RENAME")
        replaced = None
        if target is not None:
            if target[0] is node:
                return
            if noreplace:
                raise StoreError(errno.EEXIST, "rename target exists")
            replaced, tattrs = target
            if self.journaled:
                await self._check_replace(attrs, replaced, tattrs, cred)
        await self.writes.rename(src, src_name, dst, dst_name, node, replaced, cred)
        if replaced is not None and target is not None and \
                (target[1].nlink <= 1 or target[1].type is Ftype3.DIR):
            self.own.file_removed(replaced)

    async def _check_replace(self, attrs: Fattr3, replaced: Node, tattrs: Fattr3,
                             cred: Cred) -> None:
        if attrs.type is Ftype3.DIR and tattrs.type is not Ftype3.DIR:
            raise StoreError(errno.ENOTDIR, "not a directory")
        if attrs.type is not Ftype3.DIR and tattrs.type is Ftype3.DIR:
            raise StoreError(errno.EISDIR, "is a directory")
        if tattrs.type is Ftype3.DIR and await self._has_entries(replaced, cred):
            raise NfsError(Nfsstat3.NFS3ERR_NOTEMPTY, "RENAME")

    async def _has_entries(self, node: Node, cred: Cred) -> bool:
        records = await self.merged_records(node, cred)
        return any(r.name not in (b".", b"..") for r in records)

    async def silly_rename(self, parent: Node, name: bytes, node: Node,
                           cred: Cred) -> bytes:
        """Hide an unlinked but still open file under a temporary name (as NFS
        clients do) so it stays readable until its last close; returns that name."""
        self._silly_counter += 1
        hidden = f".wancache-unlinked-{node.fileid:x}-{os.getpid():x}-" \
                 f"{self._silly_counter:x}".encode()
        await self.rename(parent, name, parent, hidden, cred)
        node.parent, node.name = parent, hidden
        return hidden

    # -- directories ---------------------------------------------------------------

    async def opendir(self, node: Node, cred: Cred) -> DirCursor:
        return DirCursor(node)

    async def readdir(self, cursor: DirCursor, offset: int,
                      cred: Cred) -> tuple[list[DirEntry], bool]:
        """Entries after position `offset` (0: from the start), a page at a time, and
        whether that was the end."""
        if not self.caching:
            return await self._readdir_page(cursor, offset, cred)
        if offset == 0 or cursor.records is None:
            cursor.records = await self.merged_records(cursor.node, cred)
        records = cursor.records
        page = []
        for i, rec in enumerate(records[offset:offset + READDIR_PAGE], start=offset + 1):
            node, attrs = None, None
            if rec.fh is not None:
                node = self.nodes.get(rec.fh)
                ov = self.overlay.get(node) if node is not None else None
                if ov is not None:
                    attrs = ov.attrs
                else:
                    entry = self.attrs.peek(rec.fh)
                    if entry is not None:
                        node = self.nodes.node_for(rec.fh, entry.attrs) \
                            if rec.name in (b".", b"..") \
                            else self.nodes.node_for(rec.fh, entry.attrs, cursor.node, rec.name)
                        attrs = self._seen(node, entry.attrs, stale=entry.before_our_change)
            page.append(DirEntry(rec.name, rec.fileid, i, node,
                                 Attrs.of(attrs) if attrs is not None else None))
        return page, offset + READDIR_PAGE >= len(records)

    async def merged_records(self, node: Node, cred: Cred) -> list[DirRecord]:
        """The directory as users see it: the server's listing with local changes."""
        ov = self.overlay.get(node)
        if ov is not None and ov.local:
            base: list[DirRecord] = []
        else:
            base = (await self.listing(node, cred)).records
        if ov is None or not ov.entries:
            return base
        by_name = {r.name: r for r in base}
        for name, child in ov.entries.items():
            if child is None:
                by_name.pop(name, None)
            else:
                by_name[name] = DirRecord(name, child.fileid, child.fh, child.ftype)
        return list(by_name.values())

    async def _readdir_page(self, cursor: DirCursor, offset: int,
                            cred: Cred) -> tuple[list[DirEntry], bool]:
        """One READDIRPLUS page straight from the server (pass-through)."""
        if offset > len(cursor.cookies):
            raise StoreError(errno.EINVAL, "directory position out of range")
        cookie = cursor.cookies[offset - 1] if offset else 0
        res = await self.nodes.on(cursor.node, cred, lambda fh: self.client.readdirplus(
            fh, cookie, cursor.verf if cookie else bytes(8), cred))
        cursor.verf = res.cookieverf
        del cursor.cookies[offset:]
        entries = []
        for e in res.entries:
            node = None
            if e.name_handle is not None and e.name_attributes is not None \
                    and e.name not in (b".", b".."):
                node = self.nodes.node_for(e.name_handle, e.name_attributes, cursor.node,
                                           e.name)
            cursor.cookies.append(e.cookie)
            entries.append(DirEntry(e.name, e.fileid, len(cursor.cookies), node,
                                    Attrs.of(e.name_attributes)
                                    if e.name_attributes is not None else None))
        return entries, res.eof

    async def listing(self, node: Node, cred: Cred) -> Listing:
        """The whole directory with every child's attributes within their lease:
        from the cache when it holds, else read again with READDIRPLUS."""
        listing = self.dirs.get(node.fh)
        if listing is not None and (self._fresh(node, listing) or self.offline):
            self.dirs.stats.hits += 1
            return listing
        self.dirs.stats.misses += 1
        try:
            return await self._listings.run(node.fh, lambda: self._read_listing(node, cred))
        except TransportError:
            if listing is None:
                raise
            log.debug("server unreachable: listing %r from the cache", node.path())
            return listing

    def _fresh(self, node: Node, listing: Listing) -> bool:
        if listing.trusted_until > trio.current_time():
            return True   # ours: children's attributes are revalidated one by one
        attrs = self.attrs.valid(node.fh)
        if attrs is None or version(attrs) != listing.version:
            return False
        holds = self.attrs.holds
        return all(rec.fh is None or holds(rec.fh)
                   for rec in listing.by_name.values())

    async def _read_listing(self, node: Node, cred: Cred, *, prefetch: bool = True) -> Listing:
        """READDIRPLUS the whole directory.  Neither its attributes nor our own view of
        it may change meanwhile (a change of ours applied while the listing was on
        its way could be missing from it): otherwise read it again, and if it keeps
        changing, answer from the last read without caching it."""
        consistent = False
        for _attempt in range(READ_LISTING_ATTEMPTS):
            generation = self.own.generation(node.fh)
            records: list[DirRecord] = []
            cookie, verf = 0, bytes(8)
            first: tuple[int, int, int] | None = None
            last: Fattr3 | None = None
            while True:
                res = await self.nodes.on(node, cred, functools.partial(
                    self.client.readdirplus, cookie=cookie, cookieverf=verf, cred=cred))
                verf = res.cookieverf
                if res.dir_attributes is not None:
                    last = res.dir_attributes
                    first = first or version(last)
                for e in res.entries:
                    ftype = e.name_attributes.type if e.name_attributes is not None else None
                    records.append(DirRecord(e.name, e.fileid, e.name_handle, ftype))
                    cookie = e.cookie
                if res.eof or not res.entries:
                    break
            if last is None:
                last = await self.client.getattr(node.fh, cred)
                first = version(last)
            if first == version(last) and self.own.generation(node.fh) == generation:
                consistent = True
                break
        assert last is not None   # every attempt ends with the directory's attributes
        listing = Listing.of(records, version(last))
        if not consistent:
            return listing
        old = self.dirs.get(node.fh)
        if old is not None:
            self._listing_changed(node, old, listing)
        self.dirs.put(node.fh, listing)
        if prefetch and self.cfg.prefetch_depth > 0:
            self._prefetch_children(node, listing, self.cfg.prefetch_depth, cred)
        return listing

    def _list_ahead(self, parent: Node, cred: Cred) -> None:
        """A lookup in a directory we have no listing of: read the listing in the
        background, so the lookups of its neighbours (git status, a build's stat
        storm) are answered from it instead of one LOOKUP each."""
        if self._nursery is None or self.cfg.prefetch_depth <= 0 or \
                self.dirs.get(parent.fh) is not None or self._listings.busy(parent.fh) or \
                parent.is_local:
            return
        self._nursery.start_soon(self._prefetch, parent, 1, cred)

    def _prefetch_children(self, node: Node, listing: Listing, depth: int,
                           cred: Cred) -> None:
        """List subdirectories ahead of a tree walk, in the background."""
        if self._nursery is None or depth <= 0:
            return
        for rec in listing.by_name.values():
            if rec.ftype is Ftype3.DIR and rec.fh is not None and \
                    rec.name not in (b".", b"..") and self.dirs.get(rec.fh) is None and \
                    not self._listings.busy(rec.fh):
                attrs = self.attrs.peek(rec.fh)
                if attrs is not None:
                    child = self.nodes.node_for(rec.fh, attrs.attrs, node, rec.name)
                    self._nursery.start_soon(self._prefetch, child, depth, cred)

    async def _prefetch(self, node: Node, depth: int, cred: Cred) -> None:
        async with self._prefetch_slots:
            if self.dirs.get(node.fh) is not None or self._listings.busy(node.fh):
                return
            try:
                listing = await self._listings.run(
                    node.fh, lambda: self._read_listing(node, cred, prefetch=False))
            except Exception as exc:   # a background helper must never take the mount down
                log.debug("prefetch of %r skipped: %s", node.path(), exc)
                return
        self._prefetch_children(node, listing, depth - 1, cred)

    # -- data ----------------------------------------------------------------------

    def readahead(self) -> ReadAhead | None:
        """Read-ahead state for a new open file (None when not caching)."""
        return self.data.readahead() if self.data is not None else None

    def keep_cache(self, node: Node) -> bool:
        """Opening `node`: may the kernel keep its page cache? Yes if the file's
        version is the one it had at its previous open."""
        if self.data is None:
            return False
        attrs = self.attrs.valid(node.fh)
        if attrs is None or self.overlay.get(node) is not None:
            return False
        current = data_version(attrs)
        previous = self._open_versions.get(node.key)
        self._open_versions[node.key] = current
        return previous == current

    async def read(self, node: Node, offset: int, size: int, cred: Cred, *,
                   ra: ReadAhead | None = None, direct: bool = False) -> bytes:
        """Up to `size` bytes at `offset` (fewer only at end of file): local changes
        first, then the block cache within the attribute lease, else the server."""
        ov = self.overlay.get(node)
        if ov is not None and ov.file is not None:
            return await self.writes.read(node, offset, size, functools.partial(
                self._read_base, cred=cred, direct=direct))
        return await self._read_server(node, offset, size, cred, ra, direct)

    async def _read_base(self, node: Node, offset: int, size: int, *, cred: Cred,
                         direct: bool) -> bytes:
        """Server bytes under local changes (the overlay asks only for bytes that no
        pending change touches)."""
        return await self._read_server(node, offset, size, cred, None, direct)

    async def read_server(self, node: Node, offset: int, size: int) -> bytes:
        """The server's bytes of `node` (for lost+found)."""
        return await self._read_server(node, offset, size, Cred.root(), None, False)

    async def read_cached(self, node: Node, version: str, offset: int,
                          size: int) -> bytes | None:
        """`node`'s bytes as of `version` from the block cache, None if it has not all
        of them (a conflict copy: the server's bytes are another client's now)."""
        if self.data is None:
            return None
        bs = self.cfg.block_size
        parts: list[bytes] = []
        for idx in range(offset // bs, (offset + size + bs - 1) // bs):
            block = await self.data.cached_block(node.key, version, idx)
            if block is None:
                return None
            parts.append(block)
        start = offset - (offset // bs) * bs
        got = b"".join(parts)[start:start + size]
        return got if len(got) == size else None

    async def _read_server(self, node: Node, offset: int, size: int, cred: Cred,
                           ra: ReadAhead | None, direct: bool) -> bytes:
        """The server's bytes (through the block cache unless `direct`)."""
        if self.data is not None and not direct:
            for _attempt in range(3):
                attrs = await self._server_attrs(node, cred)
                if offset == 0 and node.parent is not None and \
                        not self.data.is_cached(node, attrs):
                    self._read_siblings_ahead(node.parent, cred)
                try:
                    return await self.data.read(node, attrs, offset, size, cred, ra)
                except VersionChanged:
                    log.debug("%r changed on the server while reading; again", node.path())
                    self.attrs.expire(node.fh)
        return await self._read_through(node, offset, size, cred)

    def _read_siblings_ahead(self, parent: Node, cred: Cred) -> None:
        """A small file read cold: its small neighbours are likely next (sources of
        a build, a project's files): fetch them too, up to `dir_readahead` bytes,
        once per directory lease."""
        budget = self.cfg.dir_readahead
        assert self.data is not None
        listing = self.dirs.get(parent.fh)
        now = trio.current_time()
        if budget <= 0 or listing is None or self._siblings_read.get(parent.fh, 0) > now:
            return
        self._siblings_read[parent.fh] = now + self.cfg.lease_bounds(True)[0]
        for rec in listing.by_name.values():
            if rec.ftype is not Ftype3.REG or rec.fh is None:
                continue
            entry = self.attrs.peek(rec.fh)
            if entry is None or entry.attrs.size > self.cfg.small_file or \
                    entry.attrs.size > budget:
                continue
            budget -= entry.attrs.size
            child = self.nodes.node_for(rec.fh, entry.attrs, parent, rec.name)
            if self.overlay.get(child) is None:
                self.data.prefetch(child, entry.attrs, cred)

    async def _read_through(self, node: Node, offset: int, size: int, cred: Cred) -> bytes:
        """Read straight from the server, rsize at a time, all in flight; a short
        READ is continued where it ended, until the count or end of file."""
        rsize = self.info.rsize
        spans = [(off, min(rsize, offset + size - off))
                 for off in range(offset, offset + size, rsize)]
        parts: list[bytes] = [b""] * len(spans)
        eof_at = len(spans)

        async def fetch(i: int, off: int, count: int) -> None:
            nonlocal eof_at
            got = b""
            while len(got) < count:
                at, want = off + len(got), count - len(got)
                res = await self.nodes.on(node, cred, functools.partial(
                    self.client.read, offset=at, count=want, cred=cred))
                got += res.data
                if res.eof or not res.data:
                    eof_at = min(eof_at, i)
                    break
            parts[i] = got

        if len(spans) == 1:
            await fetch(0, *spans[0])
        else:
            async with trio.open_nursery() as nursery:
                for i, (off, count) in enumerate(spans):
                    nursery.start_soon(fetch, i, off, count)
        return b"".join(parts[:eof_at + 1])

    async def write(self, node: Node, offset: int, data: bytes, cred: Cred, *,
                    direct: bool = False) -> int:
        """Hand a write to the policy (EFBIG past the server's largest file);
        `direct` (O_DIRECT): wait until it is on the server."""
        if node.ftype is not Ftype3.REG:
            raise StoreError(errno.EINVAL, "not a regular file")   # (the kernel's business)
        if node.gone:      # (open files are renamed away instead: this is a stale path)
            raise NfsError(NOENT, "removed")
        data = data[:checks.write_count(offset, len(data), self.info.max_file_size)]
        current = await self._known_attrs(node, cred)   # the base our bytes go over
        mode = checks.write_mode(self._state(current), cred)
        if mode is not None:     # setuid/setgid the kernel left to us (O_DIRECT, ...)
            await self._force_mode(node, current, mode)
        written = await self.writes.write(node, offset, data, cred)
        if direct:
            await self.fsync(node, cred)
        return written

    async def _known_attrs(self, node: Node, cred: Cred) -> Fattr3:
        """The attributes we have of `node`, however old (a write must not cost a
        GETATTR); asked for only if we have none."""
        ov = self.overlay.get(node)
        if ov is not None:
            return ov.attrs
        entry = self.attrs.peek(node.fh)
        return entry.attrs if entry is not None else await self._attrs(node, cred)

    async def fsync(self, node: Node, cred: Cred) -> None:
        """Wait until `node`'s changes are on the server (EIO if some never will)."""
        if self.cfg.hard:
            await self.writes.sync(node)
            return
        with trio.move_on_after(self.cfg.timeout):
            await self.writes.sync(node)
            return
        raise StoreError(errno.EIO, "the server did not take the changes in time "
                         "(they stay journaled and will be flushed)")

    async def closed(self, node: Node, cred: Cred) -> None:
        """A writer closed `node`: wait for the server where the policy or cto says
        so; EIO if changes to it could not be written."""
        if not self.journaled or self.cfg.consistency == "cto":
            await self.fsync(node, cred)
        failure = self.writes.take_failure(node)
        if failure is not None:
            raise StoreError(errno.EIO, failure)

    def release(self, node: Node) -> None:
        """The last open of `node` was closed (its write state may go)."""
        self.writes.release(node)


__all__ = ["DirCursor", "DirEntry", "Store", "StoreError", "WritePolicy"]
