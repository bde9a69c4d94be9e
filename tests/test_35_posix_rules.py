"""`wancache.cache.posix` against the real kernel on a local file system.

For random files (type, mode, owner, group, size), callers (uid, gid, groups) and
requested changes, the real system call runs in a forked child as that caller on a
real file with those attributes in a directory under /tmp (ext4 here), and the
module must predict the same errno and the same resulting mode, owner, size and
times.  Time limits, the largest file size and name limits of that file system are
probed first, so the clamping and EFBIG rules are checked with its numbers (NFSv3's
are only different numbers: see the unit tests at the end).
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.asuser import ROOT, UTIME_NOW, UTIME_OMIT, Outcome, Who, run_as, utimensat
from wancache.cache import posix
from wancache.cache.posix import NS, Caller, Inode, TimeLimits, Utime

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

TYPES = {"reg": stat.S_IFREG, "dir": stat.S_IFDIR, "fifo": stat.S_IFIFO}


@dataclass(frozen=True)
class Spec:
    """A file to make: type, permission bits, owner, group, size."""

    ftype: int
    perm: int
    uid: int
    gid: int
    size: int = 0

    @property
    def inode(self) -> Inode:
        return Inode(self.ftype | self.perm, self.uid, self.gid, self.size)


def caller(who: Who) -> Caller:
    return Caller(who.uid, who.gid, frozenset(who.groups))


def predict(fn: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(0, fn())
    except OSError as exc:
        return Outcome(exc.errno or -1, None)


class Scratch:
    """A world-writable directory on the local disk; files are made in it as root."""

    def __init__(self, path: Path) -> None:
        path.mkdir()
        path.chmod(0o777)
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        self._names = itertools.count()
        self.limits = self._time_limits()
        self.max_size = self._max_size()
        self.name_max = os.statvfs(path).f_namemax

    def name(self) -> str:
        return f"f{next(self._names)}"

    def make(self, spec: Spec) -> str:
        """A new file as `spec` says (checked), made as root; its name."""
        name = self.name()
        if spec.ftype == stat.S_IFDIR:
            os.mkdir(name, dir_fd=self.fd)
        elif spec.ftype == stat.S_IFIFO:
            os.mkfifo(name, dir_fd=self.fd)
        else:
            fd = os.open(name, os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=self.fd)
            os.ftruncate(fd, spec.size)
            os.close(fd)
        os.chown(name, spec.uid, spec.gid, dir_fd=self.fd)
        os.chmod(name, spec.perm, dir_fd=self.fd)   # after chown, which clears setuid
        st_ = self.stat(name)
        assert (st_.st_mode, st_.st_uid, st_.st_gid) == (spec.ftype | spec.perm, spec.uid,
                                                         spec.gid)
        return name

    def stat(self, name: str) -> os.stat_result:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def remove(self, name: str) -> None:
        if stat.S_ISDIR(self.stat(name).st_mode):
            os.rmdir(name, dir_fd=self.fd)
        else:
            os.unlink(name, dir_fd=self.fd)

    def _time_limits(self) -> TimeLimits:
        """This file system's s_time_min, s_time_max and granularity, as the kernel
        clamps times to them."""
        name = self.name()
        os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=self.fd))
        utimensat(self.fd, name, (2**40, 0), (-(2**40), 0))
        st_ = self.stat(name)
        hi, lo = st_.st_atime_ns // NS, st_.st_mtime_ns // NS
        utimensat(self.fd, name, (1000, 1), (1000, 1))
        gran = 1 if self.stat(name).st_atime_ns % NS == 1 else NS
        os.unlink(name, dir_fd=self.fd)
        return TimeLimits(lo, hi, gran)

    def _max_size(self) -> int:
        """s_maxbytes: the largest size ftruncate grows a file to."""
        name = self.name()
        fd = os.open(name, os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=self.fd)
        lo, hi = 0, 2**63 - 1   # lo works; hi is the highest that might
        while lo < hi:
            mid = (lo + hi + 1) // 2
            try:
                os.ftruncate(fd, mid)
                lo = mid
            except OSError as exc:
                assert exc.errno == errno.EFBIG
                hi = mid - 1
        os.close(fd)
        os.unlink(name, dir_fd=self.fd)
        return lo


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scratch]:
    s = Scratch(tmp_path_factory.mktemp("posix") / "d")
    yield s
    os.close(s.fd)


def test_scratch_is_a_local_disk(scratch: Scratch) -> None:
    """The oracle must be a real local file system with times beyond NFSv3's."""
    assert scratch.limits.max_sec > posix.NFS3_TIME_MAX
    assert scratch.limits.min_sec < 0
    assert scratch.max_size > 2**32


