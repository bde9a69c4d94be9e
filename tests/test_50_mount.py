"""A real wancache FUSE mount over a real ganesha, driven by real tools."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bench.wanem import LinkProfile, WanEmulatorThread
from bench.wcmount import WancacheMount
from tests.conftest import CACHE_MODES, Export, MountFactory, run_tool

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fs(mode: str, mount_factory: MountFactory) -> WancacheMount:
    """A mount in each cache mode."""
    return mount_factory(CACHE_MODES[mode])


def sh(*argv: str | Path, cwd: Path | None = None) -> str:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"
    return proc.stdout


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_cp_tar_rsync_round_trips(fs: WancacheMount, export: Export, tmp_path: Path) -> None:
    src = REPO / "wancache"
    m = fs.mountpoint
    sh("cp", "-a", src, m / "cp")
    assert tree_digest(m / "cp") == tree_digest(src)
    sh("tar", "cf", tmp_path / "src.tar", "-C", REPO, "wancache", "bench")
    (m / "untar").mkdir()
    sh("tar", "xf", tmp_path / "src.tar", "-C", m / "untar")
    assert tree_digest(m / "untar" / "bench") == tree_digest(REPO / "bench")
    sh("tar", "cf", tmp_path / "back.tar", "-C", m / "untar", "wancache")
    (tmp_path / "back").mkdir()
    sh("tar", "xf", tmp_path / "back.tar", "-C", tmp_path / "back")
    assert tree_digest(tmp_path / "back" / "wancache") == tree_digest(src)
    sh("rsync", "-a", f"{REPO / 'tests'}/", f"{m / 'rsync'}/")
    assert tree_digest(m / "rsync") == tree_digest(REPO / "tests")
    # What reached the server, seen by an independent client:
    assert export.nfs_cat("cp/config.py") == (src / "config.py").read_bytes()
    assert "config.py" in export.nfs_ls("untar/wancache")
    assert (export.path / "rsync" / "conftest.py").read_bytes() == \
        (REPO / "tests" / "conftest.py").read_bytes()


def test_cp_a_keeps_modes_times_and_links(fs: WancacheMount, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "exe").write_bytes(b"#!/bin/sh\n")
    (src / "exe").chmod(0o751)
    (src / "data").write_bytes(os.urandom(10_000))
    os.utime(src / "data", ns=(1_000_000_000_123_456_789, 1_500_000_000_987_654_321))
    (src / "link").symlink_to("data")
    os.link(src / "data", src / "hard")
    sh("cp", "-a", src, fs.mountpoint / "dst")
    dst = fs.mountpoint / "dst"
    assert (dst / "exe").stat().st_mode & 0o7777 == 0o751
    assert (dst / "data").stat().st_mtime_ns == 1_500_000_000_987_654_321
    assert os.readlink(dst / "link") == "data"
    assert (dst / "hard").stat().st_ino == (dst / "data").stat().st_ino
    assert (dst / "data").stat().st_nlink == 2


def test_git_on_the_mount(fs: WancacheMount) -> None:
    repo = fs.mountpoint / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    sh(*git, "init", "-q", cwd=repo)
    for i in range(30):
        (repo / f"f{i}.txt").write_text(f"file {i}\n")
    sh(*git, "add", ".", cwd=repo)
    sh(*git, "commit", "-qm", "first", cwd=repo)
    assert sh("git", "status", "--porcelain", cwd=repo) == ""
    (repo / "f3.txt").write_text("changed\n")
    assert sh("git", "status", "--porcelain", cwd=repo).split() == ["M", "f3.txt"]
    sh(*git, "clone", "-q", repo, fs.mountpoint / "clone")
    assert (fs.mountpoint / "clone" / "f7.txt").read_text() == "file 7\n"
    assert sh("git", "log", "--oneline", cwd=fs.mountpoint / "clone").count("\n") == 1


def test_sparse_file_over_4_gib(fs: WancacheMount, export: Export) -> None:
    path = fs.mountpoint / "sparse"
    size = 5 << 30
    offset = (4 << 30) + 12345
    blob = os.urandom(300_000)
    with path.open("wb") as f:
        f.truncate(size)
        f.seek(offset)
        f.write(blob)
    with path.open("rb") as f:
        f.seek(offset)
        assert f.read(len(blob)) == blob
        f.seek(1 << 30)
        assert f.read(4096) == bytes(4096)
    assert path.stat().st_size == size
    st = (export.path / "sparse").stat()
    assert st.st_size == size and st.st_blocks * 512 < 64 << 20   # still sparse


def test_big_directory_and_odd_names(fs: WancacheMount, export: Export) -> None:
    d = fs.mountpoint / "big"
    d.mkdir()
    names = {f"entry {i:05d}" for i in range(2000)}
    for n in names:
        (d / n).write_bytes(b"")
    odd = [b"with space", b"tab\there", b"newline\nname", b"\xff\xfe not utf-8", b"caf\xc3\xa9"]
    for raw in odd:
        with open(os.path.join(os.fsencode(d), raw), "wb") as f:
            f.write(raw)
    listed = set(os.listdir(os.fsencode(d)))
    assert listed == {os.fsencode(n) for n in names} | set(odd)
    for raw in odd:
        with open(os.path.join(os.fsencode(export.path / "big"), raw), "rb") as f:
            assert f.read() == raw
    assert names <= set(export.nfs_ls("big"))


def test_hard_links_and_symlink_loops(fs: WancacheMount) -> None:
    m = fs.mountpoint
    (m / "a").write_bytes(b"one")
    os.link(m / "a", m / "b")
    (m / "b").write_bytes(b"two")
    assert (m / "a").read_bytes() == b"two"
    assert (m / "a").stat().st_nlink == 2
    os.symlink("loop2", m / "loop1")
    os.symlink("loop1", m / "loop2")
    with pytest.raises(OSError) as info:
        (m / "loop1").read_bytes()
    assert info.value.errno == 40   # ELOOP


def test_concurrent_writers_to_different_files(fs: WancacheMount, export: Export) -> None:
    blobs = {f"w{i}": os.urandom(200_000 + i) for i in range(12)}

    def writer(name: str) -> None:
        with (fs.mountpoint / name).open("wb") as f:
            data = blobs[name]
            for off in range(0, len(data), 7000):
                f.write(data[off:off + 7000])

    threads = [threading.Thread(target=writer, args=(n,)) for n in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, data in blobs.items():
        assert export.nfs_cat(name) == data


def test_same_file_opened_read_only_and_write_only(fs: WancacheMount) -> None:
    path = fs.mountpoint / "shared"
    path.write_bytes(b"0123456789")
    reader = os.open(path, os.O_RDONLY)
    writer = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(writer, b"AB", 2)
        os.fsync(writer)
        assert os.pread(reader, 10, 0) == b"01AB456789"
    finally:
        os.close(reader)
        os.close(writer)


def test_forgotten_inodes_leave_no_state(fs: WancacheMount) -> None:
    tree = fs.mountpoint / "tree"
    for i in range(20):
        (tree / f"d{i}").mkdir(parents=True)
        for j in range(10):
            (tree / f"d{i}" / f"f{j}").write_bytes(b"x")
    sh("find", tree, "-type", "f")
    assert fs.request("stats")["inodes"] > 200
    fs.drop_kernel_caches()
    deadline = time.monotonic() + 10
    while fs.request("stats")["inodes"] > 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fs.request("stats")["inodes"] <= 5


def test_server_down_gives_eio_not_a_hung_mount(export: Export, mount_factory: MountFactory,
                                                allow_log_warnings: None) -> None:
    (export.path / "f").write_bytes(b"x")
    with WanEmulatorThread(("127.0.0.1", export.server.nfs_port), LinkProfile()) as wan:
        m = mount_factory(["cache=off", "timeout=2", "timeo=1"], nfs_port=wan.port)
        assert (m.mountpoint / "f").read_bytes() == b"x"
        wan.blackhole(True)
        started = time.monotonic()
        with pytest.raises(OSError) as info:
            (m.mountpoint / "f").stat()
        assert info.value.errno in (5, 110)   # EIO / ETIMEDOUT
        assert time.monotonic() - started < 15
        wan.blackhole(False)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert (m.mountpoint / "f").read_bytes() == b"x"
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.3)


def test_independent_client_sees_every_change(fs: WancacheMount, export: Export) -> None:
    m = fs.mountpoint
    (m / "d").mkdir()
    (m / "d" / "f").write_bytes(b"hello")
    os.rename(m / "d" / "f", m / "d" / "g")
    os.symlink("g", m / "d" / "s")
    assert export.nfs_ls("d") == ["g", "s"]
    assert export.nfs_cat("d/g") == b"hello"
    os.unlink(m / "d" / "g")
    os.unlink(m / "d" / "s")
    os.rmdir(m / "d")
    assert export.nfs_ls() == []
    run_tool(["nfs-ls", export.url()])


def test_unmount_right_after_closing_unlinked_files(mount_factory: MountFactory,
                                                    export: Export) -> None:
    """close() hands RELEASE to the kernel's background queue; an unmount right after
    aborts the connection while releases are still being answered, and the reply to
    the kernel fails with ENOENT.  pyfuse3 logged that as an ERROR (CI, test_64's
    unlinked-open-file test), though the release's own work (remove the hidden name)
    is done and nothing is lost.  The unmount must leave no hidden name on the server
    and log no error."""
    m = mount_factory(["writeback_delay=0"], name="m")
    fds = []
    for i in range(64):
        fds.append(os.open(m.mountpoint / f"f{i}", os.O_RDWR | os.O_CREAT, 0o644))
        os.write(fds[-1], b"x")
        os.unlink(m.mountpoint / f"f{i}")
    for fd in fds:
        os.close(fd)
    assert m.unmount() == 0
    assert os.listdir(export.raw_path) == []
