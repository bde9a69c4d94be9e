"""The cached view of the server that the FUSE layer talks to.

`Store` offers every file system operation on `Node`s, with the caller's
credentials, and decides what goes to the server: with `cache=off` everything does
(the pass-through baseline).  It owns the one-Node-per-handle registry and
re-resolves handles the server declares stale by their last known path.
"""

from __future__ import annotations

import errno
import logging
import os
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from wancache.config import Config
from wancache.nfs_backend import nfs3
from wancache.nfs_backend.client import NfsClient
from wancache.nfs_backend.errors import NfsError
from wancache.nfs_backend.nfs3 import Fattr3, Ftype3, Nfsstat3, Sattr3, StableHow
from wancache.nfs_backend.transport import Cred

from .node import Node

log = logging.getLogger(__name__)

T = TypeVar("T")
COMMIT_EVERY = 8 << 20   # uncommitted bytes after which a COMMIT is sent anyway


class StoreError(OSError):
    """A failure the store detects itself (not an NFS status), with its errno."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


@dataclass(slots=True)
class DirEntry:
    """One directory entry; `node`/`attrs` are None when the server sent no handle."""

    name: bytes
    fileid: int
    cookie: int
    node: Node | None
    attrs: Fattr3 | None


@dataclass
class DirCursor:
    """State of one open directory (one `opendir`)."""

    node: Node
    verf: bytes = bytes(8)


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

    def __init__(self, client: NfsClient, cfg: Config, root_attrs: Fattr3) -> None:
        self.client = client
        self.cfg = cfg
        self.info = client.info
        self.root = Node.from_attrs(client.root_fh, root_attrs)
        self._nodes: weakref.WeakValueDictionary[bytes, Node] = weakref.WeakValueDictionary()
        self._nodes[self.root.fh] = self.root
        self._files: dict[Node, _FileState] = {}
        self._silly_counter = 0

    @classmethod
    async def open(cls, client: NfsClient, cfg: Config) -> Store:
        """A store for the export `client` mounted."""
        return cls(client, cfg, await client.getattr(client.root_fh, Cred.root()))

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
        return node

    def attr_ttl(self, node: Node) -> float:
        """Seconds the kernel may trust `node`'s attributes (0: always ask)."""
        return 0.0

    def entry_ttl(self, parent: Node, name: bytes) -> float:
        """Seconds the kernel may trust the name -> inode binding."""
        return 0.0

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

    async def getattr(self, node: Node, cred: Cred) -> Fattr3:
        return await self._on(node, cred, lambda fh: self.client.getattr(fh, cred))

    async def lookup(self, parent: Node, name: bytes, cred: Cred) -> tuple[Node, Fattr3]:
        """The child `name` of `parent` (NfsError NOENT if there is none)."""
        if name == b".":
            return parent, await self.getattr(parent, cred)
        res = await self._on(parent, cred, lambda fh: self.client.lookup(fh, name, cred))
        attrs = res.obj_attributes or await self.client.getattr(res.object, cred)
        if name == b"..":
            return self.node_for(res.object, attrs), attrs
        return self.node_for(res.object, attrs, parent, name), attrs

    async def setattr(self, node: Node, attrs: Sattr3, cred: Cred) -> Fattr3:
        if attrs.size is not None:
            await self.commit(node, cred)
        res = await self._on(node, cred, lambda fh: self.client.setattr(fh, attrs, cred))
        if res.obj_wcc.after is not None:
            return res.obj_wcc.after
        return await self.getattr(node, cred)

    async def access(self, node: Node, mask: int, cred: Cred) -> int:
        """The subset of ACCESS3_* bits in `mask` the server grants `cred`."""
        return await self._on(node, cred, lambda fh: self.client.access(fh, mask, cred))

    async def readlink(self, node: Node, cred: Cred) -> bytes:
        return await self._on(node, cred, lambda fh: self.client.readlink(fh, cred))

    async def statfs(self, cred: Cred) -> nfs3.FsstatRes:
        return await self.client.fsstat(cred)

    # -- namespace -----------------------------------------------------------------

    async def _new_entry(self, parent: Node, name: bytes, res: nfs3.DirOpRes,
                         cred: Cred) -> tuple[Node, Fattr3]:
        fh = res.object
        if fh is None:
            look = await self.client.lookup(parent.fh, name, cred)
            fh = look.object
        attrs = res.obj_attributes or await self.client.getattr(fh, cred)
        return self.node_for(fh, attrs, parent, name), attrs

    async def create(self, parent: Node, name: bytes, mode: int, cred: Cred, *,
                     exclusive: bool) -> tuple[Node, Fattr3]:
        """A new regular file (GUARDED: EEXIST if `exclusive` and it exists)."""
        how = nfs3.CreateMode.GUARDED if exclusive else nfs3.CreateMode.UNCHECKED
        res = await self._on(parent, cred, lambda fh: self.client.create(
            fh, name, cred, mode=how, attrs=Sattr3(mode=mode & 0o7777)))
        return await self._new_entry(parent, name, res, cred)

    async def mkdir(self, parent: Node, name: bytes, mode: int,
                    cred: Cred) -> tuple[Node, Fattr3]:
        res = await self._on(parent, cred, lambda fh: self.client.mkdir(
            fh, name, Sattr3(mode=mode & 0o7777), cred))
        return await self._new_entry(parent, name, res, cred)

    async def symlink(self, parent: Node, name: bytes, target: bytes,
                      cred: Cred) -> tuple[Node, Fattr3]:
        res = await self._on(parent, cred, lambda fh: self.client.symlink(
            fh, name, target, Sattr3(), cred))
        return await self._new_entry(parent, name, res, cred)

    async def mknod(self, parent: Node, name: bytes, ftype: Ftype3, mode: int,
                    rdev: tuple[int, int], cred: Cred) -> tuple[Node, Fattr3]:
        spec = rdev if ftype in (Ftype3.CHR, Ftype3.BLK) else None
        res = await self._on(parent, cred, lambda fh: self.client.mknod(
            fh, name, ftype, Sattr3(mode=mode & 0o7777), cred, spec))
        return await self._new_entry(parent, name, res, cred)

    async def link(self, node: Node, parent: Node, name: bytes, cred: Cred) -> Fattr3:
        res = await self._on(node, cred,
                             lambda fh: self.client.link(fh, parent.fh, name, cred))
        return res.file_attributes or await self.getattr(node, cred)

    async def remove(self, parent: Node, name: bytes, cred: Cred) -> None:
        await self._on(parent, cred, lambda fh: self.client.remove(fh, name, cred))

    async def rmdir(self, parent: Node, name: bytes, cred: Cred) -> None:
        await self._on(parent, cred, lambda fh: self.client.rmdir(fh, name, cred))

    async def rename(self, src: Node, src_name: bytes, dst: Node, dst_name: bytes,
                     cred: Cred, *, noreplace: bool = False) -> None:
        """RENAME; with `noreplace`, EEXIST if the target exists (checked first:
        NFSv3 has no atomic no-replace rename, so a racing creator can still lose)."""
        if noreplace:
            try:
                await self.client.lookup(dst.fh, dst_name, cred)
            except NfsError as exc:
                if exc.status != Nfsstat3.NFS3ERR_NOENT:
                    raise
            else:
                raise StoreError(errno.EEXIST, "rename target exists")
        await self._on(src, cred, lambda fh: self.client.rename(
            fh, src_name, dst.fh, dst_name, cred))

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

    async def readdir(self, cursor: DirCursor, cookie: int,
                      cred: Cred) -> tuple[list[DirEntry], bool]:
        """One page of entries after `cookie` (0: from the start) and an eof flag."""
        res = await self._on(cursor.node, cred, lambda fh: self.client.readdirplus(
            fh, cookie, cursor.verf if cookie else bytes(8), cred))
        cursor.verf = res.cookieverf
        entries = []
        for e in res.entries:
            node = None
            if e.name_handle is not None and e.name_attributes is not None \
                    and e.name not in (b".", b".."):
                node = self.node_for(e.name_handle, e.name_attributes, cursor.node, e.name)
            entries.append(DirEntry(e.name, e.fileid, e.cookie, node, e.name_attributes))
        return entries, res.eof

    # -- data ----------------------------------------------------------------------

    async def read(self, node: Node, offset: int, size: int, cred: Cred) -> bytes:
        """Up to `size` bytes at `offset` (fewer only at end of file)."""
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
                res = await self._on(node, cred, lambda fh, at=at, want=want:
                                     self.client.read(fh, at, want, cred))
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
        """Write through to the server; UNSTABLE data is kept until COMMIT."""
        wsize = self.info.wsize
        state = self._files.setdefault(node, _FileState())
        view = memoryview(data)
        for start in range(0, len(data), wsize):
            chunk = bytes(view[start:start + wsize])
            res = await self._on(node, cred, lambda fh, c=chunk, o=offset + start:
                                 self.client.write(fh, o, c, cred, stable=stable))
            if res.count != len(chunk):
                raise StoreError(errno.EIO, f"short WRITE ({res.count} of {len(chunk)})")
            if res.committed == StableHow.UNSTABLE:
                state.unstable.append(_Unstable(offset + start, chunk, res.verf))
                state.unstable_bytes += len(chunk)
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
                await self._on(node, cred, lambda fh, w=w: self.client.write(
                    fh, w.offset, w.data, cred, stable=StableHow.FILE_SYNC))
        except BaseException:
            state.unstable[:0] = pending
            state.unstable_bytes += sum(len(w.data) for w in pending)
            raise

    def release(self, node: Node) -> None:
        """The last open of `node` was closed (its write state may go)."""
        state = self._files.get(node)
        if state is not None and not state.unstable:
            del self._files[node]
