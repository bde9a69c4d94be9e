"""The model checker's operations: the same file-system calls on a wancache mount and on
an oracle (a plain local directory on the same machine), every result compared.

An op is a JSON-able dict ``{"op": KIND, ...}`` (see `Tree`: one `_KIND` method each).
`Executor.apply` runs one op on the mount, then on the oracle, and returns what differed:
return values, errno, bytes read, the stat fields that must match (`stat_view`), symlink
targets and directory listings; after a namespace op it also compares the paths the op
named and their parents.  Data written is ``random.Random(seed).randbytes(len)``, so a
log of ops replays exactly.  Paths are relative to each tree's root and every call is
made relative to a directory fd of that root, so a process that dropped its privileges
after opening the roots can still reach them.

Entry points: `random_workload` (a seeded random run, as root or as another user: the
soak harness), `OpGenerator` (its random ops; the model checker's bursts),
`compare_trees` (two whole trees), `UserWorker` (an `Executor` in a child process
running as another user), `replay`, `minimize` and `shrink_ops` (cut a failing op log
down to a minimal one), `time_snapshot` and `changed_times`.

Where a mount may differ from a local file system on purpose is decided in one place:
the section "Deliberate differences" below.  Nothing here imports pytest.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import json
import mmap
import os
import random
import stat
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- vocabulary

TOP = ("a", "b", "c", "d")
SUB = ("e", "f", "g")
POOL = (*TOP, *(f"{t}/{s}" for t in TOP for s in SUB))   # a small 2-level tree: names collide
MAX_SIZE = 256 * 1024      # data ops keep files at most this big ...
MAX_WRITE = 64 * 1024      # ... in writes of at most this much
MAX_HANDLES = 6

DATA_KINDS = frozenset({"open", "close", "pwrite", "write", "pread", "ftruncate",
                        "mmap_write", "copy_range", "fallocate", "fsync", "fstat"})
NAMESPACE_KINDS = frozenset({"create", "write_file", "read_file", "mkdir", "mknod",
                             "symlink", "link", "rename", "unlink", "rmdir", "chmod",
                             "chown", "utime", "stat", "listdir", "readlink"})
MUTATING = frozenset({"pwrite", "write", "ftruncate", "mmap_write", "copy_range",
                      "fallocate", "fsync", "create", "write_file", "mkdir", "mknod",
                      "symlink", "link", "rename", "unlink", "rmdir", "chmod", "chown",
                      "utime", "open", "close"})
RENAME_NOREPLACE = 1
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_MODES = (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
MODES = (0o644, 0o600, 0o755, 0o700, 0o000, 0o777, 0o4755, 0o2755, 0o2775, 0o1777, 0o6711)
IDS = (0, 1001, 1002, 65534)
SEC = 10**9
TIMES_NS = (0, 1, 1_700_000_000 * SEC + 123_456_789, 946_684_800 * SEC,
            (2**32 - 1) * SEC + 999_999_999,            # the last NFSv3 second (2106)
            -SEC, -(2**31) * SEC, 2**32 * SEC, 2**33 * SEC + 5)   # out of NFSv3's range


# The mount options of every mode the model checker runs in.
MOUNT_MODES = {"writeback": [], "writeback_delay0": ["writeback_delay=0"],
               "writeback_off": ["writeback=off"], "cache_off": ["cache=off"]}


# --------------------------------------------------------------------------- deliberate differences
#
# THE ORACLE'S EXPECTATIONS WHERE A MOUNT MAY DIFFER FROM A LOCAL FILE SYSTEM.
# These functions are the only place that says so; the lead decides, change them here.

SILLY_PREFIX = ".wancache-unlinked-"
NFS3_SECONDS_MAX = 2**32 - 1
NOT_SUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS})
OUT_OF_RANGE_ERRNOS = frozenset({errno.EINVAL, errno.EOVERFLOW, errno.ERANGE})


def hidden_on_mount(name: str) -> bool:
    """A name the mount may show that a local file system would not: an unlinked but
    still open file, renamed instead of removed (README, "Unlinking an open file")."""
    return name.startswith(SILLY_PREFIX)


def in_nfs3_time_range(ns: int) -> bool:
    """NFSv3 times are unsigned 32-bit seconds: 1970 .. 2106-02-07."""
    return 0 <= ns // SEC <= NFS3_SECONDS_MAX


def nfs3_stored_time(ns: int) -> int:
    """The time a file system with NFSv3's range stores when asked for `ns`: what the
    kernel's `timestamp_truncate` does with the limits the Linux NFS client gives an
    NFSv3 super block (0 .. U32_MAX seconds): seconds clamped into the range, and
    nanoseconds 0 when the seconds are at either end.  The mount does the same
    (`cache/posix.py` `fit_time`, CLAMP_TIMES), e.g. 0.945 s is stored as 0 and
    2**32 s as 2**32-1 s; the oracle, on a local disk with a wider range, does not,
    so the oracle is asked for the stored time instead (a false alarm otherwise)."""
    sec = min(max(ns // SEC, 0), NFS3_SECONDS_MAX)
    return sec * SEC if sec in (0, NFS3_SECONDS_MAX) else ns


def oracle_op(op: dict[str, Any]) -> dict[str, Any]:
    """`op` as the oracle runs it once the mount accepted it: utimensat with the times
    NFSv3 stores (`nfs3_stored_time`)."""
    if op["op"] == "utime":
        return {**op, "atime_ns": nfs3_stored_time(op["atime_ns"]),
                "mtime_ns": nfs3_stored_time(op["mtime_ns"])}
    return op


def allowed_refusals(op: dict[str, Any]) -> frozenset[int]:
    """Errnos with which the mount may refuse `op` although a local file system accepts
    it.  Such a refusal is recorded in `Executor.notes` and the oracle is not asked.  A
    mount that accepts the op instead must then behave exactly like the oracle (and keep
    it on the server and across a crash).

    - fallocate, punch-hole and copy_file_range: only where the mount claims them;
    - utimensat with a time NFSv3 cannot carry (before 1970, after 2106): a refusal
      with EINVAL/EOVERFLOW/ERANGE is accepted (issue 13: acknowledge only what the
      server will accept).
    """
    kind = op["op"]
    if kind in ("fallocate", "copy_range"):
        return NOT_SUPPORTED
    if kind == "utime" and not (in_nfs3_time_range(op["atime_ns"])
                                and in_nfs3_time_range(op["mtime_ns"])):
        return OUT_OF_RANGE_ERRNOS
    return frozenset()


# --------------------------------------------------------------------------- helpers


def payload(seed: int, n: int) -> bytes:
    """The bytes a write op with this seed writes."""
    return random.Random(seed).randbytes(n)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def renameat2(src_dir: int, src: str, dst_dir: int, dst: str, flags: int) -> None:
    _check(_libc.renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), flags),
           "renameat2")


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    """fallocate(2) itself: glibc's posix_fallocate would emulate it by writing."""
    _check(_libc.fallocate(fd, mode, off, length), "fallocate")


