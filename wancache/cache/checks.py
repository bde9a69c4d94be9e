"""The checks a local file system makes at the system call, made before a change is
acknowledged (with write-back the server sees it only later, when the caller can
no longer be told).  The rules themselves are in posix.py; this module applies them
to the store's requests and to NFSv3's limits.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from wancache.creds import Cred

from .types import NOW, AttrChange

NOW_FIELD = -1                 # a time field meaning "now", as journaled
U32_SECONDS = (1 << 32) - 1    # NFSv3 carries seconds as an unsigned 32-bit number
PATH_MAX = 4096


@dataclass(frozen=True, slots=True)
class FileState:
    """What the rules need of a file: st_mode (type and permission bits), owner."""

    mode: int
    uid: int
    gid: int


def clamp_time(ns: int) -> int:
    """A time NFSv3 can carry: seconds within 0 .. 2**32-1 (as the Linux NFS client's
    VFS does with s_time_min/s_time_max)."""
    return min(max(ns, 0), U32_SECONDS * 1_000_000_000 + 999_999_999)


def file_size(size: int, max_size: int) -> None:
    if size > max_size:
        raise OSError(errno.EFBIG, "file too large for the server")


def symlink_target(target: bytes) -> None:
    if len(target) >= PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, "symlink target too long")


def setattr_fields(f: FileState, change: AttrChange, cred: Cred, *,
                   open_for_writing: bool, max_size: int) -> dict[str, int]:
    """The fields to journal or send for `change` (times in ns, NOW_FIELD for now),
    or OSError with the errno a local file system gives."""
    root = cred.uid == 0
    owner = root or cred.uid == f.uid
    fields: dict[str, int] = {}
    if change.mode is not None:
        if not owner:
            raise OSError(errno.EPERM, "only the owner may change the mode")
        mode = change.mode & 0o7777
        if not root and not cred.in_group(f.gid):
            mode &= ~0o2000
        fields["mode"] = mode
    if change.uid is not None and change.uid != f.uid:
        if not root:
            raise OSError(errno.EPERM, "only root may change the owner")
        fields["uid"] = change.uid
    if change.gid is not None and (change.gid != f.gid or "uid" in fields):
        if not root and not (cred.uid == f.uid and cred.in_group(change.gid)):
            raise OSError(errno.EPERM, "may not change the group to that one")
        fields["gid"] = change.gid
    if change.size is not None:
        file_size(change.size, max_size)
        fields["size"] = change.size
    for name in ("atime", "mtime"):
        value = getattr(change, name)
        # pyfuse3 hands us UTIME_NOW as the current time; the kernel lets a caller who
        # is not the owner set times only to now (with write permission): so that is
        # what such a caller asked for, and what the server allows a writer.
        if value is NOW or (value is not None and not owner):
            fields[name] = NOW_FIELD
        elif isinstance(value, int):
            fields[name] = clamp_time(value)
    return fields
