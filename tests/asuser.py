"""Run a function as another local user, in a forked child, and bring back its outcome;
and the system calls the os module lacks (utimensat with UTIME_NOW/OMIT, statx).

The child sets its supplementary groups, then its real, effective and saved gid and
uid (dropping every capability when the uid is not 0), runs the function and sends
back either its return value or the errno of the OSError it raised.  Paths are best
given relative to a directory fd opened by the parent (it is inherited), so that the
caller's permissions are checked from that directory on, as in a shell started there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# utimensat(2) with per-field UTIME_NOW / UTIME_OMIT (os.utime cannot express them).
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def utimensat(dir_fd: int, name: str, atime: tuple[int, int] | None,
              mtime: tuple[int, int] | None, *, follow: bool = True) -> None:
    """utimensat(2); a time is (sec, nsec) (nsec may be UTIME_NOW or UTIME_OMIT);
    both None means times=NULL (touch)."""
    flags = 0 if follow else 0x100   # AT_SYMLINK_NOFOLLOW
    if atime is None and mtime is None:
        ts = None
    else:
        arr = (_Timespec * 2)()
        for i, t in enumerate((atime, mtime)):
            sec, nsec = t if t is not None else (0, UTIME_OMIT)
            arr[i] = _Timespec(sec, nsec)
        ts = arr
    if _libc.utimensat(dir_fd, name.encode(), ts, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)


AT_EMPTY_PATH = 0x1000
AT_STATX_FORCE_SYNC = 0x2000   # FUSE: ask the file system, not the kernel's attr cache
STATX_BASIC_STATS = 0x7FF


class _StatxTimestamp(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32),
                ("reserved", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    _fields_ = [("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32),
                ("attributes", ctypes.c_uint64), ("nlink", ctypes.c_uint32),
                ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32),
                ("mode", ctypes.c_uint16), ("spare0", ctypes.c_uint16),
                ("ino", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("blocks", ctypes.c_uint64), ("attributes_mask", ctypes.c_uint64),
                ("atime", _StatxTimestamp), ("btime", _StatxTimestamp),
                ("ctime", _StatxTimestamp), ("mtime", _StatxTimestamp),
                ("rest", ctypes.c_uint8 * 128)]


@dataclass(frozen=True)
class Stat:
    """What statx(2) says of a file (times in ns)."""

    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime: int
    mtime: int
    ctime: int


def statx(dir_fd: int, name: str = "", *, fresh: bool = True, follow: bool = False) -> Stat:
    """statx(2) of `name` in `dir_fd` (of `dir_fd` itself when name is ""); `fresh`:
    AT_STATX_FORCE_SYNC, so a FUSE mount is asked rather than the kernel's cache."""
    flags = (0 if follow else 0x100) | (AT_STATX_FORCE_SYNC if fresh else 0)
    if not name:
        flags |= AT_EMPTY_PATH
    buf = _Statx()
    if _libc.statx(dir_fd, name.encode(), flags, STATX_BASIC_STATS, ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)

    def ns(t: _StatxTimestamp) -> int:
        return int(t.tv_sec) * 1_000_000_000 + int(t.tv_nsec)

    return Stat(buf.mode, buf.nlink, buf.uid, buf.gid, buf.size, ns(buf.atime),
                ns(buf.mtime), ns(buf.ctime))


@dataclass(frozen=True)
class Who:
    """A caller: uid, primary gid and supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"uid={self.uid} gid={self.gid} groups={list(self.groups)}"


ROOT = Who(0, 0, ())


@dataclass(frozen=True)
class Outcome:
    """What the function did: errno 0 and its value, or the errno it failed with."""

    errno: int = 0
    value: Any = None


def run_as(who: Who, fn: Callable[[], Any], *, umask: int = 0) -> Outcome:
    """Run `fn()` as `who` in a forked child; its return value must pickle."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # pragma: no cover - the child
        os.close(r)
        try:
            try:
                os.umask(umask)
                os.setgroups(list(who.groups))
                os.setresgid(who.gid, who.gid, who.gid)
                os.setresuid(who.uid, who.uid, who.uid)
                out = Outcome(0, fn())
            except OSError as exc:
                out = Outcome(exc.errno or -1, None)
            data = pickle.dumps(out)
        except BaseException as exc:   # report anything to the parent
            data = pickle.dumps(Outcome(-1, repr(exc)))
        os.write(w, data)
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    out = pickle.loads(b"".join(chunks))
    assert isinstance(out, Outcome)
    if out.errno == -1:
        raise AssertionError(f"child failed: {out.value}")
    return out