def stat_view(st: os.stat_result, *, owners: bool = True) -> dict[str, int]:
    """The stat fields a mount must show exactly as a local file system does."""
    fmt = stat.S_IFMT(st.st_mode)
    view = {"type": fmt, "mode": stat.S_IMODE(st.st_mode), "nlink": st.st_nlink}
    if fmt != stat.S_IFDIR:
        view["size"] = st.st_size
    if owners:
        view["uid"], view["gid"] = st.st_uid, st.st_gid
    if fmt in (stat.S_IFCHR, stat.S_IFBLK):
        view["rdev"] = st.st_rdev
    return view


def _kind(st: os.stat_result) -> str:
    return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "link",
            stat.S_IFIFO: "fifo", stat.S_IFCHR: "chr", stat.S_IFBLK: "blk",
            stat.S_IFSOCK: "sock"}.get(stat.S_IFMT(st.st_mode), "?")


def bytes_diff(got: bytes, want: bytes, base: int = 0) -> str:
    """Where two byte strings first differ, in the style of fsx."""
    n = min(len(got), len(want))
    i = next((k for k in range(n) if got[k] != want[k]), n)
    return (f"first difference at {base + i:#x} (+{i:#x}): mount {got[i:i + 8].hex() or '-'} "
            f"oracle {want[i:i + 8].hex() or '-'}; lengths mount {len(got):#x} "
            f"oracle {len(want):#x}")


def _short(op: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:#x}" if isinstance(v, int) and k in ("off", "len", "size",
                                                                   "off_in", "off_out")
                    else f"{k}={v}" for k, v in op.items() if k != "op")


def describe(op: dict[str, Any]) -> str:
    """One line per op, as in the report's failing sequences."""
    target = op.get("target", "")
    if isinstance(target, str) and len(target) > 40:
        op = {**op, "target": f"<{len(target)} bytes>"}
    return f"{op['op']} {_short(op)}"


# --------------------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    """What one call returned on one tree: a value, or an errno."""

    err: int | None = None
    value: Any = None

    def __str__(self) -> str:
        if self.err is not None:
            return errno.errorcode.get(self.err, str(self.err))
        if isinstance(self.value, bytes):
            return f"{len(self.value):#x} bytes"
        return repr(self.value)


@dataclass
class Mismatch:
    """One difference between the mount and the oracle."""

    step: int
    op: dict[str, Any]
    what: str          # a short category: "pread: data", "rename: errno", "tree", ...
    detail: str

    def __str__(self) -> str:
        return f"step {self.step}: {describe(self.op)}: {self.what}: {self.detail}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mismatch:
        return cls(**d)


class Skip(Exception):
    """This op is not run on this tree (e.g. it would open a FIFO and block)."""


# --------------------------------------------------------------------------- one tree


