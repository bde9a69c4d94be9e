"""pyfuse3 `Operations`: POSIX file system calls on top of the `Store`.

Every handler runs with the credentials of the calling process (uid, gid and the
supplementary groups from /proc/PID/status) and is wrapped by `guard_operations`,
so an exception can never end `pyfuse3.main()`.  The kernel checks permissions
itself too (`default_permissions`).

Open flags, deliberately:

* File handles belong to an open, not to an inode: each `open` gets its own handle
  with the opener's credentials and flags.
* O_APPEND: the kernel asks us for the file's size and writes at its end (the
  offset it passes is honoured: the page cache writes mmap'ed pages back through an
  O_APPEND handle too); appends from two clients at once are not atomic, as on NFS.
* O_DIRECT: the kernel page cache is bypassed (`direct_io`) and so are wancache's
  caches: reads go to the server, writes are written through and committed.
* O_EXCL with O_CREAT: a GUARDED CREATE, so the server answers EEXIST if the name
  exists there (the kernel's own check only sees what it has cached).
* O_TRUNC: libfuse asks for atomic O_TRUNC, so the kernel passes it to `open`,
  which truncates (SETATTR size 0) before answering.
* Unlinking an open file, or renaming another file over it, renames it to
  `.wancache-unlinked-*` (as NFS clients do); it stays readable and writable until
  the last close, which removes it with the credentials of whoever unlinked it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import pyfuse3

from wancache.cache.node import Node
from wancache.cache.readahead import ReadAhead
from wancache.cache.store import DirCursor, Store
from wancache.cache.types import AttrChange, Attrs
from wancache.config import Config
from wancache.creds import Cred

from .errors import errno_of, guard_operations
from .inodes import InodeTable

log = logging.getLogger(__name__)

BLKSIZE = 128 * 1024          # st_blksize: tools size their I/O by it
GROUPS_TTL = 2.0              # seconds a process's supplementary groups are trusted
# NFSv3 has no extended attributes.  ENOSYS makes the kernel remember that and
# answer ENOTSUP itself from then on, instead of asking us (e.g. for
# security.capability before every write): users see ENOTSUP either way.
XATTR_ERRNO = errno.ENOSYS


@dataclass(eq=False)
class OpenFile:
    """One open(2) of a file: its node, the opener's credentials and flags."""

    node: Node
    cred: Cred
    flags: int
    readahead: ReadAhead | None = None

    @property
    def direct(self) -> bool:
        return bool(self.flags & os.O_DIRECT)

    @property
    def writable(self) -> bool:
        return (self.flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)


@dataclass(eq=False)
class OpenDir:
    """One opendir(3): the cursor of the store's listing."""

    cursor: DirCursor
    cred: Cred


@dataclass
class _Groups:
    groups: tuple[int, ...]
    expires: float


