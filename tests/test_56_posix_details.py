"""POSIX details through a real wancache mount, each compared with a local directory.

Issue 13.4 and 13.5 list what an independent conformance suite flags, and 13.2 what
write-back acknowledges that the server later refuses.  Each test here runs the same
sequence of system calls, in a forked child as root or as uid 1001 (`tests.asuser`),
in a directory of the mount and in a directory on the local disk, and compares what
the two answer.  After the sequence the mount is flushed: the flush must succeed,
`lost+found` in its cache_dir must stay empty, and the server must hold what the
local directory holds.  Every test runs with write-back (the default) and with
`writeback=off`.

Attributes are read with statx(AT_STATX_FORCE_SYNC), so the kernel asks wancache
instead of answering from its attribute cache.  Timestamps are compared by whether
they moved, never by value: between two calls whose timestamps must differ the test
lets the clock tick (20 ms) - a sleep that only makes time pass, never one that waits
for something to happen.

These tests are the specification for the write-back rebuild: many fail today.
"""

from __future__ import annotations

import mmap
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.wcmount import WancacheMount
from tests.asuser import ROOT, UTIME_NOW, UTIME_OMIT, Outcome, Who, run_as, statx, utimensat
from tests.conftest import Export, MountFactory
from wancache.cache import posix

MODES = {"writeback": [], "writeback_off": ["writeback=off"]}
USER = Who(1001, 1001, (1001, 1003))
OTHER = Who(1002, 1002, (1002,))
CALLERS = {"root": ROOT, "uid1001": USER}
WORK = "w"
NS = 1_000_000_000


def tick() -> None:
    """Let the clock move past the kernel's timestamp granularity (a jiffy)."""
    time.sleep(0.02)


@dataclass
class Sides:
    """The working directory on the mount and its twin on the local disk."""

    m: WancacheMount
    export: Export
    mnt: int           # fd of the mount's working directory
    loc: int           # fd of the local working directory
    cache_dir: Path

    def each(self) -> dict[str, int]:
        return {"mount": self.mnt, "local": self.loc}

    def setup(self, fn: Callable[[int], object]) -> None:
        """Run `fn(dir_fd)` as root (in this process) on both sides."""
        for fd in self.each().values():
            fn(fd)

    def run(self, who: Who, fn: Callable[[int], Any]) -> tuple[Outcome, Outcome]:
        """`fn(dir_fd)` as `who` in a child, on the mount, then locally."""
        return (run_as(who, lambda: fn(self.mnt)), run_as(who, lambda: fn(self.loc)))

    def server(self, name: str) -> Path:
        return self.export.raw_path / WORK / name

    def settle(self) -> list[str]:
        """Flush the mount; what went wrong (a failed flush, files in lost+found)."""
        problems = []
        try:
            self.m.flush(timeout=60)
        except Exception as exc:
            problems.append(f"flush failed: {exc}")
        lost = self.cache_dir / "lost+found"
        if lost.exists() and any(lost.iterdir()):
            problems.append(f"lost+found: {sorted(p.name for p in lost.iterdir())}")
        return problems


@pytest.fixture(params=list(MODES))
def sides(request: pytest.FixtureRequest, mount_factory: MountFactory, export: Export,
          tmp_path: Path) -> Iterator[Sides]:
    m = mount_factory(MODES[request.param])
    work = m.mountpoint / WORK
    work.mkdir()
    work.chmod(0o777)
    local = tmp_path / "local" / WORK
    local.mkdir(parents=True)
    local.chmod(0o777)
    cache_dir = next(Path(o.split("=", 1)[1]) for o in m.options if o.startswith("cache_dir="))
    s = Sides(m, export, os.open(work, os.O_RDONLY | os.O_DIRECTORY),
              os.open(local, os.O_RDONLY | os.O_DIRECTORY), cache_dir)
    yield s
    os.close(s.mnt)
    os.close(s.loc)


@pytest.fixture(params=list(CALLERS))
def who(request: pytest.FixtureRequest) -> Who:
    return CALLERS[request.param]