class Tree:
    """One tree (the mount or the oracle) behind a directory fd, and its open handles."""

    def __init__(self, root_fd: int, label: str) -> None:
        self.root = root_fd
        self.label = label
        self.fds: dict[int, int] = {}

    def run(self, op: dict[str, Any]) -> Outcome:
        method: Callable[[dict[str, Any]], Any] = getattr(self, "_" + op["op"])
        try:
            return Outcome(value=method(op))
        except OSError as exc:
            return Outcome(err=exc.errno if exc.errno is not None else -1)
        except Skip:
            return Outcome(value="not opened: a FIFO or device here")

    def lstat(self, path: str) -> os.stat_result | None:
        try:
            return os.stat(path, dir_fd=self.root, follow_symlinks=False)
        except OSError:
            return None

    def kind(self, path: str, *, follow: bool = False) -> str | None:
        try:
            return _kind(os.stat(path, dir_fd=self.root, follow_symlinks=follow))
        except OSError:
            return None

    def fd(self, op: dict[str, Any], key: str = "h") -> int:
        try:
            return self.fds[op[key]]
        except KeyError:
            raise OSError(errno.EBADF, "no such handle") from None

    def close_all(self) -> dict[int, Outcome]:
        done = {}
        for h in list(self.fds):
            done[h] = self.run({"op": "close", "h": h})
        return done

    # -- handles and data ----------------------------------------------------------------

    def _open(self, op: dict[str, Any]) -> None:
        if op["h"] in self.fds:
            raise OSError(errno.EBADF, "handle in use")
        self._guard_special(op["path"])
        self.fds[op["h"]] = os.open(op["path"], op["flags"], op.get("mode", 0o644),
                                    dir_fd=self.root)

    def _close(self, op: dict[str, Any]) -> None:
        fd = self.fd(op)
        del self.fds[op["h"]]
        os.close(fd)

    def _pwrite(self, op: dict[str, Any]) -> int:
        return os.pwrite(self.fd(op), payload(op["seed"], op["len"]), op["off"])

    def _write(self, op: dict[str, Any]) -> int:
        return os.write(self.fd(op), payload(op["seed"], op["len"]))

    def _pread(self, op: dict[str, Any]) -> bytes:
        return os.pread(self.fd(op), op["len"], op["off"])

    def _ftruncate(self, op: dict[str, Any]) -> None:
        os.ftruncate(self.fd(op), op["size"])

    def _mmap_write(self, op: dict[str, Any]) -> str:
        fd = self.fd(op)
        size = os.fstat(fd).st_size
        end = op["off"] + op["len"]
        if op["len"] <= 0 or end > size:
            return "beyond end of file"
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            mm[op["off"]:end] = payload(op["seed"], op["len"])
            mm.flush()          # msync(MS_SYNC)
        return "written"

    def _copy_range(self, op: dict[str, Any]) -> int:
        return os.copy_file_range(self.fd(op, "src"), self.fd(op, "dst"), op["len"],
                                  op["off_in"], op["off_out"])

    def _fallocate(self, op: dict[str, Any]) -> None:
        fallocate(self.fd(op), op["mode"], op["off"], op["len"])

    def _fsync(self, op: dict[str, Any]) -> None:
        os.fsync(self.fd(op))

    def _fstat(self, op: dict[str, Any]) -> dict[str, int]:
        return stat_view(os.fstat(self.fd(op)))

    # -- namespace ----------------------------------------------------------------------

    def special(self, path: str) -> bool:
        """Whether opening `path` would open a FIFO (it blocks) or a device."""
        return self.kind(path, follow=True) in ("fifo", "chr", "blk", "sock")

    def _guard_special(self, path: str) -> None:
        if self.special(path):
            raise Skip(path)

    def _create(self, op: dict[str, Any]) -> None:
        os.close(os.open(op["path"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, op["mode"],
                         dir_fd=self.root))

    def _write_file(self, op: dict[str, Any]) -> int:
        self._guard_special(op["path"])
        fd = os.open(op["path"], os.O_WRONLY | os.O_CREAT | op["flags"], op.get("mode", 0o644),
                     dir_fd=self.root)
        try:
            return os.write(fd, payload(op["seed"], op["len"]))
        finally:
            os.close(fd)

    def _read_file(self, op: dict[str, Any]) -> bytes:
        self._guard_special(op["path"])
        fd = os.open(op["path"], os.O_RDONLY, dir_fd=self.root)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _mkdir(self, op: dict[str, Any]) -> None:
        os.mkdir(op["path"], op["mode"], dir_fd=self.root)

    def _mknod(self, op: dict[str, Any]) -> None:
        fmt = stat.S_IFIFO if op["kind"] == "fifo" else stat.S_IFCHR
        os.mknod(op["path"], fmt | op["mode"], op.get("rdev", 0), dir_fd=self.root)

    def _symlink(self, op: dict[str, Any]) -> None:
        os.symlink(op["target"], op["path"], dir_fd=self.root)

    def _link(self, op: dict[str, Any]) -> None:
        os.link(op["src"], op["dst"], src_dir_fd=self.root, dst_dir_fd=self.root,
                follow_symlinks=False)

    def _rename(self, op: dict[str, Any]) -> None:
        if op.get("flags", 0):
            renameat2(self.root, op["src"], self.root, op["dst"], op["flags"])
        else:
            os.rename(op["src"], op["dst"], src_dir_fd=self.root, dst_dir_fd=self.root)

    def _unlink(self, op: dict[str, Any]) -> None:
        os.unlink(op["path"], dir_fd=self.root)

    def _rmdir(self, op: dict[str, Any]) -> None:
        os.rmdir(op["path"], dir_fd=self.root)

    def _chmod(self, op: dict[str, Any]) -> None:
        os.chmod(op["path"], op["mode"], dir_fd=self.root)

    def _chown(self, op: dict[str, Any]) -> None:
        os.chown(op["path"], op["uid"], op["gid"], dir_fd=self.root, follow_symlinks=False)

    def _utime(self, op: dict[str, Any]) -> tuple[int, int]:
        os.utime(op["path"], ns=(op["atime_ns"], op["mtime_ns"]), dir_fd=self.root,
                 follow_symlinks=False)
        st = os.stat(op["path"], dir_fd=self.root, follow_symlinks=False)
        return st.st_atime_ns, st.st_mtime_ns

    def _stat(self, op: dict[str, Any]) -> dict[str, int]:
        return stat_view(os.stat(op["path"], dir_fd=self.root, follow_symlinks=False))

    def _listdir(self, op: dict[str, Any]) -> list[str]:
        fd = os.open(op["path"], os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.root)
        try:
            names = os.listdir(fd)
        finally:
            os.close(fd)
        return sorted(n for n in names if not (self.label == "mount" and hidden_on_mount(n)))

    def _readlink(self, op: dict[str, Any]) -> str:
        return os.readlink(op["path"], dir_fd=self.root)


# --------------------------------------------------------------------------- both trees


def _op_paths(op: dict[str, Any]) -> list[str]:
    """The paths a namespace op names, with their parents (checked after it)."""
    paths = [op[k] for k in ("path", "src", "dst") if k in op and isinstance(op[k], str)]
    out: list[str] = []
    for p in paths:
        for q in (p, os.path.dirname(p) or "."):
            if q not in out:
                out.append(q)
    return out


@dataclass
class Executor:
    """Applies ops to the mount and to the oracle and compares what they do."""

    mount: Tree
    oracle: Tree
    step: int = 0
    notes: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    acknowledged: list[dict[str, Any]] = field(default_factory=list)
    keep_log: bool = True

    @classmethod
    def open(cls, mount_dir: Path | str, oracle_dir: Path | str) -> Executor:
        flags = os.O_RDONLY | os.O_DIRECTORY
        return cls(Tree(os.open(mount_dir, flags), "mount"), Tree(os.open(oracle_dir, flags),
                                                                  "oracle"))

    def close(self) -> list[Mismatch]:
        """Close every handle on both trees (compared), then the roots."""
        found = self.close_handles()
        self.release()
        return found

    def close_handles(self) -> list[Mismatch]:
        found = []
        for h in sorted(set(self.mount.fds) | set(self.oracle.fds)):
            found += self.apply({"op": "close", "h": h})
        return found

    def forget_handles(self) -> None:
        """The mount died: its fds are gone; close the oracle's without comparing."""
        for tree in (self.mount, self.oracle):
            for fd in tree.fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            tree.fds.clear()

    def release(self) -> None:
        """Close every fd, handles and roots, comparing nothing (again: nothing)."""
        self.forget_handles()
        for tree in (self.mount, self.oracle):
            if tree.root >= 0:
                with contextlib.suppress(OSError):
                    os.close(tree.root)
                tree.root = -1

    # -- one op ---------------------------------------------------------------------------

    def apply(self, op: dict[str, Any]) -> list[Mismatch]:
        """Run `op` on the mount, then on the oracle; what differed."""
        self.step += 1
        kind = op["op"]
        if self._blocked_by_silly_name(op):
            self.notes[f"{kind}: skipped, target directory holds an unlinked open file"] += 1
            return []
        if kind in ("open", "read_file", "write_file") and self.oracle.special(op["path"]):
            self.notes[f"{kind}: skipped, a FIFO or device"] += 1
            return []
        symlink_times = kind == "utime" and self.mount.kind(op["path"]) == "link"
        got = self.mount.run(op)
        if symlink_times and got.err is None:
            # nfs-ganesha answers OK and keeps a symlink's old times (README: what the
            # server cannot do; tests/test_64_found.py): not compared.
            self.oracle.run(oracle_op(op))
            self.notes["utime: of a symlink (the server keeps no symlink times)"] += 1
            return []
        if got.err == errno.EINVAL and kind in ("chown", "chmod") and \
                self.mount.kind(op["path"], follow=True) in ("chr", "blk"):
            # nfs-ganesha refuses (NFS3ERR_INVAL) a SETATTR of a device node whose first
            # name was removed while another link remains (README: what the server
            # cannot do)
            self.notes[f"{kind}: the server refused it on a device node (EINVAL)"] += 1
            return []
        if got.err is not None and got.err in allowed_refusals(op):
            self.notes[f"{kind}: mount refused with {errno.errorcode[got.err]}"
                       + (f" ({self._why(op)})" if kind == "utime" else "")] += 1
            return []
        want = self.oracle.run(oracle_op(op) if got.err is None else op)
        self.counts["data" if kind in DATA_KINDS else "namespace"] += 1
        if kind == "utime" and got.err is None:
            self.notes[f"utime: mount accepted ({self._why(op)})"] += 1
        found = self._compare(op, got, want)
        if kind == "open" and (got.err is None) != (want.err is None):
            for tree in (self.mount, self.oracle):      # keep the handle tables equal
                if op["h"] in tree.fds:
                    tree.run({"op": "close", "h": op["h"]})
        if got.err is None and kind in MUTATING and self.keep_log:
            self.acknowledged.append(op)
        if got.err is None and want.err is None:
            found += self._after(op)
        return found

    @staticmethod
    def _why(op: dict[str, Any]) -> str:
        ok = in_nfs3_time_range(op["atime_ns"]) and in_nfs3_time_range(op["mtime_ns"])
        return "times within NFSv3's range" if ok else "a time outside NFSv3's range"

    def _blocked_by_silly_name(self, op: dict[str, Any]) -> bool:
        """rmdir of (or a rename over) a directory that holds hidden unlinked-open files
        on the mount answers ENOTEMPTY there, as on NFS, where a local file system may
        succeed: such ops are skipped (and counted in `notes`)."""
        kind = op["op"]
        target = op.get("path") if kind == "rmdir" else op.get("dst") if kind == "rename" \
            else None
        if target is None or self.mount.kind(target) != "dir":
            return False
        try:
            fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.mount.root)
            try:
                names = os.listdir(fd)
            finally:
                os.close(fd)
        except OSError:
            return False
        return any(hidden_on_mount(n) for n in names)

    def _compare(self, op: dict[str, Any], got: Outcome, want: Outcome) -> list[Mismatch]:
        kind = op["op"]
        if got.err != want.err:
            return [Mismatch(self.step, op, f"{kind}: errno", f"mount {got}, oracle {want}")]
        if got.err is not None or got.value == want.value:
            return []
        if isinstance(got.value, bytes) and isinstance(want.value, bytes):
            detail = bytes_diff(got.value, want.value, op.get("off", 0))
            return [Mismatch(self.step, op, f"{kind}: data", detail)]
        if isinstance(got.value, dict) and isinstance(want.value, dict):
            fields = sorted(k for k in set(got.value) | set(want.value)
                            if got.value.get(k) != want.value.get(k))
            detail = ", ".join(f"{k} mount {_fmt(k, got.value.get(k))} oracle "
                               f"{_fmt(k, want.value.get(k))}" for k in fields)
            return [Mismatch(self.step, op, f"{kind}: {'/'.join(fields)}", detail)]
        if isinstance(got.value, list) and isinstance(want.value, list):
            extra = sorted(set(got.value) - set(want.value))
            missing = sorted(set(want.value) - set(got.value))
            return [Mismatch(self.step, op, f"{kind}: names",
                             f"only on the mount {extra}, only in the oracle {missing}")]
        return [Mismatch(self.step, op, f"{kind}: value", f"mount {got}, oracle {want}")]

    def _after(self, op: dict[str, Any]) -> list[Mismatch]:
        """Checks after an op both trees accepted."""
        kind = op["op"]
        found: list[Mismatch] = []
        if kind in ("ftruncate", "write", "copy_range", "fallocate", "mmap_write"):
            found += self._compare_one({"op": "fstat", "h": op.get("h", op.get("dst"))},
                                       f"fstat after {kind}")
        if kind in NAMESPACE_KINDS and kind in MUTATING:
            for p in _op_paths(op):
                found += self._compare_one({"op": "stat", "path": p}, f"stat after {kind}")
                if self.oracle.kind(p) == "link":
                    found += self._compare_one({"op": "readlink", "path": p},
                                               f"target after {kind}")
        return found

    def _compare_one(self, probe: dict[str, Any], why: str) -> list[Mismatch]:
        got, want = self.mount.run(probe), self.oracle.run(probe)
        where = f"{probe['path']}: " if "path" in probe else ""
        return [Mismatch(m.step, m.op, f"{why}: {m.what.split(': ', 1)[1]}", where + m.detail)
                for m in self._compare(probe, got, want)]


