"""A fake NFS backend for cache tests: an in-memory file system with NfsClient's
methods, attribute sinks and per-procedure call counters.

"Another client" changes the tree with the `server_*` methods, which bump mtime
and ctime like a real server, so lease logic can be tested deterministically
(with trio's mock clock) and without a network.

It misbehaves like the real thing on demand: `inject(proc, Fault...)` queues, per
procedure, deterministic faults for its next calls: an error before the server acts
(`Fault.refuse`, `Fault.jukebox`, `Fault.stale`), a short READ (`Fault.short_read`),
a reply lost after the server acted (`Fault.lose_reply`, which is also what a
timeout after sending looks like), a call the transport sent twice
(`Fault.resend`), and code run between "server applied" and "reply delivered"
(`Fault.between`, to interleave another client's change).  `server_reboot_handles()`
makes every handle stale while the objects stay where they are by name.
"""

from __future__ import annotations

import inspect
import itertools
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, TypeVar

import trio

from wancache.cache.node import LOCAL_PREFIX
from wancache.nfs_backend import nfs3
from wancache.nfs_backend.client import ServerInfo
from wancache.nfs_backend.errors import (
    NfsError,
    RpcTimeoutError,
    ServerUnreachableError,
    TransportError,
    UnknownOutcomeError,
)
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
from wancache.nfs_backend.transport import Cred, note_sent

S = Nfsstat3
R = TypeVar("R")
Sinks = list[tuple[bytes, Fattr3 | None, WccAttr | None]]
IDEMPOTENT = frozenset(p.name for p in nfs3.IDEMPOTENT)
CHANGES_NOTHING = frozenset(p.name for p in nfs3.CHANGES_NOTHING)


@dataclass
class FakeNode:
    fh: bytes
    attrs: Fattr3
    children: dict[bytes, bytes] = field(default_factory=dict)   # name -> fh
    data: bytearray = field(default_factory=bytearray)
    target: bytes = b""
    verf: bytes = b""      # an EXCLUSIVE create's verifier


