"""The cached view of the server that the FUSE layer talks to.

`Store` offers every file system operation on `Node`s, with the caller's
credentials, and decides what goes to the server.  With `cache=off` everything does
(the pass-through baseline).  Otherwise attributes come from the attribute cache
while their lease holds, names from cached directory listings (revalidated with one
GETATTR of the directory when its lease ran out), missing names from the negative
cache, and listings are read whole with READDIRPLUS, which also refreshes every
child's attributes, so `ls -l` never costs one GETATTR per file.

It owns the one-Node-per-handle registry and re-resolves handles the server
declares stale by their last known path.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import trio
from cachetools import LRUCache

from wancache.config import Config
from wancache.nfs_backend import nfs3
from wancache.nfs_backend.client import NfsClient
from wancache.nfs_backend.errors import NfsError, TransportError
from wancache.nfs_backend.nfs3 import Fattr3, Ftype3, Nfsstat3, Sattr3, StableHow, WccData
from wancache.nfs_backend.transport import Cred

from .attrs import AttrCache, data_version, version
from .blocks import BlockStore
from .data import DataCache, VersionChanged
from .dirs import DirCache, DirRecord, Listing
from .flight import SingleFlight
from .node import LOCAL_PREFIX, Node
from .persist import SavedState
from .readahead import ReadAhead

if TYPE_CHECKING:
    from .writeback import WriteBack

log = logging.getLogger(__name__)

T = TypeVar("T")
COMMIT_EVERY = 8 << 20   # uncommitted bytes after which a COMMIT is sent anyway
READDIR_PAGE = 512       # entries handed to the FUSE layer per readdir step
# Attributes with local changes are not cached by the kernel: it asks us (no RPC).
# (With a timeout, this kernel kept a directory's old mode after our setattr reply.)
LOCAL_ATTR_TTL = 0.0
READ_LISTING_ATTEMPTS = 10
DIR_GENERATIONS = 100_000   # directories whose count of our changes we keep
NOENT = Nfsstat3.NFS3ERR_NOENT


class StoreError(OSError):
    """A failure the store detects itself (not an NFS status), with its errno."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


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
    attrs: Fattr3 | None


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


@dataclass(slots=True)
class _Unstable:
    offset: int
    data: bytes
    verf: bytes


@dataclass
class _FileState:
    """Per-node write state: UNSTABLE writes not yet covered by a COMMIT."""

    unstable: list[_Unstable] = field(default_factory=list)
    unstable_bytes: int = 0


