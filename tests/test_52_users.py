"""One mount, many local users: permissions through a real wancache FUSE mount.

Two non-root users (created once if missing, and kept: they are harmless) run
commands through the mount with `setpriv`.  The mount point lives below pytest's
private (0700) temporary directory, so their commands start *inside* it: the
working directory is entered as root before `setpriv` drops the privileges.

The kernel checks permissions itself (`default_permissions`), but the server checks
every call again with the AUTH_SYS identity wancache sends: a new file's owner,
group membership for chgrp and for a group-only directory, prove that the caller's
uid, gid and supplementary groups travel with each call.  Every test runs both as
pure pass-through (`cache=off`) and with the default caches.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.wcmount import WancacheMount
from tests.conftest import CACHE_MODES, MountFactory, wait_until

ALICE, BOB = "wancache-alice", "wancache-bob"
TEAM = "wancache-team"        # bob joins it during a test (and leaves it afterwards)
ALICE_EXTRA = "wancache-extra"  # a supplementary group of alice
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/"}
PYTHON = "/usr/bin/python3"   # a system interpreter other users may run
DENIED = "Permission denied"
NOT_PERMITTED = "Operation not permitted"


@dataclass(frozen=True)
class Ids:
    uid: int
    gid: int


def _tool(*argv: str) -> None:
    proc = subprocess.run(list(argv), capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr.decode()}"


def _ensure_user(name: str) -> Ids:
    """The user, created if missing (another session may be creating it too)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", name], capture_output=True, timeout=60,
                       check=False)
        pw = pwd.getpwnam(name)
    return Ids(pw.pw_uid, pw.pw_gid)


def _ensure_group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", name], capture_output=True, timeout=60,
                       check=False)
        return grp.getgrnam(name).gr_gid


def _leave_group(user: str, group: str) -> None:
    if user in grp.getgrnam(group).gr_mem:
        _tool("gpasswd", "-d", user, group)


@dataclass(frozen=True)
class Users:
    alice: Ids
    bob: Ids
    team: int
    extra: int


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    for tool in ("setpriv", "useradd", "groupadd", "usermod", "gpasswd"):
        if not any(Path(p, tool).exists() for p in ENV["PATH"].split(":")):
            pytest.fail(f"{tool} is not installed")
    if not Path(PYTHON).exists():
        pytest.fail(f"{PYTHON} is not installed")
    u = Users(_ensure_user(ALICE), _ensure_user(BOB), _ensure_group(TEAM),
              _ensure_group(ALICE_EXTRA))
    _leave_group(BOB, TEAM)
    if ALICE not in grp.getgrnam(ALICE_EXTRA).gr_mem:
        _tool("usermod", "-aG", ALICE_EXTRA, ALICE)
    yield u
    _leave_group(BOB, TEAM)


@pytest.fixture
def wc(mode: str, mount_factory: MountFactory, users: Users) -> WancacheMount:
    return mount_factory(CACHE_MODES[mode])


@pytest.fixture
def d(wc: WancacheMount) -> Path:
    return wc.mountpoint


def run_as(user: str, script: str, cwd: Path,
           stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """`sh -c script` as `user` (with its supplementary groups), started in `cwd`."""
    proc = subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--",
         "sh", "-c", script], cwd=cwd, env=ENV, capture_output=True, input=stdin,
        timeout=60, check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode,
                                       proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def ok(user: str, script: str, cwd: Path) -> str:
    """Run as `user`; it must succeed; returns stdout."""
    r = run_as(user, script, cwd)
    assert r.returncode == 0, f"{user}: {script!r} failed: {r.stderr}"
    return r.stdout


def refused(user: str, script: str, cwd: Path, message: str) -> None:
    """Run as `user`; it must fail with `message` on stderr."""
    r = run_as(user, script, cwd)
    assert r.returncode != 0, f"{user}: {script!r} succeeded: {r.stdout!r}"
    assert message in r.stderr, f"{user}: {script!r}: {r.stderr!r}"