def make_file(fd: int, name: str, owner: Who, mode: int, data: bytes = b"") -> None:
    """A file made as root, then given to `owner` with `mode` (in that order: chown
    clears setuid)."""
    f = os.open(name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600, dir_fd=fd)
    os.write(f, data)
    os.close(f)
    os.chown(name, owner.uid, owner.gid, dir_fd=fd)
    os.chmod(name, mode, dir_fd=fd)


def make_dir(fd: int, name: str) -> None:
    os.mkdir(name, dir_fd=fd)
    os.chmod(name, 0o777, dir_fd=fd)


def attrs(fd: int, names: list[str]) -> dict[str, tuple[str, int, int, int]]:
    """(mode, uid, gid, nlink) of each name, fresh."""
    out = {}
    for n in names:
        st = statx(fd, n)
        out[n] = (oct(st.mode), st.uid, st.gid, st.nlink)
    return out


def truncate_path(fd: int, name: str, length: int) -> None:
    """truncate(2) by path, relative to `fd` (os.truncate takes no dir_fd)."""
    os.fchdir(fd)
    os.truncate(name, length)


def on(fn: Callable[[int, str], object], name: str) -> Callable[[int], object]:
    """`fn` bound to one file name."""
    return lambda fd: fn(fd, name)


def same(mine: Outcome, local: Outcome) -> None:
    assert mine == local, f"\n  mount: {mine}\n  local: {local}"


# -- 13.4: ctime of special files --------------------------------------------------------