@dataclass(frozen=True)
class Fault:
    """How the fake server misbehaves on one call (queue it with `FakeNfs.inject`).

    before: raised before the server acts (nothing changes).
    short: READ returns at most this many bytes (eof only if that is the end).
    hook: run (sync or async) after the server acted, before the reply is delivered.
    lost: the reply never arrives: the server acted, the caller gets `error`, or
      what the transport raises when a sent call's reply is lost and its time runs
      out: UnknownOutcomeError for non-idempotent calls, RpcTimeoutError otherwise.
    twice: the first reply is lost and the transport sends the call again, as it
      does for idempotent calls after a reconnect: the server acts twice.
    """

    before: Exception | None = None
    short: int | None = None
    hook: Callable[[], object] | None = None
    lost: bool = False
    error: TransportError | None = None
    twice: bool = False

    @classmethod
    def refuse(cls, exc: Exception) -> Fault:
        """The call fails with `exc` before the server changes anything."""
        return cls(before=exc)

    @classmethod
    def jukebox(cls) -> Fault:
        """NFS3ERR_JUKEBOX: the server is busy (e.g. recalling from tape); try later."""
        return cls(before=NfsError(S.NFS3ERR_JUKEBOX))

    @classmethod
    def stale(cls) -> Fault:
        """NFS3ERR_STALE for this call's handle (see also `server_reboot_handles`)."""
        return cls(before=NfsError(S.NFS3ERR_STALE))

    @classmethod
    def short_read(cls, max_bytes: int) -> Fault:
        """READ returns fewer bytes than asked (eof false unless at the end)."""
        return cls(short=max_bytes)

    @classmethod
    def short_write(cls, max_bytes: int) -> Fault:
        """WRITE takes only the first `max_bytes` bytes (its count says so)."""
        return cls(short=max_bytes)

    @classmethod
    def lose_reply(cls, error: TransportError | None = None) -> Fault:
        """The server acts; its reply is lost (see `lost` above)."""
        return cls(lost=True, error=error)

    @classmethod
    def timeout_after_send(cls, error: TransportError | None = None) -> Fault:
        """The call reached the server (which acts) and the caller's time runs out:
        the same as a lost reply, named for readability."""
        return cls.lose_reply(error)

    @classmethod
    def resend(cls) -> Fault:
        """The transport sends the call twice; the caller sees the second reply."""
        return cls(twice=True)

    @classmethod
    def between(cls, hook: Callable[[], object], *, lost: bool = False) -> Fault:
        """Run `hook` after the server acted and before the reply is delivered."""
        return cls(hook=hook, lost=lost)


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
        self._generation = 0
        self.nodes: dict[bytes, FakeNode] = {}
        self.root_fh = self._new(Ftype3.DIR, 0o755).fh
        fsinfo = nfs3.FsinfoRes(S.NFS3_OK, None, rsize, rsize, 512, rsize, rsize, 512, 65536,
                                1 << 62, NfsTime(0, 1), 27)
        pathconf = nfs3.PathconfRes(S.NFS3_OK, None, 32000, 255, True, True, False, True)
        self.info = ServerInfo(self.root_fh, 2049, 20048, rsize, rsize, 65536, fsinfo,
                               pathconf)
        self.verf = b"verf0001"
        self.fail: dict[str, Exception] = {}    # proc -> error its next call raises
        self.under_way: Counter[str] = Counter()         # calls of a proc under way
        self.most_under_way: Counter[str] = Counter()    # ... at most, so far
        self.created: list[bytes] = []          # names created, in order
        self.on_write: list = []                # callbacks run after each WRITE
        self.faults: dict[str, deque[Fault]] = {}   # proc -> faults of its next calls
        self.always: dict[str, Fault] = {}      # proc -> fault of every call
        self.applied: Counter[str] = Counter()  # proc -> calls the server acted on
        # What the server did to files, in order: ("WRITE", fh, offset, length, uid),
        # ("SETATTR", fh, sattr, uid).
        self.log: list[tuple[Any, ...]] = []
        # Calls that named a node created here and not yet on the server by its
        # placeholder handle (ganesha answers NFS3ERR_BADHANDLE): always a bug.
        self.placeholder_calls: list[str] = []

    # -- faults --------------------------------------------------------------------

    def inject(self, proc: str, fault: Fault, times: int | None = 1) -> None:
        """`fault` for the next `times` calls of `proc` (e.g. "WRITE"), after those
        already queued; `times=None`: every call until `clear_faults()`."""
        if times is None:
            self.always[proc] = fault
        else:
            self.faults.setdefault(proc, deque()).extend([fault] * times)

    def clear_faults(self) -> None:
        self.faults.clear()
        self.always.clear()

    def _next_fault(self, proc: str) -> Fault | None:
        queue = self.faults.get(proc)
        if queue:
            return queue.popleft()
        return self.always.get(proc)

    # -- server side ---------------------------------------------------------------

    def _handle(self, fileid: int) -> bytes:
        return b"fh-%d" % fileid if not self._generation else \
            b"fh-%d-g%d" % (fileid, self._generation)

    def _new(self, ftype: Ftype3, mode: int, uid: int = 0, gid: int = 0) -> FakeNode:
        fileid = next(self._ids)
        fh = self._handle(fileid)
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

    def _parent(self, path: str) -> tuple[FakeNode, bytes]:
        parent_path, _, name = path.strip("/").rpartition("/")
        return self.path(parent_path), name.encode()

    def server_create(self, path: str, data: bytes = b"", *, is_dir: bool = False) -> FakeNode:
        """Another client creates a file or directory."""
        parent, name = self._parent(path)
        node = self._new(Ftype3.DIR if is_dir else Ftype3.REG, 0o755 if is_dir else 0o644)
        node.data[:] = data
        node.attrs = replace(node.attrs, size=len(data))
        parent.children[name] = node.fh
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
        parent, name = self._parent(path)
        fh = parent.children.pop(name)
        del self.nodes[fh]
        self._touch(parent, size=len(parent.children))

    def server_rename(self, old: str, new: str) -> None:
        """Another client renames `old` to `new` (replacing what `new` was)."""
        src, old_name = self._parent(old)
        dst, new_name = self._parent(new)
        fh = src.children.pop(old_name)
        replaced = dst.children.get(new_name)
        if replaced is not None and replaced != fh:
            del self.nodes[replaced]
        dst.children[new_name] = fh
        self._touch(src, size=len(src.children))
        self._touch(dst, size=len(dst.children))

    def server_reboot_handles(self, *, include_root: bool = False) -> None:
        """The server restarts with new file handles (as a server whose handles are
        not persistent does): every old handle is STALE, every object is still where
        it was by name.  The root keeps its handle unless `include_root`."""
        self._generation += 1
        renamed = {fh: (fh if fh == self.root_fh and not include_root
                        else self._handle(node.attrs.fileid))
                   for fh, node in self.nodes.items()}
        nodes = {}
        for old, node in self.nodes.items():
            node.fh = renamed[old]
            node.children = {name: renamed[c] for name, c in node.children.items()}
            nodes[node.fh] = node
        self.nodes = nodes
        self.root_fh = renamed[self.root_fh]

    def server_rehandle(self, path: str) -> bytes:
        """One object gets a new handle (its old one is STALE); the new handle."""
        node = self.path(path)
        parent, name = self._parent(path)
        self._generation += 1
        old, node.fh = node.fh, self._handle(node.attrs.fileid)
        del self.nodes[old]
        self.nodes[node.fh] = node
        parent.children[name] = node.fh
        return node.fh

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
        self.under_way[proc] += 1
        self.most_under_way[proc] = max(self.most_under_way[proc], self.under_way[proc])
        try:
            if self.latency:
                await trio.sleep(self.latency)
            else:
                await trio.lowlevel.checkpoint()
        finally:
            self.under_way[proc] -= 1
        return sent

    async def _rpc(self, proc: str, act: Callable[[Sinks, Fault | None], R], *,
                   idempotent: bool | None = None) -> R:
        """One call: `act` is the server's work (appending the attributes its reply
        carries to the sinks list); faults queued for `proc` apply around it."""
        sent = await self._call(proc)
        fault = self._next_fault(proc)
        if fault is not None and fault.before is not None:
            raise fault.before
        if proc not in CHANGES_NOTHING:
            note_sent()
        sinks: Sinks = []
        error: NfsError | None = None
        res: R | None = None
        for _ in range(2 if fault is not None and fault.twice else 1):
            sinks.clear()
            self.applied[proc] += 1
            try:
                res, error = act(sinks, fault), None
            except NfsError as exc:
                error = exc
        if fault is not None and fault.hook is not None:
            ran = fault.hook()
            if inspect.isawaitable(ran):
                await ran
        if fault is not None and fault.lost:
            idem = proc in IDEMPOTENT if idempotent is None else idempotent
            raise fault.error or (
                RpcTimeoutError(f"fake: no reply to {proc}") if idem else
                UnknownOutcomeError(f"fake: reply to {proc} lost; its outcome is unknown"))
        for fh, attrs, before in sinks:
            self._sink(fh, attrs, before, sent)
        if error is not None:
            raise error
        assert res is not None
        return res

    def _sink(self, fh: bytes, attrs: Fattr3 | None, before: WccAttr | None,
              sent: float) -> None:
        if attrs is not None:
            for sink in self.attr_sinks:
                sink(fh, attrs, before, sent)

    def _node(self, fh: bytes, proc: str) -> FakeNode:
        node = self.nodes.get(fh)
        if node is None and fh.startswith(LOCAL_PREFIX):
            self.placeholder_calls.append(proc)
            raise NfsError(S.NFS3ERR_BADHANDLE, proc)
        if node is None:
            raise NfsError(S.NFS3ERR_STALE, proc)
        return node

    def _wcc(self, node: FakeNode) -> WccAttr:
        a = node.attrs
        return WccAttr(a.size, a.mtime, a.ctime)

    @property
    def up(self) -> bool:
        return not self.down

    @property
    def offline(self) -> bool:
        """Like NfsClient.offline: known unreachable, calls fail at once."""
        return self.down

    def calls(self) -> Counter[str]:
        return self.stats.calls()

    def close(self) -> None:
        pass

    async def getattr(self, fh: bytes, cred: Cred) -> Fattr3:
        def act(sinks: Sinks, fault: Fault | None) -> Fattr3:
            node = self._node(fh, "GETATTR")
            sinks.append((fh, node.attrs, None))
            return node.attrs
        return await self._rpc("GETATTR", act)

    async def lookup(self, dir_fh: bytes, name: bytes, cred: Cred) -> nfs3.LookupRes:
        def act(sinks: Sinks, fault: Fault | None) -> nfs3.LookupRes:
            d = self._node(dir_fh, "LOOKUP")
            sinks.append((dir_fh, d.attrs, None))
            fh = d.children.get(name)
            if fh is None:
                raise NfsError(S.NFS3ERR_NOENT, "LOOKUP")
            node = self.nodes[fh]
            sinks.append((fh, node.attrs, None))
            return nfs3.LookupRes(S.NFS3_OK, fh, node.attrs, d.attrs)
        return await self._rpc("LOOKUP", act)

    async def readdirplus(self, dir_fh: bytes, cookie: int, cookieverf: bytes, cred: Cred,
                          dircount: int | None = None,
                          maxcount: int | None = None) -> nfs3.ReaddirplusRes:
        def act(sinks: Sinks, fault: Fault | None) -> nfs3.ReaddirplusRes:
            d = self._node(dir_fh, "READDIRPLUS")
            names = sorted(d.children)
            page = names[cookie:cookie + 100]
            entries = []
            for i, name in enumerate(page, start=cookie + 1):
                child = self.nodes[d.children[name]]
                sinks.append((child.fh, child.attrs, None))
                entries.append(nfs3.EntryPlus3(child.attrs.fileid, name, i, child.attrs,
                                               child.fh))
            sinks.append((dir_fh, d.attrs, None))
            return nfs3.ReaddirplusRes(S.NFS3_OK, d.attrs, b"cv000001", entries,
                                       cookie + len(page) >= len(names))
        return await self._rpc("READDIRPLUS", act)

    async def _dirop(self, proc: str, dir_fh: bytes, name: bytes, ftype: Ftype3,
                     attrs: Sattr3, cred: Cred, *, exclusive: bool = False,
                     verf: bytes = b"", target: bytes = b"",
                     idempotent: bool = False) -> nfs3.DirOpRes:
        def act(sinks: Sinks, fault: Fault | None) -> nfs3.DirOpRes:
            d = self._node(dir_fh, proc)
            before = self._wcc(d)
            if name in d.children:
                node = self.nodes[d.children[name]]
                if verf and node.verf == verf:
                    pass     # a repeated EXCLUSIVE create of the same file (RFC 1813 3.3.8)
                elif exclusive or verf or proc != "CREATE":
                    raise NfsError(S.NFS3ERR_EXIST, proc)
            else:
                # An EXCLUSIVE create carries no attributes: the client sets them after
                # (ganesha's VFS backend then shows 0600, as here).
                node = self._new(ftype, attrs.mode if attrs.mode is not None else
                                 0o600 if verf else 0o644, cred.uid, cred.gid)
                node.target = target
                node.verf = verf
                self.created.append(name)
                d.children[name] = node.fh
                self._touch(d, size=len(d.children))
            sinks.append((node.fh, node.attrs, None))
            sinks.append((dir_fh, d.attrs, before))
            return nfs3.CreateRes(S.NFS3_OK, node.fh, node.attrs, WccData(before, d.attrs))
        return await self._rpc(proc, act, idempotent=idempotent)

    async def create(self, dir_fh: bytes, name: bytes, cred: Cred, *,
                     attrs: Sattr3 | None = None,
                     mode: nfs3.CreateMode = nfs3.CreateMode.UNCHECKED,
                     verf: bytes | None = None) -> nfs3.CreateRes:
        exclusive = mode is nfs3.CreateMode.EXCLUSIVE
        res = await self._dirop("CREATE", dir_fh, name, Ftype3.REG, attrs or Sattr3(), cred,
                                exclusive=mode is nfs3.CreateMode.GUARDED,
                                verf=(verf or bytes(8)) if exclusive else b"",
                                idempotent=exclusive)
        assert isinstance(res, nfs3.CreateRes)
        return res

    async def mkdir(self, dir_fh: bytes, name: bytes, attrs: Sattr3,
                    cred: Cred) -> nfs3.DirOpRes:
        return await self._dirop("MKDIR", dir_fh, name, Ftype3.DIR, attrs, cred)

    async def mknod(self, dir_fh: bytes, name: bytes, ftype: Ftype3, attrs: Sattr3,
                    cred: Cred, spec: tuple[int, int] | None = None) -> nfs3.DirOpRes:
        return await self._dirop("MKNOD", dir_fh, name, ftype, attrs, cred)

    async def symlink(self, dir_fh: bytes, name: bytes, target: bytes, attrs: Sattr3,
                      cred: Cred) -> nfs3.DirOpRes:
        return await self._dirop("SYMLINK", dir_fh, name, Ftype3.LNK, attrs, cred,
                                 target=target)

    async def readlink(self, fh: bytes, cred: Cred) -> bytes:
        def act(sinks: Sinks, fault: Fault | None) -> bytes:
            return self._node(fh, "READLINK").target
        return await self._rpc("READLINK", act)

    async def rmdir(self, dir_fh: bytes, name: bytes, cred: Cred) -> nfs3.RmdirRes:
        res = await self.remove(dir_fh, name, cred, proc="RMDIR")
        return nfs3.RmdirRes(res.status, res.dir_wcc)

    async def rename(self, from_dir: bytes, from_name: bytes, to_dir: bytes, to_name: bytes,
                     cred: Cred) -> nfs3.RenameRes:
        def act(sinks: Sinks, fault: Fault | None) -> nfs3.RenameRes:
            src, dst = self._node(from_dir, "RENAME"), self._node(to_dir, "RENAME")
            sb, db = self._wcc(src), self._wcc(dst)
            fh = src.children.get(from_name)
            if fh is None:
                raise NfsError(S.NFS3ERR_NOENT, "RENAME")
            if self._below(fh, to_dir):      # a directory into itself (Linux: EINVAL)
                raise NfsError(S.NFS3ERR_INVAL, "RENAME")
            del src.children[from_name]
            old = dst.children.get(to_name)
            if old is not None and old != fh:    # the replaced name: one link less
                gone = self.nodes[old]
                gone.attrs = replace(gone.attrs, nlink=gone.attrs.nlink - 1)
                if gone.attrs.nlink <= 0 or gone.attrs.type is Ftype3.DIR:
                    del self.nodes[old]
            dst.children[to_name] = fh
            moved = self.nodes[fh]          # its ctime changes (Linux file systems, ganesha)
            moved.attrs = replace(moved.attrs, ctime=_now())
            self._touch(src, size=len(src.children))
            if dst is not src:
                self._touch(dst, size=len(dst.children))
            sinks.append((from_dir, src.attrs, sb))
            sinks.append((to_dir, dst.attrs, db))
            return nfs3.RenameRes(S.NFS3_OK, WccData(sb, src.attrs), WccData(db, dst.attrs))
        return await self._rpc("RENAME", act)

    def _below(self, top: bytes, fh: bytes) -> bool:
        """Is `fh` the directory `top` or in its tree?"""
        return fh == top or any(self._below(child, fh)
                                for child in self.nodes[top].children.values())

    async def link(self, fh: bytes, dir_fh: bytes, name: bytes, cred: Cred) -> nfs3.LinkRes:
        def act(sinks: Sinks, fault: Fault | None) -> nfs3.LinkRes:
            node, d = self._node(fh, "LINK"), self._node(dir_fh, "LINK")
            if name in d.children:
                raise NfsError(S.NFS3ERR_EXIST, "LINK")
            before = self._wcc(d)
            d.children[name] = fh
            self._touch(d, size=len(d.children))
            node.attrs = replace(node.attrs, nlink=node.attrs.nlink + 1)
            sinks.append((dir_fh, d.attrs, before))
            return nfs3.LinkRes(S.NFS3_OK, node.attrs, WccData(before, d.attrs))
        return await self._rpc("LINK", act)

    async def remove(self, dir_fh: bytes, name: bytes, cred: Cred, *,
                     proc: str = "REMOVE") -> nfs3.RemoveRes:
        def act(sinks: Sinks, fault: Fault | None) -> nfs3.RemoveRes:
            d = self._node(dir_fh, proc)
            before = self._wcc(d)
            fh = d.children.get(name)
            if fh is None:
                raise NfsError(S.NFS3ERR_NOENT, proc)
            node = self.nodes[fh]
            if proc == "RMDIR" and node.children:
                raise NfsError(S.NFS3ERR_NOTEMPTY, proc)
            del d.children[name]
            node.attrs = replace(node.attrs, nlink=node.attrs.nlink - 1)
            if node.attrs.nlink <= 0 or node.attrs.type is Ftype3.DIR:
                del self.nodes[fh]
            self._touch(d, size=len(d.children))
            sinks.append((dir_fh, d.attrs, before))
            return nfs3.RemoveRes(S.NFS3_OK, WccData(before, d.attrs))
        return await self._rpc(proc, act)

    async def read(self, fh: bytes, offset: int, count: int, cred: Cred) -> nfs3.ReadRes:
        def act(sinks: Sinks, fault: Fault | None) -> nfs3.ReadRes:
            node = self._node(fh, "READ")
            n = count if fault is None or fault.short is None else min(count, fault.short)
            data = bytes(node.data[offset:offset + n])
            sinks.append((fh, node.attrs, None))
            return nfs3.ReadRes(S.NFS3_OK, node.attrs, len(data),
                                offset + len(data) >= len(node.data), data)
        return await self._rpc("READ", act)

    async def write(self, fh: bytes, offset: int, data: bytes, cred: Cred,
                    stable: StableHow = StableHow.UNSTABLE) -> nfs3.WriteRes:
        def act(sinks: Sinks, fault: Fault | None) -> nfs3.WriteRes:
            node = self._node(fh, "WRITE")
            before = self._wcc(node)
            taken = data[:fault.short] if fault is not None and fault.short is not None \
                else data
            self.log.append(("WRITE", fh, offset, len(taken), cred.uid))
            end = offset + len(taken)
            if len(node.data) < end:
                node.data.extend(bytes(end - len(node.data)))
            node.data[offset:end] = taken
            node.verf = b""       # (servers keep an EXCLUSIVE verifier in the times)
            self._touch(node, size=len(node.data))
            sinks.append((fh, node.attrs, before))
            verf = self.verf
            for callback in self.on_write:
                callback()
            return nfs3.WriteRes(S.NFS3_OK, WccData(before, node.attrs), len(taken), stable,
                                 verf)
        return await self._rpc("WRITE", act)

    async def commit(self, fh: bytes, cred: Cred, offset: int = 0,
                     count: int = 0) -> nfs3.CommitRes:
        def act(sinks: Sinks, fault: Fault | None) -> nfs3.CommitRes:
            node = self._node(fh, "COMMIT")
            return nfs3.CommitRes(S.NFS3_OK, WccData(None, node.attrs), self.verf)
        return await self._rpc("COMMIT", act)

    async def setattr(self, fh: bytes, attrs: Sattr3, cred: Cred,
                      guard: NfsTime | None = None) -> nfs3.SetattrRes:
        def act(sinks: Sinks, fault: Fault | None) -> nfs3.SetattrRes:
            node = self._node(fh, "SETATTR")
            before = self._wcc(node)
            if guard is not None and guard != node.attrs.ctime:
                raise NfsError(S.NFS3ERR_NOT_SYNC, "SETATTR")
            self.log.append(("SETATTR", fh, attrs, cred.uid))
            if attrs.size is not None:
                del node.data[attrs.size:]
                node.data.extend(bytes(attrs.size - len(node.data)))
            changes: dict[str, object] = {"size": len(node.data)}
            node.verf = b""
            for name in ("mode", "uid", "gid"):
                if getattr(attrs, name) is not None:
                    changes[name] = getattr(attrs, name)
            mtime = node.attrs.mtime
            self._touch(node, **changes)
            if attrs.size is None:      # a chmod or chown changes the ctime only
                node.attrs = replace(node.attrs, mtime=mtime)
            for name in ("atime", "mtime"):     # client times (the server's: _touch did it)
                if isinstance(getattr(attrs, name), NfsTime):
                    node.attrs = replace(node.attrs, **{name: getattr(attrs, name)})
            sinks.append((fh, node.attrs, before))
            return nfs3.SetattrRes(S.NFS3_OK, WccData(before, node.attrs))
        return await self._rpc("SETATTR", act)

    async def access(self, fh: bytes, mask: int, cred: Cred) -> int:
        def act(sinks: Sinks, fault: Fault | None) -> int:
            self._node(fh, "ACCESS")
            return mask
        return await self._rpc("ACCESS", act)

    async def fsstat(self, cred: Cred, fh: bytes | None = None) -> nfs3.FsstatRes:
        def act(sinks: Sinks, fault: Fault | None) -> nfs3.FsstatRes:
            return nfs3.FsstatRes(S.NFS3_OK, None, 1 << 40, 1 << 39, 1 << 39, 1000, 500, 500,
                                  0)
        return await self._rpc("FSSTAT", act)
