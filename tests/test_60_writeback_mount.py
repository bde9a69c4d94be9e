"""Write-back on a real mount: durability, crashes, outages, conflicts, limits.

What reached the server is checked with an independent client (nfs-cat, nfs-ls)
or on the server's disk through `export.raw_path` (which, unlike `export.path`,
does not flush the mounts first).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from bench.nfsserver import NfsServer
from bench.wanem import LinkProfile, WanEmulatorThread
from tests.conftest import Export, MountFactory, wait_until


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_untar_1000_files_then_flush(export: Export, mount_factory: MountFactory,
                                     tmp_path: Path) -> None:
    rnd = random.Random(1)
    members = {f"pkg/d{i % 10}/f{i:04}.bin": rnd.randbytes(4096) for i in range(1000)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "x.tar").write_bytes(buf.getvalue())
    m = mount_factory(["writeback_delay=1"])
    subprocess.run(["tar", "xf", str(tmp_path / "x.tar"), "-C", str(m.mountpoint)], check=True)
    m.flush()
    stats = m.request("stats")["writeback"]
    assert stats["pending"] == 0 and stats["lost"] == 0 and stats["conflicts"] == 0
    for name, data in members.items():
        path = export.raw_path / name
        assert path.read_bytes() == data, name
        assert path.stat().st_mtime == 1_600_000_000
    calls = m.rpc_calls()
    assert calls["CREATE"] == 1000 and calls["MKDIR"] == 11
    assert calls["LOOKUP"] <= 5          # new names in new directories cost nothing


WRITER = textwrap.dedent("""
    import os, sys
    root = sys.argv[1]
    for i in range(100000):
        d = os.path.join(root, f"d{i % 7}")
        os.makedirs(d, exist_ok=True)
        data = (f"file {i} " * (1 + i % 50)).encode()
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(data)
        print(i, flush=True)      # acknowledged: close() returned
