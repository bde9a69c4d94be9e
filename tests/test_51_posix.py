"""A small POSIX conformance suite through a real wancache FUSE mount.

Every test runs twice: as pure pass-through (`cache=off`) and with the default
caches, so that caching can never quietly break POSIX semantics.  Errors are
checked by their exact errno (what Linux answers on a local file system, unless
a test documents otherwise).

What the server (nfs-ganesha 4.3, VFS FSAL, on ext4) answers, as observed:

* PATHCONF says name_max=1024 although ext4 allows 255 bytes and ganesha answers
  NAMETOOLONG for a 256-byte name: wancache probes the real limit at mount time
  and reports 255 in statvfs (and answers ENAMETOOLONG itself).
* FSINFO time_delta claims 100 ns, yet nanosecond timestamps round-trip exactly.
* SETATTR of times on a symlink (utimensat with AT_SYMLINK_NOFOLLOW) answers OK
  but leaves the symlink's times unchanged.
* MKNOD of character and block devices succeeds for root (no_root_squash); the
  FUSE mount is `nodev`, so opening such a node gives EACCES.

Deliberate wancache choices pinned here:

* renameat2(RENAME_EXCHANGE) -> EINVAL: NFSv3 cannot swap two names atomically.
* getxattr/setxattr/listxattr/removexattr -> ENOTSUP: NFSv3 has no xattrs.
* Unlinking an open file renames it to `.wancache-unlinked-*` (like `.nfsXXXX`
  on NFS) until the last close; FUSE sends RELEASE asynchronously, so the name
  disappears shortly after close(2) returns, not during it.

Known bugs are pinned as strict xfails; their reasons say what goes wrong.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from bench.wcmount import WancacheMount
from tests.conftest import CACHE_MODES, Export, MountFactory, wait_until
from wancache.nfs_backend.client import ClientOptions, open_client
from wancache.nfs_backend.transport import Cred

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

libc = ctypes.CDLL(None, use_errno=True)


# -- fixtures and helpers --------------------------------------------------------------

@pytest.fixture
def wc(mode: str, mount_factory: MountFactory) -> WancacheMount:
    return mount_factory(CACHE_MODES[mode])


@pytest.fixture
def d(wc: WancacheMount) -> Path:
    """The mount point: the test's export directory as wancache shows it."""
    return wc.mountpoint


def expect_errno(err: int, fn: Callable[..., object], *args: object, **kw: object) -> None:
    """`fn(*args)` must fail with exactly `err`."""
    try:
        fn(*args, **kw)
    except OSError as exc:
        assert exc.errno == err, (f"{fn.__name__}{args!r}: got "
                                  f"{errno.errorcode.get(exc.errno or 0)}, "
                                  f"want {errno.errorcode[err]}")
    else:
        pytest.fail(f"{fn.__name__}{args!r} succeeded, want {errno.errorcode[err]}")