# -- strategies ------------------------------------------------------------------------

UIDS = [0, 1001, 1002]
GIDS = [0, 1001, 1002, 1003, 1004]
GROUPS = [1001, 1002, 1003, 1004]
# setuid, setgid, sticky and group execute are where the rules differ: favour them.
perms = st.one_of(st.integers(0, 0o7777),
                  st.sampled_from([0o4755, 0o2755, 0o2745, 0o6775, 0o6745, 0o2700, 0o1777,
                                   0o666, 0o600, 0o000, 0o644, 0o664, 0o646]))
callers = st.builds(Who, uid=st.sampled_from(UIDS), gid=st.sampled_from([0, 1001, 1002]),
                    groups=st.sets(st.sampled_from(GROUPS)).map(lambda s: tuple(sorted(s))))


def specs(types: tuple[str, ...] = tuple(TYPES), size: bool = False) -> st.SearchStrategy[Spec]:
    return st.builds(Spec, ftype=st.sampled_from([TYPES[t] for t in types]), perm=perms,
                     uid=st.sampled_from(UIDS), gid=st.sampled_from(GIDS),
                     size=st.integers(0, 4096) if size else st.just(0))


# -- permission, chmod, chown ----------------------------------------------------------

@SETTINGS
@given(spec=specs(), who=callers, want=st.integers(1, 7))
def test_permitted_is_access(scratch: Scratch, spec: Spec, who: Who, want: int) -> None:
    name = scratch.make(spec)
    got = run_as(who, lambda: os.access(name, want, dir_fd=scratch.fd))
    assert got.value == posix.permitted(spec.inode, caller(who), want), (spec, who, want)
    scratch.remove(name)


@SETTINGS
@given(spec=specs(), who=callers, mode=perms)
@example(spec=Spec(stat.S_IFREG, 0o644, 1001, 1003), who=Who(1001, 1001, (1001,)),
         mode=0o2755)
def test_chmod(scratch: Scratch, spec: Spec, who: Who, mode: int) -> None:
    name = scratch.make(spec)
    got = run_as(who, lambda: os.chmod(name, mode, dir_fd=scratch.fd))
    want = predict(lambda: posix.chmod(spec.inode, caller(who), mode))
    assert got.errno == want.errno, (spec, who, oct(mode))
    assert scratch.stat(name).st_mode == (want.value if not got.errno else spec.inode.mode)
    scratch.remove(name)


owners = st.one_of(st.none(), st.sampled_from(UIDS))
groups_ = st.one_of(st.none(), st.sampled_from(GIDS))


@SETTINGS
@given(spec=specs(), who=callers, uid=owners, gid=groups_)
@example(spec=Spec(stat.S_IFREG, 0o6755, 1001, 1001), who=Who(0, 0), uid=1002, gid=None)
@example(spec=Spec(stat.S_IFREG, 0o2745, 1001, 1003), who=Who(1001, 1001, (1001, 1002)),
         uid=None, gid=1002)
@example(spec=Spec(stat.S_IFREG, 0o4755, 1001, 1001), who=Who(1002, 1002), uid=None,
         gid=None)
def test_chown(scratch: Scratch, spec: Spec, who: Who, uid: int | None,
               gid: int | None) -> None:
    name = scratch.make(spec)
    got = run_as(who, lambda: os.chown(name, -1 if uid is None else uid,
                                       -1 if gid is None else gid, dir_fd=scratch.fd))
    want = predict(lambda: posix.chown(spec.inode, caller(who), uid, gid))
    assert got.errno == want.errno, (spec, who, uid, gid)
    st_ = scratch.stat(name)
    after = want.value if not got.errno else spec.inode
    assert (st_.st_mode, st_.st_uid, st_.st_gid) == (after.mode, after.uid, after.gid), \
        (spec, who, uid, gid)
    scratch.remove(name)