def owner(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


# -- ownership of new files ------------------------------------------------------------

def test_umask_077_file_belongs_to_alice(d: Path, srv: Path, users: Users) -> None:
    ok(ALICE, "umask 077; echo secret > priv; mkdir privdir", d)
    a = users.alice
    assert owner(srv / "priv") == (a.uid, a.gid, 0o600)
    assert owner(srv / "privdir") == (a.uid, a.gid, 0o700)
    assert owner(d / "priv") == (a.uid, a.gid, 0o600)
    assert (srv / "priv").read_bytes() == b"secret\n"


def test_owner_writes_to_a_file_it_created_read_only(d: Path, srv: Path,
                                                     users: Users) -> None:
    """open(O_CREAT, 0444) and write through that fd (git objects, tar): the server
    must let the owner write although the mode forbids it."""
    code = ("import os; fd = os.open('ro', os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o444); "
            "n = os.write(fd, b'x' * (1 << 20)); os.fsync(fd); os.close(fd); print(n)")
    assert ok(ALICE, f'{PYTHON} -c "{code}"', d).strip() == str(1 << 20)
    assert owner(srv / "ro") == (users.alice.uid, users.alice.gid, 0o444)
    assert (srv / "ro").read_bytes() == b"x" * (1 << 20)
    refused(ALICE, "echo more >> ro", d, DENIED)


# -- what bob may not do ---------------------------------------------------------------

def test_bob_cannot_touch_alices_private_file(d: Path, srv: Path, users: Users) -> None:
    os.chmod(d, 0o1777)                         # like /tmp: sticky and world-writable
    ok(ALICE, "umask 077; echo secret > priv", d)
    refused(BOB, "cat priv", d, DENIED)
    refused(BOB, "echo evil >> priv", d, DENIED)
    refused(BOB, "echo evil > priv", d, DENIED)
    refused(BOB, "truncate -s 0 priv", d, DENIED)
    refused(BOB, "touch priv", d, DENIED)
    refused(BOB, "rm -f priv", d, NOT_PERMITTED)      # sticky directory
    refused(BOB, "mv priv mine", d, NOT_PERMITTED)
    refused(BOB, "chmod 666 priv", d, NOT_PERMITTED)
    refused(BOB, f"chown {BOB} priv", d, NOT_PERMITTED)
    refused(BOB, f"chgrp {BOB} priv", d, NOT_PERMITTED)
    assert (srv / "priv").read_bytes() == b"secret\n"
    assert owner(srv / "priv") == (users.alice.uid, users.alice.gid, 0o600)
    assert os.listdir(srv) == ["priv"]


def test_bob_reads_but_cannot_change_alices_public_file(d: Path, srv: Path,
                                                        users: Users) -> None:
    ok(ALICE, "umask 022; echo public > pub; mkdir adir; echo inner > adir/f", d)
    assert ok(BOB, "cat pub", d) == "public\n"
    assert ok(BOB, "ls adir; cat adir/f", d) == "f\ninner\n"
    refused(BOB, "echo evil >> pub", d, DENIED)
    refused(BOB, "touch adir/new", d, DENIED)
    refused(BOB, "mkdir adir/sub", d, DENIED)
    refused(BOB, "rm -f adir/f", d, DENIED)
    refused(BOB, "mv adir/f adir/g", d, DENIED)
    assert (srv / "pub").read_bytes() == b"public\n"
    assert sorted(os.listdir(srv / "adir")) == ["f"]


def test_chmod_takes_effect_for_other_users_at_once(d: Path, users: Users) -> None:
    ok(ALICE, "umask 022; echo news > f", d)
    assert ok(BOB, "cat f", d) == "news\n"         # bob's view of f is now cached
    ok(ALICE, "chmod 600 f", d)
    refused(BOB, "cat f", d, DENIED)
    ok(ALICE, "chmod 604 f", d)
    assert ok(BOB, "cat f", d) == "news\n"
    ok(ALICE, "mkdir dir; echo in > dir/g; chmod 700 dir", d)
    refused(BOB, "cat dir/g", d, DENIED)
    ok(ALICE, "chmod 711 dir", d)
    assert ok(BOB, "cat dir/g", d) == "in\n"
    refused(BOB, "ls dir", d, DENIED)               # search but no read permission


def test_cached_data_does_not_leak_to_bob(d: Path, srv: Path, users: Users) -> None:
    ok(ALICE, "umask 077; head -c 300000 /dev/zero | tr '\\0' s > priv", d)
    for _ in range(2):                            # now its data may well be cached
        assert ok(ALICE, "md5sum < priv", d) == ok(ALICE, "md5sum < priv", d)
        refused(BOB, "cat priv", d, DENIED)
        refused(BOB, "dd if=priv of=/dev/null bs=4096 iflag=direct", d, DENIED)
        refused(BOB, "head -c 10 priv", d, DENIED)
    assert (d / "priv").read_bytes() == b"s" * 300000   # root reads it
    refused(BOB, "cat priv", d, DENIED)


def test_root_reads_everything(d: Path, users: Users) -> None:
    ok(ALICE, "umask 077; echo secret > priv; mkdir closed; echo hidden > closed/f; "
              "chmod 000 closed/f", d)
    assert (d / "priv").read_bytes() == b"secret\n"
    assert os.listdir(d / "closed") == ["f"]
    assert (d / "closed" / "f").read_bytes() == b"hidden\n"
    with open(d / "closed" / "f", "ab") as f:      # and writes (no_root_squash)
        f.write(b"root\n")
    assert ok(ALICE, "chmod 600 closed/f; cat closed/f", d) == "hidden\nroot\n"


# -- groups ----------------------------------------------------------------------------

def test_supplementary_group_grants_access(d: Path, srv: Path, users: Users) -> None:
    """A 0770 directory of group TEAM: bob gets in only once he is a member."""
    os.mkdir(d / "team")
    os.chown(d / "team", users.alice.uid, users.team)
    os.chmod(d / "team", 0o770)
    ok(ALICE, "echo plan > team/doc", d)
    refused(BOB, "ls team", d, DENIED)
    refused(BOB, "cat team/doc", d, DENIED)
    refused(BOB, "echo bob > team/bobs", d, DENIED)
    _tool("usermod", "-aG", TEAM, BOB)
    try:
        assert ok(BOB, "id -G", d).split().count(str(users.team)) == 1
        assert ok(BOB, "cat team/doc", d) == "plan\n"
        ok(BOB, "echo bob > team/bobs; mkdir team/bobdir", d)   # the server checks too
        assert owner(srv / "team" / "bobs")[:2] == (users.bob.uid, users.bob.gid)
        assert sorted(os.listdir(srv / "team")) == ["bobdir", "bobs", "doc"]
    finally:
        _leave_group(BOB, TEAM)
    refused(BOB, "cat team/doc", d, DENIED)


def test_chgrp_to_own_supplementary_group(d: Path, srv: Path, users: Users) -> None:
    """chgrp is checked by the server against the groups in the call's credentials."""
    ok(ALICE, "echo x > f", d)
    ok(ALICE, f"chgrp {ALICE_EXTRA} f", d)
    assert owner(srv / "f")[:2] == (users.alice.uid, users.extra)
    refused(ALICE, f"chgrp {BOB} f", d, NOT_PERMITTED)
    refused(ALICE, f"chown {BOB} f", d, NOT_PERMITTED)
    assert owner(srv / "f")[:2] == (users.alice.uid, users.extra)


def test_group_permission_bits(d: Path, users: Users) -> None:
    ok(ALICE, f"echo g > grpfile; chgrp {ALICE_EXTRA} grpfile; chmod 040 grpfile", d)
    refused(ALICE, "cat grpfile", d, DENIED)          # owner bits (none) apply first
    refused(BOB, "cat grpfile", d, DENIED)
    ok(ALICE, "chmod 640 grpfile", d)
    assert ok(ALICE, "cat grpfile", d) == "g\n"


def test_setgid_directory_passes_its_group(d: Path, srv: Path, users: Users) -> None:
    os.mkdir(d / "shared")
    os.chown(d / "shared", 0, users.team)
    os.chmod(d / "shared", 0o2777)
    ok(BOB, "echo b > shared/bobfile; mkdir shared/bobdir", d)   # bob is not in TEAM
    uid, gid, _ = owner(srv / "shared" / "bobfile")
    assert (uid, gid) == (users.bob.uid, users.team)
    uid, gid, mode = owner(srv / "shared" / "bobdir")
    assert (uid, gid) == (users.bob.uid, users.team)
    assert mode & stat.S_ISGID
    assert os.stat(d / "shared" / "bobdir").st_gid == users.team


def test_users_share_a_world_writable_file(d: Path, srv: Path, users: Users) -> None:
    ok(ALICE, "umask 0; echo alice > log", d)
    ok(BOB, "echo bob >> log", d)
    ok(ALICE, "echo alice2 >> log", d)
    assert ok(BOB, "cat log", d) == "alice\nbob\nalice2\n"
    assert (srv / "log").read_bytes() == b"alice\nbob\nalice2\n"
    assert owner(srv / "log") == (users.alice.uid, users.alice.gid, 0o666)


# -- unlinking a file another user still has open --------------------------------------

def test_unlinked_open_file_goes_when_another_user_closes_it(d: Path, srv: Path,
                                                             users: Users) -> None:
    ok(ALICE, "umask 022; mkdir adir; echo shared > adir/f", d)
    reader = subprocess.Popen(
        ["setpriv", f"--reuid={BOB}", f"--regid={BOB}", "--init-groups", "--", "sh", "-c",
         "exec 3< adir/f; echo opened; read line; cat <&3; exec 3<&-"],
        cwd=d, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline() == b"opened\n"
        ok(ALICE, "rm adir/f", d)
        assert ok(ALICE, "ls adir", d) == ""
        out, err = reader.communicate(b"go\n", timeout=30)
        assert out == b"shared\n", err
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert wait_until(lambda: os.listdir(srv / "adir") == [], 2.0), os.listdir(srv / "adir")
