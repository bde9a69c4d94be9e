"""Write-through (`writeback=off`, `cache=off`): every change goes to the server
before the application gets its answer, as with NFS.  Writes are UNSTABLE and kept
until a COMMIT (fsync, close, or every COMMIT_EVERY bytes) whose verifier is checked;
what a rebooted server lost is sent again.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from wancache.config import Config
from wancache.creds import Cred
from wancache.nfs_backend import nfs3
from wancache.nfs_backend.client import NfsClient
from wancache.nfs_backend.errors import NfsError
from wancache.nfs_backend.nfs3 import Fattr3, Ftype3, Nfsstat3, NfsTime, Sattr3, StableHow

from .node import Node
from .nodes import NodeTable
from .overlay import Overlay
from .ownchanges import OwnChanges

log = logging.getLogger(__name__)

COMMIT_EVERY = 8 << 20   # uncommitted bytes after which a COMMIT is sent anyway
NOW = -1


@dataclass(slots=True)
class _Unstable:
    offset: int
    data: bytes
    verf: bytes


@dataclass
class _FileState:
    """UNSTABLE writes of one file not yet covered by a COMMIT."""

    unstable: list[_Unstable] = field(default_factory=list)
    unstable_bytes: int = 0


def sattr_of(fields: dict[str, int]) -> Sattr3:
    """A setattr's fields (times in ns, NOW for the server's clock) as a sattr3."""
    def time(name: str) -> NfsTime | nfs3.TimeHow | None:
        value = fields.get(name)
        if value is None:
            return None
        return nfs3.TimeHow.SET_TO_SERVER_TIME if value == NOW else NfsTime.from_ns(value)
    return Sattr3(mode=fields.get("mode"), uid=fields.get("uid"), gid=fields.get("gid"),
                  size=fields.get("size"), atime=time("atime"), mtime=time("mtime"))


class WriteThrough:
    """The write-through policy: each change is on the server when it returns."""

    def __init__(self, client: NfsClient, cfg: Config, nodes: NodeTable,
                 own: OwnChanges) -> None:
        self.client = client
        self.cfg = cfg
        self.nodes = nodes
        self.own = own
        self.overlay = Overlay()      # always empty: nothing is ever pending here
        self.dirty_bytes = 0
        self.pending_ops = 0
        self._files: dict[Node, _FileState] = {}

    def take_failure(self, node: Node) -> str | None:
        return None

    async def _new_entry(self, parent: Node, name: bytes, res: nfs3.DirOpRes,
                         cred: Cred) -> tuple[Node, Fattr3]:
        fh = res.object
        if fh is None:
            fh = (await self.client.lookup(parent.fh, name, cred)).fh
        attrs = res.obj_attributes or await self.client.getattr(fh, cred)
        node = self.nodes.node_for(fh, attrs, parent, name)
        self.own.dir_changed(parent, res.dir_wcc, name, added=node, added_attrs=attrs)
        return node, attrs

    async def create(self, parent: Node, name: bytes, ftype: Ftype3, mode: int, cred: Cred,
                     *, target: bytes = b"", rdev: tuple[int, int] = (0, 0),
                     exclusive: bool = True) -> tuple[Node, Fattr3]:
        sattr = Sattr3(mode=mode & 0o7777)
        res: nfs3.DirOpRes
        if ftype is Ftype3.REG:
            how = nfs3.CreateMode.GUARDED if exclusive else nfs3.CreateMode.UNCHECKED
            res = await self.nodes.on(parent, cred, lambda fh: self.client.create(
                fh, name, cred, mode=how, attrs=sattr))
        elif ftype is Ftype3.DIR:
            res = await self.nodes.on(parent, cred,
                                      lambda fh: self.client.mkdir(fh, name, sattr, cred))
        elif ftype is Ftype3.LNK:
            res = await self.nodes.on(parent, cred, lambda fh: self.client.symlink(
                fh, name, target, Sattr3(), cred))
        else:
            spec = rdev if ftype in (Ftype3.CHR, Ftype3.BLK) else None
            res = await self.nodes.on(parent, cred, lambda fh: self.client.mknod(
                fh, name, ftype, sattr, cred, spec))
        return await self._new_entry(parent, name, res, cred)

    async def link(self, node: Node, parent: Node, name: bytes, cred: Cred) -> Fattr3:
        res = await self.nodes.on(node, cred,
                                  lambda fh: self.client.link(fh, parent.fh, name, cred))
        attrs = res.file_attributes or await self.client.getattr(node.fh, cred)
        self.own.dir_changed(parent, res.linkdir_wcc, name, added=node, added_attrs=attrs)
        self.own.file_changed(node, attrs, None)
        return attrs

    async def remove(self, parent: Node, name: bytes, node: Node, cred: Cred, *,
                     is_dir: bool) -> None:
        call = self.client.rmdir if is_dir else self.client.remove
        try:
            res = await self.nodes.on(parent, cred, lambda fh: call(fh, name, cred))
        except NfsError as exc:
            if exc.status == Nfsstat3.NFS3ERR_NOENT:
                self.own.dirs.drop(parent.fh)
            raise
        self.own.dir_changed(parent, res.dir_wcc, name, removed=True)

    async def rename(self, src: Node, src_name: bytes, dst: Node, dst_name: bytes,
                     node: Node, replaced: Node | None, cred: Cred) -> None:
        try:
            res = await self.nodes.on(src, cred, lambda fh: self.client.rename(
                fh, src_name, dst.fh, dst_name, cred))
        except NfsError:
            self.own.dirs.drop(src.fh)
            self.own.dirs.drop(dst.fh)
            raise
        self.own.dir_changed(src, res.fromdir_wcc, src_name, removed=True)
        self.own.dir_changed(dst, res.todir_wcc, dst_name, removed=replaced is not None,
                             added=node)
        self.own.attrs.expire(node.fh)   # its ctime changed

    async def write(self, node: Node, offset: int, data: bytes, cred: Cred, *,
                    stable: StableHow = StableHow.UNSTABLE) -> int:
        """Send it now; UNSTABLE data is kept until COMMIT."""
        wsize = self.client.info.wsize
        state = self._files.setdefault(node, _FileState())
        view = memoryview(data)
        pos = 0
        while pos < len(data):      # a short WRITE: the rest again
            chunk = bytes(view[pos:pos + wsize])
            res = await self.nodes.on(node, cred, functools.partial(
                self.client.write, offset=offset + pos, data=chunk, cred=cred, stable=stable))
            if res.count <= 0 or res.count > len(chunk):
                raise OSError(errno.EIO, f"WRITE wrote {res.count} of {len(chunk)} bytes")
            if res.committed == StableHow.UNSTABLE:
                state.unstable.append(_Unstable(offset + pos, chunk[:res.count], res.verf))
                state.unstable_bytes += res.count
            pos += res.count
        self.own.file_changed(node, None, None)
        if state.unstable_bytes > COMMIT_EVERY:
            await self.sync(node, cred)
        return len(data)

    async def sync(self, node: Node | None, cred: Cred | None = None) -> None:
        """COMMIT UNSTABLE writes; re-send those the server lost in a reboot."""
        if node is None:
            for n in list(self._files):
                await self.sync(n, cred)
            return
        state = self._files.get(node)
        if state is None or not state.unstable:
            return
        cred = cred or Cred.root()
        pending, state.unstable, state.unstable_bytes = state.unstable, [], 0
        try:
            res = await self.nodes.on(node, cred, lambda fh: self.client.commit(fh, cred))
            lost = [w for w in pending if w.verf != res.verf]
            if lost:
                log.warning("server rebooted: re-sending %d uncommitted writes of %r",
                            len(lost), node.path())
            for w in lost:
                await self.nodes.on(node, cred, functools.partial(
                    self.client.write, offset=w.offset, data=w.data, cred=cred,
                    stable=StableHow.FILE_SYNC))
        except BaseException:
            state.unstable[:0] = pending
            state.unstable_bytes += sum(len(w.data) for w in pending)
            raise

    async def setattr(self, node: Node, fields: dict[str, int], cred: Cred) -> Fattr3:
        if "size" in fields:
            await self.sync(node, cred)
        sent = trio.current_time()
        res = await self.nodes.on(node, cred,
                                  lambda fh: self.client.setattr(fh, sattr_of(fields), cred))
        after = res.obj_wcc.after
        self.own.file_changed(node, after, sent)
        if after is not None:
            return after
        return await self.nodes.on(node, cred, lambda fh: self.client.getattr(fh, cred))

    async def read(self, node: Node, offset: int, size: int,
                   read_server: Callable[[Node, int, int], Awaitable[bytes]]) -> bytes:
        """Never asked: nothing is local here (the overlay is always empty)."""
        return await read_server(node, offset, size)

    def release(self, node: Node) -> None:
        """The last open of `node` was closed (its write state may go)."""
        state = self._files.get(node)
        if state is not None and not state.unstable:
            del self._files[node]
