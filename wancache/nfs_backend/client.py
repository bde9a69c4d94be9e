"""The async NFSv3 client: discovery, MOUNT, and one typed method per procedure.

`open_client()` finds the server's ports (explicit, or through portmapper/rpcbind),
mounts the export (MOUNT v3 MNT), reads FSINFO/PATHCONF to size READs and WRITEs,
and keeps an `RpcTransport` to the NFS port running in the caller's nursery.

Every reply's attributes (post_op_attr, wcc_data, LOOKUP and READDIRPLUS
entries) are handed to the `attr_sink` callbacks: free cache updates.  A status
other than NFS3_OK raises `NfsError` carrying the decoded result.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import trio

from . import mount3, nfs3, portmap
from .errors import MountError, NfsError, ProtocolError, ServerUnreachableError, WancacheError
from .nfs3 import Fattr3, Proc, WccAttr
from .stats import RpcStats
from .transport import Cred, RpcTransport, TransportOptions

log = logging.getLogger(__name__)

PORTMAP_PORT = 111
DEFAULT_IO_SIZE = 1 << 20
REPLY_HEADROOM = 64 * 1024   # RPC and NFS headers around a READ's or READDIR's data

# Observer of every attribute the server sends: (handle, attributes, pre-op attributes,
# trio time at which the call that brought them was sent).
AttrSink = Callable[[bytes, Fattr3, WccAttr | None, float], None]
R = TypeVar("R")


@dataclass
class ClientOptions:
    """How to reach and use the server (from the mount options)."""

    nfs_port: int | None = None      # None: ask portmapper/rpcbind
    mount_port: int | None = None
    rsize: int | None = None         # cap on READ size (server's FSINFO decides otherwise)
    wsize: int | None = None
    transport: TransportOptions = field(default_factory=TransportOptions)


@dataclass(frozen=True)
class ServerInfo:
    """What the server told us at mount time."""

    root_fh: bytes
    nfs_port: int
    mount_port: int
    rsize: int
    wsize: int
    dtpref: int
    fsinfo: nfs3.FsinfoRes
    pathconf: nfs3.PathconfRes

    @property
    def name_max(self) -> int:
        return self.pathconf.name_max

    @property
    def max_file_size(self) -> int:
        return self.fsinfo.maxfilesize


@asynccontextmanager
async def _transient(host: str, port: int, program: int, version: int, prefix: str,
                     names: dict[int, str], options: TransportOptions,
                     stats: RpcStats) -> AsyncIterator[RpcTransport]:
    """A transport that lives only for a few calls (portmapper, MOUNT)."""
    transport = RpcTransport(host, port, program, version, options=options, stats=stats,
                             proc_names=names, prefix=prefix)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(transport.run)
            try:
                yield transport
            finally:
                transport.close()
    except BaseExceptionGroup as group:
        # One error from the caller's block: let it through as itself.
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], trio.Cancelled):
            raise group.exceptions[0] from None
        raise


async def lookup_port(host: str, program: int, version: int, *,
                      options: TransportOptions | None = None,
                      stats: RpcStats | None = None) -> int:
    """Port of `program`/`version` over TCP, from portmapper v2 or else rpcbind v4."""
    options = options or TransportOptions()
    stats = stats if stats is not None else RpcStats()
    async with _transient(host, PORTMAP_PORT, portmap.PROGRAM, 2, "portmap.",
                          {3: "GETPORT"}, options, stats) as pm:
        port = portmap.decode_getport_res(
            await pm.call(3, portmap.encode_getport_args(program, version), None,
                          idempotent=True))
    if port:
        return port
    async with _transient(host, PORTMAP_PORT, portmap.PROGRAM, 4, "rpcbind.",
                          {3: "GETADDR"}, options, stats) as rb:
        found = portmap.decode_getaddr_res(
            await rb.call(3, portmap.encode_getaddr_args(program, version), None,
                          idempotent=True))
    if not found:
        raise ServerUnreachableError(
            f"{host}: program {program} version {version} is not registered with rpcbind")
    return found


_PATIENT: ContextVar[bool] = ContextVar("wancache_patient", default=False)


@contextmanager
def patient() -> Iterator[None]:
    """Calls made in this context (and the tasks it starts) have no soft timeout: they
    wait while the connection lives, however slow the link (background work such as
    write-back: no application waits on one call).  They still fail at once while
    the server is known to be unreachable."""
    token = _PATIENT.set(True)
    try:
        yield
    finally:
        _PATIENT.reset(token)


class NfsClient:
    """NFSv3 calls on the export mounted by `open_client()`."""

    def __init__(self, transport: RpcTransport, info: ServerInfo, stats: RpcStats) -> None:
        self.transport = transport
        self.info = info
        self.stats = stats
        self.attr_sinks: list[AttrSink] = []

    @property
    def root_fh(self) -> bytes:
        return self.info.root_fh

    @property
    def up(self) -> bool:
        """True while connected to the server and it answers."""
        return self.transport.up

    @property
    def offline(self) -> bool:
        """The server is known to be unreachable (connection lost and reconnecting
        fails, or calls time out with nothing heard since): soft-mount calls fail at
        once, unsent, until a background probe sees it again.  Serve from the caches
        instead of calling.  (`not up and not offline`: connecting, not known yet.)"""
        return self.transport.offline

    def close(self) -> None:
        """Stop the NFS transport."""
        self.transport.close()

    # -- the generic call ------------------------------------------------------------

    async def call(self, args: Any, cred: Cred) -> Any:
        """Send one NFSv3 call; return its result or raise `NfsError`."""
        proc = nfs3.proc_of(args)
        idempotent = proc in nfs3.IDEMPOTENT or (
            proc is Proc.CREATE and args.mode is nfs3.CreateMode.EXCLUSIVE)
        sent = trio.current_time()
        body = await self.transport.call(proc, nfs3.encode_args_parts(args), cred,
                                         idempotent=idempotent, patient=_PATIENT.get(),
                                         changes=proc not in nfs3.CHANGES_NOTHING)
        res = nfs3.decode_res(proc, body)
        if self.attr_sinks:
            for fh, attrs, before in _attrs_in(args, res):
                for sink in self.attr_sinks:
                    sink(fh, attrs, before, sent)
        if res.status != nfs3.Nfsstat3.NFS3_OK:
            raise NfsError(res.status, proc.name, res)
        return res

    # -- one method per procedure ----------------------------------------------------

    async def null(self) -> None:
        await self.transport.call(Proc.NULL, b"", None, idempotent=True)

    async def getattr(self, fh: bytes, cred: Cred) -> Fattr3:
        res: nfs3.GetattrRes = await self.call(nfs3.GetattrArgs(fh), cred)
        assert res.attributes is not None
        return res.attributes

    async def setattr(self, fh: bytes, attrs: nfs3.Sattr3, cred: Cred,
                      guard: nfs3.NfsTime | None = None) -> nfs3.SetattrRes:
        res: nfs3.SetattrRes = await self.call(nfs3.SetattrArgs(fh, attrs, guard), cred)
        return res

    async def lookup(self, dir_fh: bytes, name: bytes, cred: Cred) -> nfs3.LookupRes:
        res: nfs3.LookupRes = await self.call(
            nfs3.LookupArgs(nfs3.DirOpArgs(dir_fh, name)), cred)
        return res

    async def access(self, fh: bytes, mask: int, cred: Cred) -> int:
        res: nfs3.AccessRes = await self.call(nfs3.AccessArgs(fh, mask), cred)
        return res.access

    async def readlink(self, fh: bytes, cred: Cred) -> bytes:
        res: nfs3.ReadlinkRes = await self.call(nfs3.ReadlinkArgs(fh), cred)
        return res.data

    async def read(self, fh: bytes, offset: int, count: int, cred: Cred) -> nfs3.ReadRes:
        """One READ.  It may be short (fewer bytes, `eof` false): READ the rest."""
        res: nfs3.ReadRes = await self.call(nfs3.ReadArgs(fh, offset, count), cred)
        if res.count != len(res.data) or len(res.data) > count:
            raise ProtocolError(f"READ reply says {res.count} bytes, carries "
                                f"{len(res.data)}, {count} were asked for")
        return res

    async def write(self, fh: bytes, offset: int, data: bytes, cred: Cred,
                    stable: nfs3.StableHow = nfs3.StableHow.UNSTABLE) -> nfs3.WriteRes:
        """One WRITE.  `count` may be short (fewer bytes written): WRITE the rest."""
        res: nfs3.WriteRes = await self.call(
            nfs3.WriteArgs(fh, offset, len(data), stable, data), cred)
        if res.count > len(data):
            raise ProtocolError(f"WRITE reply says {res.count} bytes of {len(data)} written")
        return res

    async def create(self, dir_fh: bytes, name: bytes, cred: Cred, *,
                     attrs: nfs3.Sattr3 | None = None,
                     mode: nfs3.CreateMode = nfs3.CreateMode.UNCHECKED,
                     verf: bytes | None = None) -> nfs3.CreateRes:
        if mode is nfs3.CreateMode.EXCLUSIVE:
            args = nfs3.CreateArgs(nfs3.DirOpArgs(dir_fh, name), mode, None, verf or bytes(8))
        else:
            args = nfs3.CreateArgs(nfs3.DirOpArgs(dir_fh, name), mode,
                                   attrs or nfs3.Sattr3(), None)
        res: nfs3.CreateRes = await self.call(args, cred)
        return res

    async def mkdir(self, dir_fh: bytes, name: bytes, attrs: nfs3.Sattr3,
                    cred: Cred) -> nfs3.MkdirRes:
        res: nfs3.MkdirRes = await self.call(
            nfs3.MkdirArgs(nfs3.DirOpArgs(dir_fh, name), attrs), cred)
        return res

    async def symlink(self, dir_fh: bytes, name: bytes, target: bytes, attrs: nfs3.Sattr3,
                      cred: Cred) -> nfs3.SymlinkRes:
        res: nfs3.SymlinkRes = await self.call(
            nfs3.SymlinkArgs(nfs3.DirOpArgs(dir_fh, name), attrs, target), cred)
        return res

    async def mknod(self, dir_fh: bytes, name: bytes, ftype: nfs3.Ftype3,
                    attrs: nfs3.Sattr3, cred: Cred,
                    spec: tuple[int, int] | None = None) -> nfs3.MknodRes:
        res: nfs3.MknodRes = await self.call(
            nfs3.MknodArgs(nfs3.DirOpArgs(dir_fh, name), ftype, attrs, spec), cred)
        return res

    async def remove(self, dir_fh: bytes, name: bytes, cred: Cred) -> nfs3.RemoveRes:
        res: nfs3.RemoveRes = await self.call(
            nfs3.RemoveArgs(nfs3.DirOpArgs(dir_fh, name)), cred)
        return res

    async def rmdir(self, dir_fh: bytes, name: bytes, cred: Cred) -> nfs3.RmdirRes:
        res: nfs3.RmdirRes = await self.call(
            nfs3.RmdirArgs(nfs3.DirOpArgs(dir_fh, name)), cred)
        return res

    async def rename(self, from_dir: bytes, from_name: bytes, to_dir: bytes, to_name: bytes,
                     cred: Cred) -> nfs3.RenameRes:
        res: nfs3.RenameRes = await self.call(
            nfs3.RenameArgs(nfs3.DirOpArgs(from_dir, from_name),
                            nfs3.DirOpArgs(to_dir, to_name)), cred)
        return res

    async def link(self, fh: bytes, dir_fh: bytes, name: bytes, cred: Cred) -> nfs3.LinkRes:
        res: nfs3.LinkRes = await self.call(
            nfs3.LinkArgs(fh, nfs3.DirOpArgs(dir_fh, name)), cred)
        return res

    async def readdir(self, dir_fh: bytes, cookie: int, cookieverf: bytes, cred: Cred,
                      count: int | None = None) -> nfs3.ReaddirRes:
        res: nfs3.ReaddirRes = await self.call(
            nfs3.ReaddirArgs(dir_fh, cookie, cookieverf, count or self.info.dtpref), cred)
        return res

    async def readdirplus(self, dir_fh: bytes, cookie: int, cookieverf: bytes, cred: Cred,
                          dircount: int | None = None,
                          maxcount: int | None = None) -> nfs3.ReaddirplusRes:
        dircount = dircount or max(self.info.dtpref, 64 * 1024)
        maxcount = maxcount or max(self.info.rsize, dircount)
        maxcount = min(maxcount, self.transport.options.max_record - REPLY_HEADROOM)
        res: nfs3.ReaddirplusRes = await self.call(
            nfs3.ReaddirplusArgs(dir_fh, cookie, cookieverf, dircount, maxcount), cred)
        return res

    async def fsstat(self, cred: Cred, fh: bytes | None = None) -> nfs3.FsstatRes:
        res: nfs3.FsstatRes = await self.call(nfs3.FsstatArgs(fh or self.root_fh), cred)
        return res

    async def fsinfo(self, cred: Cred, fh: bytes | None = None) -> nfs3.FsinfoRes:
        res: nfs3.FsinfoRes = await self.call(nfs3.FsinfoArgs(fh or self.root_fh), cred)
        return res

    async def pathconf(self, cred: Cred, fh: bytes | None = None) -> nfs3.PathconfRes:
        res: nfs3.PathconfRes = await self.call(nfs3.PathconfArgs(fh or self.root_fh), cred)
        return res

    async def commit(self, fh: bytes, cred: Cred, offset: int = 0,
                     count: int = 0) -> nfs3.CommitRes:
        res: nfs3.CommitRes = await self.call(nfs3.CommitArgs(fh, offset, count), cred)
        return res


def _wcc(fh: bytes, wcc: nfs3.WccData | None) -> Iterable[tuple[bytes, Fattr3, WccAttr | None]]:
    if wcc is not None and wcc.after is not None:
        yield fh, wcc.after, wcc.before


def _attrs_in(args: Any, res: Any) -> Iterable[tuple[bytes, Fattr3, WccAttr | None]]:
    """Every (handle, attributes, pre-op attributes) a reply carries."""
    proc = nfs3.proc_of(args)
    if proc in (Proc.GETATTR, Proc.ACCESS, Proc.FSSTAT, Proc.FSINFO, Proc.PATHCONF):
        attrs = res.attributes if proc is Proc.GETATTR else res.obj_attributes
        fh = args.fsroot if proc in (Proc.FSSTAT, Proc.FSINFO) else args.object
        if attrs is not None:
            yield fh, attrs, None
    elif proc is Proc.SETATTR:
        yield from _wcc(args.object, res.obj_wcc)
    elif proc is Proc.LOOKUP:
        if res.object is not None and res.obj_attributes is not None:
            yield res.object, res.obj_attributes, None
        if res.dir_attributes is not None:
            yield args.what.dir, res.dir_attributes, None
    elif proc in (Proc.READLINK, Proc.READ):
        attrs = res.symlink_attributes if proc is Proc.READLINK else res.file_attributes
        if attrs is not None:
            yield (args.symlink if proc is Proc.READLINK else args.file), attrs, None
    elif proc in (Proc.WRITE, Proc.COMMIT):
        yield from _wcc(args.file, res.file_wcc)
    elif proc in (Proc.CREATE, Proc.MKDIR, Proc.SYMLINK, Proc.MKNOD):
        if res.object is not None and res.obj_attributes is not None:
            yield res.object, res.obj_attributes, None
        yield from _wcc(args.where.dir, res.dir_wcc)
    elif proc in (Proc.REMOVE, Proc.RMDIR):
        yield from _wcc(args.object.dir, res.dir_wcc)
    elif proc is Proc.RENAME:
        yield from _wcc(args.from_.dir, res.fromdir_wcc)
        yield from _wcc(args.to.dir, res.todir_wcc)
    elif proc is Proc.LINK:
        if res.file_attributes is not None:
            yield args.file, res.file_attributes, None
        yield from _wcc(args.link.dir, res.linkdir_wcc)
    elif proc in (Proc.READDIR, Proc.READDIRPLUS):
        if res.dir_attributes is not None:
            yield args.dir, res.dir_attributes, None
        if proc is Proc.READDIRPLUS:
            for e in res.entries:
                if e.name_handle is not None and e.name_attributes is not None:
                    yield e.name_handle, e.name_attributes, None


# -- mounting ------------------------------------------------------------------------

async def mount_export(host: str, port: int, export: bytes, *,
                       options: TransportOptions, stats: RpcStats) -> bytes:
    """MOUNT v3 MNT: the root file handle of `export` (MountError if refused)."""
    names = {p.value: p.name for p in mount3.Proc}
    async with _transient(host, port, mount3.PROGRAM, mount3.VERSION, "mount3.", names,
                          options, stats) as mnt:
        res = mount3.decode_mnt_res(await mnt.call(
            mount3.Proc.MNT, mount3.encode_mnt_args(export), Cred.root(), idempotent=True))
    if res.status != mount3.Mountstat3.MNT3_OK or res.fhandle is None:
        raise MountError(res.status, export)
    return res.fhandle


async def unmount_export(host: str, port: int, export: bytes, *,
                         options: TransportOptions, stats: RpcStats) -> None:
    """MOUNT v3 UMNT (a courtesy: servers only use it for `showmount`)."""
    names = {p.value: p.name for p in mount3.Proc}
    async with _transient(host, port, mount3.PROGRAM, mount3.VERSION, "mount3.", names,
                          options, stats) as mnt:
        await mnt.call(mount3.Proc.UMNT, mount3.encode_umnt_args(export), Cred.root(),
                       idempotent=True)


async def list_exports(host: str, port: int | None = None, *,
                       options: TransportOptions | None = None) -> list[mount3.ExportNode]:
    """MOUNT v3 EXPORT: what the server exports."""
    options = options or TransportOptions()
    stats = RpcStats()
    if port is None:
        port = await lookup_port(host, mount3.PROGRAM, mount3.VERSION, options=options,
                                 stats=stats)
    names = {p.value: p.name for p in mount3.Proc}
    async with _transient(host, port, mount3.PROGRAM, mount3.VERSION, "mount3.", names,
                          options, stats) as mnt:
        return mount3.decode_export_res(
            await mnt.call(mount3.Proc.EXPORT, b"", None, idempotent=True))


def _io_size(cap: int | None, pref: int, limit: int, max_record: int) -> int:
    """READ/WRITE size: the option, else the server's preference capped at 1 MiB;
    never more than the server's limit, nor than a reply we accept (`max_record`)."""
    size = cap or min(pref or DEFAULT_IO_SIZE, DEFAULT_IO_SIZE)
    if limit:
        size = min(size, limit)
    size = min(size, (max_record - REPLY_HEADROOM) // 4096 * 4096)
    return max(4096, size)


async def open_client(nursery: trio.Nursery, host: str, export: bytes | str,
                      options: ClientOptions | None = None,
                      stats: RpcStats | None = None) -> NfsClient:
    """Discover, mount and start a client whose transport runs in `nursery`."""
    options = options or ClientOptions()
    stats = stats if stats is not None else RpcStats()
    topts = options.transport
    export_b = export.encode() if isinstance(export, str) else export
    # Discovery and MOUNT are bounded even on hard mounts: a mount must not hang.
    quick = replace(topts, timeout=topts.timeout or 30.0)
    try:
        nfs_port = options.nfs_port or await lookup_port(
            host, nfs3.PROGRAM, nfs3.VERSION, options=quick, stats=stats)
        mount_port = options.mount_port or await lookup_port(
            host, mount3.PROGRAM, mount3.VERSION, options=quick, stats=stats)
        root_fh = await mount_export(host, mount_port, export_b, options=quick, stats=stats)
    except MountError as exc:
        raise MountError(exc.status, f"{host}:".encode() + export_b) from None
    names = {p.value: p.name for p in Proc}
    transport = RpcTransport(host, nfs_port, nfs3.PROGRAM, nfs3.VERSION, options=topts,
                             stats=stats, proc_names=names, prefix="nfs3.")
    await nursery.start(transport.run)
    probe = NfsClient(transport, ServerInfo(root_fh, nfs_port, mount_port, DEFAULT_IO_SIZE,
                                            DEFAULT_IO_SIZE, 8192, None, None),  # type: ignore[arg-type]
                      stats)
    try:
        # The transport's own deadline applies on soft mounts; this bounds hard ones.
        with trio.fail_after(2 * (quick.timeout or 30.0)):
            fsinfo = await probe.fsinfo(Cred.root())
            pathconf = await probe.pathconf(Cred.root())
    except trio.TooSlowError:
        transport.close()
        raise ServerUnreachableError(
            f"server {host}:{nfs_port} unreachable: no answer to FSINFO") from None
    except (WancacheError, OSError):
        transport.close()
        raise
    info = ServerInfo(
        root_fh=root_fh, nfs_port=nfs_port, mount_port=mount_port,
        rsize=_io_size(options.rsize, fsinfo.rtpref, fsinfo.rtmax, topts.max_record),
        wsize=_io_size(options.wsize, fsinfo.wtpref, fsinfo.wtmax, topts.max_record),
        dtpref=max(fsinfo.dtpref, 8192), fsinfo=fsinfo, pathconf=pathconf)
    log.debug("mounted %s:%s (nfs port %d, rsize %d, wsize %d)", host, export_b, nfs_port,
              info.rsize, info.wsize)
    return NfsClient(transport, info, stats)


async def offline_client(nursery: trio.Nursery, host: str, info: ServerInfo,
                         options: ClientOptions | None = None,
                         stats: RpcStats | None = None) -> NfsClient:
    """A client for a server that cannot be reached now, from what it told us before
    (`info`); its transport keeps trying to connect in the background."""
    options = options or ClientOptions()
    stats = stats if stats is not None else RpcStats()
    names = {p.value: p.name for p in Proc}
    transport = RpcTransport(host, info.nfs_port, nfs3.PROGRAM, nfs3.VERSION,
                             options=options.transport, stats=stats, proc_names=names,
                             prefix="nfs3.")
    await nursery.start(transport.run)
    return NfsClient(transport, info, stats)


__all__ = ["AttrSink", "ClientOptions", "Cred", "NfsClient", "NfsError", "ServerInfo",
           "list_exports", "lookup_port", "mount_export", "offline_client", "open_client",
           "unmount_export"]
