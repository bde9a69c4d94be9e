"""`wancache mount`: foreground and daemon modes, clean unmounts, one-line errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.nfsserver import free_port
from bench.wcmount import is_mounted
from tests.conftest import Export

WANCACHE = [sys.executable, "-m", "wancache.cli"]


def wancache(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WANCACHE, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def server_opts(export: Export, tmp_path: Path, *extra: str) -> str:
    return ",".join([f"nfsport={export.server.nfs_port}",
                     f"mountport={export.server.mount_port}",
                     f"cache_dir={tmp_path / 'cache'}", *extra])


def one_line_error(proc: subprocess.CompletedProcess[str], *, code: int | None = None) -> str:
    assert proc.returncode != 0
    if code is not None:
        assert proc.returncode == code
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("wancache: ")
    return lines[0]


def wait_unmounted(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while is_mounted(path):
        assert time.monotonic() < deadline, f"{path} still mounted"
        time.sleep(0.1)


def test_daemon_mode_returns_when_serving_and_umount_stops_it(export: Export,
                                                              tmp_path: Path) -> None:
    (export.path / "hello").write_bytes(b"hi")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = wancache("mount", export.spec, str(mnt), "-o", server_opts(export, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert is_mounted(mnt)                 # serving as soon as the command returns
    assert (mnt / "hello").read_bytes() == b"hi"
    pids = subprocess.run(["pgrep", "-f", f"wancache.cli mount {export.spec} {mnt}"],
                          capture_output=True, text=True, check=False).stdout.split()
    assert pids
    subprocess.run(["umount", str(mnt)], check=True)
    wait_unmounted(mnt)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pids[0]}").exists():
        assert time.monotonic() < deadline, "daemon kept running after umount"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_mode_unmounts_cleanly_on_signals(export: Export, tmp_path: Path,
                                                     sig: signal.Signals) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    child = subprocess.Popen([*WANCACHE, "mount", export.spec, str(mnt), "-f", "-o",
                              server_opts(export, tmp_path)],
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not is_mounted(mnt):
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    (mnt / "written").write_bytes(b"before the signal")
    child.send_signal(sig)
    assert child.wait(20) == 0
    assert not is_mounted(mnt)
    _, err = child.communicate()
    assert "Traceback" not in err
    assert (export.path / "written").read_bytes() == b"before the signal"


def test_fusermount_unmount_ends_foreground_daemon(export: Export, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    child = subprocess.Popen([*WANCACHE, "mount", export.spec, str(mnt), "-f", "-o",
                              server_opts(export, tmp_path)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not is_mounted(mnt):
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    assert child.wait(20) == 0


@pytest.mark.parametrize(("options", "expect"), [
    ("frobnicate=1", "unknown option 'frobnicate'; valid options: "),
    ("timeout=soon", "bad value for timeout"),
    ("consistency=eventual", "must be one of lease, cto"),
    ("nfsport", "needs a value"),
    ("block_size=3000", "power of two"),
])
def test_bad_options_are_one_line_errors(export: Export, tmp_path: Path, options: str,
                                         expect: str) -> None:
    (tmp_path / "mnt").mkdir()
    for mode in ([], ["-f"]):
        line = one_line_error(wancache("mount", export.spec, str(tmp_path / "mnt"), *mode,
                                       "-o", options), code=2)
        assert expect in line


def test_generic_fstab_options_are_accepted(export: Export, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = server_opts(export, tmp_path, "_netdev", "nofail", "x-systemd.automount",
                       "defaults", "noatime")
    proc = wancache("mount", export.spec, str(mnt), "-o", opts)
    assert proc.returncode == 0, proc.stderr
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    wait_unmounted(mnt)


def test_unusable_mount_points(export: Export, tmp_path: Path) -> None:
    opts = server_opts(export, tmp_path)
    line = one_line_error(wancache("mount", export.spec, str(tmp_path / "missing"), "-o", opts))
    assert "does not exist" in line
    (tmp_path / "file").write_bytes(b"")
    line = one_line_error(wancache("mount", export.spec, str(tmp_path / "file"), "-o", opts))
    assert "not a directory" in line
    busy = tmp_path / "busy"
    busy.mkdir()
    assert wancache("mount", export.spec, str(busy), "-o", opts).returncode == 0
    try:
        line = one_line_error(wancache("mount", export.spec, str(busy), "-o", opts))
        assert "busy" in line
    finally:
        subprocess.run(["fusermount3", "-u", str(busy)], check=True)
        wait_unmounted(busy)


def test_unreachable_server_and_missing_export(export: Export, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    dead = free_port()
    for mode in ([], ["-f"]):
        line = one_line_error(wancache("mount", export.spec, str(tmp_path / "mnt"), *mode,
                                       "-o", f"nfsport={dead},mountport={dead},timeout=2"))
        assert "unreachable" in line
    spec = export.spec + "/no-such-dir"
    for mode in ([], ["-f"]):
        line = one_line_error(wancache("mount", spec, str(tmp_path / "mnt"), *mode,
                                       "-o", server_opts(export, tmp_path)))
        assert "no-such-dir" in line and "no such" in line
    assert not is_mounted(tmp_path / "mnt")


def test_bad_spec(tmp_path: Path) -> None:
    line = one_line_error(wancache("mount", "no-colon-here", str(tmp_path)), code=2)
    assert "HOST:/EXPORT" in line