# -- write, truncate -------------------------------------------------------------------

@SETTINGS
@given(spec=specs(("reg",)), who=callers)
@example(spec=Spec(stat.S_IFREG, 0o2746, 1001, 1003), who=Who(1002, 1002))
def test_write_clears_setuid_setgid(scratch: Scratch, spec: Spec, who: Who) -> None:
    name = scratch.make(spec)

    def write() -> int:
        fd = os.open(name, os.O_WRONLY, dir_fd=scratch.fd)
        try:
            return os.write(fd, b"x")
        finally:
            os.close(fd)

    got = run_as(who, write)
    may = posix.permitted(spec.inode, caller(who), os.W_OK)
    assert got.errno == (0 if may else errno.EACCES), (spec, who)
    expected = posix.killed_privs(spec.inode, caller(who)) if may else spec.inode.mode
    assert scratch.stat(name).st_mode == expected, (spec, who)
    scratch.remove(name)


def lengths(scratch_max: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([-1, 0, 1, 4096, scratch_max, scratch_max + 1]),
                     st.integers(0, 1 << 20))


@SETTINGS
@given(spec=specs(size=True), who=callers, data=st.data())
def test_truncate_by_path(scratch: Scratch, spec: Spec, who: Who, data: st.DataObject) -> None:
    length = data.draw(lengths(scratch.max_size))
    name = scratch.make(spec)

    def trunc() -> None:
        os.fchdir(scratch.fd)
        os.truncate(name, length)

    got = run_as(who, trunc)
    want = predict(lambda: posix.truncate(spec.inode, caller(who), length,
                                          max_size=scratch.max_size))
    assert got.errno == want.errno, (spec, who, length)
    st_ = scratch.stat(name)
    assert st_.st_mode == (want.value if not got.errno else spec.inode.mode), (spec, who)
    if spec.ftype == stat.S_IFREG:
        assert st_.st_size == (spec.size if got.errno else length)
    scratch.remove(name)


OPEN_MODES = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}


@SETTINGS
@given(spec=specs(("reg", "dir"), size=True), who=callers,
       how=st.sampled_from(list(OPEN_MODES)), data=st.data())
def test_ftruncate(scratch: Scratch, spec: Spec, who: Who, how: str,
                   data: st.DataObject) -> None:
    """The fd is opened by root: the caller then truncates through it whatever the
    mode says (as the creator of a mode-0 file may)."""
    length = data.draw(lengths(scratch.max_size))
    if spec.ftype == stat.S_IFDIR:
        how = "r"
    name = scratch.make(spec)
    fd = os.open(name, OPEN_MODES[how], dir_fd=scratch.fd)
    try:
        got = run_as(who, lambda: os.ftruncate(fd, length))
    finally:
        os.close(fd)
    want = predict(lambda: posix.truncate(spec.inode, caller(who), length,
                                          fd_writable=how != "r", max_size=scratch.max_size))
    assert got.errno == want.errno, (spec, who, how, length)
    st_ = scratch.stat(name)
    assert st_.st_mode == (want.value if not got.errno else spec.inode.mode), (spec, who)
    if spec.ftype == stat.S_IFREG:
        assert st_.st_size == (spec.size if got.errno else length)
    scratch.remove(name)


def test_mode_0_file_truncated_by_its_creator(scratch: Scratch) -> None:
    """open(O_CREAT|O_RDWR, 0) then ftruncate by a non-root user succeeds."""
    name = scratch.name()

    def create_and_truncate() -> int:
        fd = os.open(name, os.O_CREAT | os.O_RDWR, 0, dir_fd=scratch.fd)
        os.ftruncate(fd, 100)
        os.close(fd)
        return os.stat(name, dir_fd=scratch.fd).st_size

    assert run_as(Who(1001, 1001), create_and_truncate) == Outcome(0, 100)
    inode = Inode(stat.S_IFREG, 1001, 1001)
    me = Caller(1001, 1001)
    assert posix.truncate(inode, me, 100, fd_writable=True) == stat.S_IFREG
    with pytest.raises(PermissionError):
        posix.truncate(inode, me, 100)   # by path: the mode says no
    scratch.remove(name)


