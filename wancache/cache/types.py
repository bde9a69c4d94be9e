"""What the file system layer sees of files: attributes and attribute changes.

`fs/` works with these, never with NFS types: the cache layer converts the
server's attributes (fattr3) into `Attrs` at its edge, and turns an `AttrChange`
into what it journals or sends.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from enum import Enum

from wancache.nfs_backend.nfs3 import Fattr3, Ftype3

_TYPE_BITS = {Ftype3.REG: stat.S_IFREG, Ftype3.DIR: stat.S_IFDIR, Ftype3.LNK: stat.S_IFLNK,
              Ftype3.FIFO: stat.S_IFIFO, Ftype3.SOCK: stat.S_IFSOCK, Ftype3.CHR: stat.S_IFCHR,
              Ftype3.BLK: stat.S_IFBLK}
_FTYPES = {bits: ftype for ftype, bits in _TYPE_BITS.items()}


class Now(Enum):
    """A time to be set to "now" (utimensat's UTIME_NOW)."""

    NOW = "now"


NOW = Now.NOW


@dataclass(frozen=True, slots=True)
class Attrs:
    """A file's attributes as stat(2) shows them (times in ns since the epoch)."""

    mode: int          # st_mode: file type and permission bits
    nlink: int
    uid: int
    gid: int
    size: int
    used: int          # bytes allocated
    rdev: int          # device number of a device node, else 0
    fileid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @classmethod
    def of(cls, a: Fattr3) -> Attrs:
        rdev = os.makedev(*a.rdev) if a.type in (Ftype3.CHR, Ftype3.BLK) else 0
        return cls(_TYPE_BITS.get(a.type, stat.S_IFREG) | (a.mode & 0o7777), a.nlink, a.uid,
                   a.gid, a.size, a.used, rdev, a.fileid, a.atime.to_ns(), a.mtime.to_ns(),
                   a.ctime.to_ns())


@dataclass(frozen=True, slots=True)
class AttrChange:
    """What a setattr asks to change; None leaves a field alone.  Times are ns since
    the epoch, or NOW."""

    mode: int | None = None      # permission bits (07777)
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime: int | Now | None = None
    mtime: int | Now | None = None

    @property
    def empty(self) -> bool:
        return self == AttrChange()


def ftype_of_mode(mode: int) -> Ftype3 | None:
    """The NFS file type of an st_mode's type bits (None if unknown)."""
    return _FTYPES.get(stat.S_IFMT(mode))


@dataclass(frozen=True, slots=True)
class FsStats:
    """What statvfs(2) reports of the export: bytes and files, total/free/available."""

    total_bytes: int
    free_bytes: int
    avail_bytes: int
    total_files: int
    free_files: int
    avail_files: int
