"""The checks a local file system makes at the system call, applied to the store's
requests before it acknowledges them (with write-back the server sees a change only
later, when the caller can no longer be told).  The rules are posix.py's; this
module feeds them the store's view of a file and NFSv3's limits.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass

from wancache.creds import Cred

from . import posix
from .types import NOW, AttrChange

NOW_FIELD = -1                 # a time field meaning "now", as journaled and sent


@dataclass(frozen=True, slots=True)
class FileState:
    """What the rules need of a file: st_mode (type and permission bits), owner, size."""

    mode: int
    uid: int
    gid: int
    size: int = 0


def _inode(f: FileState) -> posix.Inode:
    return posix.Inode(f.mode, f.uid, f.gid, f.size)


def _caller(cred: Cred) -> posix.Caller:
    return posix.Caller(cred.uid, cred.gid, frozenset(cred.groups))


def setattr_fields(f: FileState, change: AttrChange, cred: Cred, *,
                   fd_writable: bool | None, max_size: int) -> dict[str, int]:
    """The fields to journal or send for `change` (times in ns, NOW_FIELD: the
    server's clock), the setuid/setgid bits the change clears included; OSError with
    the errno a local file system gives.  `fd_writable`: the change came through an
    fd (ftruncate), opened for writing or not; None: by path."""
    inode, caller = _inode(f), _caller(cred)
    fields: dict[str, int] = {}
    if change.uid is not None or change.gid is not None:
        after = posix.chown(inode, caller, change.uid, change.gid)
        if change.uid is not None and after.uid != inode.uid:
            fields["uid"] = after.uid
        if change.gid is not None and (after.gid != inode.gid or "uid" in fields):
            fields["gid"] = after.gid
        inode = after
    if change.mode is not None:
        inode = posix.Inode(posix.chmod(inode, caller, change.mode), inode.uid, inode.gid,
                            inode.size)
    if change.size is not None:
        mode = posix.truncate(inode, caller, change.size, fd_writable=fd_writable,
                              max_size=max_size)
        inode = posix.Inode(mode, inode.uid, inode.gid, change.size)
        fields["size"] = change.size
    if stat.S_IMODE(inode.mode) != stat.S_IMODE(f.mode) or change.mode is not None:
        fields["mode"] = stat.S_IMODE(inode.mode)
    fields.update(_times(_inode(f), caller, change))
    if "size" in fields and "mtime" not in fields:
        fields["mtime"] = NOW_FIELD      # a truncate is a data change (O_TRUNC, ...)
    return fields


def _times(inode: posix.Inode, caller: posix.Caller, change: AttrChange) -> dict[str, int]:
    if change.atime is None and change.mtime is None:
        return {}
    now = time.time_ns()
    ns = {name: now if value is NOW else value
          for name, value in (("atime", change.atime), ("mtime", change.mtime))
          if value is not None}
    t = posix.times_from_kernel(inode, caller, ns.get("atime"), ns.get("mtime"), now_ns=now)
    out = {name: value for name, value in (("atime", t.atime), ("mtime", t.mtime))
           if value is not None}
    return dict.fromkeys(out, NOW_FIELD) if t.server_time else out


def write_mode(f: FileState, cred: Cred) -> int | None:
    """The mode a write by `cred` leaves (setuid/setgid cleared), if it changes it."""
    mode = posix.killed_privs(_inode(f), _caller(cred))
    return stat.S_IMODE(mode) if mode != f.mode else None


def write_count(offset: int, count: int, max_size: int) -> int:
    """How much of a write fits below the server's largest file (EFBIG if none)."""
    return posix.write_count(offset, count, max_size)


def symlink_target(target: bytes) -> None:
    posix.check_symlink_target(target)


def name(name: bytes, name_max: int) -> None:
    posix.check_name(name, name_max)