@settings(max_examples=60, deadline=None)
@given(offset_back=st.integers(-5000, 5000), count=st.integers(0, 8192))
def test_write_limit(scratch: Scratch, offset_back: int, count: int) -> None:
    """pwrite near the largest file size: short, or EFBIG at and past it."""
    offset = max(0, scratch.max_size - offset_back)
    name = scratch.name()
    fd = os.open(name, os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=scratch.fd)
    try:
        got = predict(lambda: os.pwrite(fd, b"x" * count, offset))
    finally:
        os.close(fd)
        os.unlink(name, dir_fd=scratch.fd)
    want = predict(lambda: posix.write_count(offset, count, scratch.max_size))
    assert got == want, (offset, count)


# -- times -----------------------------------------------------------------------------

def explicit_times(limits: TimeLimits) -> st.SearchStrategy[int]:
    edges = [limits.min_sec - 1, limits.min_sec, limits.min_sec + 1, -1, 0,
             posix.NFS3_TIME_MAX, posix.NFS3_TIME_MAX + 1, limits.max_sec - 1,
             limits.max_sec, limits.max_sec + 1]
    secs = st.one_of(st.sampled_from(edges), st.integers(-(2**35), 2**35))
    return st.builds(lambda s, n: s * NS + n, secs, st.integers(0, NS - 1))


def time_args(limits: TimeLimits) -> st.SearchStrategy[int | Utime]:
    return st.one_of(st.sampled_from([Utime.NOW, Utime.OMIT]), explicit_times(limits))


def _ts(t: int | Utime) -> tuple[int, int]:
    if t is Utime.NOW:
        return (0, UTIME_NOW)
    if t is Utime.OMIT:
        return (0, UTIME_OMIT)
    assert isinstance(t, int)
    return divmod(t, NS)


@SETTINGS
@given(spec=specs(), who=callers, null=st.booleans(), data=st.data())
@example(spec=Spec(stat.S_IFREG, 0o666, 1001, 1001), who=Who(1002, 1002), null=False,
         data=None)
def test_utimensat(scratch: Scratch, spec: Spec, who: Who, null: bool,
                   data: st.DataObject | None) -> None:
    if data is None:   # the @example: a non-owner with write permission: NOW, NOW
        atime: int | Utime = Utime.NOW
        mtime: int | Utime = Utime.NOW
    else:
        atime, mtime = (data.draw(time_args(scratch.limits)) for _ in range(2))
    if null:
        atime = mtime = Utime.NOW
    name = scratch.make(spec)
    before = scratch.stat(name)
    t0 = time.time_ns()
    got = run_as(who, lambda: utimensat(scratch.fd, name, *(
        (None, None) if null else (_ts(atime), _ts(mtime)))))
    t1 = time.time_ns()
    want = predict(lambda: posix.utimens(spec.inode, caller(who), atime, mtime, now_ns=t0,
                                         limits=scratch.limits, clamp=True))
    assert got.errno == want.errno, (spec, who, atime, mtime)
    after = scratch.stat(name)
    for arg, old, new, field in ((atime, before.st_atime_ns, after.st_atime_ns, "atime"),
                                 (mtime, before.st_mtime_ns, after.st_mtime_ns, "mtime")):
        predicted = getattr(want.value, field) if not got.errno else None
        if got.errno or arg is Utime.OMIT:
            assert new == old, field
        elif arg is Utime.NOW:
            # The kernel's clock is coarse (a tick behind time.time_ns()).
            assert t0 - NS // 10 <= new <= t1, field
        else:
            assert new == predicted, (field, arg, new, predicted)
    if not got.errno:
        owner = spec.inode.owned_by(caller(who))
        assert want.value.server_time == (atime is mtime is Utime.NOW and not owner)
    scratch.remove(name)