def write(path: Path | bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def perm(path: Path | bytes, *, follow: bool = True) -> int:
    st = os.stat(path) if follow else os.lstat(path)
    return stat.S_IMODE(st.st_mode)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@contextlib.contextmanager
def opened(path: Path | bytes, flags: int, mode: int = 0o644) -> Iterator[int]:
    fd = os.open(path, flags, mode)
    try:
        yield fd
    finally:
        os.close(fd)


def renameat2(old: Path, new: Path, flags: int) -> None:
    fn = libc.renameat2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                   ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old))


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int],
              flags: int = 0) -> None:
    """utimensat(2) with raw timespecs, so UTIME_NOW / UTIME_OMIT can be passed."""
    times = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
    fn = libc.utimensat
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
    if fn(AT_FDCWD, os.fsencode(path), times, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def xfail_if(request: pytest.FixtureRequest, cond: bool, reason: str) -> None:
    """A known bug in one mode only: expect this test to fail there."""
    if cond:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def silly_names(names: list[str] | list[bytes]) -> list[str]:
    return [os.fsdecode(n) for n in names if os.fsdecode(n).startswith(".wancache-unlinked-")]


def aligned(size: int, fill: bytes = b"\0") -> mmap.mmap:
    """A page-aligned buffer (what O_DIRECT needs)."""
    buf = mmap.mmap(-1, size)
    buf.write(fill * (size // len(fill)))
    buf.seek(0)
    return buf


# -- chmod / chown ---------------------------------------------------------------------

def test_chmod_file_special_bits(d: Path, srv: Path) -> None:
    write(d / "f", b"x")
    for bits in (0o4755, 0o2755, 0o1755, 0o7777, 0o6711, 0o0, 0o644):
        os.chmod(d / "f", bits)
        assert perm(d / "f") == bits, oct(bits)
        assert perm(srv / "f") == bits, oct(bits)


def test_chmod_directory_special_bits(d: Path, srv: Path) -> None:
    os.mkdir(d / "sub")
    for bits in (0o1777, 0o2775, 0o3700, 0o755):
        os.chmod(d / "sub", bits)
        assert perm(d / "sub") == bits
        assert perm(srv / "sub") == bits
        assert stat.S_ISDIR(os.stat(d / "sub").st_mode)


def test_chmod_follows_symlink_and_fchmod(d: Path, srv: Path) -> None:
    write(d / "target", b"x")
    os.chmod(d / "target", 0o644)
    os.symlink("target", d / "link")
    os.chmod(d / "link", 0o600)                 # follows the link
    assert perm(d / "target") == 0o600
    assert perm(srv / "target") == 0o600
    assert perm(d / "link", follow=False) == 0o777
    with opened(d / "target", os.O_RDONLY) as fd:
        os.fchmod(fd, 0o751)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o751
    assert perm(srv / "target") == 0o751


def test_chown_as_root_to_any_ids(d: Path, srv: Path) -> None:
    write(d / "f", b"x")
    os.chown(d / "f", 1234, 5678)
    assert (os.stat(d / "f").st_uid, os.stat(d / "f").st_gid) == (1234, 5678)
    os.chown(d / "f", -1, 4321)                # -1 keeps the owner
    assert (os.stat(srv / "f").st_uid, os.stat(srv / "f").st_gid) == (1234, 4321)
    os.chown(d / "f", 999, -1)                 # -1 keeps the group
    assert (os.stat(srv / "f").st_uid, os.stat(srv / "f").st_gid) == (999, 4321)
    with opened(d / "f", os.O_RDONLY) as fd:
        os.fchown(fd, 7, 8)
    assert (os.stat(d / "f").st_uid, os.stat(d / "f").st_gid) == (7, 8)


def test_chown_clears_setuid_and_setgid(d: Path, srv: Path) -> None:
    write(d / "f", b"#!/bin/sh\n")
    os.chmod(d / "f", 0o6755)
    os.chown(d / "f", 1000, 1000)
    assert perm(d / "f") == 0o755
    assert perm(srv / "f") == 0o755


def test_lchown_changes_the_symlink_only(d: Path, srv: Path) -> None:
    write(d / "target", b"x")
    os.symlink("target", d / "link")
    os.lchown(d / "link", 42, 43)
    assert (os.lstat(d / "link").st_uid, os.lstat(d / "link").st_gid) == (42, 43)
    assert (os.lstat(srv / "link").st_uid, os.lstat(srv / "link").st_gid) == (42, 43)
    assert (os.stat(d / "target").st_uid, os.stat(d / "target").st_gid) == (0, 0)


# -- truncate --------------------------------------------------------------------------

def test_truncate_grow_shrink_and_zero(d: Path, export: Export) -> None:
    write(d / "f", b"hello")
    os.truncate(d / "f", 12)
    assert (d / "f").read_bytes() == b"hello" + bytes(7)
    assert export.nfs_cat("f") == b"hello" + bytes(7)
    os.truncate(d / "f", 3)
    assert os.stat(d / "f").st_size == 3
    assert (d / "f").read_bytes() == b"hel"
    assert export.nfs_cat("f") == b"hel"
    with opened(d / "f", os.O_WRONLY) as fd:
        os.ftruncate(fd, 0)
        assert os.fstat(fd).st_size == 0
    assert export.nfs_cat("f") == b""
    assert os.stat(export.path / "f").st_size == 0


def test_truncate_errors(d: Path) -> None:
    write(d / "f", b"data")
    os.mkdir(d / "sub")
    with opened(d / "f", os.O_RDONLY) as fd:
        expect_errno(errno.EINVAL, os.ftruncate, fd, 0)     # not open for writing
    expect_errno(errno.EISDIR, os.truncate, d / "sub", 0)
    with opened(d / "sub", os.O_RDONLY | os.O_DIRECTORY) as fd:
        expect_errno(errno.EINVAL, os.ftruncate, fd, 0)
    expect_errno(errno.EINVAL, os.truncate, d / "f", -1)
    with opened(d / "f", os.O_WRONLY) as fd:
        expect_errno(errno.EINVAL, os.ftruncate, fd, -1)
    expect_errno(errno.ENOENT, os.truncate, d / "missing", 0)
    assert (d / "f").read_bytes() == b"data"


# -- times -----------------------------------------------------------------------------

def test_utime_explicit_nanoseconds(d: Path, srv: Path) -> None:
    write(d / "f", b"x")
    os.utime(d / "f", ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(d / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    st = os.stat(srv / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    os.mkdir(d / "sub")
    os.utime(d / "sub", ns=(3_999_999_999, 1_700_000_000_987_654_321))
    assert os.stat(srv / "sub").st_mtime_ns == 1_700_000_000_987_654_321


def test_utime_now(d: Path, srv: Path) -> None:
    write(d / "f", b"x")
    os.utime(d / "f", ns=(10**9, 10**9))
    before = time.time_ns()
    os.utime(d / "f")                            # UTIME_NOW for both
    after = time.time_ns()
    st = os.stat(srv / "f")
    for t in (st.st_atime_ns, st.st_mtime_ns):
        assert before - 10**9 <= t <= after + 10**9


def test_utime_omit_one_of_two(d: Path, srv: Path) -> None:
    write(d / "f", b"x")
    os.utime(d / "f", ns=(1_000_000_001, 2_000_000_002))
    utimensat(d / "f", (0, UTIME_OMIT), (5, 6))
    st = os.stat(srv / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 5_000_000_006)
    utimensat(d / "f", (7, 8), (0, UTIME_OMIT))
    st = os.stat(d / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (7_000_000_008, 5_000_000_006)
    before = time.time_ns()
    utimensat(d / "f", (0, UTIME_NOW), (0, UTIME_OMIT))
    st = os.stat(srv / "f")
    assert st.st_atime_ns >= before - 10**9
    assert st.st_mtime_ns == 5_000_000_006


def test_touch_a_and_touch_m_d(d: Path, srv: Path) -> None:
    write(d / "f", b"x")
    os.utime(d / "f", ns=(10**9, 2 * 10**9))
    subprocess.run(["touch", "-a", str(d / "f")], check=True)
    st = os.stat(srv / "f")
    assert st.st_atime_ns > 10**18 and st.st_mtime_ns == 2 * 10**9
    atime = st.st_atime_ns
    subprocess.run(["touch", "-m", "-d", "2001-02-03 04:05:06.123456789 UTC", str(d / "f")],
                   check=True)
    st = os.stat(d / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime, 981_173_106_123_456_789)
    assert os.stat(srv / "f").st_mtime_ns == 981_173_106_123_456_789


def test_utime_on_symlink_without_following(d: Path, srv: Path) -> None:
    """ganesha answers OK but does not change a symlink's times (documented);
    the target must never be touched."""
    write(d / "target", b"x")
    os.utime(d / "target", ns=(10**9, 2 * 10**9))
    os.symlink("target", d / "link")
    link_mtime = os.lstat(srv / "link").st_mtime_ns
    os.utime(d / "link", ns=(5_000_000_001, 6_000_000_002), follow_symlinks=False)
    assert os.lstat(d / "link").st_mtime_ns in (6_000_000_002, link_mtime)
    assert os.lstat(srv / "link").st_mtime_ns in (6_000_000_002, link_mtime)
    st = os.stat(srv / "target")
    assert (st.st_atime_ns, st.st_mtime_ns) == (10**9, 2 * 10**9)


# -- link ------------------------------------------------------------------------------

def test_hard_link_count_and_inode(d: Path, srv: Path, export: Export) -> None:
    write(d / "a", b"shared")
    assert os.stat(d / "a").st_nlink == 1
    os.link(d / "a", d / "b")
    st_a, st_b = os.stat(d / "a"), os.stat(d / "b")
    assert st_a.st_nlink == st_b.st_nlink == 2
    assert st_a.st_ino == st_b.st_ino
    assert os.stat(srv / "a").st_ino == os.stat(srv / "b").st_ino
    os.link(d / "b", d / "c")
    assert os.stat(d / "a").st_nlink == 3
    with open(d / "c", "ab") as f:
        f.write(b"+")
    assert (d / "a").read_bytes() == b"shared+"
    assert export.nfs_cat("b") == b"shared+"


def test_nlink_drops_when_another_link_goes(d: Path, srv: Path, mode: str,
                                            request: pytest.FixtureRequest) -> None:
    write(d / "a", b"x")
    os.link(d / "a", d / "b")
    os.link(d / "a", d / "c")
    assert os.stat(d / "b").st_nlink == 3
    os.unlink(d / "a")
    assert os.stat(srv / "b").st_nlink == 2
    assert os.stat(d / "b").st_nlink == 2
    write(d / "new", b"y")
    os.rename(d / "new", d / "b")               # replaces one of the two links
    assert os.stat(srv / "c").st_nlink == 1
    assert os.stat(d / "c").st_nlink == 1


def test_link_errors(d: Path) -> None:
    write(d / "f", b"x")
    write(d / "g", b"y")
    os.mkdir(d / "sub")
    expect_errno(errno.EPERM, os.link, d / "sub", d / "sublink")
    expect_errno(errno.EEXIST, os.link, d / "f", d / "g")
    expect_errno(errno.ENOENT, os.link, d / "f", d / "nodir" / "f")
    expect_errno(errno.ENOENT, os.link, d / "missing", d / "h")
    assert (d / "g").read_bytes() == b"y"
    assert os.stat(d / "f").st_nlink == 1


# -- rename ----------------------------------------------------------------------------

def test_rename_over_existing_file(d: Path, export: Export) -> None:
    write(d / "src", b"new")
    write(d / "dst", b"old content")
    ino = os.stat(d / "src").st_ino
    os.rename(d / "src", d / "dst")
    assert os.stat(d / "dst").st_ino == ino
    assert (d / "dst").read_bytes() == b"new"
    assert not (d / "src").exists()
    assert export.nfs_ls() == ["dst"]
    assert export.nfs_cat("dst") == b"new"


def test_rename_errors(d: Path) -> None:
    write(d / "f", b"x")
    os.makedirs(d / "full" / "sub")
    os.mkdir(d / "dir")
    write(d / "dir" / "inside", b"i")
    expect_errno(errno.EISDIR, os.rename, d / "f", d / "dir")
    expect_errno(errno.ENOTDIR, os.rename, d / "dir", d / "f")
    expect_errno(errno.ENOTEMPTY, os.rename, d / "dir", d / "full")
    expect_errno(errno.EINVAL, os.rename, d / "full", d / "full" / "sub" / "x")
    expect_errno(errno.ENOENT, os.rename, d / "missing", d / "x")
    expect_errno(errno.ENOENT, os.rename, d / "f", d / "nodir" / "f")
    assert sorted(os.listdir(d)) == ["dir", "f", "full"]
    assert os.listdir(d / "dir") == ["inside"]


def test_rename_directory_over_empty_directory(d: Path, srv: Path) -> None:
    os.mkdir(d / "a")
    write(d / "a" / "child", b"c")
    os.mkdir(d / "empty")
    ino = os.stat(d / "a").st_ino
    os.rename(d / "a", d / "empty")
    assert os.stat(d / "empty").st_ino == ino
    assert os.listdir(d / "empty") == ["child"]
    assert (d / "empty" / "child").read_bytes() == b"c"
    expect_errno(errno.ENOENT, os.stat, d / "a")
    expect_errno(errno.ENOENT, os.stat, d / "a" / "child")
    assert sorted(os.listdir(srv)) == ["empty"]
    assert os.listdir(d) == ["empty"]


def test_renameat2_noreplace(d: Path, export: Export) -> None:
    write(d / "a", b"a")
    write(d / "b", b"b")
    expect_errno(errno.EEXIST, renameat2, d / "a", d / "b", RENAME_NOREPLACE)
    assert (d / "b").read_bytes() == b"b"
    renameat2(d / "a", d / "c", RENAME_NOREPLACE)
    assert export.nfs_ls() == ["b", "c"]
    assert (d / "c").read_bytes() == b"a"


def test_renameat2_exchange_is_einval(d: Path) -> None:
    """Deliberate: NFSv3 cannot swap two names atomically."""
    write(d / "a", b"a")
    write(d / "b", b"b")
    expect_errno(errno.EINVAL, renameat2, d / "a", d / "b", RENAME_EXCHANGE)
    assert (d / "a").read_bytes() == b"a"
    assert (d / "b").read_bytes() == b"b"


def test_rename_over_open_file_keeps_it_readable(d: Path, srv: Path) -> None:
    write(d / "victim", b"old content")
    write(d / "new", b"replacement")
    with opened(d / "victim", os.O_RDWR) as fd:
        os.rename(d / "new", d / "victim")
        assert (d / "victim").read_bytes() == b"replacement"
        assert os.pread(fd, 100, 0) == b"old content"
        assert os.pwrite(fd, b"OLD", 0) == 3
        assert os.pread(fd, 100, 0) == b"OLD content"
    assert wait_until(lambda: os.listdir(srv) == ["victim"])


# -- unlink / rmdir --------------------------------------------------------------------

def test_unlink_rmdir_errors(d: Path) -> None:
    os.makedirs(d / "full" / "sub")
    write(d / "f", b"x")
    expect_errno(errno.EISDIR, os.unlink, d / "full")
    expect_errno(errno.ENOTEMPTY, os.rmdir, d / "full")
    expect_errno(errno.ENOTDIR, os.rmdir, d / "f")
    expect_errno(errno.ENOENT, os.unlink, d / "missing")
    expect_errno(errno.ENOENT, os.rmdir, d / "missing")
    expect_errno(errno.ENOTDIR, os.unlink, d / "f" / "x")
    os.rmdir(d / "full" / "sub")
    os.rmdir(d / "full")
    os.unlink(d / "f")
    assert os.listdir(d) == []


def test_unlink_open_file_stays_usable_until_close(d: Path, export: Export) -> None:
    write(d / "f", b"abc")
    fd = os.open(d / "f", os.O_RDWR)
    try:
        os.unlink(d / "f")
        assert not (d / "f").exists()
        assert "f" not in os.listdir(d)
        assert os.pread(fd, 10, 0) == b"abc"
        assert os.pwrite(fd, b"XYZW", 1) == 4
        assert os.pread(fd, 10, 0) == b"aXYZW"
        assert os.fstat(fd).st_size == 5
        os.fsync(fd)
        hidden = silly_names(export.nfs_ls())
        assert len(hidden) == 1            # the data lives on under a hidden name
        assert export.nfs_cat(hidden[0]) == b"aXYZW"
    finally:
        os.close(fd)
    # RELEASE is asynchronous: the hidden name goes shortly after close(2).
    assert wait_until(lambda: not os.listdir(export.path)), os.listdir(export.path)
    assert export.nfs_ls() == []
    assert os.listdir(d) == []


def test_unlink_one_of_two_links_of_open_file(d: Path, export: Export) -> None:
    write(d / "a", b"data")
    os.link(d / "a", d / "b")
    with opened(d / "a", os.O_RDONLY) as fd:
        os.unlink(d / "a")                 # another name keeps it: a plain REMOVE
        assert export.nfs_ls() == ["b"]
        assert os.pread(fd, 10, 0) == b"data"
    assert wait_until(lambda: os.listdir(export.path) == ["b"])
    assert os.stat(d / "b").st_nlink == 1


def test_listing_after_creating_names(d: Path) -> None:
    """ls; touch; ls: the new names appear, and every readdir offset fits off_t."""
    write(d / "a", b"")
    assert os.listdir(d) == ["a"]
    write(d / "b", b"")
    assert sorted(os.listdir(d)) == ["a", "b"]
    os.mkdir(d / "c")
    assert sorted(os.listdir(d)) == ["a", "b", "c"]
    os.symlink("a", d / "d")
    assert sorted(os.listdir(d)) == ["a", "b", "c", "d"]
    os.rename(d / "b", d / "e")
    assert sorted(os.listdir(d)) == ["a", "c", "d", "e"]
    os.unlink(d / "a")
    assert sorted(os.listdir(d)) == ["c", "d", "e"]


def test_missing_name_then_created(d: Path) -> None:
    """A name found missing must appear as soon as this mount creates it."""
    for make in (lambda p: write(p, b"x"), os.mkdir, lambda p: os.symlink("t", p),
                 os.mkfifo, lambda p: os.link(d / "base", p)):
        if not (d / "base").exists():
            write(d / "base", b"base")
        expect_errno(errno.ENOENT, os.lstat, d / "name")
        assert "name" not in os.listdir(d)
        make(d / "name")
        assert os.lstat(d / "name")
        assert "name" in os.listdir(d)
        if stat.S_ISDIR(os.lstat(d / "name").st_mode):
            os.rmdir(d / "name")
        else:
            os.unlink(d / "name")
        expect_errno(errno.ENOENT, os.lstat, d / "name")
    os.rename(d / "base", d / "name")
    assert (d / "name").read_bytes() == b"base"
    expect_errno(errno.ENOENT, os.lstat, d / "base")


# -- open / create ---------------------------------------------------------------------

def test_create_exclusive_and_existing(d: Path, srv: Path) -> None:
    write(d / "f", b"keep")
    os.chmod(d / "f", 0o640)
    expect_errno(errno.EEXIST, os.open, d / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.mkdir(d / "sub")
    expect_errno(errno.EEXIST, os.open, d / "sub", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with opened(d / "f", os.O_CREAT | os.O_WRONLY, 0o600):   # no O_EXCL: just opens it
        pass
    assert (d / "f").read_bytes() == b"keep"
    assert perm(srv / "f") == 0o640
    with opened(d / "new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600) as fd:
        os.write(fd, b"fresh")
    assert (srv / "new").read_bytes() == b"fresh"


def test_o_trunc(d: Path, export: Export) -> None:
    write(d / "f", b"some content")
    with opened(d / "f", os.O_WRONLY | os.O_TRUNC) as fd:
        os.write(fd, b"ab")
    assert (d / "f").read_bytes() == b"ab"
    assert export.nfs_cat("f") == b"ab"
    # The everyday form: a shell redirection over a longer file.
    subprocess.run(["sh", "-c", "echo a long line > g; echo s > g"], cwd=d, check=True)
    assert export.nfs_cat("g") == b"s\n"
    with opened(d / "f", os.O_RDONLY | os.O_TRUNC) as fd:   # Linux truncates read-only too
        assert os.fstat(fd).st_size == 0
    assert os.stat(export.path / "f").st_size == 0


def test_o_append_appends_after_lseek(d: Path, export: Export) -> None:
    write(d / "f", b"12345")
    with opened(d / "f", os.O_WRONLY | os.O_APPEND) as fd:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"67")
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"89")
        assert os.lseek(fd, 0, os.SEEK_CUR) == 9
    assert (d / "f").read_bytes() == b"123456789"
    assert export.nfs_cat("f") == b"123456789"


def test_open_directory_errors(d: Path) -> None:
    write(d / "f", b"x")
    os.mkdir(d / "sub")
    expect_errno(errno.ENOTDIR, os.open, d / "f", os.O_RDONLY | os.O_DIRECTORY)
    expect_errno(errno.EISDIR, os.open, d / "sub", os.O_WRONLY)
    expect_errno(errno.EISDIR, os.open, d / "sub", os.O_RDWR)
    expect_errno(errno.EISDIR, os.open, d / "sub", os.O_WRONLY | os.O_CREAT)
    expect_errno(errno.ENOENT, os.open, d / "missing", os.O_RDONLY)
    expect_errno(errno.ENOTDIR, os.open, d / "f" / "x", os.O_RDONLY)
    with opened(d / "sub", os.O_RDONLY | os.O_DIRECTORY) as fd:
        assert stat.S_ISDIR(os.fstat(fd).st_mode)


def test_create_honours_umask_and_mode(d: Path, srv: Path) -> None:
    with umask(0o027):
        with opened(d / "masked", os.O_CREAT | os.O_WRONLY, 0o777):
            pass
        os.mkdir(d / "maskeddir", 0o777)
    assert perm(d / "masked") == perm(srv / "masked") == 0o750
    assert perm(d / "maskeddir") == perm(srv / "maskeddir") == 0o750
    with umask(0):
        with opened(d / "exact", os.O_CREAT | os.O_WRONLY, 0o4751):
            pass
        os.mkdir(d / "exactdir", 0o1751)
        os.mkfifo(d / "fifo", 0o666)
    assert perm(srv / "exact") == 0o4751
    assert perm(srv / "exactdir") == 0o1751
    assert perm(srv / "fifo") == 0o666
    with umask(0o077):
        write(d / "private", b"p")
    assert perm(srv / "private") == 0o600


def test_o_direct_aligned_io_reaches_server(d: Path, export: Export) -> None:
    size = 64 * 1024
    buf = aligned(size, b"0123456789abcdef")
    with opened(d / "f", os.O_CREAT | os.O_WRONLY | os.O_DIRECT) as fd:
        assert os.write(fd, buf) == size
    assert export.nfs_cat("f") == bytes(buf)       # written through, no close needed
    rbuf = aligned(size)
    with opened(d / "f", os.O_RDONLY | os.O_DIRECT) as fd:
        assert os.readv(fd, [rbuf]) == size
    assert bytes(rbuf) == bytes(buf)


def test_reader_and_writer_fds_of_one_file(d: Path, export: Export) -> None:
    write(d / "f", b"before")
    rfd = os.open(d / "f", os.O_RDONLY)
    try:
        assert os.pread(rfd, 100, 0) == b"before"       # reader has seen the old data
        with opened(d / "f", os.O_WRONLY) as wfd:
            os.write(wfd, b"AFTER!")
            expect_errno(errno.EBADF, os.read, wfd, 1)
        expect_errno(errno.EBADF, os.write, rfd, b"x")
        assert os.pread(rfd, 100, 0) == b"AFTER!"
    finally:
        os.close(rfd)
    assert export.nfs_cat("f") == b"AFTER!"


def test_reader_and_writer_in_two_processes(d: Path, export: Export) -> None:
    write(d / "f", b"v1")
    with opened(d / "f", os.O_RDONLY) as rfd:
        assert os.read(rfd, 100) == b"v1"
        code = ("import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_APPEND); "
                "os.write(fd, b'+v2'); os.close(fd)")
        subprocess.run([sys.executable, "-c", code, str(d / "f")], check=True, timeout=30)
        assert os.pread(rfd, 100, 0) == b"v1+v2"
    cat = subprocess.run(["cat", str(d / "f")], capture_output=True, check=True, timeout=30)
    assert cat.stdout == b"v1+v2"
    assert export.nfs_cat("f") == b"v1+v2"


def test_sparse_and_large_io(d: Path, export: Export) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    with opened(d / "f", os.O_CREAT | os.O_WRONLY) as fd:
        os.pwrite(fd, b"head", 0)
        os.pwrite(fd, data, 1 << 20)             # a 1 MiB hole after "head"
    expect = b"head" + bytes((1 << 20) - 4) + data
    assert os.stat(d / "f").st_size == len(expect)
    assert (d / "f").read_bytes() == expect
    assert export.nfs_cat("f") == expect
    with opened(d / "f", os.O_RDONLY) as fd:
        assert os.pread(fd, 10, len(expect)) == b""
        assert os.pread(fd, 10, len(expect) - 3) == expect[-3:]


def test_mmap_shared(d: Path, mode: str, export: Export,
                     request: pytest.FixtureRequest) -> None:
    write(d / "f", b"a" * 8192)
    with opened(d / "f", os.O_RDWR) as fd:
        with mmap.mmap(fd, 8192, prot=mmap.PROT_READ) as m:
            assert m[:3] == b"aaa"
        with mmap.mmap(fd, 8192) as m:
            m[:3] = b"xyz"
            m.flush()
    assert (d / "f").read_bytes()[:4] == b"xyza"
    assert export.nfs_cat("f")[:4] == b"xyza"


def test_mmap_private(d: Path) -> None:
    write(d / "f", b"b" * 8192)
    with opened(d / "f", os.O_RDONLY) as fd, \
            mmap.mmap(fd, 8192, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as m:
        assert m[:] == b"b" * 8192


# -- names -----------------------------------------------------------------------------

def test_name_length_limits(d: Path, export: Export) -> None:
    ok, bad = "n" * 255, "n" * 256
    write(d / ok, b"x")
    assert os.listdir(d) == [ok]
    assert export.nfs_ls() == [ok]
    expect_errno(errno.ENAMETOOLONG, os.open, d / bad, os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.ENAMETOOLONG, os.mkdir, d / bad)
    expect_errno(errno.ENAMETOOLONG, os.symlink, ok, d / bad)
    expect_errno(errno.ENAMETOOLONG, os.link, d / ok, d / bad)
    expect_errno(errno.ENAMETOOLONG, os.rename, d / ok, d / bad)
    assert os.listdir(d) == [ok]


def test_lookup_of_too_long_name(d: Path, mode: str,
                                 request: pytest.FixtureRequest) -> None:
    write(d / "f", b"x")
    assert os.listdir(d) == ["f"]               # the listing may now be cached
    expect_errno(errno.ENAMETOOLONG, os.stat, d / ("n" * 256))
    expect_errno(errno.ENAMETOOLONG, os.open, d / ("n" * 300), os.O_RDONLY)


def test_odd_names_round_trip(d: Path, export: Export) -> None:
    names = [b"with space", b" lead", b"trail ", b"new\nline", b"tab\tx", b"bad\xff\xfe",
             "\u00fcn\u00ef\u00e7\u00f8d\u00e9".encode(), b"-dash", b"a:b;c'd\"e", b"*?[]"]
    base = os.fsencode(d)
    for i, name in enumerate(names):
        write(base + b"/" + name, b"%d" % i)
    assert sorted(os.listdir(base)) == sorted(names)
    assert sorted(os.listdir(os.fsencode(export.path))) == sorted(names)
    for i, name in enumerate(names):
        with open(base + b"/" + name, "rb") as f:
            assert f.read() == b"%d" % i
    raw = subprocess.run(["nfs-ls", export.url()], capture_output=True, check=True,
                         timeout=60).stdout
    for name in names:
        assert b" " + name + b"\n" in raw
    # conftest's nfs_ls() parser cannot keep leading blanks, newlines or non-UTF-8
    printable = [n.decode() for n in names
                 if b"\n" not in n and b"\xff" not in n and not n[:1].isspace()]
    assert set(printable) <= set(export.nfs_ls())


# -- symlinks --------------------------------------------------------------------------

def test_readlink_exact_targets(d: Path, srv: Path) -> None:
    targets = {b"dangling": b"no/such/file", b"long": b"x" * 1000,
               b"bytes": b"\xff\xfe/../odd name\n", b"abs": b"/etc/hostname",
               b"dots": b"../../..", b"max": b"y" * 4095}
    base = os.fsencode(d)
    for name, target in targets.items():
        os.symlink(target, base + b"/" + name)
    sbase = os.fsencode(srv)    # (looking at the server flushes the mount first)
    for name, target in targets.items():
        assert os.readlink(base + b"/" + name) == target
        assert os.readlink(sbase + b"/" + name) == target
        assert os.lstat(base + b"/" + name).st_size == len(target)
    expect_errno(errno.ENAMETOOLONG, os.symlink, b"z" * 4096, base + b"/toolong")
    expect_errno(errno.ENOENT, os.stat, d / "dangling")
    expect_errno(errno.EINVAL, os.readlink, d)


def test_symlink_loop_and_lstat_vs_stat(d: Path) -> None:
    os.symlink("loop2", d / "loop1")
    os.symlink("loop1", d / "loop2")
    expect_errno(errno.ELOOP, os.open, d / "loop1", os.O_RDONLY)
    expect_errno(errno.ELOOP, os.stat, d / "loop2")
    os.symlink("self", d / "self")
    expect_errno(errno.ELOOP, os.open, d / "self", os.O_RDONLY | os.O_CREAT)
    write(d / "target", b"12345")
    os.symlink("target", d / "link")
    lst, st = os.lstat(d / "link"), os.stat(d / "link")
    assert stat.S_ISLNK(lst.st_mode) and lst.st_size == len("target")
    assert stat.S_ISREG(st.st_mode) and st.st_size == 5
    assert st.st_ino == os.stat(d / "target").st_ino != lst.st_ino
    expect_errno(errno.ELOOP, os.open, d / "link", os.O_RDONLY | os.O_NOFOLLOW)


# -- special files ---------------------------------------------------------------------

def test_fifo(d: Path, srv: Path) -> None:
    os.mkfifo(d / "fifo")
    assert stat.S_ISFIFO(os.stat(d / "fifo").st_mode)
    assert stat.S_ISFIFO(os.stat(srv / "fifo").st_mode)
    rfd = os.open(d / "fifo", os.O_RDONLY | os.O_NONBLOCK)   # a reader first: no wait
    try:
        with opened(d / "fifo", os.O_WRONLY) as wfd:
            os.write(wfd, b"through the pipe")
        os.set_blocking(rfd, True)
        assert os.read(rfd, 100) == b"through the pipe"
        assert os.read(rfd, 100) == b""                      # the writer is gone
    finally:
        os.close(rfd)
    assert os.stat(srv / "fifo").st_size == 0               # nothing reached the server


def test_mknod_devices_as_root(d: Path, srv: Path) -> None:
    """ganesha lets root create device nodes; the mount is nodev, so they cannot be
    opened through it (EACCES)."""
    os.mknod(d / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(d / "blk", 0o640 | stat.S_IFBLK, os.makedev(7, 200))
    for name, ftype, dev in (("chr", stat.S_ISCHR, (1, 3)), ("blk", stat.S_ISBLK, (7, 200))):
        for st in (os.lstat(d / name), os.lstat(srv / name)):
            assert ftype(st.st_mode)
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == dev
    assert perm(srv / "blk") == 0o640
    expect_errno(errno.EACCES, os.open, d / "chr", os.O_RDONLY)
    os.mknod(d / "sock", 0o600 | stat.S_IFSOCK)
    assert stat.S_ISSOCK(os.lstat(srv / "sock").st_mode)
    os.mknod(d / "reg", 0o600 | stat.S_IFREG)
    assert stat.S_ISREG(os.lstat(srv / "reg").st_mode)
    expect_errno(errno.EEXIST, os.mknod, d / "reg", 0o600 | stat.S_IFREG)


# -- directories -----------------------------------------------------------------------

def test_mkdir_errors_mode_and_nlink(d: Path, srv: Path) -> None:
    os.mkdir(d / "sub")
    expect_errno(errno.EEXIST, os.mkdir, d / "sub")
    write(d / "f", b"x")
    expect_errno(errno.EEXIST, os.mkdir, d / "f")
    expect_errno(errno.ENOENT, os.mkdir, d / "missing" / "sub")
    expect_errno(errno.ENOTDIR, os.mkdir, d / "f" / "sub")
    with umask(0):
        os.mkdir(d / "m700", 0o700)
        os.mkdir(d / "m1777", 0o1777)
    assert perm(srv / "m700") == 0o700 and perm(d / "m700") == 0o700
    assert perm(srv / "m1777") == 0o1777
    nlink = os.stat(d / "sub").st_nlink
    assert nlink == 2
    os.mkdir(d / "sub" / "child")
    assert os.stat(d / "sub").st_nlink == 3
    assert os.stat(d / "sub" / "child").st_nlink == 2


def test_readdir_types_and_inodes(d: Path) -> None:
    write(d / "f", b"x")
    os.mkdir(d / "sub")
    os.symlink("f", d / "link")
    os.mkfifo(d / "fifo")
    with os.scandir(d) as it:
        entries = {e.name: e for e in it}
    assert sorted(entries) == ["f", "fifo", "link", "sub"]
    assert entries["f"].is_file(follow_symlinks=False)
    assert entries["sub"].is_dir(follow_symlinks=False)
    assert entries["link"].is_symlink()
    for name, e in entries.items():
        assert e.inode() == os.lstat(d / name).st_ino, name


def test_readdir_10000_entries(mode: str, export: Export,
                               mount_factory: MountFactory) -> None:
    big = export.path / "big"
    big.mkdir()                                  # ganesha has not seen it yet
    for i in range(10_000):
        (big / f"entry-{i:05d}-{'x' * (i % 40)}").touch()
    m = mount_factory(CACHE_MODES[mode])
    names = os.listdir(m.mountpoint / "big")
    assert len(names) == 10_000
    assert sorted(names) == sorted(os.listdir(big))


class Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


def test_telldir_seekdir(mode: str, export: Export,
                         mount_factory: MountFactory) -> None:
    (export.path / "dir").mkdir()
    for i in range(1000):
        (export.path / "dir" / f"e{i:04d}").touch()
    m = mount_factory(CACHE_MODES[mode])
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir.restype = ctypes.POINTER(Dirent)
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.closedir.argtypes = [ctypes.c_void_p]
    dirp = libc.opendir(os.fsencode(m.mountpoint / "dir"))
    assert dirp
    try:
        seen: list[tuple[int, bytes]] = []
        while True:
            pos = libc.telldir(dirp)
            ent = libc.readdir(dirp)
            if not ent:
                break
            seen.append((pos, ent.contents.d_name))
        names = [n for _, n in seen]
        assert sorted(n for n in names if n not in (b".", b"..")) == \
            sorted(os.fsencode(p.name) for p in (export.path / "dir").iterdir())
        for k in (500, 3, 999, len(seen) - 1, 0, 777, 250):
            libc.seekdir(dirp, seen[k][0])
            ent = libc.readdir(dirp)
            assert ent and ent.contents.d_name == seen[k][1], k
            ent = libc.readdir(dirp)              # and it goes on from there
            if k + 1 < len(seen):
                assert ent and ent.contents.d_name == seen[k + 1][1], k
            else:
                assert not ent
    finally:
        libc.closedir(dirp)


def test_fsync_file_and_directory(d: Path, export: Export) -> None:
    with opened(d / "f", os.O_CREAT | os.O_WRONLY) as fd:
        os.write(fd, b"synced data")
        os.fsync(fd)
        assert export.nfs_cat("f") == b"synced data"
        os.write(fd, b"+more")
        os.fdatasync(fd)
        assert export.nfs_cat("f") == b"synced data+more"
    with opened(d, os.O_RDONLY | os.O_DIRECTORY) as dfd:
        os.fsync(dfd)
        os.fdatasync(dfd)


# -- file system wide ------------------------------------------------------------------

async def server_name_max(export: Export) -> int:
    """PATHCONF name_max as the server reports it."""
    options = ClientOptions(nfs_port=export.server.nfs_port,
                            mount_port=export.server.mount_port)
    async with trio.open_nursery() as nursery:
        client = await open_client(nursery, "127.0.0.1", export.export_path, options)
        try:
            return (await client.pathconf(Cred.root())).name_max
        finally:
            client.close()


async def test_statvfs(d: Path, export: Export) -> None:
    st = os.statvfs(d)
    local = os.statvfs(export.path)
    assert await server_name_max(export) == 1024         # what PATHCONF claims
    assert st.f_namemax == local.f_namemax == 255        # what the server really takes
    assert st.f_blocks > 0
    size, local_size = st.f_blocks * st.f_frsize, local.f_blocks * local.f_frsize
    assert abs(size - local_size) <= local_size // 100
    assert 0 < st.f_bavail * st.f_frsize <= size
    assert st.f_files > 0


def test_access_as_root(d: Path) -> None:
    write(d / "f", b"x")
    os.mkdir(d / "sub")
    os.chmod(d / "f", 0o000)
    os.chmod(d / "sub", 0o000)
    assert os.access(d / "f", os.R_OK, effective_ids=True)
    assert os.access(d / "f", os.W_OK, effective_ids=True)
    assert not os.access(d / "f", os.X_OK, effective_ids=True)
    assert os.access(d / "sub", os.R_OK | os.W_OK | os.X_OK, effective_ids=True)
    assert (d / "f").read_bytes() == b"x"
    os.chmod(d / "f", 0o755)
    assert os.access(d / "f", os.R_OK | os.W_OK | os.X_OK, effective_ids=True)
    os.chmod(d / "f", 0o644)
    assert not os.access(d / "f", os.X_OK, effective_ids=True)
    assert os.access(d / "f", os.F_OK, effective_ids=True)
    assert not os.access(d / "missing", os.F_OK, effective_ids=True)


def test_xattrs_are_not_supported(d: Path) -> None:
    write(d / "f", b"x")
    expect_errno(errno.ENOTSUP, os.getxattr, d / "f", "user.test")
    expect_errno(errno.ENOTSUP, os.setxattr, d / "f", "user.test", b"1")
    expect_errno(errno.ENOTSUP, os.listxattr, d / "f")
    expect_errno(errno.ENOTSUP, os.removexattr, d / "f", "user.test")
    expect_errno(errno.ENOTSUP, os.listxattr, d)
