"""A fake NFS backend for cache tests: an in-memory file system with NfsClient's
methods, attribute sinks and per-procedure call counters.

"Another client" changes the tree with the `server_*` methods, which bump mtime
and ctime like a real server, so lease logic can be tested deterministically
(with trio's mock clock) and without a network.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import trio

from wancache.nfs_backend import nfs3
from wancache.nfs_backend.client import ServerInfo
from wancache.nfs_backend.errors import NfsError, ServerUnreachableError
from wancache.nfs_backend.nfs3 import (
    Fattr3,
    Ftype3,
    Nfsstat3,
    NfsTime,
    Sattr3,
    StableHow,
    WccAttr,
    WccData,
)
from wancache.nfs_backend.stats import RpcStats
from wancache.nfs_backend.transport import Cred

S = Nfsstat3


@dataclass
class FakeNode:
    fh: bytes
    attrs: Fattr3
    children: dict[bytes, bytes] = field(default_factory=dict)   # name -> fh
    data: bytearray = field(default_factory=bytearray)
    target: bytes = b""
    verf: bytes = b""      # an EXCLUSIVE create's verifier


def _now() -> NfsTime:
    return NfsTime.from_ns(time.time_ns())


class FakeNfs:
    """In-memory NFSv3 server + client in one, counting calls like RpcStats."""

    def __init__(self, *, rsize: int = 1 << 20, latency: float = 0.0) -> None:
        self.stats = RpcStats()
        self.attr_sinks: list = []
        self.latency = latency
        self.down = False
        self.transport = SimpleNamespace(connected_once=True, last_error=None)
        self._ids = itertools.count(100)
        self.nodes: dict[bytes, FakeNode] = {}
        self.root_fh = self._new(Ftype3.DIR, 0o755).fh
        fsinfo = nfs3.FsinfoRes(S.NFS3_OK, None, rsize, rsize, 512, rsize, rsize, 512, 65536,
                                1 << 62, NfsTime(0, 1), 27)
        pathconf = nfs3.PathconfRes(S.NFS3_OK, None, 32000, 255, True, True, False, True)
        self.info = ServerInfo(self.root_fh, 2049, 20048, rsize, rsize, 65536, fsinfo,
                               pathconf)
        self.verf = b"verf0001"
        self.fail: dict[str, Exception] = {}    # proc -> error its next call raises
        self.created: list[bytes] = []          # names created, in order
        self.on_write: list = []                # callbacks run after each WRITE

    # -- server side ---------------------------------------------------------------

    def _new(self, ftype: Ftype3, mode: int, uid: int = 0, gid: int = 0) -> FakeNode:
        fileid = next(self._ids)
        fh = b"fh-%d" % fileid
        t = _now()
        attrs = Fattr3(ftype, mode, 2 if ftype is Ftype3.DIR else 1, uid, gid, 0, 0, (0, 0),
                       1, fileid, t, t, t)
        node = FakeNode(fh, attrs)
        self.nodes[fh] = node
        return node

    def _touch(self, node: FakeNode, **changes: Any) -> None:
        t = _now()
        node.attrs = replace(node.attrs, mtime=t, ctime=t, **changes)

    def path(self, path: str) -> FakeNode:
        node = self.nodes[self.root_fh]
        for part in path.strip("/").split("/"):
            if part:
                node = self.nodes[node.children[part.encode()]]
        return node

    def server_create(self, path: str, data: bytes = b"", *, is_dir: bool = False) -> FakeNode:
        """Another client creates a file or directory."""
        parent_path, _, name = path.strip("/").rpartition("/")
        parent = self.path(parent_path)
        node = self._new(Ftype3.DIR if is_dir else Ftype3.REG, 0o755 if is_dir else 0o644)
        node.data[:] = data
        node.attrs = replace(node.attrs, size=len(data))
        parent.children[name.encode()] = node.fh
        self._touch(parent, size=len(parent.children))
        return node

    def tree(self, path: str = "/") -> dict[str, Any]:
        """The server's tree below `path`: {name: contents or {subtree}}."""
        node = self.path(path)
        out: dict[str, bytes | dict] = {}
        for name, fh in sorted(node.children.items()):
            child = self.nodes[fh]
            key = name.decode()
            if child.attrs.type is Ftype3.DIR:
                out[key] = self.tree(f"{path.rstrip('/')}/{key}")
            elif child.attrs.type is Ftype3.LNK:
                out[key] = b"-> " + child.target
            else:
                out[key] = bytes(child.data)
        return out

    def server_write(self, path: str, data: bytes) -> None:
        """Another client rewrites a file."""
        node = self.path(path)
        node.data[:] = data
        self._touch(node, size=len(data))

    def server_remove(self, path: str) -> None:
        parent_path, _, name = path.strip("/").rpartition("/")
        parent = self.path(parent_path)
        fh = parent.children.pop(name.encode())
        del self.nodes[fh]
        self._touch(parent, size=len(parent.children))

    # -- client side ---------------------------------------------------------------

    async def _call(self, proc: str) -> float:
        if self.down:
            raise ServerUnreachableError("fake server is down")
        failure = self.fail.pop(proc, None)
        if failure is not None:
            raise failure
        sent = trio.current_time()
        self.stats.started(f"nfs3.{proc}", 100)
        self.stats.finished(f"nfs3.{proc}", 0.0, 100, ok=True)
        if self.latency:
            await trio.sleep(self.latency)
        else:
            await trio.lowlevel.checkpoint()
        return sent

    def _sink(self, fh: bytes, attrs: Fattr3 | None, before: WccAttr | None,
              sent: float) -> None:
        if attrs is not None:
            for sink in self.attr_sinks:
                sink(fh, attrs, before, sent)

    def _node(self, fh: bytes, proc: str) -> FakeNode:
        node = self.nodes.get(fh)
        if node is None:
            raise NfsError(S.NFS3ERR_STALE, proc)
        return node

    def _wcc(self, node: FakeNode) -> WccAttr:
        a = node.attrs
        return WccAttr(a.size, a.mtime, a.ctime)

    @property
    def up(self) -> bool:
        return not self.down

    def calls(self) -> Counter[str]:
        return self.stats.calls()

    def close(self) -> None:
        pass

    async def getattr(self, fh: bytes, cred: Cred) -> Fattr3:
        sent = await self._call("GETATTR")
        node = self._node(fh, "GETATTR")
        self._sink(fh, node.attrs, None, sent)
        return node.attrs

    async def lookup(self, dir_fh: bytes, name: bytes, cred: Cred) -> nfs3.LookupRes:
        sent = await self._call("LOOKUP")
        d = self._node(dir_fh, "LOOKUP")
        self._sink(dir_fh, d.attrs, None, sent)
        fh = d.children.get(name)
        if fh is None:
            raise NfsError(S.NFS3ERR_NOENT, "LOOKUP")
        node = self.nodes[fh]
        self._sink(fh, node.attrs, None, sent)
        return nfs3.LookupRes(S.NFS3_OK, fh, node.attrs, d.attrs)

    async def readdirplus(self, dir_fh: bytes, cookie: int, cookieverf: bytes, cred: Cred,
                          dircount: int | None = None,
                          maxcount: int | None = None) -> nfs3.ReaddirplusRes:
        sent = await self._call("READDIRPLUS")
        d = self._node(dir_fh, "READDIRPLUS")
        names = sorted(d.children)
        page = names[cookie:cookie + 100]
        entries = []
        for i, name in enumerate(page, start=cookie + 1):
            child = self.nodes[d.children[name]]
            self._sink(child.fh, child.attrs, None, sent)
            entries.append(nfs3.EntryPlus3(child.attrs.fileid, name, i, child.attrs, child.fh))
        self._sink(dir_fh, d.attrs, None, sent)
        return nfs3.ReaddirplusRes(S.NFS3_OK, d.attrs, b"cv000001", entries,
                                   cookie + len(page) >= len(names))

    async def _dirop(self, proc: str, dir_fh: bytes, name: bytes, ftype: Ftype3,
                     attrs: Sattr3, cred: Cred, *, exclusive: bool = False,
                     verf: bytes = b"") -> nfs3.DirOpRes:
        sent = await self._call(proc)
        d = self._node(dir_fh, proc)
        before = self._wcc(d)
        if name in d.children:
            node = self.nodes[d.children[name]]
            if verf and node.verf == verf:
                pass     # a repeated EXCLUSIVE create of the same file (RFC 1813 §3.3.8)
            elif exclusive or verf or proc != "CREATE":
                raise NfsError(S.NFS3ERR_EXIST, proc)
        else:
            node = self._new(ftype, attrs.mode if attrs.mode is not None else 0o644,
                             cred.uid, cred.gid)
            self.created.append(name)
            node.verf = verf
            d.children[name] = node.fh
            self._touch(d, size=len(d.children))
        self._sink(node.fh, node.attrs, None, sent)
        self._sink(dir_fh, d.attrs, before, sent)
        return nfs3.CreateRes(S.NFS3_OK, node.fh, node.attrs, WccData(before, d.attrs))

    async def create(self, dir_fh: bytes, name: bytes, cred: Cred, *,
                     attrs: Sattr3 | None = None,
                     mode: nfs3.CreateMode = nfs3.CreateMode.UNCHECKED,
                     verf: bytes | None = None) -> nfs3.CreateRes:
        exclusive = mode is nfs3.CreateMode.EXCLUSIVE
        res = await self._dirop("CREATE", dir_fh, name, Ftype3.REG, attrs or Sattr3(), cred,
                                exclusive=mode is nfs3.CreateMode.GUARDED,
                                verf=(verf or bytes(8)) if exclusive else b"")
        assert isinstance(res, nfs3.CreateRes)
        return res

    async def mkdir(self, dir_fh: bytes, name: bytes, attrs: Sattr3,
                    cred: Cred) -> nfs3.DirOpRes:
        return await self._dirop("MKDIR", dir_fh, name, Ftype3.DIR, attrs, cred)

    async def symlink(self, dir_fh: bytes, name: bytes, target: bytes, attrs: Sattr3,
                      cred: Cred) -> nfs3.DirOpRes:
        res = await self._dirop("SYMLINK", dir_fh, name, Ftype3.LNK, attrs, cred)
        assert res.object is not None
        self.nodes[res.object].target = target
        return res

    async def readlink(self, fh: bytes, cred: Cred) -> bytes:
        await self._call("READLINK")
        return self._node(fh, "READLINK").target

    async def rmdir(self, dir_fh: bytes, name: bytes, cred: Cred) -> nfs3.RmdirRes:
        d = self._node(dir_fh, "RMDIR")
        child = d.children.get(name)
        if child is not None and self.nodes[child].children:
            await self._call("RMDIR")
            raise NfsError(S.NFS3ERR_NOTEMPTY, "RMDIR")
        res = await self.remove(dir_fh, name, cred, proc="RMDIR")
        return nfs3.RmdirRes(res.status, res.dir_wcc)

    async def rename(self, from_dir: bytes, from_name: bytes, to_dir: bytes, to_name: bytes,
                     cred: Cred) -> nfs3.RenameRes:
        sent = await self._call("RENAME")
        src, dst = self._node(from_dir, "RENAME"), self._node(to_dir, "RENAME")
        sb, db = self._wcc(src), self._wcc(dst)
        fh = src.children.pop(from_name, None)
        if fh is None:
            raise NfsError(S.NFS3ERR_NOENT, "RENAME")
        old = dst.children.get(to_name)
        if old is not None and old != fh:
            del self.nodes[old]
        dst.children[to_name] = fh
        self._touch(src, size=len(src.children))
        if dst is not src:
            self._touch(dst, size=len(dst.children))
        self._sink(from_dir, src.attrs, sb, sent)
        self._sink(to_dir, dst.attrs, db, sent)
        return nfs3.RenameRes(S.NFS3_OK, WccData(sb, src.attrs), WccData(db, dst.attrs))

    async def link(self, fh: bytes, dir_fh: bytes, name: bytes, cred: Cred) -> nfs3.LinkRes:
        sent = await self._call("LINK")
        node, d = self._node(fh, "LINK"), self._node(dir_fh, "LINK")
        if name in d.children:
            raise NfsError(S.NFS3ERR_EXIST, "LINK")
        before = self._wcc(d)
        d.children[name] = fh
        self._touch(d, size=len(d.children))
        node.attrs = replace(node.attrs, nlink=node.attrs.nlink + 1)
        self._sink(dir_fh, d.attrs, before, sent)
        return nfs3.LinkRes(S.NFS3_OK, node.attrs, WccData(before, d.attrs))

    async def remove(self, dir_fh: bytes, name: bytes, cred: Cred, *,
                     proc: str = "REMOVE") -> nfs3.RemoveRes:
        sent = await self._call(proc)
        d = self._node(dir_fh, proc)
        before = self._wcc(d)
        fh = d.children.pop(name, None)
        if fh is None:
            raise NfsError(S.NFS3ERR_NOENT, proc)
        node = self.nodes[fh]
        node.attrs = replace(node.attrs, nlink=node.attrs.nlink - 1)
        if node.attrs.nlink <= 0 or node.attrs.type is Ftype3.DIR:
            del self.nodes[fh]
        self._touch(d, size=len(d.children))
        self._sink(dir_fh, d.attrs, before, sent)
        return nfs3.RemoveRes(S.NFS3_OK, WccData(before, d.attrs))

    async def read(self, fh: bytes, offset: int, count: int, cred: Cred) -> nfs3.ReadRes:
        sent = await self._call("READ")
        node = self._node(fh, "READ")
        data = bytes(node.data[offset:offset + count])
        self._sink(fh, node.attrs, None, sent)
        return nfs3.ReadRes(S.NFS3_OK, node.attrs, len(data), offset + len(data) >= len(node.data),
                            data)

    async def write(self, fh: bytes, offset: int, data: bytes, cred: Cred,
                    stable: StableHow = StableHow.UNSTABLE) -> nfs3.WriteRes:
        sent = await self._call("WRITE")
        node = self._node(fh, "WRITE")
        before = self._wcc(node)
        end = offset + len(data)
        if len(node.data) < end:
            node.data.extend(bytes(end - len(node.data)))
        node.data[offset:end] = data
        self._touch(node, size=len(node.data))
        self._sink(fh, node.attrs, before, sent)
        verf = self.verf
        for callback in self.on_write:
            callback()
        return nfs3.WriteRes(S.NFS3_OK, WccData(before, node.attrs), len(data), stable, verf)

    async def commit(self, fh: bytes, cred: Cred, offset: int = 0,
                     count: int = 0) -> nfs3.CommitRes:
        await self._call("COMMIT")
        node = self._node(fh, "COMMIT")
        return nfs3.CommitRes(S.NFS3_OK, WccData(None, node.attrs), self.verf)

    async def setattr(self, fh: bytes, attrs: Sattr3, cred: Cred,
                      guard: NfsTime | None = None) -> nfs3.SetattrRes:
        sent = await self._call("SETATTR")
        node = self._node(fh, "SETATTR")
        before = self._wcc(node)
        if attrs.size is not None:
            del node.data[attrs.size:]
            node.data.extend(bytes(attrs.size - len(node.data)))
        changes: dict[str, object] = {"size": len(node.data)}
        for name in ("mode", "uid", "gid"):
            if getattr(attrs, name) is not None:
                changes[name] = getattr(attrs, name)
        self._touch(node, **changes)
        for name in ("atime", "mtime"):     # client times (the server's: _touch did it)
            if isinstance(getattr(attrs, name), NfsTime):
                node.attrs = replace(node.attrs, **{name: getattr(attrs, name)})
        self._sink(fh, node.attrs, before, sent)
        return nfs3.SetattrRes(S.NFS3_OK, WccData(before, node.attrs))

    async def access(self, fh: bytes, mask: int, cred: Cred) -> int:
        await self._call("ACCESS")
        self._node(fh, "ACCESS")
        return mask

    async def fsstat(self, cred: Cred, fh: bytes | None = None) -> nfs3.FsstatRes:
        await self._call("FSSTAT")
        return nfs3.FsstatRes(S.NFS3_OK, None, 1 << 40, 1 << 39, 1 << 39, 1000, 500, 500, 0)
