"""The decisions a local Linux file system makes at the system call, as pure functions.

With write-back, a change is acknowledged once it is journaled here and reaches the
server later; whatever the server would refuse must therefore be refused here first,
with the errno Linux gives.  The kernel already checks much of it for a FUSE mount
with `default_permissions` (docs/posix.md says what and where); these functions are
the rules themselves, so the store can apply them to its own view of a file and so
tests can compare them with the kernel's behaviour on a local file system.

Everything is plain ints: modes are st_mode values (file type bits included), times
are nanoseconds since the epoch, errors are `OSError(errno, message)`.  No I/O.

Sources: Linux 6.x fs/attr.c (`setattr_prepare`, `setattr_should_drop_sgid`,
`setattr_should_drop_suidgid`, `may_setattr`, `inode_newsize_ok`), fs/open.c
(`chmod_common`, `chown_common`, `vfs_truncate`, `do_ftruncate`), fs/utimes.c,
fs/namei.c (`generic_permission`), fs/inode.c (`timestamp_truncate`), mm/filemap.c
(`generic_write_check_limits`), fs/nfs/super.c (NFSv3 times: 0..U32_MAX).
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from dataclasses import dataclass, replace

NS = 1_000_000_000

S_ISUID, S_ISGID, S_IXGRP = stat.S_ISUID, stat.S_ISGID, stat.S_IXGRP
R_OK, W_OK, X_OK = os.R_OK, os.W_OK, os.X_OK

# NFSv3 carries seconds as an unsigned 32-bit number (RFC 1813 nfstime3), and the
# Linux NFS client gives its NFSv3 super blocks these limits (fs/nfs/super.c).
NFS3_TIME_MIN = 0
NFS3_TIME_MAX = 2**32 - 1

# A time outside what NFSv3 can carry is clamped to the nearest one, as the Linux NFS
# client and local file systems with a narrower range do (docs/posix.md says why).
# False: refuse it with EINVAL instead.
CLAMP_TIMES = True

# The longest symlink target Linux takes (PATH_MAX 4096, with its NUL): the syscall
# refuses longer ones itself; ext4 and ganesha on it take up to this.
SYMLINK_MAX = 4095


def _error(code: int, what: str) -> OSError:
    return OSError(code, f"{os.strerror(code)}: {what}")


@dataclass(frozen=True)
class Caller:
    """Who makes the call: uid, primary gid and supplementary groups."""

    uid: int
    gid: int
    groups: frozenset[int] = frozenset()

    @property
    def is_root(self) -> bool:
        """uid 0: every capability (CAP_CHOWN, CAP_FOWNER, CAP_FSETID, CAP_DAC_*)."""
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups


@dataclass(frozen=True)
class Inode:
    """What the decisions read of a file: st_mode (type bits included), owner, group
    and size."""

    mode: int
    uid: int
    gid: int
    size: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def owned_by(self, caller: Caller) -> bool:
        """The owner or root (`inode_owner_or_capable`)."""
        return caller.is_root or caller.uid == self.uid


@dataclass(frozen=True)
class TimeLimits:
    """A file system's time range (s_time_min, s_time_max) and granularity."""

    min_sec: int
    max_sec: int
    gran_ns: int = 1


NFS3_TIMES = TimeLimits(NFS3_TIME_MIN, NFS3_TIME_MAX, 1)


class Utime(enum.Enum):
    """utimensat's special times."""

    NOW = "now"     # UTIME_NOW
    OMIT = "omit"   # UTIME_OMIT


TimeArg = int | Utime


@dataclass(frozen=True)
class Times:
    """The times a utimensat sets (ns; None: left alone).  `server_time`: both are
    "now" and the caller may set them only through write permission, so NFSv3 must
    send them as SET_TO_SERVER_TIME (a server refuses client times from non-owners)."""

    atime: int | None
    mtime: int | None
    server_time: bool = False


# -- permission ------------------------------------------------------------------------

def permitted(inode: Inode, caller: Caller, want: int) -> bool:
    """May `caller` read/write/execute (R_OK|W_OK|X_OK) `inode` (`generic_permission`
    without ACLs)?  Root may read and write anything and execute what has an x bit."""
    if caller.is_root:
        return not (want & X_OK) or inode.is_dir or bool(inode.mode & 0o111)
    if caller.uid == inode.uid:
        bits = inode.mode >> 6
    elif caller.in_group(inode.gid):
        bits = inode.mode >> 3
    else:
        bits = inode.mode
    return (want & ~bits & 0o7) == 0