def _fmt(key: str, v: int | None) -> str:
    if v is None:
        return "-"
    if key == "mode":
        return f"{v:#o}"
    if key == "type":
        return stat.filemode(v)[0] if v else "?"
    return f"{v:#x}" if key == "size" else str(v)


# --------------------------------------------------------------------------- random ops


class OpGenerator:
    """Random ops over `POOL`, biased towards what exists in the oracle, on open handles.

    `namespace_share` of the ops are namespace ops; the rest are data ops on files up
    to `max_size` bytes through up to MAX_HANDLES open handles.  As a non-root user
    (`owner`), chown mostly targets the user's own ids."""

    def __init__(self, rng: random.Random, executor: Executor, *, namespace_share: float = 1 / 6,
                 max_size: int = MAX_SIZE, owner: tuple[int, int] | None = None,
                 exclude: frozenset[str] = frozenset()) -> None:
        self.rng = rng
        self.exclude = exclude
        self.ex = executor
        self.namespace_share = namespace_share
        self.max_size = max_size
        self.owner = owner
        self.next_handle = 1

    def next(self) -> dict[str, Any]:
        """The next op (never one of the kinds in `exclude`)."""
        while True:
            op = self._next()
            if op["op"] not in self.exclude:
                return op

    def _next(self) -> dict[str, Any]:
        r = self.rng.random()
        handles = sorted(self.ex.oracle.fds)
        if not handles or (len(handles) < MAX_HANDLES and r < 0.03):
            return self.open_op()
        if r < self.namespace_share:
            return self.namespace_op()
        return self.data_op(self.rng.choice(handles))

    def path(self, want: str | None = None) -> str:
        """A pool path; with `want`, preferably one that is that kind in the oracle."""
        if want is not None:
            match = [p for p in POOL if self.ex.oracle.kind(p) == want]
            if match and self.rng.random() < 0.8:
                return self.rng.choice(match)
        return self.rng.choice(POOL)

    def open_op(self) -> dict[str, Any]:
        rng = self.rng
        h, self.next_handle = self.next_handle, self.next_handle + 1
        access = rng.choice((os.O_RDWR,) * 6 + (os.O_RDONLY, os.O_WRONLY))
        extra = rng.choice((os.O_CREAT,) * 4 + (0, os.O_APPEND | os.O_CREAT,
                                                 os.O_CREAT | os.O_TRUNC,
                                                 os.O_CREAT | os.O_EXCL))
        return {"op": "open", "h": h, "path": self.path("file"), "flags": access | extra,
                "mode": rng.choice((0o644, 0o600, 0o666, 0o000))}

    def data_op(self, h: int) -> dict[str, Any]:
        rng, size = self.rng, self.max_size
        r = rng.random()
        seed = rng.getrandbits(32)
        off = rng.randrange(size)
        length = max(1, min(rng.randrange(1, MAX_WRITE), size - off))
        if r < 0.34:
            return {"op": "pwrite", "h": h, "off": off, "len": length, "seed": seed}
        if r < 0.62:
            return {"op": "pread", "h": h, "off": off, "len": rng.randrange(1, MAX_WRITE)}
        if r < 0.76:
            return {"op": "ftruncate", "h": h, "size": rng.randrange(size)}
        if r < 0.80:
            return {"op": "write", "h": h, "len": rng.randrange(1, 4096), "seed": seed}
        if r < 0.84:
            return {"op": "mmap_write", "h": h, "off": rng.randrange(size // 4),
                    "len": rng.randrange(1, 8192), "seed": seed}
        if r < 0.88:
            handles = sorted(self.ex.oracle.fds)
            return {"op": "copy_range", "src": rng.choice(handles), "dst": h,
                    "off_in": rng.randrange(size), "off_out": off, "len": length}
        if r < 0.92:
            return {"op": "fallocate", "h": h, "mode": rng.choice(FALLOC_MODES), "off": off,
                    "len": length}
        if r < 0.94:
            return {"op": "fsync", "h": h}
        if r < 0.97:
            return {"op": "fstat", "h": h}
        return {"op": "close", "h": h}

    def namespace_op(self) -> dict[str, Any]:
        rng = self.rng
        kind = rng.choice(("create", "write_file", "write_file", "read_file", "mkdir", "mkdir",
                           "mknod", "symlink", "link", "rename", "rename", "unlink", "rmdir",
                           "chmod", "chown", "utime", "stat", "listdir", "readlink"))
        mode = rng.choice(MODES)
        if kind == "create":
            return {"op": kind, "path": self.path(), "mode": mode}
        if kind == "write_file":
            return {"op": kind, "path": self.path("file"), "len": rng.randrange(0, 20000),
                    "seed": rng.getrandbits(32), "mode": rng.choice((0o644, 0o600)),
                    "flags": rng.choice((os.O_TRUNC, os.O_APPEND, 0))}
        if kind in ("read_file", "readlink", "stat", "unlink"):
            want = {"read_file": "file", "readlink": "link", "stat": None,
                    "unlink": "file"}[kind]
            return {"op": kind, "path": self.path(want)}
        if kind == "mkdir":
            return {"op": kind, "path": self.path(), "mode": mode}
        if kind in ("rmdir", "listdir"):
            return {"op": kind, "path": self.path("dir")}
        if kind == "mknod":
            return {"op": kind, "path": self.path(), "mode": rng.choice((0o644, 0o600, 0o666)),
                    "kind": rng.choice(("fifo", "chr")),
                    "rdev": os.makedev(rng.randrange(1, 300), rng.randrange(256))}
        if kind == "symlink":
            return {"op": kind, "path": self.path(), "target": self.link_target()}
        if kind == "link":
            return {"op": kind, "src": self.path("file"), "dst": self.path()}
        if kind == "rename":
            return {"op": kind, "src": self.path(rng.choice(("file", "dir", None))),
                    "dst": self.path(rng.choice(("file", "dir", None))),
                    "flags": rng.choice((0, 0, RENAME_NOREPLACE))}
        if kind == "chmod":
            return {"op": kind, "path": self.path(), "mode": mode}
        if kind == "chown":
            uid, gid = rng.choice(IDS), rng.choice(IDS)
            if self.owner is not None and rng.random() < 0.7:
                uid = rng.choice((self.owner[0], -1))
                gid = rng.choice((self.owner[1], -1, 1002))
            return {"op": kind, "path": self.path(), "uid": uid, "gid": gid}
        return {"op": "utime", "path": self.path(), "atime_ns": rng.choice(TIMES_NS),
                "mtime_ns": rng.choice(TIMES_NS) + rng.randrange(SEC)}

    def link_target(self) -> str:
        """A symlink target: a pool path (resolves, maybe), or 2-4 KB long (never does).
        Never absolute and never '..': a link must resolve alike in both trees."""
        if self.rng.random() < 0.3:
            parts = ["nowhere"]
            while len("/".join(parts)) < self.rng.randrange(2048, 4000):
                parts.append("x" * self.rng.randrange(1, 200))
            return "/".join(parts)[:4000]
        return self.rng.choice(POOL)


# --------------------------------------------------------------------------- runs


@dataclass
class WorkloadResult:
    """What `random_workload` did: ops applied, what differed, what the mount acknowledged
    (every op that changed state and returned success there, in order)."""

    ops: int
    mismatches: list[Mismatch]
    acknowledged: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "mismatches": [asdict(m) for m in self.mismatches]})

    @classmethod
    def from_json(cls, text: str) -> WorkloadResult:
        d = json.loads(text)
        d["mismatches"] = [Mismatch.from_dict(m) for m in d["mismatches"]]
        return cls(**d)