""")


@pytest.mark.parametrize("kill_after", [0.7, 1.5, 2.6])
def test_kill_9_loses_nothing_acknowledged(export: Export, mount_factory: MountFactory,
                                           tmp_path: Path, kill_after: float,
                                           allow_log_warnings: None) -> None:
    m = mount_factory(["writeback_delay=0.5"], name="crash")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(m.mountpoint / "out")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(kill_after)
    m.kill(signal.SIGKILL)            # the daemon dies mid-write: a crash
    out, _ = writer.communicate(timeout=30)
    acknowledged = [int(line) for line in out.split()]
    assert len(acknowledged) > 10
    again = mount_factory([], name="crash")   # same cache_dir: replays the journal
    again.flush()
    for i in acknowledged:
        data = (f"file {i} " * (1 + i % 50)).encode()
        assert (export.raw_path / "out" / f"d{i % 7}" / f"f{i}").read_bytes() == data, i
    names = [p.name for p in (export.raw_path / "out").rglob("*")]
    assert not [n for n in names if "conflict" in n or "unlinked" in n]


def test_wan_outage_during_writes(export: Export, mount_factory: MountFactory,
                                  tmp_path: Path, allow_log_warnings: None) -> None:
    (export.raw_path / "docs").mkdir()
    (export.raw_path / "docs" / "cached.txt").write_bytes(b"read before the outage\n")
    with WanEmulatorThread(("127.0.0.1", export.server.nfs_port), LinkProfile(rtt_ms=20)) as wan:
        m = mount_factory(["timeout=3", "timeo=1", "writeback_delay=0"],
                          nfs_port=wan.port)
        assert (m.mountpoint / "docs" / "cached.txt").read_bytes() == b"read before the outage\n"
        assert os.listdir(m.mountpoint / "docs") == ["cached.txt"]
        wan.stop()
        for i in range(20):
            (m.mountpoint / "docs" / f"new{i}.txt").write_bytes(f"offline {i}\n".encode())
        # Cached files stay readable and cached directories listable, past their lease.
        assert (m.mountpoint / "docs" / "cached.txt").read_bytes() == b"read before the outage\n"
        assert len(os.listdir(m.mountpoint / "docs")) == 21
        assert wait_until(lambda: not m.request("stats")["server_up"], 30), "disconnected status"
        assert m.request("stats")["writeback"]["pending"] > 0
        assert not (export.raw_path / "docs" / "new0.txt").exists()
        wan.start()
        # Flushing resumes by itself.
        assert wait_until(lambda: m.request("stats")["writeback"]["pending"] == 0, 60), \
            "the journal to drain"
    for i in range(20):
        assert (export.raw_path / "docs" / f"new{i}.txt").read_bytes() == f"offline {i}\n".encode()


def test_server_restart_during_writes(private_nfs_server: NfsServer, tmp_path: Path,
                                      mount_factory: MountFactory,
                                      allow_log_warnings: None) -> None:
    srv = private_nfs_server
    target = Export(srv, "")
    m = mount_factory(["writeback_delay=0", "timeout=20"], target=target)
    blobs = {f"big{i}": os.urandom(3 << 20) for i in range(4)}
    for name, data in blobs.items():
        with (m.mountpoint / name).open("wb") as f:
            for off in range(0, len(data), 1 << 16):
                f.write(data[off:off + (1 << 16)])
        if name == "big1":
            srv.restart()
    m.flush()
    for name, data in blobs.items():
        assert digest(srv.export / name) == hashlib.sha256(data).hexdigest(), name


def test_conflicting_writer(export: Export, mount_factory: MountFactory,
                            allow_log_warnings: None) -> None:
    (export.raw_path / "report.txt").write_bytes(b"version 1\n")
    m = mount_factory(["writeback_delay=60"])
    assert (m.mountpoint / "report.txt").read_bytes() == b"version 1\n"
    with (m.mountpoint / "report.txt").open("r+b") as f:
        f.write(b"OUR EDIT!")
    export.overwrite_as_other_client("report.txt", b"their version 2, written first\n")
    m.flush()
    names = export.nfs_ls()
    conflict = [n for n in names if n.startswith("report.txt.wancache-conflict-")]
    assert len(conflict) == 1, names
    assert export.nfs_cat("report.txt") == b"their version 2, written first\n"
    assert export.nfs_cat(conflict[0]) == b"OUR EDIT!\n"
    assert m.request("stats")["writeback"]["conflicts"] == 1
    assert "conflict" in m.log()


def test_fsync_reaches_the_server(export: Export, mount_factory: MountFactory) -> None:
    m = mount_factory(["writeback_delay=60"])
    with (m.mountpoint / "journal.db").open("wb") as f:
        f.write(b"committed record\n")
        f.flush()
        assert not (export.raw_path / "journal.db").exists()     # journaled, not sent
        os.fsync(f.fileno())
        assert (export.raw_path / "journal.db").read_bytes() == b"committed record\n"
        f.write(b"not yet\n")
    assert (export.raw_path / "journal.db").read_bytes() == b"committed record\n"


def test_renames_and_unlinks_of_unflushed_files(export: Export,
                                                mount_factory: MountFactory) -> None:
    m = mount_factory(["writeback_delay=60"])
    mp = m.mountpoint
    (mp / "a").write_bytes(b"aaa")
    (mp / "b").write_bytes(b"bbb")
    os.rename(mp / "a", mp / "c")
    os.unlink(mp / "b")
    with (mp / "c").open("ab") as f:
        f.write(b"+more")
    (mp / "tmp").write_bytes(b"x")
    os.rename(mp / "tmp", mp / "final")      # the write-then-rename idiom
    assert sorted(os.listdir(mp)) == ["c", "final"]
    m.reset_rpc_calls()
    m.flush()
    assert export.nfs_ls() == ["c", "final"]
    assert export.nfs_cat("c") == b"aaa+more"
    calls = m.rpc_calls()
    assert calls["REMOVE"] == 0          # b never reached the server: nothing to remove


def test_temp_files_never_reach_the_server(export: Export, mount_factory: MountFactory) -> None:
    m = mount_factory(["writeback_delay=3"])
    m.reset_rpc_calls()
    for i in range(20):
        tmp = m.mountpoint / f".tmp{i}"
        tmp.write_bytes(b"scratch" * 100)
        tmp.unlink()
    (m.mountpoint / "kept").write_bytes(b"kept")
    m.flush()
    calls = m.rpc_calls()
    assert calls["CREATE"] == 1 and calls["REMOVE"] == 0 and calls["WRITE"] == 1
    assert export.nfs_ls() == ["kept"]


def test_full_cache_disk(export: Export, mount_factory: MountFactory, tmp_path: Path,
                         allow_log_warnings: None) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)], check=True)
    try:
        (export.raw_path / "r").write_bytes(os.urandom(2 << 20))
        m = mount_factory([f"cache_dir={small}/c", "writeback_delay=60", "max_dirty=64M"])
        (m.mountpoint / "small.txt").write_bytes(b"fits")
        with pytest.raises(OSError) as info, (m.mountpoint / "big").open("wb") as f:
            for _ in range(100):
                f.write(os.urandom(100_000))
        assert info.value.errno == 28       # ENOSPC, a clear error for the writer
        assert (m.mountpoint / "r").read_bytes() == (export.raw_path / "r").read_bytes()
        m.flush()
        assert export.nfs_cat("small.txt") == b"fits"
        assert m.proc is not None and m.proc.poll() is None   # the mount is alive
        m.unmount()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_after_a_crash_the_saved_metadata_is_not_served_disconnected(
        export: Export, mount_factory: MountFactory, allow_log_warnings: None) -> None:
    """The soak: after a kill -9, while the link was down, the mount served the state
    saved before the crash (new files at size 0, listings without the files made
    since), and `rm -rf` by that listing left files on the server."""
    (export.raw_path / "d").mkdir()
    (export.raw_path / "d" / "f").write_bytes(b"cached contents")
    with WanEmulatorThread(("127.0.0.1", export.server.nfs_port), LinkProfile()) as nfs_wan, \
            WanEmulatorThread(("127.0.0.1", export.server.mount_port), LinkProfile()) as mnt_wan:
        opts = ["timeout=2", "timeo=1", "writeback_delay=0"]
        first = mount_factory(opts, nfs_port=nfs_wan.port, mount_port=mnt_wan.port, name="c")
        assert os.listdir(first.mountpoint / "d") == ["f"]
        first.unmount()                    # saves the metadata caches: d holds f
        second = mount_factory(opts, nfs_port=nfs_wan.port, mount_port=mnt_wan.port, name="c")
        os.rename(second.mountpoint / "d" / "f", second.mountpoint / "d" / "g")
        second.flush()
        assert wait_until(lambda: second.request("stats")["journal"]["records_pending"] == 0,
                          30), "the journal to empty"
        second.kill(signal.SIGKILL)        # no save since the rename: the saved state is old
        assert export.nfs_ls("d") == ["g"]
        nfs_wan.stop()
        mnt_wan.stop()
        third = mount_factory(opts, nfs_port=nfs_wan.port, mount_port=mnt_wan.port, name="c")
        assert "mounting disconnected" in third.log()
        try:
            names = os.listdir(third.mountpoint / "d")
        except OSError:
            names = None                   # unknown while disconnected: fine
        assert names != ["f"], "the state saved before the crash was served"
        nfs_wan.start()
        mnt_wan.start()
        assert wait_until(lambda: _listdir(third.mountpoint / "d") == ["g"], 60)


def _listdir(path: Path) -> list[str] | None:
    try:
        return os.listdir(path)
    except OSError:
        return None


def test_mount_while_the_server_is_away(export: Export, mount_factory: MountFactory,
                                        allow_log_warnings: None) -> None:
    (export.raw_path / "d").mkdir()
    (export.raw_path / "d" / "f").write_bytes(b"cached contents")
    with WanEmulatorThread(("127.0.0.1", export.server.nfs_port), LinkProfile()) as nfs_wan, \
            WanEmulatorThread(("127.0.0.1", export.server.mount_port), LinkProfile()) as mnt_wan:
        first = mount_factory(["timeout=2", "timeo=1"], nfs_port=nfs_wan.port,
                              mount_port=mnt_wan.port, name="off")
        assert (first.mountpoint / "d" / "f").read_bytes() == b"cached contents"
        assert os.listdir(first.mountpoint / "d") == ["f"]
        first.unmount()                    # saves the metadata caches
        nfs_wan.stop()
        mnt_wan.stop()
        m = mount_factory(["timeout=2", "timeo=1", "writeback_delay=0"],
                          nfs_port=nfs_wan.port, mount_port=mnt_wan.port, name="off")
        assert "mounting disconnected" in m.log()
        assert os.listdir(m.mountpoint / "d") == ["f"]
        assert (m.mountpoint / "d" / "f").read_bytes() == b"cached contents"
        (m.mountpoint / "d" / "new").write_bytes(b"written offline")
        nfs_wan.start()
        mnt_wan.start()
        assert wait_until(lambda: m.request("stats")["writeback"]["pending"] == 0, 60), \
            "the journal to drain"
    assert (export.raw_path / "d" / "new").read_bytes() == b"written offline"