NODES = {"fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK, "chardev": stat.S_IFCHR}
NODE_OPS = ("chmod", "chown", "link")


def test_ctime_of_special_files(sides: Sides, who: Who) -> None:
    """chmod, chown and link of fifos, sockets and device nodes change their ctime."""
    names = [f"{kind}-{op}" for kind in NODES for op in NODE_OPS]

    def setup(fd: int) -> None:
        for kind, ftype in NODES.items():
            for op in NODE_OPS:
                name = f"{kind}-{op}"
                dev = os.makedev(1, 3) if ftype == stat.S_IFCHR else 0
                os.mknod(name, ftype | 0o644, dev, dir_fd=fd)
                os.chown(name, who.uid, who.gid, dir_fd=fd, follow_symlinks=False)

    def ops(fd: int) -> dict[str, bool]:
        moved = {}
        for name in names:
            before = statx(fd, name)
            tick()
            op = name.rsplit("-", 1)[1]
            if op == "chmod":
                os.chmod(name, 0o600, dir_fd=fd)
            elif op == "chown":
                os.chown(name, 1002 if who is ROOT else -1, 1003, dir_fd=fd,
                         follow_symlinks=False)
            else:
                os.link(name, name + ".l", src_dir_fd=fd, dst_dir_fd=fd)
            moved[f"{name}: ctime moved"] = statx(fd, name).ctime > before.ctime
        return moved

    sides.setup(setup)
    mine, local = sides.run(who, ops)
    same(mine, local)
    ctimes = {n: statx(sides.mnt, n).ctime for n in names}
    assert sides.settle() == []
    assert {n: statx(sides.mnt, n).ctime for n in names} == ctimes, "ctime jumped at flush"
    assert attrs(sides.mnt, names) == attrs(sides.loc, names)


# -- 13.4: the parent directory's times ------------------------------------------------

DIR_OPS = ("create", "mkdir", "link", "unlink", "rename", "rename_to_other_dir")


def test_parent_directory_times(sides: Sides, who: Who) -> None:
    """create, mkdir, link, unlink and rename change the mtime and ctime of the
    directories whose entries they change."""

    def setup(fd: int) -> None:
        for op in DIR_OPS:
            make_dir(fd, f"{op}.a")
            make_dir(fd, f"{op}.b")
            make_file(fd, f"{op}.a/x", who, 0o644)

    def ops(fd: int) -> dict[str, tuple[bool, ...]]:
        moved = {}
        for op in DIR_OPS:
            a, b = f"{op}.a", f"{op}.b"
            before = (statx(fd, a), statx(fd, b))
            tick()
            if op == "create":
                os.close(os.open(f"{a}/new", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
            elif op == "mkdir":
                os.mkdir(f"{a}/new", dir_fd=fd)
            elif op == "link":
                os.link(f"{a}/x", f"{a}/new", src_dir_fd=fd, dst_dir_fd=fd)
            elif op == "unlink":
                os.unlink(f"{a}/x", dir_fd=fd)
            elif op == "rename":
                os.rename(f"{a}/x", f"{a}/new", src_dir_fd=fd, dst_dir_fd=fd)
            else:
                os.rename(f"{a}/x", f"{b}/x", src_dir_fd=fd, dst_dir_fd=fd)
            after = (statx(fd, a), statx(fd, b))
            moved[f"{op}: a.mtime, a.ctime, b.mtime, b.ctime moved"] = tuple(
                getattr(x1, t) > getattr(x0, t)
                for x0, x1 in zip(before, after, strict=True) for t in ("mtime", "ctime"))
        return moved

    sides.setup(setup)
    mine, local = sides.run(who, ops)
    same(mine, local)
    assert sides.settle() == []


# -- 13.4: nlink of directories --------------------------------------------------------

def test_directory_nlink_after_moving_a_directory(sides: Sides, who: Who) -> None:
    """Moving a directory to another parent moves one link ('..') between them."""

    def ops(fd: int) -> dict[str, int]:
        for d in ("a", "b", "a/sub", "a/sub/deeper"):
            os.mkdir(d, dir_fd=fd)
        os.rename("a/sub", "b/sub", src_dir_fd=fd, dst_dir_fd=fd)
        return {d: statx(fd, d).nlink for d in ("a", "b", "b/sub")}

    mine, local = sides.run(who, ops)
    same(mine, local)
    assert sides.settle() == []
    assert {d: statx(sides.mnt, d).nlink for d in ("a", "b", "b/sub")} == local.value


# -- 13.4: fstat of an open, unlinked file ---------------------------------------------

def test_fstat_of_open_unlinked_file(sides: Sides, who: Who) -> None:
    """fstat of an fd whose file has no name left says nlink 0; the data stays."""

    def ops(fd: int) -> tuple[int, int, bytes]:
        f = os.open("f", os.O_CREAT | os.O_RDWR, 0o644, dir_fd=fd)
        try:
            os.write(f, b"data")
            os.unlink("f", dir_fd=fd)
            return os.fstat(f).st_nlink, statx(f).nlink, os.pread(f, 4, 0)
        finally:
            os.close(f)

    mine, local = sides.run(who, ops)
    same(mine, local)
    assert sides.settle() == []


# -- 13.4: ftruncate of a mode-0 file by its creator -----------------------------------

def test_ftruncate_of_mode_0_file_by_its_creator(sides: Sides, who: Who) -> None:
    """open(O_CREAT|O_RDWR, 0) gives a writable fd: ftruncate and write through it
    succeed even for a non-root owner, and the server ends up with the same file."""

    def ops(fd: int) -> tuple[int, str, int]:
        f = os.open("m0", os.O_CREAT | os.O_RDWR, 0, dir_fd=fd)
        try:
            os.ftruncate(f, 100)
            os.pwrite(f, b"abc", 0)
        finally:
            os.close(f)
        st = statx(fd, "m0")
        return st.size, oct(st.mode), st.uid

    mine, local = sides.run(who, ops)
    same(mine, local)
    assert sides.settle() == []
    st = os.stat(sides.server("m0"))
    assert (st.st_size, oct(st.st_mode), st.st_uid) == local.value
    assert sides.server("m0").read_bytes() == b"abc" + bytes(97)


# -- 13.2: refused at the syscall, never journaled -------------------------------------

REFUSED: dict[str, tuple[Who, Callable[[int, str], object]]] = {
    "chmod by another user": (OTHER, lambda fd, n: os.chmod(n, 0o600, dir_fd=fd)),
    "chown by another user": (OTHER, lambda fd, n: os.chown(n, 1002, -1, dir_fd=fd)),
    "chgrp by another user": (OTHER, lambda fd, n: os.chown(n, -1, 1002, dir_fd=fd)),
    "chown to another user by the owner": (USER, lambda fd, n: os.chown(n, 1002, -1,
                                                                         dir_fd=fd)),
    "chgrp to a foreign group by the owner": (USER, lambda fd, n: os.chown(n, -1, 1004,
                                                                           dir_fd=fd)),
    "explicit times by another user": (OTHER, lambda fd, n: utimensat(fd, n, (5, 0),
                                                                      (5, 0))),
    "now and omit by another user": (OTHER, lambda fd, n: utimensat(
        fd, n, (0, UTIME_NOW), (0, UTIME_OMIT))),
    "touch without write permission": (OTHER, lambda fd, n: utimensat(fd, n, None, None)),
    "truncate without write permission": (OTHER, lambda fd, n: truncate_path(fd, n, 0)),
}


def test_refused_changes_are_refused_at_the_syscall(sides: Sides) -> None:
    """A change a local file system refuses gets its errno here and leaves nothing
    behind: no ctime change, nothing to flush, nothing in lost+found, the server's
    file as it was."""
    names = {case: f"f{i}" for i, case in enumerate(REFUSED)}
    for n in names.values():
        sides.setup(on(lambda fd, n: make_file(fd, n, USER, 0o644, b"data"), n))
    sides.m.flush()
    server_before = {n: os.stat(sides.server(n)) for n in names.values()}
    ctimes = {n: statx(sides.mnt, n).ctime for n in names.values()}
    errnos = {}
    for case, (caller, fn) in REFUSED.items():
        name = names[case]
        mine, local = sides.run(caller, on(fn, name))
        assert local.errno != 0, case
        errnos[case] = (mine.errno, local.errno)
    assert {c: e for c, e in errnos.items() if e[0] != e[1]} == {}, "errno differs"
    assert {n: statx(sides.mnt, n).ctime for n in names.values()} == ctimes, \
        "a refused change moved ctime"
    assert sides.settle() == []
    for n, before in server_before.items():
        after = os.stat(sides.server(n))
        assert (after.st_mode, after.st_uid, after.st_gid, after.st_size, after.st_mtime_ns) \
            == (before.st_mode, before.st_uid, before.st_gid, before.st_size,
                before.st_mtime_ns), n


# -- 13.2: times NFSv3 cannot carry ----------------------------------------------------

def test_times_outside_nfs3_range_are_clamped(sides: Sides, who: Who) -> None:
    """NFSv3 times are u32 seconds: a time past 2106 or before 1970 is clamped as the
    Linux NFSv3 client clamps it (not refused later, not an EIO)."""
    sides.setup(lambda fd: make_file(fd, "t", who, 0o644))
    late, early = (2**32 + 5, 7), (-5, 0)
    mine, local = sides.run(who, lambda fd: utimensat(fd, "t", late, early))
    assert local.errno == 0
    assert mine.errno == 0
    want = (posix.fit_time(late[0] * NS + late[1], posix.NFS3_TIMES),
            posix.fit_time(early[0] * NS, posix.NFS3_TIMES))
    st = statx(sides.mnt, "t")
    assert (st.atime, st.mtime) == want == ((2**32 - 1) * NS, 0)
    assert sides.settle() == []
    srv = os.stat(sides.server("t"))
    assert (srv.st_atime_ns, srv.st_mtime_ns) == want


# -- 13.5: timestamps that change by themselves ----------------------------------------

def test_flush_does_not_change_the_times_shown(sides: Sides, who: Who) -> None:
    """`echo data > f; stat f`: the mtime and ctime shown stay when the data reaches
    the server, and the server's mtime is the one shown."""

    def ops(fd: int) -> tuple[int, int]:
        f = os.open("f", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644, dir_fd=fd)
        os.write(f, b"data\n")
        os.close(f)
        st = statx(fd, "f")
        return st.mtime, st.ctime

    mine, _ = sides.run(who, ops)
    assert mine.errno == 0
    tick()
    assert sides.settle() == []
    st = statx(sides.mnt, "f")
    assert (st.mtime, st.ctime) == mine.value, "the flush changed the times shown"
    assert os.stat(sides.server("f")).st_mtime_ns == st.mtime


# -- 13.2: a non-owner's touch ---------------------------------------------------------

def test_touch_by_non_owner_with_write_permission(sides: Sides) -> None:
    """utimensat(NULL) and (UTIME_NOW, UTIME_NOW) by a user who may write but does not
    own the file succeed, and reach the server (as server time: NFSv3 servers refuse
    a client time from a non-owner)."""
    for n in ("null", "now"):
        sides.setup(on(lambda fd, n: make_file(fd, n, USER, 0o666, b"x"), n))
    sides.m.flush()
    tick()

    def touch(fd: int) -> None:
        utimensat(fd, "null", None, None)
        utimensat(fd, "now", (0, UTIME_NOW), (0, UTIME_NOW))

    t0 = time.time_ns()
    mine, local = sides.run(OTHER, touch)
    t1 = time.time_ns()
    same(mine, local)
    assert sides.settle() == []
    for n in ("null", "now"):
        shown, srv = statx(sides.mnt, n).mtime, os.stat(sides.server(n)).st_mtime_ns
        assert t0 - NS // 10 <= shown <= t1 + NS, n
        assert t0 - NS // 10 <= srv <= time.time_ns(), n


# -- 13.2: setuid and setgid clearing --------------------------------------------------

def _write(fd: int, name: str, direct: bool = False) -> None:
    f = os.open(name, os.O_WRONLY | (os.O_DIRECT if direct else 0), dir_fd=fd)
    try:
        buf = mmap.mmap(-1, 4096)   # page aligned, as O_DIRECT wants
        buf.write(b"y" * 4096)
        os.write(f, buf)
    finally:
        os.close(f)


KILLS: dict[str, tuple[Who, Who, int, int, Callable[[int, str], object]]] = {
    # case: (owner, caller, mode, group, what the caller does)
    "write by the owner": (USER, USER, 0o6755, 1001, _write),
    "write by root": (USER, ROOT, 0o6755, 1001, _write),
    "O_DIRECT write by the owner": (USER, USER, 0o6755, 1001,
                                    lambda fd, n: _write(fd, n, direct=True)),
    "write of setgid without group execute by a non-member": (
        USER, OTHER, 0o2646, 1004, _write),
    "ftruncate by the owner": (USER, USER, 0o4755, 1001, lambda fd, n: os.truncate(
        os.open(n, os.O_WRONLY, dir_fd=fd), 0)),
    "truncate by the owner": (USER, USER, 0o4755, 1001, lambda fd, n: truncate_path(fd, n, 1)),
    "chown by root": (USER, ROOT, 0o6755, 1001, lambda fd, n: os.chown(n, 1002, 1002,
                                                                       dir_fd=fd)),
    "chgrp by the owner": (USER, USER, 0o4755, 1001, lambda fd, n: os.chown(n, -1, 1003,
                                                                            dir_fd=fd)),
}


def test_setuid_and_setgid_clearing(sides: Sides) -> None:
    """Writes, truncates and chowns clear setuid/setgid as on a local file system:
    here, not only later on the server."""
    names = {case: f"k{i}" for i, case in enumerate(KILLS)}

    def setup(fd: int) -> None:
        for case, (owner, _, mode, group, _) in KILLS.items():
            make_file(fd, names[case], Who(owner.uid, group), mode, b"z" * 4096)

    sides.setup(setup)
    for case, (_, caller, _, _, fn) in KILLS.items():
        mine, local = sides.run(caller, on(fn, names[case]))
        assert (mine.errno, local.errno) == (0, 0), case
    modes = {case: (oct(statx(sides.mnt, n).mode), oct(statx(sides.loc, n).mode))
             for case, n in names.items()}
    assert {c: m for c, m in modes.items() if m[0] != m[1]} == {}, "mount vs local"
    assert sides.settle() == []
    server = {case: oct(os.stat(sides.server(n)).st_mode) for case, n in names.items()}
    assert server == {case: m[1] for case, m in modes.items()}, "server vs local"