def random_workload(mount_dir: Path, oracle_dir: Path, *, seed: int, ops: int | None = None,
                    seconds: float | None = None, user: tuple[int, int] | None = None,
                    namespace_share: float = 1 / 6, max_mismatches: int = 1,
                    max_size: int = MAX_SIZE, exclude: frozenset[str] = frozenset(),
                    ignore: Callable[[Mismatch], bool] | None = None) -> WorkloadResult:
    """Apply random ops (`ops` of them, or for `seconds`) to `mount_dir` and `oracle_dir`
    (as `user` = (uid, gid) if given: the run then happens in a child process that
    drops to that user after opening both roots), comparing every result.  Stops after
    `max_mismatches` differences: after one, the trees may disagree on everything.
    `exclude`: op kinds not to generate, `ignore`: mismatches only counted in the notes
    (both to look past a known bug)."""
    if ops is None and seconds is None:
        raise ValueError("give ops or seconds")

    def run() -> WorkloadResult:
        ex = Executor.open(mount_dir, oracle_dir)
        gen = OpGenerator(random.Random(seed), ex, namespace_share=namespace_share,
                          max_size=max_size, owner=user, exclude=exclude)
        found: list[Mismatch] = []
        log: list[dict[str, Any]] = []
        deadline = time.monotonic() + seconds if seconds is not None else None
        n = 0
        while (ops is None or n < ops) and (deadline is None or time.monotonic() < deadline) \
                and len(found) < max_mismatches:
            op = gen.next()
            log.append(op)
            for m in ex.apply(op):
                if ignore is not None and ignore(m):
                    ex.notes[f"ignored: {m.what}"] += 1
                else:
                    found.append(m)
            n += 1
        found += ex.close()
        return WorkloadResult(n, found, ex.acknowledged, dict(ex.counts), dict(ex.notes), log)

    if user is None:
        return run()
    return WorkloadResult.from_json(_as_user(user, lambda: run().to_json()))