def _sgid_dropped(inode: Inode, caller: Caller) -> bool:
    """`setattr_should_drop_sgid`: a group-executable setgid bit always goes; one
    without group execute (mandatory locking, historically) goes when the caller is
    neither root nor in the file's group."""
    if not inode.mode & S_ISGID:
        return False
    return bool(inode.mode & S_IXGRP) or not (caller.is_root or caller.in_group(inode.gid))


def killed_privs(inode: Inode, caller: Caller) -> int:
    """The mode after a write or truncate by `caller` (`setattr_should_drop_suidgid`):
    without CAP_FSETID (not root), a regular file loses setuid, and setgid as
    `_sgid_dropped` says.  No ownership is needed: the kernel forces this change."""
    if caller.is_root or not inode.is_reg:
        return inode.mode
    kill = S_ISUID | (S_ISGID if _sgid_dropped(inode, caller) else 0)
    return inode.mode & ~kill


# -- chmod, chown ----------------------------------------------------------------------

def chmod(inode: Inode, caller: Caller, mode: int) -> int:
    """The st_mode after chmod(mode): only the owner or root may (EPERM); a caller who
    is not root and not in the file's group cannot set setgid (silently cleared)."""
    if not inode.owned_by(caller):
        raise _error(errno.EPERM, "only the owner may change the mode")
    perm = mode & 0o7777
    if not (caller.is_root or caller.in_group(inode.gid)):
        perm &= ~S_ISGID
    return stat.S_IFMT(inode.mode) | perm


def chown(inode: Inode, caller: Caller, uid: int | None = None,
          gid: int | None = None) -> Inode:
    """The inode after chown(uid, gid) (None: -1, unchanged).

    Only root gives a file away; the owner may "change" the owner to itself and the
    group to the current one or one of its groups (EPERM otherwise).  A non-directory
    loses setuid (even when root chowns) and setgid as `_sgid_dropped` says; that mode
    change needs ownership, so a non-owner's no-op chown of such a file is EPERM too.
    """
    if uid is not None and not (caller.is_root or (caller.uid == inode.uid == uid)):
        raise _error(errno.EPERM, "only root may change the owner")
    if gid is not None and not (caller.is_root or (
            caller.uid == inode.uid and (gid == inode.gid or caller.in_group(gid)))):
        raise _error(errno.EPERM, "the owner may only choose one of its groups")
    mode = inode.mode
    if not inode.is_dir:
        kill = S_ISUID | (S_ISGID if _sgid_dropped(inode, caller) else 0)
        if mode & kill:
            if not inode.owned_by(caller):
                raise _error(errno.EPERM, "clearing setuid/setgid needs ownership")
            mode &= ~kill
    return replace(inode, mode=mode,
                   uid=inode.uid if uid is None else uid,
                   gid=inode.gid if gid is None else gid)


# -- truncate, write -------------------------------------------------------------------

def truncate(inode: Inode, caller: Caller, length: int, *, fd_writable: bool | None = None,
             max_size: int = 2**63 - 1) -> int:
    """The mode after truncate(2) (`fd_writable` None) or ftruncate(2) to `length`.

    By path the caller needs write permission (EACCES); through an fd only that the fd
    was opened for writing (EINVAL otherwise), whatever the mode says now: a non-root
    owner who created a file with mode 0 and O_RDWR may truncate it.  Growing past
    `max_size` is EFBIG; a non-root caller clears setuid/setgid (`killed_privs`).
    """
    if length < 0:
        raise _error(errno.EINVAL, "negative length")
    if fd_writable is None:
        if inode.is_dir:
            raise _error(errno.EISDIR, "truncate of a directory")
        if not inode.is_reg:
            raise _error(errno.EINVAL, "truncate of a special file")
        if not permitted(inode, caller, W_OK):
            raise _error(errno.EACCES, "no write permission")
    elif not (inode.is_reg and fd_writable):
        raise _error(errno.EINVAL, "ftruncate needs a regular file open for writing")
    if length > inode.size and length > max_size:
        raise _error(errno.EFBIG, f"{length} is past the largest file size {max_size}")
    return killed_privs(inode, caller)


def write_count(offset: int, count: int, max_size: int) -> int:
    """How much of a write of `count` bytes at `offset` may happen: EFBIG at or past
    `max_size`, shortened up to it (`generic_write_check_limits`)."""
    if count and offset >= max_size:
        raise _error(errno.EFBIG, f"offset {offset} is past the largest file size {max_size}")
    return min(count, max(0, max_size - offset))


def check_size(size: int, max_size: int) -> None:
    """EFBIG if a file may not grow to `size` (e.g. the server's FSINFO maxfilesize)."""
    if size > max_size:
        raise _error(errno.EFBIG, f"{size} is past the largest file size {max_size}")