def to_entry(ino: int, attrs: Attrs, attr_ttl: float = 0.0,
             entry_ttl: float = 0.0) -> pyfuse3.EntryAttributes:
    """A file's attributes as the kernel wants them, for inode `ino`."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = ino
    e.generation = 0
    e.entry_timeout = entry_ttl
    e.attr_timeout = attr_ttl
    e.st_mode = attrs.mode
    e.st_nlink = attrs.nlink
    e.st_uid = attrs.uid
    e.st_gid = attrs.gid
    e.st_rdev = attrs.rdev
    e.st_size = attrs.size
    e.st_blksize = BLKSIZE
    e.st_blocks = (attrs.used + 511) // 512
    e.st_atime_ns = attrs.atime_ns
    e.st_mtime_ns = attrs.mtime_ns
    e.st_ctime_ns = attrs.ctime_ns
    return e


def to_change(attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> AttrChange:
    """The attributes a setattr request changes (pyfuse3 already turned UTIME_NOW into
    the current time; UTIME_OMIT leaves a field unchanged)."""
    return AttrChange(
        mode=attr.st_mode & 0o7777 if fields.update_mode else None,
        uid=attr.st_uid if fields.update_uid else None,
        gid=attr.st_gid if fields.update_gid else None,
        size=attr.st_size if fields.update_size else None,
        atime=attr.st_atime_ns if fields.update_atime else None,
        mtime=attr.st_mtime_ns if fields.update_mtime else None)


@guard_operations
class Operations(pyfuse3.Operations):
    """The FUSE file system: one instance per mount."""

    supports_dot_lookup = True
    enable_writeback_cache = False   # writes must reach our journal before write() returns
    enable_acl = False

    def __init__(self, store: Store, cfg: Config) -> None:
        super().__init__()
        self.store = store
        self.cfg = cfg
        self.inodes = InodeTable(store.root, store.nodes)
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, OpenDir] = {}
        self._handles = itertools.count(1)
        self._groups: OrderedDict[tuple[int, int, int], _Groups] = OrderedDict()
        # Open files unlinked here: node -> (directory, hidden name, who unlinked it);
        # the hidden name goes at the node's last close (whichever open that is).
        self._hidden: dict[Node, tuple[Node, bytes, Cred]] = {}

    @property
    def open_files(self) -> int:
        return len(self._files)

    # -- helpers -------------------------------------------------------------------

    def cred(self, ctx: pyfuse3.RequestContext) -> Cred:
        """The AUTH_SYS identity of the calling process."""
        key = (ctx.pid, ctx.uid, ctx.gid)
        now = time.monotonic()
        cached = self._groups.get(key)
        if cached is None or cached.expires < now:
            groups: tuple[int, ...] = (ctx.gid,)
            if ctx.pid:
                try:
                    found = pyfuse3.get_sup_groups(ctx.pid)
                    groups = (ctx.gid, *sorted(g for g in found if g != ctx.gid))
                except (OSError, ValueError):
                    pass   # the process is gone: its primary group is all we know
            cached = _Groups(groups, now + GROUPS_TTL)
            self._groups[key] = cached
            if len(self._groups) > 1024:
                self._groups.popitem(last=False)
        return Cred(ctx.uid, ctx.gid, cached.groups[:16])

    def _entry(self, node: Node, attrs: Attrs, parent: Node | None = None,
               name: bytes = b"") -> pyfuse3.EntryAttributes:
        """An entry reply: counts one kernel lookup of `node`."""
        ino = self.inodes.remember(node)
        entry_ttl = self.store.entry_ttl(parent, name) if parent is not None else 0.0
        return to_entry(ino, self._unlinked(node, attrs), self.store.attr_ttl(node), entry_ttl)

    def _check_name(self, name: bytes) -> None:
        if len(name) > self.store.name_max:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)

    def _writable_mount(self) -> None:
        if self.cfg.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)

    # -- metadata ------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.inodes.node(parent_inode)
        self._check_name(name)
        try:
            node, attrs = await self.store.lookup(parent, name, self.cred(ctx))
        except Exception as exc:
            missing = errno_of(exc) == errno.ENOENT
            ttl = self.store.negative_ttl(parent, name) if missing else 0.0
            if ttl <= 0:
                raise
            # A negative entry: the kernel remembers the name is missing for `ttl`.
            entry = pyfuse3.EntryAttributes()
            entry.st_ino = 0
            entry.entry_timeout = ttl
            return entry
        return self._entry(node, attrs, parent, name)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            self.inodes.forget(ino, nlookup)

    async def getattr(self, inode: int,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.inodes.node(inode)
        attrs = self._unlinked(node, await self.store.getattr(node, self.cred(ctx)))
        return to_entry(inode, attrs, self.store.attr_ttl(node))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._writable_mount()
        node = self.inodes.node(inode)
        change = to_change(attr, fields)
        cred = self.cred(ctx)
        if change.empty:   # only ctime (or nothing) was asked for
            attrs = await self.store.getattr(node, cred)
        else:
            of = self._files.get(fh) if fh is not None else None
            attrs = await self.store.setattr(node, change, cred,
                                             fd_writable=of.writable if of else None)
        return to_entry(inode, self._unlinked(node, attrs), self.store.attr_ttl(node))

    def _unlinked(self, node: Node, attrs: Attrs) -> Attrs:
        """An open file unlinked here lives on under a hidden name: it has one link
        less than the server says (none, usually)."""
        if node in self._hidden:
            return dataclasses.replace(attrs, nlink=max(0, attrs.nlink - 1))
        return attrs

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.store.readlink(self.inodes.node(inode), self.cred(ctx))

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return await self.store.access(self.inodes.node(inode), mode, self.cred(ctx))

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        fs = await self.store.statfs(self.cred(ctx))
        st = pyfuse3.StatvfsData()
        st.f_bsize = BLKSIZE
        st.f_frsize = 4096
        st.f_blocks = fs.total_bytes // st.f_frsize
        st.f_bfree = fs.free_bytes // st.f_frsize
        st.f_bavail = fs.avail_bytes // st.f_frsize
        st.f_files = fs.total_files
        st.f_ffree = fs.free_files
        st.f_favail = fs.avail_files
        st.f_namemax = self.store.name_max
        return st

    # -- namespace -----------------------------------------------------------------

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._writable_mount()
        self._check_name(name)
        parent = self.inodes.node(parent_inode)
        perm = mode & ~ctx.umask & 0o7777
        if stat.S_ISREG(mode):
            node, attrs = await self.store.create(parent, name, perm, self.cred(ctx),
                                                  exclusive=True)
        elif stat.S_IFMT(mode) in (stat.S_IFDIR, stat.S_IFLNK):
            raise pyfuse3.FUSEError(errno.EINVAL)
        else:
            node, attrs = await self.store.mknod(parent, name, stat.S_IFMT(mode) | perm, rdev,
                                                 self.cred(ctx))
        return self._entry(node, attrs, parent, name)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._writable_mount()
        self._check_name(name)
        parent = self.inodes.node(parent_inode)
        node, attrs = await self.store.mkdir(parent, name, mode & ~ctx.umask, self.cred(ctx))
        return self._entry(node, attrs, parent, name)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._writable_mount()
        self._check_name(name)
        parent = self.inodes.node(parent_inode)
        node, attrs = await self.store.symlink(parent, name, target, self.cred(ctx))
        return self._entry(node, attrs, parent, name)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._writable_mount()
        self._check_name(new_name)
        node = self.inodes.node(inode)
        parent = self.inodes.node(new_parent_inode)
        attrs = await self.store.link(node, parent, new_name, self.cred(ctx))
        return self._entry(node, attrs, parent, new_name)

    async def unlink(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> None:
        self._writable_mount()
        parent = self.inodes.node(parent_inode)
        cred = self.cred(ctx)
        if await self._hide_if_open(parent, name, cred):
            return
        await self.store.remove(parent, name, cred)

    async def _hide_if_open(self, parent: Node, name: bytes, cred: Cred) -> bool:
        """If `name` is the last link of a file some open refers to, rename it out of
        the way (to be removed at its last close) and return True."""
        node = await self._open_child(parent, name, cred)
        if node is None:
            return False
        hidden = await self.store.silly_rename(parent, name, node, cred)
        self._hidden[node] = (parent, hidden, cred)
        return True

    async def _open_child(self, parent: Node, name: bytes, cred: Cred) -> Node | None:
        """The node behind `name` if some open file refers to it (NOENT otherwise
        surfaces from the store)."""
        if all(of.node in self._hidden for of in self._files.values()):
            return None
        try:
            node, attrs = await self.store.lookup(parent, name, cred)
        except Exception as exc:
            if errno_of(exc) == errno.ENOENT:
                return None
            raise
        if attrs.is_dir or self.inodes.open_count(node) == 0:
            return None
        if attrs.nlink > 1:
            return None   # other names keep the file alive on the server
        return node

    async def rmdir(self, parent_inode: int, name: bytes,
                    ctx: pyfuse3.RequestContext) -> None:
        self._writable_mount()
        await self.store.rmdir(self.inodes.node(parent_inode), name, self.cred(ctx))

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._writable_mount()
        self._check_name(name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)   # NFSv3 cannot swap two names
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        src = self.inodes.node(parent_inode_old)
        dst = self.inodes.node(parent_inode_new)
        cred = self.cred(ctx)
        noreplace = bool(flags & pyfuse3.RENAME_NOREPLACE)
        if not noreplace and (src is not dst or name_old != name_new):
            await self._hide_if_open(dst, name_new, cred)   # replacing an open file
        await self.store.rename(src, name_old, dst, name_new, cred, noreplace=noreplace)

    # -- files ---------------------------------------------------------------------

    def _file_info(self, node: Node, of: OpenFile, *, new: bool = False) -> pyfuse3.FileInfo:
        fh = next(self._handles)
        self._files[fh] = of
        self.inodes.opened(node)
        info = pyfuse3.FileInfo(fh=fh)
        info.direct_io = of.direct   # (not for cache=off: MAP_SHARED needs the page cache)
        info.keep_cache = not new and not info.direct_io and self.store.keep_cache(node)
        if not of.direct:
            of.readahead = self.store.readahead()
        return info

    async def open(self, inode: int, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.inodes.node(inode)
        of = OpenFile(node, self.cred(ctx), flags)
        if of.writable:
            self._writable_mount()
        if self.cfg.consistency == "cto":
            # Close-to-open: every open sees what the last close on any client wrote.
            await self.store.getattr(node, of.cred, fresh=True)
        if flags & os.O_TRUNC:   # Linux truncates even when opened read-only
            await self.store.setattr(node, AttrChange(size=0), of.cred, fd_writable=True)
        return self._file_info(node, of)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._writable_mount()
        self._check_name(name)
        parent = self.inodes.node(parent_inode)
        cred = self.cred(ctx)
        node, attrs = await self.store.create(parent, name, mode & ~ctx.umask, cred,
                                              exclusive=bool(flags & os.O_EXCL))
        if flags & os.O_TRUNC and attrs.size:   # it existed after all (a racing creator)
            attrs = await self.store.setattr(node, AttrChange(size=0), cred, fd_writable=True)
        entry = self._entry(node, attrs, parent, name)
        return self._file_info(node, OpenFile(node, cred, flags), new=True), entry

    def _file(self, fh: int) -> OpenFile:
        of = self._files.get(fh)
        if of is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return of

    async def read(self, fh: int, off: int, size: int) -> bytes:
        of = self._file(fh)
        return await self.store.read(of.node, off, size, of.cred, ra=of.readahead,
                                     direct=of.direct)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        of = self._file(fh)
        return await self.store.write(of.node, off, buf, of.cred, direct=of.direct)

    async def flush(self, fh: int) -> None:
        of = self._file(fh)
        if of.writable:
            await self.store.closed(of.node, of.cred)

    async def fsync(self, fh: int, datasync: bool) -> None:
        of = self._file(fh)
        await self.store.fsync(of.node, of.cred)

    async def release(self, fh: int) -> None:
        of = self._files.pop(fh, None)
        if of is None:
            return
        remaining = self.inodes.closed(of.node)
        try:
            if of.writable:
                await self.store.closed(of.node, of.cred)
        finally:
            if remaining == 0:
                self.store.release(of.node)
                hidden = self._hidden.pop(of.node, None)
                if hidden is not None:
                    parent, name, unlinker = hidden
                    await self.store.remove(parent, name, unlinker)

    async def release_all(self) -> int:
        """After the unmount: release every open the kernel never released (it drops
        the RELEASEs still queued when the connection ends), so that their writes are
        closed and their hidden names removed.  Returns how many there were."""
        handles = list(self._files)
        for fh in handles:
            with contextlib.suppress(pyfuse3.FUSEError):   # fuse_handler logged it
                await self.release(fh)
        self._dirs.clear()
        return len(handles)

    # -- directories ---------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.inodes.node(inode)
        cred = self.cred(ctx)
        cursor = await self.store.opendir(node, cred)
        fh = next(self._handles)
        self._dirs[fh] = OpenDir(cursor, cred)
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        od = self._dirs.get(fh)
        if od is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        offset = start_id
        parent = od.cursor.node
        while True:
            entries, eof = await self.store.readdir(od.cursor, offset, od.cred)
            for e in entries:
                if e.name in (b".", b".."):
                    # The kernel does not count lookups for these two.
                    ino = self.inodes.peek(parent) if e.name == b"." else None
                    dot = e.attrs or await self.store.getattr(parent, od.cred)
                    if not pyfuse3.readdir_reply(token, e.name,
                                                 to_entry(ino or e.fileid, dot), e.offset):
                        return
                    offset = e.offset
                    continue
                node, attrs = e.node, e.attrs
                if node is None or attrs is None:
                    node, attrs = await self.store.lookup(parent, e.name, od.cred)
                ino = self.inodes.ino_of(node)
                entry = to_entry(ino, self._unlinked(node, attrs), self.store.attr_ttl(node),
                                 self.store.entry_ttl(parent, e.name))
                if not pyfuse3.readdir_reply(token, e.name, entry, e.offset):
                    self.inodes.drop_unreferenced(node)
                    return
                self.inodes.remember(node)
                offset = e.offset
            if eof or not entries:
                return

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if fh not in self._dirs:
            raise pyfuse3.FUSEError(errno.EBADF)

    # -- extended attributes: NFSv3 has none ---------------------------------------

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(XATTR_ERRNO)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(XATTR_ERRNO)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        raise pyfuse3.FUSEError(XATTR_ERRNO)

    async def removexattr(self, inode: int, name: bytes,
                          ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(XATTR_ERRNO)


__all__ = ["OpenDir", "OpenFile", "Operations", "to_change", "to_entry"]
