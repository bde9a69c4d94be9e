"""What the soak found, each cut down to a short sequence on a real mount (each
failed against the write-back layer before its rebuild)."""

from __future__ import annotations

import os
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest

from bench.wanem import PROFILES, LinkProfile, WanEmulatorThread
from bench.wcmount import WancacheMount
from tests.conftest import Export, MountFactory, wait_until


def _lost_found(cache: Path) -> list[str]:
    lost = cache / "lost+found"
    return sorted(os.listdir(lost)) if lost.is_dir() else []


def test_a_journaled_symlink_survives_kill_9(export: Export, mount_factory: MountFactory,
                                             tmp_path: Path, allow_log_warnings: None) -> None:
    """The remount replays a SYMLINK whose target starts with 'f' (today: the mount
    exits in WriteBack.replay, ValueError from bytes.fromhex: the target is read as a
    file-handle reference)."""
    m = mount_factory(name="a")
    os.symlink("foo", m.mountpoint / "link")
    m.kill()                   # within writeback_delay: the SYMLINK is still journaled
    again = mount_factory(name="a")
    assert os.readlink(again.mountpoint / "link") == "foo"
    again.flush()
    assert os.readlink(export.raw_path / "link") == "foo"


def test_an_outage_during_a_flush_keeps_the_data(export: Export, mount_factory: MountFactory,
                                                 tmp_path: Path,
                                                 allow_log_warnings: None) -> None:
    """The flush of a file's WRITEs is cut by an outage longer than `timeout` (today:
    the ServerUnreachableError arrives wrapped in an ExceptionGroup, is taken for an
    internal error, the data goes to lost+found and the server keeps an empty file)."""
    link = LinkProfile(rtt_ms=10, up_mbit=2, down_mbit=2)
    with WanEmulatorThread(("127.0.0.1", export.server.nfs_port), link) as wan:
        m = mount_factory(["timeout=5s"], nfs_port=wan.port, name="b")
        data = os.urandom(4 << 20)
        (m.mountpoint / "big").write_bytes(data)     # acknowledged: journaled
        time.sleep(3)                                # its WRITEs are on the way
        wan.stop()
        time.sleep(12)                               # longer than timeout
        wan.start()
        m.flush(timeout=120)
    assert _lost_found(tmp_path / "cache-b") == []
    assert (export.raw_path / "big").read_bytes() == data


def test_a_stalled_link_during_mkdir_keeps_the_children(export: Export,
                                                        mount_factory: MountFactory,
                                                        tmp_path: Path,
                                                        allow_log_warnings: None) -> None:
    """The link stalls (packets held, delivered late) while the flusher's MKDIR is on
    the way; the client reconnects and the MKDIR's outcome is unknown (today, 3 runs
    in 4: a LOOKUP answered NOENT before the late MKDIR lands is taken as a refusal,
    the files go to lost+found, the server ends with an empty directory)."""
    with WanEmulatorThread(("127.0.0.1", export.server.nfs_port), PROFILES["branch"]) as wan:
        for attempt in range(1):
            m = mount_factory(nfs_port=wan.port, name=f"c{attempt}")
            os.listdir(m.mountpoint)
            wan.stall(True)
            d = m.mountpoint / f"d{attempt}"
            d.mkdir()
            for i in range(5):
                (d / f"f{i}").write_bytes(b"x" * 1000)    # acknowledged
            time.sleep(15)                                # > timeo: it reconnects
            wan.stall(False)
            m.flush(timeout=120)
            assert _lost_found(tmp_path / f"cache-c{attempt}") == []
            assert sorted(os.listdir(export.raw_path / f"d{attempt}")) == \
                [f"f{i}" for i in range(5)]


def test_tar_c_right_after_tar_x(export: Export, mount_factory: MountFactory,
                                 tmp_path: Path) -> None:
    """Nobody writes the extracted tree while tar reads it (today: tar exits 1, 'file
    changed as we read it': the ctimes of files and the times of directories change
    when the write-back reaches the server)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    src = tmp_path / "src.tar"
    subprocess.run(["tar", "cf", str(src), "-C", str(stdlib), "asyncio", "json"], check=True)
    with WanEmulatorThread(("127.0.0.1", export.server.nfs_port), PROFILES["branch"]) as wan:
        m = mount_factory(nfs_port=wan.port, name="d")
        (m.mountpoint / "x").mkdir()
        subprocess.run(["tar", "xf", str(src), "-C", str(m.mountpoint / "x")], check=True)
        done = subprocess.run(["tar", "cf", str(m.mountpoint / "out.tar"), "-C",
                               str(m.mountpoint / "x"), "."], capture_output=True, text=True,
                              check=False)
        assert done.returncode == 0, done.stderr
        m.flush()



def _retries(m: WancacheMount) -> int:
    return int(m.request("stats")["writeback"]["retries"])


@pytest.mark.parametrize("fault", ["outage", "kill"])
def test_a_file_whose_create_may_have_reached_the_server_is_removed_there(
        export: Export, mount_factory: MountFactory, allow_log_warnings: None,
        fault: str) -> None:
    """The soak's dbench area kept directories the mount had removed ("extra: r1;
    r1/clients; r1/clients/client0 ...").  A CREATE reaches the server but its reply
    does not come back: the link goes down (its outcome is unknown: it is tried
    again later), or the daemon is killed (the CREATE is replayed).  The file is
    then removed here: the flusher took it for a temporary file that never reached
    the server and dropped its CREATE and its REMOVE, so the server kept the file;
    the RMDIR of its directory then met NOTEMPTY there, which the flusher takes for
    another client's files (a WARNING only): the directory stayed too.

    mkdir(d); flush; replies held 60 s; write_bytes(d/f); wait until the server has
    d/f; outage (wait for the retry) or kill -9 and remount (writeback_delay 60 s);
    unlink(d/f); rmdir(d); link back; flush."""
    with WanEmulatorThread(("127.0.0.1", export.server.nfs_port),
                           LinkProfile(rtt_ms=2)) as wan:
        m = mount_factory(["writeback_delay=0"], nfs_port=wan.port, name="e")
        d = m.mountpoint / "d"
        d.mkdir()
        m.flush()
        wan.set_link(up_delay_ms=1, down_delay_ms=60_000)   # replies are held
        (d / "f").write_bytes(b"x")
        assert wait_until((export.raw_path / "d" / "f").exists, timeout=30)
        if fault == "outage":
            wan.stop()              # the CREATE's reply is lost: its outcome is unknown
            assert wait_until(lambda: _retries(m) > 0, timeout=30)
        else:
            m.kill()
            wan.set_link(rtt_ms=2)
            m = mount_factory(["writeback_delay=60s"], nfs_port=wan.port, name="e")
            d = m.mountpoint / "d"
            assert (d / "f").exists()
        (d / "f").unlink()
        d.rmdir()
        wan.set_link(rtt_ms=2)
        wan.start()
        m.flush(timeout=60)
        log = m.log()
    assert not (export.raw_path / "d").exists(), os.listdir(export.raw_path / "d")
    assert "another client put files in it" not in log