# -- times -----------------------------------------------------------------------------

def fit_time(ns: int, limits: TimeLimits, *, clamp: bool | None = None) -> int:
    """A time the file system can store (`timestamp_truncate`): seconds clamped into
    the range (nanoseconds 0 at either end), nanoseconds cut to the granularity.  With
    `clamp` False (default: CLAMP_TIMES) a time out of range is EINVAL instead."""
    sec, nsec = divmod(ns, NS)
    if not limits.min_sec <= sec <= limits.max_sec and not (
            CLAMP_TIMES if clamp is None else clamp):
        raise _error(errno.EINVAL, f"time {sec} s is outside {limits.min_sec}..{limits.max_sec}")
    sec = min(max(sec, limits.min_sec), limits.max_sec)
    if sec in (limits.min_sec, limits.max_sec):
        nsec = 0
    nsec -= nsec % limits.gran_ns
    return sec * NS + nsec


def utimens(inode: Inode, caller: Caller, atime: TimeArg, mtime: TimeArg, *, now_ns: int,
            limits: TimeLimits = NFS3_TIMES, clamp: bool | None = None) -> Times:
    """The times utimensat(atime, mtime) sets (times=NULL is NOW, NOW).

    Both OMIT: nothing, and nothing is checked.  Both NOW: the owner, root, or anyone
    with write permission (EACCES).  Anything else (an explicit time, or NOW with OMIT):
    the owner or root only (EPERM).  Times are fitted to `limits` (`fit_time`).
    """
    if atime is Utime.OMIT and mtime is Utime.OMIT:
        return Times(None, None)
    touch = atime is Utime.NOW and mtime is Utime.NOW
    owner = inode.owned_by(caller)
    if touch:
        if not owner and not permitted(inode, caller, W_OK):
            raise _error(errno.EACCES, "setting the times to now needs write permission")
    elif not owner:
        raise _error(errno.EPERM, "only the owner may set explicit times")

    def one(t: TimeArg) -> int | None:
        if t is Utime.OMIT:
            return None
        if t is Utime.NOW:
            return fit_time(now_ns, limits, clamp=True)
        return fit_time(t, limits, clamp=clamp)

    return Times(one(atime), one(mtime), server_time=touch and not owner)


def times_from_kernel(inode: Inode, caller: Caller, atime_ns: int | None,
                      mtime_ns: int | None, *, now_ns: int,
                      limits: TimeLimits = NFS3_TIMES) -> Times:
    """`utimens` for a FUSE setattr as pyfuse3 hands it over (None: not set).

    pyfuse3 turns UTIME_NOW into the current time, so "now" cannot be told from an
    explicit time.  But the kernel (default_permissions) refuses a non-owner's explicit
    times and NOW+OMIT with EPERM before asking us, so a non-owner, non-root caller
    who gets here setting both times is doing a touch.
    """
    if not inode.owned_by(caller) and atime_ns is not None and mtime_ns is not None:
        return utimens(inode, caller, Utime.NOW, Utime.NOW, now_ns=now_ns, limits=limits)
    return utimens(inode, caller, Utime.OMIT if atime_ns is None else atime_ns,
                   Utime.OMIT if mtime_ns is None else mtime_ns, now_ns=now_ns,
                   limits=limits)


# -- names -----------------------------------------------------------------------------

def check_name(name: bytes, name_max: int) -> None:
    """ENAMETOOLONG for a name longer than the server takes (PATHCONF name_max)."""
    if len(name) > name_max:
        raise _error(errno.ENAMETOOLONG, f"a name of {len(name)} bytes (at most {name_max})")


def check_symlink_target(target: bytes, max_len: int = SYMLINK_MAX) -> None:
    """symlink(2)'s checks of the target: ENOENT if empty, ENAMETOOLONG if longer
    than `max_len`."""
    if not target:
        raise _error(errno.ENOENT, "empty symlink target")
    if len(target) > max_len:
        raise _error(errno.ENAMETOOLONG,
                     f"a symlink target of {len(target)} bytes (at most {max_len})")


__all__ = [
    "CLAMP_TIMES", "NFS3_TIMES", "NFS3_TIME_MAX", "NFS3_TIME_MIN", "SYMLINK_MAX", "Caller",
    "Inode", "TimeArg", "TimeLimits", "Times", "Utime", "check_name", "check_size",
    "check_symlink_target", "chmod", "chown", "fit_time", "killed_privs", "permitted",
    "times_from_kernel", "truncate", "utimens", "write_count",
]