def replay(mount_dir: Path, oracle_dir: Path, ops: list[dict[str, Any]],
           *, stop_at_first: bool = True, user: tuple[int, int] | None = None
           ) -> list[Mismatch]:
    """Apply a logged op sequence as fast as it goes (as `user` if given); what
    differed."""
    def run() -> list[Mismatch]:
        ex = Executor.open(mount_dir, oracle_dir)
        found: list[Mismatch] = []
        for op in ops:
            found += ex.apply(op)
            if found and stop_at_first:
                break
        return found + ex.close()

    if user is None:
        return run()
    text = _as_user(user, lambda: json.dumps([asdict(m) for m in run()]))
    return [Mismatch.from_dict(m) for m in json.loads(text)]


_fresh = itertools.count()


def minimize(mount_parent: Path, oracle_parent: Path, ops: list[dict[str, Any]], what: str,
             *, tries: int = 2, budget: int = 300, user: tuple[int, int] | None = None
             ) -> list[dict[str, Any]]:
    """The shortest op list found (`shrink_ops`) that still fails with a mismatch of
    category `what`; each attempt replays on new directories below the two parents, up
    to `tries` times (a race may need more than one)."""
    def fails(candidate: list[dict[str, Any]]) -> bool:
        for _ in range(tries):
            n = next(_fresh)
            roots = [Path(parent) / f"shrink-{os.getpid()}-{n}"
                     for parent in (mount_parent, oracle_parent)]
            for root in roots:
                root.mkdir()
                root.chmod(0o777)
                if user is not None:
                    os.chown(root, *user)
            if any(m.what == what for m in replay(roots[0], roots[1], candidate, user=user)):
                return True
        return False

    return shrink_ops(ops, fails, budget=budget)


