"""The Python-FUSE floor: a minimal pyfuse3 pass-through of a local directory.

No caching logic of its own: each request is one or two system calls on the
directory below, so what it costs is the cost of Python + pyfuse3 + FUSE itself,
the same-run reference every bench speed is compared against.  It mounts with
wancache's FUSE options (`default_permissions`, `allow_other`, no kernel write-back
cache) and lets the kernel keep what it may (entries, attributes and pages for
`TTL`; nobody else changes the directory).  Inodes are the source's inode numbers,
each held by an O_PATH descriptor, so renames need no path bookkeeping.  Created
files belong to the caller.  fsync runs in a thread; nothing else blocks long.

`python -m bench.passthrough SOURCE MOUNTPOINT` serves in the foreground until
unmounted; `PassthroughMount` runs it in a child process (see `bench.wcmount`).
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import trio

from bench.wcmount import FuseChild, is_mounted

TTL = 60.0          # seconds the kernel may keep entries and attributes
_PATH = os.O_PATH | os.O_NOFOLLOW
_R = TypeVar("_R")


def _errno(fn: Callable[..., Coroutine[Any, Any, _R]]) -> Callable[..., Coroutine[Any, Any, _R]]:
    """OSError -> FUSEError at the FUSE edge."""
    @functools.wraps(fn)
    async def wrapper(*args: Any) -> _R:
        try:
            return await fn(*args)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
    return wrapper


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


class Passthrough(pyfuse3.Operations):
    """Every request answered by the local directory `source`."""

    enable_writeback_cache = False     # as wancache: a write reaches us before it returns

    def __init__(self, source: Path) -> None:
        super().__init__()
        root = os.open(source, os.O_PATH | os.O_DIRECTORY)
        self._root_ino = os.fstat(root).st_ino
        self._fds: dict[int, int] = {pyfuse3.ROOT_INODE: root}     # inode -> O_PATH fd
        self._lookups: dict[int, int] = {pyfuse3.ROOT_INODE: 1}
        self._dirs: dict[int, tuple[int, list[bytes]]] = {}    # handle -> inode, names
        self._next_dir = 0

    def _ino(self, st: os.stat_result) -> int:
        if st.st_ino == self._root_ino:
            return pyfuse3.ROOT_INODE
        return st.st_ino if st.st_ino != pyfuse3.ROOT_INODE else 1 << 62

    @staticmethod
    def _attrs(st: os.stat_result, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino, e.entry_timeout, e.attr_timeout = ino, TTL, TTL
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(e, name, getattr(st, name))
        return e

    def _remember(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        """Look `name` up in `parent` and count one kernel reference to it."""
        fd = os.open(name, _PATH, dir_fd=self._fds[parent])
        st = os.fstat(fd)
        self._count(fd, self._ino(st))
        return self._attrs(st, self._ino(st))

    def _count(self, fd: int, ino: int) -> None:
        """One more kernel reference to `ino`; `fd` (O_PATH) is kept or closed."""
        if ino in self._fds:
            os.close(fd)
            self._lookups[ino] += 1
        else:
            self._fds[ino], self._lookups[ino] = fd, 1

    def _own(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.chown(name, ctx.uid, ctx.gid, dir_fd=self._fds[parent], follow_symlinks=False)

    # -- metadata

    @_errno
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._remember(parent_inode, name)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:  # type: ignore[override]
        for ino, n in inode_list:
            if ino == pyfuse3.ROOT_INODE or ino not in self._lookups:
                continue
            self._lookups[ino] -= n
            if self._lookups[ino] <= 0:
                del self._lookups[ino]
                os.close(self._fds.pop(ino))

    @_errno
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(os.fstat(self._fds[inode]), inode)

    @_errno
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = _proc(self._fds[inode])
        if fields.update_size:
            os.truncate(fh if fh is not None else path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(path, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.fstat(self._fds[inode])
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        return await self.getattr(inode, ctx)

    @_errno
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(os.readlink("", dir_fd=self._fds[inode]))

    @_errno
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(_proc(self._fds[pyfuse3.ROOT_INODE]))
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(out, name, getattr(sv, name))
        return out

    # -- directories

    @_errno
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._next_dir += 1
        names = sorted(os.listdir(os.fsencode(_proc(self._fds[inode]))))
        self._dirs[self._next_dir] = (inode, names)
        return self._next_dir

    @_errno
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        parent, names = self._dirs[fh]
        for i in range(start_id, len(names)):
            try:
                fd = os.open(names[i], _PATH, dir_fd=self._fds[parent])
            except FileNotFoundError:
                continue
            st = os.fstat(fd)
            ino = self._ino(st)
            if not pyfuse3.readdir_reply(token, names[i], self._attrs(st, ino), i + 1):
                os.close(fd)
                return
            self._count(fd, ino)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_errno
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        os.mkdir(name, mode, dir_fd=self._fds[parent_inode])
        self._own(parent_inode, name, ctx)
        return self._remember(parent_inode, name)

    @_errno
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.rmdir(name, dir_fd=self._fds[parent_inode])

    @_errno
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.unlink(name, dir_fd=self._fds[parent_inode])

    @_errno
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags:
            raise OSError(errno.EINVAL, "rename flags are not supported")
        os.rename(name_old, name_new, src_dir_fd=self._fds[parent_inode_old],
                  dst_dir_fd=self._fds[parent_inode_new])

    @_errno
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        os.symlink(target, name, dir_fd=self._fds[parent_inode])
        self._own(parent_inode, name, ctx)
        return self._remember(parent_inode, name)

    @_errno
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        os.mknod(name, mode, rdev, dir_fd=self._fds[parent_inode])
        self._own(parent_inode, name, ctx)
        return self._remember(parent_inode, name)

    @_errno
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        os.link(_proc(self._fds[inode]), new_name, dst_dir_fd=self._fds[new_parent_inode],
                follow_symlinks=True)
        return self._remember(new_parent_inode, new_name)

    # -- files

    @_errno
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # The kernel resolved the path: O_NOFOLLOW would refuse the /proc magic link.
        flags &= ~(os.O_CREAT | os.O_NOFOLLOW)
        return pyfuse3.FileInfo(fh=os.open(_proc(self._fds[inode]), flags),
                                keep_cache=True)

    @_errno
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fd = os.open(name, flags | os.O_CREAT, mode, dir_fd=self._fds[parent_inode])
        os.fchown(fd, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), self._remember(parent_inode, name)

    @_errno
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    @_errno
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(fh, buf, off)

    @_errno
    async def fsync(self, fh: int, datasync: bool) -> None:
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fh)

    async def flush(self, fh: int) -> None:
        pass

    @_errno
    async def release(self, fh: int) -> None:
        os.close(fh)


def fuse_options() -> set[str]:
    """wancache's options: the kernel checks permissions, every user may enter."""
    return set(pyfuse3.default_options) | {"fsname=passthrough", "subtype=passthrough",
                                           "default_permissions", "allow_other"}


def serve(source: Path, mountpoint: Path) -> None:
    """Mount and serve until unmounted."""
    os.umask(0)     # the kernel has applied the caller's umask to every mode already
    ops = Passthrough(source)
    pyfuse3.init(ops, str(mountpoint), fuse_options())
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


class PassthroughMount(FuseChild):
    """`python -m bench.passthrough SOURCE MOUNTPOINT` in a child process."""

    name = "passthrough"

    def __init__(self, source: Path, mountpoint: Path, *, log_path: Path | None = None) -> None:
        super().__init__(mountpoint, log_path=log_path)
        self.source = Path(source)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "bench.passthrough", str(self.source),
                str(self.mountpoint)]

    def serving(self) -> bool:
        return is_mounted(self.mountpoint)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.passthrough SOURCE MOUNTPOINT", file=sys.stderr)
        return 2
    source, mountpoint = Path(args[0]), Path(args[1])
    if not source.is_dir() or not mountpoint.is_dir():
        print(f"bench.passthrough: {source} and {mountpoint} must be directories",
              file=sys.stderr)
        return 2
    serve(source, mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