class Store:
    """Every operation the FUSE layer needs, on Nodes, for one mount."""

    def __init__(self, client: NfsClient, cfg: Config, root_attrs: Fattr3,
                 nursery: trio.Nursery | None = None,
                 blocks: BlockStore | None = None) -> None:
        self.client = client
        self.cfg = cfg
        self.info = client.info
        self.caching = cfg.cache
        self.root = Node.from_attrs(client.root_fh, root_attrs)
        self._nodes: weakref.WeakValueDictionary[bytes, Node] = weakref.WeakValueDictionary()
        self._nodes[self.root.fh] = self.root
        self._files: dict[Node, _FileState] = {}
        self._silly_counter = 0
        self.attrs = AttrCache(cfg, enabled=cfg.cache)
        self.dirs = DirCache(cfg)
        self._listings: SingleFlight[bytes, Listing] = SingleFlight()
        self._nursery = nursery
        self._prefetch_slots = trio.Semaphore(max(1, cfg.prefetch_concurrency))
        # Names that disappeared from a re-read listing: (directory node, name).
        self.entry_listeners: list[Callable[[Node, bytes], None]] = []
        client.attr_sinks.append(self.attrs.update)
        self.attrs.update(self.root.fh, root_attrs, None, trio.current_time())
        self.data: DataCache | None = None
        if self.caching and nursery is not None:
            self.data = DataCache(client, cfg, blocks, nursery)
            self.attrs.listeners.append(self.data.attrs_changed)
        self._open_versions: dict[str, str] = {}
        # (directory handle, name) -> handle, as last seen: to expire a removed
        # name's attributes (its other hard links' link count) without a listing.
        self._names: LRUCache[tuple[bytes, bytes], bytes] = LRUCache(cfg.attr_entries)
        self.name_max = client.info.name_max
        self._siblings_read: LRUCache[bytes, float] = LRUCache(DIR_GENERATIONS)
        self.wb: WriteBack | None = None    # set when write-back is on
        self._fsstat: tuple[float, nfs3.FsstatRes] | None = None
        # Count of our own changes applied to each directory (see _read_listing).
        self._dir_gen: LRUCache[bytes, int] = LRUCache(DIR_GENERATIONS)

    @classmethod
    async def open(cls, client: NfsClient, cfg: Config, nursery: trio.Nursery | None = None,
                   blocks: BlockStore | None = None, saved: SavedState | None = None) -> Store:
        """A store for the export `client` mounted; background work runs in `nursery`,
        file data is cached in `blocks` (if given), the metadata caches start from
        `saved` (if given; then the server need not be reachable now)."""
        try:
            root_attrs = await client.getattr(client.root_fh, Cred.root())
        except TransportError:
            if saved is None or client.root_fh not in saved.attrs:
                raise
            root_attrs = saved.attrs[client.root_fh]
        store = cls(client, cfg, root_attrs, nursery, blocks)
        if saved is not None:
            store.restore(saved)
        with contextlib.suppress(TransportError):
            await store._probe_name_max()
        return store

    def restore(self, saved: SavedState) -> None:
        """Start the metadata caches from a saved state (all of it expired)."""
        for fh, attrs in saved.attrs.items():
            self.attrs.load(fh, attrs)
        for fh, (dir_version, records) in saved.listings.items():
            if self.dirs.get(fh) is None:
                self.dirs.put(fh, Listing.of(records, dir_version))
        for key, fh in saved.names.items():
            self._names[key] = fh

    def saved_state(self) -> SavedState:
        """The metadata caches, to be saved (nodes created here are left out)."""
        attrs = {fh: a for fh, a in self.attrs.items() if not fh.startswith(LOCAL_PREFIX)}
        listings = {fh: (listing.version, [r for r in listing.records
                                           if r.fh is None or not r.fh.startswith(LOCAL_PREFIX)])
                    for fh, listing in self.dirs.items()}
        names = {k: fh for k, fh in self._names.items() if not fh.startswith(LOCAL_PREFIX)}
        return SavedState(export=self.cfg.spec, info=self.info, attrs=attrs,
                          listings=listings, names=names)

    @property
    def offline(self) -> bool:
        """No connection to the server, and the last attempts failed (or it was lost):
        serve what we have instead of waiting for a timeout per request."""
        transport = self.client.transport
        return not self.client.up and (transport.connected_once or
                                       transport.last_error is not None)

    async def _probe_name_max(self) -> None:
        """PATHCONF's name_max may promise more than the server's disk takes (ganesha
        says 1024 over ext4's 255): one LOOKUP of a 256-byte name tells."""
        if self.name_max <= 255:
            return
        try:
            await self.client.lookup(self.root.fh, b"n" * 256, Cred.root())
        except NfsError as exc:
            if exc.status == Nfsstat3.NFS3ERR_NAMETOOLONG:
                self.name_max = 255

    # -- nodes ---------------------------------------------------------------------

    def node_for(self, fh: bytes, attrs: Fattr3, parent: Node | None = None,
                 name: bytes = b"") -> Node:
        """The one Node of handle `fh` (created on first sight), path updated."""
        node = self._nodes.get(fh)
        if node is None:
            node = Node.from_attrs(fh, attrs, parent, name)
            self._nodes[fh] = node
        elif parent is not None:
            node.parent, node.name = parent, name
        if parent is not None:
            self._names[(parent.fh, name)] = fh
        return node

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None
        return self._nursery

    def register(self, node: Node) -> None:
        """Make `node` the one Node of its handle (for nodes created elsewhere)."""
        self._nodes[node.fh] = node

    def node_by_fh(self, fh: bytes) -> Node:
        """The Node of a handle whose attributes are cached (KeyError otherwise)."""
        node = self._nodes.get(fh)
        if node is not None:
            return node
        entry = self.attrs.peek(fh)
        if entry is None:
            raise KeyError(fh)
        return self.node_for(fh, entry.attrs)

    async def ensure_node(self, fh: bytes) -> Node:
        """The Node of a handle, asking the server for its attributes if needed."""
        try:
            return self.node_by_fh(fh)
        except KeyError:
            attrs = await self.client.getattr(fh, Cred.root())
            return self.node_for(fh, attrs)

    def rebind(self, node: Node, fh: bytes, attrs: Fattr3) -> None:
        """A node created here now exists on the server under `fh`."""
        if self._nodes.get(node.fh) is node:
            del self._nodes[node.fh]
        node.fh = fh
        node.fileid, node.fsid = attrs.fileid, attrs.fsid
        self._nodes[fh] = node
        if node.parent is not None:
            self._names[(node.parent.fh, node.name)] = fh
        self.attrs.update(fh, attrs, None, trio.current_time())

    def server_changed_dir(self, parent: Node, wcc: WccData, name: bytes, *,
                           added: Node | None = None, removed: bool = False) -> None:
        """The flusher changed `parent` on the server: keep its cached listing right."""
        if removed:
            self._forget_child(parent, name)
        new = (added.fileid, added.fh, added.ftype) if added is not None and \
            not added.is_local else None
        self._changed_dir(parent, wcc, name, added=new, removed=removed)

    def rename_local_entry(self, parent: Node, old: bytes, new: bytes, node: Node) -> None:
        """Our new file lost its name to another client's: it is now called `new`."""
        assert self.wb is not None
        ov = self.wb.overlay(parent)
        if ov is not None and ov.entries.get(old) is node:
            seq = ov.entry_seq.pop(old)
            del ov.entries[old]
            ov.entries[new], ov.entry_seq[new] = node, seq
        node.name = new

    def known_node(self, fh: bytes) -> Node | None:
        """The Node of `fh` if something still refers to it."""
        return self._nodes.get(fh)

    def attr_ttl(self, node: Node) -> float:
        """Seconds the kernel may trust `node`'s attributes: what is left of our lease
        (none for files in cto mode, whose attributes each open may refresh)."""
        if not self.caching or (self.cfg.consistency == "cto" and not node.is_dir):
            return 0.0
        if self.wb is not None and self.wb.overlay(node) is not None:
            return LOCAL_ATTR_TTL   # local changes: the kernel sees them all anyway
        return self.attrs.remaining(node.fh)

    def entry_ttl(self, parent: Node, name: bytes) -> float:
        """Seconds the kernel may trust the name -> inode binding: the directory's lease."""
        return self.attrs.remaining(parent.fh) if self.caching else 0.0

    def negative_ttl(self, parent: Node, name: bytes) -> float:
        """Seconds the kernel may remember that `name` is missing (0: do not)."""
        if not self.caching:
            return 0.0
        if self.wb is not None:
            known, node = self.wb.entry(parent, name)
            if (known and node is None) or (not known and self.wb.is_local_dir(parent)):
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

    async def _on(self, node: Node, cred: Cred, op: Callable[[bytes], Awaitable[T]]) -> T:
        """Run `op(handle)`, re-resolving the handle once if the server calls it stale."""
        try:
            return await op(node.fh)
        except NfsError as exc:
            if exc.status not in (Nfsstat3.NFS3ERR_STALE, Nfsstat3.NFS3ERR_BADHANDLE):
                raise
            if not await self._reresolve(node, cred):
                raise
        return await op(node.fh)

    async def _reresolve(self, node: Node, cred: Cred) -> bool:
        """Find `node` again by its last known path; True if it is the same file."""
        parent = node.parent
        if parent is None or node.gone:
            return False
        try:
            res = await self._on(parent, cred,
                                 lambda fh: self.client.lookup(fh, node.name, cred))
        except NfsError:
            return False
        if res.object is None or res.obj_attributes is None or \
                res.obj_attributes.fileid != node.fileid:
            return False
        log.info("re-resolved stale handle of %r", node.path())
        if self._nodes.get(node.fh) is node:
            del self._nodes[node.fh]
        node.fh = res.object
        self._nodes[node.fh] = node
        return True

    # -- metadata ------------------------------------------------------------------

    async def getattr(self, node: Node, cred: Cred, *, fresh: bool = False) -> Fattr3:
        """Attributes of `node`: cached within their lease unless `fresh`."""
        if self.wb is not None:
            ov = self.wb.overlay(node)
            if ov is not None:
                return ov.attrs
        return await self._server_attrs(node, cred, fresh=fresh)

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
            return await self._on(node, cred, lambda fh: self.client.getattr(fh, cred))
        except TransportError:
            if stale is None:
                raise
            log.debug("server unreachable: serving cached attributes of %r", node.path())
            return stale.attrs

    async def lookup(self, parent: Node, name: bytes, cred: Cred) -> tuple[Node, Fattr3]:
        """The child `name` of `parent` (NfsError NOENT if there is none)."""
        if name == b".":
            return parent, await self.getattr(parent, cred)
        if self.wb is not None and name != b"..":
            known, node = self.wb.entry(parent, name)
            if known and node is not None:
                return node, await self.getattr(node, cred)
            if known or self.wb.is_local_dir(parent):
                raise NfsError(NOENT, "LOOKUP")
        if self.caching and name != b"..":
            found = await self._cached_lookup(parent, name, cred)
            if found is not None:
                return found
            if self.dirs.missing_for(parent.fh, name):
                raise NfsError(NOENT, "LOOKUP")
            if self.offline:
                found = self._remembered(parent, name)
                if found is not None:
                    return found
            self._list_ahead(parent, cred)
        sent = trio.current_time()
        try:
            res = await self._on(parent, cred,
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
            return self.node_for(res.fh, attrs), attrs
        return self.node_for(res.fh, attrs, parent, name), attrs

    def _remembered(self, parent: Node, name: bytes) -> tuple[Node, Fattr3] | None:
        """While disconnected: what `name` was the last time we looked it up."""
        fh = self._names.get((parent.fh, name))
        entry = self.attrs.peek(fh) if fh is not None else None
        if fh is None or entry is None:
            return None
        log.debug("server unreachable: %r as last seen", parent.path().rstrip(b"/") + b"/" + name)
        return self.node_for(fh, entry.attrs, parent, name), entry.attrs

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
                await self._on(parent, cred, lambda fh: self.client.getattr(fh, cred))
                if await self._valid_names(parent, cred) is not listing:
                    return None
            raise NfsError(NOENT, "LOOKUP")
        if rec.fh is None:
            return None
        entry = self.attrs.get(rec.fh)
        if entry is not None:
            return self.node_for(rec.fh, entry.attrs, parent, name), entry.attrs
        stale = self.attrs.peek(rec.fh)
        if stale is not None and self.offline:
            return self.node_for(rec.fh, stale.attrs, parent, name), stale.attrs
        try:
            attrs = await self.client.getattr(rec.fh, cred)
        except NfsError as exc:
            if exc.status in (Nfsstat3.NFS3ERR_STALE, Nfsstat3.NFS3ERR_BADHANDLE):
                self.dirs.drop(parent.fh)
                return None
            raise
        return self.node_for(rec.fh, attrs, parent, name), attrs

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
            for listener in self.entry_listeners:
                listener(parent, name)

    async def setattr(self, node: Node, attrs: Sattr3, cred: Cred) -> Fattr3:
        if self.wb is not None:
            await self.getattr(node, cred)    # the base the change applies to
            return await self.wb.setattr(node, attrs, cred)
        if attrs.size is not None:
            await self.commit(node, cred)
        res = await self._on(node, cred, lambda fh: self.client.setattr(fh, attrs, cred))
        if res.obj_wcc.after is not None:
            return res.obj_wcc.after
        return await self.getattr(node, cred)

    async def access(self, node: Node, mask: int, cred: Cred) -> int:
        """The subset of ACCESS3_* bits in `mask` the server grants `cred`."""
        if node.is_local:
            return mask   # not on the server yet: the kernel checked the mode bits
        return await self._on(node, cred, lambda fh: self.client.access(fh, mask, cred))

    async def readlink(self, node: Node, cred: Cred) -> bytes:
        if self.wb is not None:
            ov = self.wb.overlay(node)
            if ov is not None and ov.target:
                return ov.target
        return await self._on(node, cred, lambda fh: self.client.readlink(fh, cred))

    async def statfs(self, cred: Cred) -> nfs3.FsstatRes:
        """FSSTAT, kept for the shortest file lease (df, find and build tools ask
        often); the last answer while the server cannot be reached."""
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

    def _changed_dir(self, parent: Node, wcc: WccData, name: bytes, *,
                     added: tuple[int, bytes | None, Ftype3 | None] | None = None,
                     removed: bool = False) -> None:
        """We changed `parent`: patch its listing if the reply proves nobody else
        did in between, else drop it; forget `name` as missing."""
        self.dirs.forget_missing(parent.fh, name)
        self._dir_gen[parent.fh] = self._dir_gen.get(parent.fh, 0) + 1
        listing = self.dirs.get(parent.fh)
        if listing is None:
            return
        if listing.trusted_until > trio.current_time():
            pass    # ours: apply the change whatever the order of the replies
        elif wcc.before is None or wcc.after is None or \
                (wcc.before.mtime.to_ns(), wcc.before.ctime.to_ns(), wcc.before.size) \
                != listing.version:
            self.dirs.drop(parent.fh)
            return
        if removed:
            listing.remove(name)
        if added is not None:
            listing.add(name, added[0], added[1], added[2])
        if wcc.after is not None:
            listing.version = version(wcc.after)

    def install_own_listing(self, node: Node, attrs: Fattr3) -> None:
        """`node` is a directory we just created on the server: it is empty but for
        what we put in it, so trust our listing of it for the directory lease."""
        lo, _ = self.cfg.lease_bounds(True)
        self.dirs.put(node.fh, Listing({}, version(attrs),
                                       trusted_until=trio.current_time() + lo))

    async def _new_entry(self, parent: Node, name: bytes, res: nfs3.DirOpRes,
                         cred: Cred) -> tuple[Node, Fattr3]:
        fh = res.object
        if fh is None:
            fh = (await self.client.lookup(parent.fh, name, cred)).fh
        attrs = res.obj_attributes or await self.client.getattr(fh, cred)
        self._changed_dir(parent, res.dir_wcc, name, added=(attrs.fileid, fh, attrs.type))
        return self.node_for(fh, attrs, parent, name), attrs

    async def _existing(self, parent: Node, name: bytes,
                        cred: Cred) -> tuple[Node, Fattr3] | None:
        """The child `name` of `parent` as users see it now, or None."""
        try:
            return await self.lookup(parent, name, cred)
        except NfsError as exc:
            if exc.status == NOENT:
                return None
            raise

    async def _local_create(self, parent: Node, name: bytes, ftype: Ftype3, mode: int,
                            cred: Cred, *, target: bytes = b"", rdev: tuple[int, int] = (0, 0)
                            ) -> tuple[Node, Fattr3]:
        """Write-back: create here, after the checks the server would make."""
        assert self.wb is not None
        if await self._existing(parent, name, cred) is not None:
            raise StoreError(errno.EEXIST, "exists")
        return await self.wb.create(parent, name, ftype, mode, cred, target=target, rdev=rdev)

    async def create(self, parent: Node, name: bytes, mode: int, cred: Cred, *,
                     exclusive: bool) -> tuple[Node, Fattr3]:
        """A new regular file (GUARDED: EEXIST if `exclusive` and it exists)."""
        if self.wb is not None:
            found = await self._existing(parent, name, cred)
            if found is not None:
                if exclusive:
                    raise StoreError(errno.EEXIST, "exists")
                return found
            return await self.wb.create(parent, name, Ftype3.REG, mode, cred)
        how = nfs3.CreateMode.GUARDED if exclusive else nfs3.CreateMode.UNCHECKED
        res = await self._on(parent, cred, lambda fh: self.client.create(
            fh, name, cred, mode=how, attrs=Sattr3(mode=mode & 0o7777)))
        return await self._new_entry(parent, name, res, cred)

    async def mkdir(self, parent: Node, name: bytes, mode: int,
                    cred: Cred) -> tuple[Node, Fattr3]:
        if self.wb is not None:
            return await self._local_create(parent, name, Ftype3.DIR, mode, cred)
        res = await self._on(parent, cred, lambda fh: self.client.mkdir(
            fh, name, Sattr3(mode=mode & 0o7777), cred))
        return await self._new_entry(parent, name, res, cred)

    async def symlink(self, parent: Node, name: bytes, target: bytes,
                      cred: Cred) -> tuple[Node, Fattr3]:
        if self.wb is not None:
            return await self._local_create(parent, name, Ftype3.LNK, 0o777, cred,
                                            target=target)
        res = await self._on(parent, cred, lambda fh: self.client.symlink(
            fh, name, target, Sattr3(), cred))
        return await self._new_entry(parent, name, res, cred)

    async def mknod(self, parent: Node, name: bytes, ftype: Ftype3, mode: int,
                    rdev: tuple[int, int], cred: Cred) -> tuple[Node, Fattr3]:
        if self.wb is not None:
            return await self._local_create(parent, name, ftype, mode, cred, rdev=rdev)
        spec = rdev if ftype in (Ftype3.CHR, Ftype3.BLK) else None
        res = await self._on(parent, cred, lambda fh: self.client.mknod(
            fh, name, ftype, Sattr3(mode=mode & 0o7777), cred, spec))
        return await self._new_entry(parent, name, res, cred)

    async def link(self, node: Node, parent: Node, name: bytes, cred: Cred) -> Fattr3:
        if self.wb is not None:
            if await self._existing(parent, name, cred) is not None:
                raise StoreError(errno.EEXIST, "exists")
            await self.getattr(node, cred)
            return await self.wb.link(node, parent, name, cred)
        res = await self._on(node, cred,
                             lambda fh: self.client.link(fh, parent.fh, name, cred))
        attrs = res.file_attributes or await self.getattr(node, cred, fresh=True)
        self._changed_dir(parent, res.linkdir_wcc, name,
                          added=(attrs.fileid, node.fh, attrs.type))
        return attrs

    async def remove(self, parent: Node, name: bytes, cred: Cred) -> None:
        if self.wb is not None:
            found = await self._existing(parent, name, cred)
            if found is None:
                raise NfsError(NOENT, "REMOVE")
            if found[1].type is Ftype3.DIR:
                raise StoreError(errno.EISDIR, "is a directory")
            return await self.wb.remove(parent, name, found[0], cred, is_dir=False)
        await self._remove_through(parent, name, cred, self.client.remove)

    async def rmdir(self, parent: Node, name: bytes, cred: Cred) -> None:
        if self.wb is not None:
            found = await self._existing(parent, name, cred)
            if found is None:
                raise NfsError(NOENT, "RMDIR")
            node, attrs = found
            if attrs.type is not Ftype3.DIR:
                raise StoreError(errno.ENOTDIR, "not a directory")
            if await self._has_entries(node, cred):
                raise NfsError(Nfsstat3.NFS3ERR_NOTEMPTY, "RMDIR")
            return await self.wb.remove(parent, name, node, cred, is_dir=True)
        await self._remove_through(parent, name, cred, self.client.rmdir)

    async def _remove_through(self, parent: Node, name: bytes, cred: Cred,
                              rpc: Callable[[bytes, bytes, Cred],
                                            Awaitable[nfs3.DirWccRes]]) -> None:
        """REMOVE or RMDIR on the server, then mend the caches."""
        try:
            res = await self._on(parent, cred, lambda fh: rpc(fh, name, cred))
        except NfsError as exc:
            if exc.status == NOENT:
                self.dirs.drop(parent.fh)
            raise
        self._forget_child(parent, name)
        self._changed_dir(parent, res.dir_wcc, name, removed=True)

    def _forget_child(self, parent: Node, name: bytes) -> None:
        """A name went away: its node's attributes (nlink, ctime) are now stale, for
        every other name (hard link) of it too."""
        fh = self._names.pop((parent.fh, name), None)
        listing = self.dirs.get(parent.fh)
        rec = listing.by_name.get(name) if listing is not None else None
        if rec is not None and rec.fh is not None:
            fh = rec.fh
            if rec.ftype is Ftype3.DIR:
                self.dirs.drop(rec.fh)
        if fh is not None:
            self.attrs.expire(fh)

    async def rename(self, src: Node, src_name: bytes, dst: Node, dst_name: bytes,
                     cred: Cred, *, noreplace: bool = False) -> None:
        """RENAME; with `noreplace`, EEXIST if the target exists (checked first:
        NFSv3 has no atomic no-replace rename, so a racing creator can still lose)."""
        if self.wb is not None:
            return await self._local_rename(src, src_name, dst, dst_name, cred,
                                            noreplace=noreplace)
        if noreplace:
            try:
                await self.client.lookup(dst.fh, dst_name, cred)
            except NfsError as exc:
                if exc.status != Nfsstat3.NFS3ERR_NOENT:
                    raise
            else:
                raise StoreError(errno.EEXIST, "rename target exists")
        src_listing = self.dirs.get(src.fh)
        moved = src_listing.by_name.get(src_name) if src_listing is not None else None
        try:
            res = await self._on(src, cred, lambda fh: self.client.rename(
                fh, src_name, dst.fh, dst_name, cred))
        except NfsError:
            self.dirs.drop(src.fh)
            self.dirs.drop(dst.fh)
            raise
        self._forget_child(dst, dst_name)
        if moved is not None and moved.fh is not None:
            self.attrs.expire(moved.fh)   # its ctime changed
        self._changed_dir(src, res.fromdir_wcc, src_name, removed=True)
        if moved is None:
            self.dirs.drop(dst.fh)
            self.dirs.forget_missing(dst.fh, dst_name)
        elif dst is src:
            self._changed_dir(dst, res.todir_wcc, dst_name,
                              added=(moved.fileid, moved.fh, moved.ftype))
        else:
            self._changed_dir(dst, res.todir_wcc, dst_name, removed=True,
                              added=(moved.fileid, moved.fh, moved.ftype))

    async def _local_rename(self, src: Node, src_name: bytes, dst: Node, dst_name: bytes,
                            cred: Cred, *, noreplace: bool) -> None:
        """Write-back rename, after the checks the server would make."""
        assert self.wb is not None
        found = await self._existing(src, src_name, cred)
        if found is None:
            raise NfsError(NOENT, "RENAME")
        node, attrs = found
        target = await self._existing(dst, dst_name, cred)
        replaced = None
        if target is not None:
            if target[0] is node:
                return
            if noreplace:
                raise StoreError(errno.EEXIST, "rename target exists")
            replaced, tattrs = target
            if attrs.type is Ftype3.DIR and tattrs.type is not Ftype3.DIR:
                raise StoreError(errno.ENOTDIR, "not a directory")
            if attrs.type is not Ftype3.DIR and tattrs.type is Ftype3.DIR:
                raise StoreError(errno.EISDIR, "is a directory")
            if tattrs.type is Ftype3.DIR and await self._has_entries(replaced, cred):
                raise NfsError(Nfsstat3.NFS3ERR_NOTEMPTY, "RENAME")
        await self.wb.rename(src, src_name, dst, dst_name, node, replaced, cred)

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
                node = self._nodes.get(rec.fh)
                ov = self.wb.overlay(node) if self.wb is not None and node is not None \
                    else None
                if ov is not None:
                    attrs = ov.attrs
                else:
                    entry = self.attrs.peek(rec.fh)
                    if entry is not None:
                        attrs = entry.attrs
                        node = self.node_for(rec.fh, attrs) if rec.name in (b".", b"..") \
                            else self.node_for(rec.fh, attrs, cursor.node, rec.name)
            page.append(DirEntry(rec.name, rec.fileid, i, node, attrs))
        return page, offset + READDIR_PAGE >= len(records)

    async def merged_records(self, node: Node, cred: Cred) -> list[DirRecord]:
        """The directory as users see it: the server's listing with local changes."""
        wb = self.wb
        ov = wb.overlay(node) if wb is not None else None
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
        res = await self._on(cursor.node, cred, lambda fh: self.client.readdirplus(
            fh, cookie, cursor.verf if cookie else bytes(8), cred))
        cursor.verf = res.cookieverf
        del cursor.cookies[offset:]
        entries = []
        for e in res.entries:
            node = None
            if e.name_handle is not None and e.name_attributes is not None \
                    and e.name not in (b".", b".."):
                node = self.node_for(e.name_handle, e.name_attributes, cursor.node, e.name)
            cursor.cookies.append(e.cookie)
            entries.append(DirEntry(e.name, e.fileid, len(cursor.cookies), node,
                                    e.name_attributes))
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
        valid = self.attrs.valid
        return all(rec.fh is None or valid(rec.fh) is not None
                   for rec in listing.by_name.values())

    async def _read_listing(self, node: Node, cred: Cred, *, prefetch: bool = True) -> Listing:
        """READDIRPLUS the whole directory.  Neither its attributes nor our own view of
        it may change meanwhile (a change of ours applied while the listing was on
        its way could be missing from it): otherwise read it again, and if it keeps
        changing, answer from the last read without caching it."""
        consistent = False
        for _attempt in range(READ_LISTING_ATTEMPTS):
            generation = self._dir_gen.get(node.fh, 0)
            records: list[DirRecord] = []
            cookie, verf = 0, bytes(8)
            first: tuple[int, int, int] | None = None
            last: Fattr3 | None = None
            while True:
                res = await self._on(node, cred, functools.partial(
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
            if first == version(last) and self._dir_gen.get(node.fh, 0) == generation:
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
                    child = self.node_for(rec.fh, attrs.attrs, node, rec.name)
                    self._nursery.start_soon(self._prefetch, child, depth, cred)

    async def _prefetch(self, node: Node, depth: int, cred: Cred) -> None:
        async with self._prefetch_slots:
            if self.dirs.get(node.fh) is not None or self._listings.busy(node.fh):
                return
            try:
                listing = await self._listings.run(
                    node.fh, lambda: self._read_listing(node, cred, prefetch=False))
            except (NfsError, OSError) as exc:
                log.debug("prefetch of %r skipped: %s", node.path(), exc)
                return
            except Exception as exc:   # a background helper must never take the mount down
                log.debug("prefetch of %r failed: %s", node.path(), exc)
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
        if attrs is None:
            return False
        current = data_version(attrs)
        previous = self._open_versions.get(node.key)
        if previous != current:
            if len(self._open_versions) > self.cfg.attr_entries:
                self._open_versions.clear()
            self._open_versions[node.key] = current
        return previous == current

    async def read(self, node: Node, offset: int, size: int, cred: Cred, *,
                   ra: ReadAhead | None = None, direct: bool = False) -> bytes:
        """Up to `size` bytes at `offset` (fewer only at end of file): local changes
        first, then the block cache within the attribute lease, else the server."""
        if self.wb is not None:
            ov = self.wb.overlay(node)
            if ov is not None and ov.file is not None:
                lo, hi = ov.file.base_span(offset, size)
                base = b""
                if hi > lo and not node.is_local:
                    base = await self._read_server(node, lo, hi - lo, cred, ra, direct)
                return ov.file.apply(offset, size, base)
        return await self._read_server(node, offset, size, cred, ra, direct)

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
            child = self.node_for(rec.fh, entry.attrs, parent, rec.name)
            self.data.prefetch(child, entry.attrs, cred)

    async def _read_through(self, node: Node, offset: int, size: int, cred: Cred) -> bytes:
        """Read straight from the server, rsize at a time, all in flight."""
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
                res = await self._on(node, cred, functools.partial(
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
                    stable: StableHow = StableHow.UNSTABLE) -> int:
        """Write-back: journal it (O_DIRECT: and wait until it is on the server).
        Write-through: send it now; UNSTABLE data is kept until COMMIT."""
        if self.wb is not None:
            if not node.is_local and self.attrs.peek(node.fh) is None:
                await self._server_attrs(node, cred)   # the base our bytes go over
            written = await self.wb.write(node, offset, data, cred)
            if stable != StableHow.UNSTABLE:
                await self.fsync(node, cred)
            return written
        wsize = self.info.wsize
        state = self._files.setdefault(node, _FileState())
        view = memoryview(data)
        for start in range(0, len(data), wsize):
            chunk = bytes(view[start:start + wsize])
            res = await self._on(node, cred, functools.partial(
                self.client.write, offset=offset + start, data=chunk, cred=cred, stable=stable))
            if res.count != len(chunk):
                raise StoreError(errno.EIO, f"short WRITE ({res.count} of {len(chunk)})")
            if res.committed == StableHow.UNSTABLE:
                state.unstable.append(_Unstable(offset + start, chunk, res.verf))
                state.unstable_bytes += len(chunk)
        if self.data is not None:
            self.data.forget(node.key)
        if state.unstable_bytes > COMMIT_EVERY:
            await self.commit(node, cred)
        return len(data)

    async def commit(self, node: Node, cred: Cred) -> None:
        """COMMIT UNSTABLE writes; re-send those the server lost in a reboot."""
        state = self._files.get(node)
        if state is None or not state.unstable:
            return
        pending, state.unstable, state.unstable_bytes = state.unstable, [], 0
        try:
            res = await self._on(node, cred, lambda fh: self.client.commit(fh, cred))
            lost = [w for w in pending if w.verf != res.verf]
            if lost:
                log.warning("server rebooted: re-sending %d uncommitted writes of %r",
                            len(lost), node.path())
            for w in lost:
                await self._on(node, cred, functools.partial(
                    self.client.write, offset=w.offset, data=w.data, cred=cred,
                    stable=StableHow.FILE_SYNC))
        except BaseException:
            state.unstable[:0] = pending
            state.unstable_bytes += sum(len(w.data) for w in pending)
            raise

    async def fsync(self, node: Node, cred: Cred) -> None:
        """Wait until `node`'s changes are committed on the server."""
        if self.wb is None:
            await self.commit(node, cred)
            return
        if self.cfg.hard:
            await self.wb.sync(node)
            return
        with trio.move_on_after(self.cfg.timeout):
            await self.wb.sync(node)
            return
        raise StoreError(errno.EIO, "the server did not take the changes in time "
                         "(they stay journaled and will be flushed)")

    async def closed(self, node: Node, cred: Cred) -> None:
        """A writer closed `node`: write-through commits; write-back flushes only in
        cto mode (close-to-open), else the flusher takes its time."""
        if self.wb is None:
            await self.commit(node, cred)
        elif self.cfg.consistency == "cto":
            await self.fsync(node, cred)

    def release(self, node: Node) -> None:
        """The last open of `node` was closed (its write state may go)."""
        state = self._files.get(node)
        if state is not None and not state.unstable:
            del self._files[node]
