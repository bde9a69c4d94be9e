"""`mount.wancache`: real `mount -t wancache`, `mount -T fstab` and `umount` calls.

mount(8) finds the helper as /sbin/mount.wancache (scripts/bootstrap links it to
this checkout's; the `helper` fixture makes sure it points here).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.nfsserver import free_port
from bench.wcmount import is_mounted
from tests.conftest import Export
from wancache import control

HELPER = Path("/sbin/mount.wancache")
OUR_HELPER = Path(sys.executable).parent / "mount.wancache"


@pytest.fixture
def helper() -> Path:
    """/sbin/mount.wancache, pointing at this checkout's helper."""
    if not OUR_HELPER.exists():
        pytest.fail(f"{OUR_HELPER} is missing: run scripts/bootstrap")
    if os.path.realpath(HELPER) != os.path.realpath(OUR_HELPER):
        if HELPER.exists() and not HELPER.is_symlink():
            pytest.skip(f"{HELPER} is another installation's (not a link): not replacing it")
        tmp = HELPER.with_name(".mount.wancache.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(OUR_HELPER)
        tmp.replace(HELPER)
    return HELPER


def opts(export: Export, tmp_path: Path, *extra: str) -> str:
    return ",".join([f"nfsport={export.server.nfs_port}",
                     f"mountport={export.server.mount_port}",
                     f"cache_dir={tmp_path / 'cache'}", "metrics=off", *extra])


@pytest.fixture(autouse=True)
def log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where daemons without a syslog socket log (not /var/log/wancache in tests)."""
    path = tmp_path / "logs"
    monkeypatch.setenv("WANCACHE_LOG_DIR", str(path))
    return path


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60,
                          check=False, env=env)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mount.wancache: "), lines
    return lines[0]


def daemon_pid(mnt: Path) -> int:
    return int(control.request(mnt, "status")["pid"])


def unmount(mnt: Path) -> None:
    """umount, and wait until the daemon is gone."""
    if not is_mounted(mnt):
        return
    pid = daemon_pid(mnt)
    subprocess.run(["umount", str(mnt)], check=True)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}").exists() or is_mounted(mnt):
        assert time.monotonic() < deadline, "the daemon kept running after umount"
        time.sleep(0.05)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    """A mount point, unmounted (whatever mounted it) at the end."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    try:
        unmount(path)
    finally:
        if is_mounted(path):
            subprocess.run(["fusermount3", "-uz", str(path)], check=False)


def test_mount_t_wancache_serves_on_return_and_umount_ends_it(
        helper: Path, export: Export, tmp_path: Path, mnt: Path) -> None:
    (export.path / "hello").write_bytes(b"from headquarters")
    proc = run("mount", "-t", "wancache", export.spec, str(mnt), "-o",
               opts(export, tmp_path, "cache_size=50G", "_netdev", "nofail",
                    "x-systemd.automount", "x-systemd.mount-timeout=30", "noatime"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert is_mounted(mnt)       # serving as soon as mount(8) returns
    assert (mnt / "hello").read_bytes() == b"from headquarters"
    fields = next(line.split() for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1] == str(mnt))
    assert fields[0] == export.spec and fields[2] == "fuse.wancache"
    status = control.request(mnt, "status")
    assert status["server"] == export.spec and status["state"] == "up"
    unmount(mnt)
    assert not is_mounted(mnt)


def test_fstab_line_with_mount_T_and_mount_a(helper: Path, export: Export, tmp_path: Path,
                                             mnt: Path) -> None:
    (export.path / "f").write_bytes(b"fstab")
    fstab = tmp_path / "fstab"
    fstab.write_text("# a test fstab\n"
                     f"{export.spec} {mnt} wancache "
                     f"{opts(export, tmp_path, '_netdev', 'nofail', 'x-systemd.automount')}"
                     " 0 0\n")
    proc = run("mount", "-T", str(fstab), str(mnt))
    assert proc.returncode == 0, proc.stderr
    assert (mnt / "f").read_bytes() == b"fstab"
    proc = run("mount", "-T", str(fstab), "-a")          # already mounted: left alone
    assert proc.returncode == 0, proc.stderr
    unmount(mnt)
    proc = run("mount", "-T", str(fstab), "-a")
    assert proc.returncode == 0, proc.stderr
    assert is_mounted(mnt)
    assert (mnt / "f").read_bytes() == b"fstab"


def test_mount_failures_are_one_line_reasons(helper: Path, export: Export, tmp_path: Path,
                                             mnt: Path) -> None:
    def mount(spec: str, target: Path, options: str, *flags: str
              ) -> subprocess.CompletedProcess[str]:
        return run("mount", "-t", "wancache", *flags, spec, str(target), "-o", options)

    line = one_line(mount(export.spec, mnt, opts(export, tmp_path, "frobnicate=1")))
    assert "unknown option 'frobnicate'; valid options: " in line
    assert "cache_size" in line and "nfsport" in line
    line = one_line(mount(export.spec, mnt, opts(export, tmp_path, "timeout=soon")))
    assert "bad value for timeout" in line
    line = one_line(mount(export.spec, tmp_path / "missing", opts(export, tmp_path)))
    assert "does not exist" in line
    dead = free_port()
    proc = mount(export.spec, mnt, f"nfsport={dead},mountport={dead},timeout=2,metrics=off,"
                                   f"cache_dir={tmp_path / 'cache'}")
    assert "unreachable" in one_line(proc)
    assert proc.returncode == 32
    line = one_line(mount(export.spec + "/no-such-dir", mnt, opts(export, tmp_path)))
    assert "no-such-dir" in line and "no such" in line
    (tmp_path / "a-file").write_bytes(b"")
    line = one_line(mount(export.spec, mnt, opts(export, tmp_path) +
                          f",cache_dir={tmp_path / 'a-file' / 'cache'}"))
    assert "cache_dir" in line and "not usable" in line
    line = one_line(mount("no-colon", mnt, opts(export, tmp_path)))
    assert "HOST:/EXPORT" in line
    assert not is_mounted(mnt)
    # busy: something is mounted there already
    assert mount(export.spec, mnt, opts(export, tmp_path)).returncode == 0
    line = one_line(mount(export.spec, mnt, opts(export, tmp_path)))
    assert "busy" in line


def test_helper_flags_fake_sloppy_verbose(helper: Path, export: Export, tmp_path: Path,
                                          mnt: Path) -> None:
    good = opts(export, tmp_path)
    # -f: parse and validate only
    proc = run(str(helper), export.spec, str(mnt), "-f", "-v", "-o", good)
    assert proc.returncode == 0, proc.stderr
    assert "would mount" in proc.stdout
    assert not is_mounted(mnt)
    assert "unknown option" in one_line(run(str(helper), export.spec, str(mnt), "-f", "-o",
                                            good + ",frob"))
    # -s: unknown options are ignored; -n accepted; combined flags as mount(8) passes them
    proc = run(str(helper), export.spec, str(mnt), "-snv", "-o", good + ",frob=1")
    assert proc.returncode == 0, proc.stderr
    assert "ignoring unknown option 'frob=1'" in proc.stdout
    assert is_mounted(mnt)
    assert "usage" in one_line(run(str(helper), export.spec))


def test_daemon_logs_to_syslog_or_a_root_only_file(helper: Path, export: Export,
                                                   tmp_path: Path, mnt: Path,
                                                   log_dir: Path) -> None:
    # A syslog socket of our own (the machine may have no /dev/log).
    dev_log = tmp_path / "dev-log"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(dev_log))
    sock.settimeout(10)
    env = dict(os.environ, WANCACHE_SYSLOG=str(dev_log))
    try:
        proc = run("mount", "-t", "wancache", export.spec, str(mnt), "-o",
                   opts(export, tmp_path), env=env)
        assert proc.returncode == 0, proc.stderr
        pid = daemon_pid(mnt)
        message = sock.recv(4096).decode()
        assert f"wancache[{pid}]: {mnt}: INFO serving {export.spec}" in message
    finally:
        sock.close()
    unmount(mnt)
    # No syslog socket: a log file, root only.
    env["WANCACHE_SYSLOG"] = str(tmp_path / "no-such-socket")
    proc = run("mount", "-t", "wancache", export.spec, str(mnt), "-o",
               opts(export, tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr
    logs = list(log_dir.glob("*.log"))
    assert len(logs) == 1
    assert "INFO wancache: serving" in logs[0].read_text()
    assert logs[0].stat().st_mode & 0o777 == 0o600
    assert logs[0].parent.stat().st_mode & 0o777 == 0o700