def test_times_from_kernel_reads_a_non_owners_times_as_now() -> None:
    """pyfuse3 hands over UTIME_NOW as the current time: a non-owner who got past the
    kernel with both times is touching, and must go to the server as server time."""
    f = Inode(stat.S_IFREG | 0o666, 1001, 1001)
    now = 1_700_000_000 * NS
    got = posix.times_from_kernel(f, Caller(1002, 1002), now, now, now_ns=now)
    assert got == posix.Times(now, now, server_time=True)
    mine = posix.times_from_kernel(f, Caller(1001, 1001), 5 * NS, None, now_ns=now)
    assert mine == posix.Times(5 * NS, None, server_time=False)
    with pytest.raises(PermissionError):   # no write permission either
        posix.times_from_kernel(Inode(stat.S_IFREG | 0o644, 1001, 1001),
                                Caller(1002, 1002), now, now, now_ns=now)


# -- NFSv3's limits --------------------------------------------------------------------

@given(ns=st.integers(-(2**70), 2**70))
def test_nfs3_times_fit_u32_seconds(ns: int) -> None:
    t = posix.fit_time(ns, posix.NFS3_TIMES, clamp=True)
    sec, nsec = divmod(t, NS)
    assert 0 <= sec <= 2**32 - 1
    assert 0 <= nsec < NS
    if 0 < ns // NS < 2**32 - 1:
        assert t == ns
    else:
        assert nsec == 0


def test_nfs3_times_past_2106_or_before_1970() -> None:
    """Clamped like the Linux NFSv3 client (CLAMP_TIMES); EINVAL when not clamping."""
    past_2106 = 2**32 * NS + 5
    assert posix.fit_time(past_2106, posix.NFS3_TIMES) == (2**32 - 1) * NS
    assert posix.fit_time(-NS, posix.NFS3_TIMES) == 0
    for t in (past_2106, -1):
        with pytest.raises(OSError) as exc:
            posix.fit_time(t, posix.NFS3_TIMES, clamp=False)
        assert exc.value.errno == errno.EINVAL
    me = Caller(1001, 1001)
    f = Inode(stat.S_IFREG | 0o644, 1001, 1001)
    set_ = posix.utimens(f, me, past_2106, Utime.OMIT, now_ns=0)
    assert set_ == posix.Times((2**32 - 1) * NS, None)


def test_nfs3_sizes_and_names() -> None:
    maxfilesize = 2**63 - 1   # what ganesha's FSINFO says
    posix.check_size(maxfilesize, maxfilesize)
    with pytest.raises(OSError) as exc:
        posix.check_size(2**40 + 1, 2**40)
    assert exc.value.errno == errno.EFBIG
    assert posix.write_count(2**40 - 10, 100, 2**40) == 10
    posix.check_name(b"x" * 1024, 1024)
    with pytest.raises(OSError) as exc:
        posix.check_name(b"x" * 1025, 1024)
    assert exc.value.errno == errno.ENAMETOOLONG


@settings(max_examples=60, deadline=None)
@given(length=st.one_of(st.integers(0, 5000), st.sampled_from([0, 255, 256, 4095, 4096])))
def test_names_and_symlink_targets(scratch: Scratch, length: int) -> None:
    """ext4's NAME_MAX and Linux's symlink target limit, as the kernel applies them."""
    name = "n" * length
    got = predict(lambda: os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o600,
                                           dir_fd=scratch.fd)))
    expected = predict(lambda: posix.check_name(name.encode(), scratch.name_max))
    if length == 0:
        expected = Outcome(errno.ENOENT)
    elif length >= 4096:
        expected = Outcome(errno.ENAMETOOLONG)   # PATH_MAX, before any name limit
    assert got.errno == expected.errno, length
    if not got.errno:
        os.unlink(name, dir_fd=scratch.fd)
    link = scratch.name()
    got = run_as(ROOT, lambda: os.symlink("t" * length, link, dir_fd=scratch.fd))
    want = predict(lambda: posix.check_symlink_target(b"t" * length))
    assert got.errno == want.errno, length
    if not got.errno:
        os.unlink(link, dir_fd=scratch.fd)