def shrink_ops(ops: list[dict[str, Any]], fails: Callable[[list[dict[str, Any]]], bool],
               *, budget: int = 200) -> list[dict[str, Any]]:
    """Delta debugging (ddmin): a shorter op list for which `fails` still holds; at
    most `budget` calls of `fails`."""
    n = 2
    calls = 0
    while len(ops) >= 2 and calls < budget:
        chunk = max(1, len(ops) // n)
        for start in range(0, len(ops), chunk):
            candidate = ops[:start] + ops[start + chunk:]
            calls += 1
            if candidate and fails(candidate):
                ops, n = candidate, max(n - 1, 2)
                break
            if calls >= budget:
                break
        else:
            if chunk == 1:
                break
            n = min(len(ops), n * 2)
    return ops


# --------------------------------------------------------------------------- other users


def drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _as_user(user: tuple[int, int], fn: Callable[[], str]) -> str:
    """Run `fn` in a child process as `user`; its text result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: never returns
        code = 1
        try:
            os.close(r)
            drop_privileges(*user)
            data = fn().encode()
            with os.fdopen(w, "wb") as out:
                out.write(data)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not data:
        raise RuntimeError(f"the workload as user {user} failed (status {status:#x})")
    return data.decode()


def _send(fd: int, obj: Any) -> None:
    data = json.dumps(obj).encode()
    os.write(fd, struct.pack("!I", len(data)) + data)


def _recv(fd: int) -> Any:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise EOFError("worker gone")
            buf += chunk
        return buf
    (n,) = struct.unpack("!I", exactly(4))
    return json.loads(exactly(n))


class UserWorker:
    """An `Executor` in a child process that runs as another user (uid, gid, no
    supplementary groups): it opens both roots as root, then drops its privileges."""

    def __init__(self, mount_dir: Path, oracle_dir: Path, uid: int, gid: int) -> None:
        self.user = (uid, gid)
        to_child, self._to = os.pipe()
        self._from, from_child = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.close(self._to)
                os.close(self._from)
                ex = Executor.open(mount_dir, oracle_dir)
                drop_privileges(uid, gid)
                self._serve(ex, to_child, from_child)
                code = 0
            finally:
                os._exit(code)
        os.close(to_child)
        os.close(from_child)

    @staticmethod
    def _serve(ex: Executor, inp: int, out: int) -> None:
        ex.keep_log = False
        while True:
            try:
                msg = _recv(inp)
            except EOFError:
                return
            if msg is None:
                _send(out, [asdict(m) for m in ex.close()])
                return
            if msg == "forget":
                ex.forget_handles()
                _send(out, [])
                continue
            _send(out, [asdict(m) for m in ex.apply(msg)])

    def apply(self, op: dict[str, Any]) -> list[Mismatch]:
        _send(self._to, op)
        return [Mismatch.from_dict(m) for m in _recv(self._from)]

    def stop(self, *, compare: bool = True) -> list[Mismatch]:
        """Close its handles (compared unless the mount died) and end the child."""
        found: list[Mismatch] = []
        with contextlib.suppress(OSError, EOFError):
            if not compare:
                _send(self._to, "forget")
                _recv(self._from)
            _send(self._to, None)
            found = [Mismatch.from_dict(m) for m in _recv(self._from)]
        for fd in (self._to, self._from):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        return found


# --------------------------------------------------------------------------- whole trees


def _walk(root: Path, ignore: Callable[[str], bool] | None) -> Iterator[str]:
    """Relative paths below `root` (not following symlinks), parents first."""
    stack = [""]
    while stack:
        rel = stack.pop()
        names = sorted(os.listdir(root / rel) if rel else os.listdir(root))
        for name in names:
            if ignore is not None and ignore(name):
                continue
            sub = f"{rel}/{name}" if rel else name
            yield sub
            if stat.S_ISDIR(os.lstat(root / sub).st_mode):
                stack.append(sub)


def _same_contents(a: Path, b: Path) -> str | None:
    with a.open("rb") as fa, b.open("rb") as fb:
        off = 0
        while True:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if ca != cb:
                return bytes_diff(ca, cb, off).replace("mount", "a").replace("oracle", "b")
            if not ca:
                return None
            off += len(ca)


def compare_trees(a: Path, b: Path, *, owners: bool = True,
                  ignore: Callable[[str], bool] | None = None) -> list[str]:
    """Every difference between two trees: names, types, modes, owners (if `owners`),
    sizes, nlink, device numbers, symlink targets and file contents.  Names for which
    `ignore` holds are skipped in both."""
    a, b = Path(a), Path(b)
    diffs: list[str] = []
    try:
        names_a, names_b = set(_walk(a, ignore)), set(_walk(b, ignore))
    except OSError as exc:
        return [f"cannot walk: {exc}"]
    diffs += [f"{p}: only in {a}" for p in sorted(names_a - names_b)]
    diffs += [f"{p}: only in {b}" for p in sorted(names_b - names_a)]
    for p in ["", *sorted(names_a & names_b)]:
        try:
            sa, sb = os.lstat(a / p), os.lstat(b / p)
        except OSError as exc:
            diffs.append(f"{p or '.'}: {exc}")
            continue
        va, vb = stat_view(sa, owners=owners), stat_view(sb, owners=owners)
        if va != vb:
            diffs.append(f"{p or '.'}: " + ", ".join(
                f"{k} {_fmt(k, va.get(k))} != {_fmt(k, vb.get(k))}"
                for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)))
            continue
        if stat.S_ISLNK(sa.st_mode) and os.readlink(a / p) != os.readlink(b / p):
            diffs.append(f"{p}: symlink targets differ")
        elif stat.S_ISREG(sa.st_mode):
            try:
                why = _same_contents(a / p, b / p)
            except OSError as exc:
                why = str(exc)
            if why:
                diffs.append(f"{p}: contents: {why}")
    return diffs


def hidden_paths(root: Path) -> set[str]:
    """The hidden names of unlinked open files below `root` (relative paths)."""
    return {p for p in _walk(Path(root), None)
            if os.path.basename(p).startswith(SILLY_PREFIX)}


def time_snapshot(root: Path, *, ignore: Callable[[str], bool] | None = hidden_on_mount,
                  dirs: bool = True) -> dict[str, tuple[int, int]]:
    """(mtime_ns, ctime_ns) of every entry below `root` but symlinks (and directories
    unless `dirs`)."""
    out = {}
    for p in ["", *_walk(Path(root), ignore)]:
        with contextlib.suppress(OSError):
            st = os.lstat(Path(root) / p)
            if stat.S_ISLNK(st.st_mode):     # the server keeps no symlink times
                continue
            if dirs or not stat.S_ISDIR(st.st_mode):
                out[p or "."] = (st.st_mtime_ns, st.st_ctime_ns)
    return out


def changed_times(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]],
                  *, ctime: bool = True) -> list[str]:
    """Entries whose mtime (and ctime, if asked) changed between two snapshots."""
    out = []
    for p in sorted(set(before) & set(after)):
        (m0, c0), (m1, c1) = before[p], after[p]
        if m0 != m1:
            out.append(f"{p}: mtime {m0} -> {m1} ({(m1 - m0) / SEC:+.3f} s)")
        elif ctime and c0 != c1:
            out.append(f"{p}: ctime {c0} -> {c1} ({(c1 - c0) / SEC:+.3f} s)")
    return out
