"""`Operations` called directly (no kernel), over a real ganesha."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio

from tests.conftest import Export
from wancache.config import build_config
from wancache.fs import operations as ops_module
from wancache.fs.operations import Operations
from wancache.mount import build
from wancache.nfs_backend.client import ClientOptions, open_client


def ctx(uid: int = 0, gid: int = 0, umask: int = 0o022, pid: int = 0) -> Any:
    return SimpleNamespace(uid=uid, gid=gid, pid=pid or os.getpid(), umask=umask)


ROOT = ctx()


@pytest.fixture
async def ops(export: Export, nursery: trio.Nursery) -> AsyncIterator[Operations]:
    cfg = build_config(export.spec, "/nonexistent", ["cache=off"])
    client = await open_client(nursery, "127.0.0.1", export.export_path,
                               ClientOptions(nfs_port=export.server.nfs_port,
                                             mount_port=export.server.mount_port))
    store = (await build(client, cfg)).store
    yield Operations(store, cfg)
    client.close()


async def test_lookup_counts_and_forget(ops: Operations, export: Export) -> None:
    (export.path / "f").write_bytes(b"x")
    e1 = await ops.lookup(pyfuse3.ROOT_INODE, b"f", ROOT)
    e2 = await ops.lookup(pyfuse3.ROOT_INODE, b"f", ROOT)
    assert e1.st_ino == e2.st_ino == (export.path / "f").stat().st_ino
    assert len(ops.inodes) == 2
    await ops.forget([(e1.st_ino, 1)])
    assert e1.st_ino in ops.inodes          # one lookup left
    await ops.forget([(e1.st_ino, 1)])
    assert e1.st_ino not in ops.inodes      # no state kept for forgotten inodes
    assert len(ops.inodes) == 1
    await ops.forget([(12345, 7), (pyfuse3.ROOT_INODE, 100)])   # never raises
    assert pyfuse3.ROOT_INODE in ops.inodes


async def test_open_files_outlive_forget(ops: Operations) -> None:
    info, entry = await ops.create(pyfuse3.ROOT_INODE, b"new", 0o644,
                                   os.O_CREAT | os.O_RDWR, ROOT)
    await ops.forget([(entry.st_ino, 1)])
    assert await ops.write(info.fh, 0, b"still here") == 10
    assert await ops.read(info.fh, 0, 100) == b"still here"
    await ops.release(info.fh)
    assert entry.st_ino not in ops.inodes


async def test_errors_map_to_errno(ops: Operations) -> None:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.lookup(pyfuse3.ROOT_INODE, b"missing", ROOT)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.lookup(pyfuse3.ROOT_INODE, b"x" * 256, ROOT)
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.getattr(987654321, ROOT)
    assert info.value.errno == errno.ESTALE
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.getxattr(pyfuse3.ROOT_INODE, b"user.x", ROOT)
    assert info.value.errno == errno.ENOSYS   # the kernel answers ENOTSUP from then on
    await ops.mkdir(pyfuse3.ROOT_INODE, b"d", 0o755, ROOT)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.mkdir(pyfuse3.ROOT_INODE, b"d", 0o755, ROOT)
    assert info.value.errno == errno.EEXIST


async def test_unexpected_exceptions_become_eio_and_are_logged(
        ops: Operations, caplog: pytest.LogCaptureFixture, allow_log_warnings: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ops.store, "getattr", broken)
    with caplog.at_level(logging.ERROR, logger="wancache"), \
            pytest.raises(pyfuse3.FUSEError) as info:
        await ops.getattr(pyfuse3.ROOT_INODE, ROOT)
    assert info.value.errno == errno.EIO
    assert any("a bug" in (r.exc_text or "") or r.exc_info for r in caplog.records)

    def broken_forget(*args: object) -> None:
        raise RuntimeError("forget bug")

    monkeypatch.setattr(ops.inodes, "forget", broken_forget)
    await ops.forget([(5, 1)])   # logged, never raised


async def test_create_honours_mode_umask_and_caller(ops: Operations, export: Export) -> None:
    alice = ctx(uid=1001, gid=1001, umask=0o027)
    (export.path).chmod(0o777)
    info, entry = await ops.create(pyfuse3.ROOT_INODE, b"mine", 0o666,
                                   os.O_CREAT | os.O_WRONLY, alice)
    await ops.release(info.fh)
    st = (export.path / "mine").stat()
    assert (st.st_uid, st.st_gid) == (1001, 1001)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert stat.S_IMODE(entry.st_mode) == 0o640
    d = await ops.mkdir(pyfuse3.ROOT_INODE, b"dir", 0o777, alice)
    assert stat.S_IMODE(d.st_mode) == 0o750


async def test_exclusive_create_sees_the_server(ops: Operations, export: Export) -> None:
    (export.path / "exists").write_bytes(b"")
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.create(pyfuse3.ROOT_INODE, b"exists", 0o644,
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY, ROOT)
    assert info.value.errno == errno.EEXIST


async def test_stale_handle_is_re_resolved_by_path(ops: Operations, export: Export) -> None:
    (export.path / "f").write_bytes(b"data")
    entry = await ops.lookup(pyfuse3.ROOT_INODE, b"f", ROOT)
    node = ops.inodes.node(entry.st_ino)
    real = node.fh
    node.fh = bytes(len(real))   # a handle the server does not know
    attrs = await ops.getattr(entry.st_ino, ROOT)
    assert attrs.st_size == 4
    assert node.fh == real


async def test_stale_handle_of_a_removed_file_is_estale(ops: Operations,
                                                        export: Export) -> None:
    (export.path / "f").write_bytes(b"data")
    entry = await ops.lookup(pyfuse3.ROOT_INODE, b"f", ROOT)
    node = ops.inodes.node(entry.st_ino)
    await ops.unlink(pyfuse3.ROOT_INODE, b"f", ROOT)
    node.fh = bytes(len(node.fh))
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.getattr(entry.st_ino, ROOT)
    assert info.value.errno == errno.ESTALE


async def test_readdir_counts_only_entries_the_kernel_took(
        ops: Operations, export: Export, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(50):
        (export.path / f"f{i:02}").write_bytes(b"")
    taken: list[tuple[bytes, int, int]] = []

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if len(taken) >= 20:
            return False
        taken.append((name, attr.st_ino, next_id))
        return True

    monkeypatch.setattr(ops_module.pyfuse3, "readdir_reply", reply)
    fh = await ops.opendir(pyfuse3.ROOT_INODE, ROOT)
    await ops.readdir(fh, 0, None)  # type: ignore[arg-type]
    first = taken[:]
    names = [n for n, _, _ in first if n not in (b".", b"..")]
    # '.' and '..' are not counted; every other entry the kernel took is one lookup.
    assert len(ops.inodes) == 1 + len(names)
    taken.clear()
    await ops.readdir(fh, first[-1][2], None)  # type: ignore[arg-type]
    more = [n for n, _, _ in taken]
    assert not set(more) & {n for n, _, _ in first}
    await ops.releasedir(fh)
    for name, ino, _ in first + taken:
        if name not in (b".", b".."):
            await ops.forget([(ino, 1)])
    assert len(ops.inodes) == 1


async def test_rename_flags(ops: Operations, export: Export) -> None:
    for n in ("a", "b"):
        (export.path / n).write_bytes(n.encode())
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.rename(1, b"a", 1, b"b", pyfuse3.RENAME_NOREPLACE, ROOT)
    assert info.value.errno == errno.EEXIST
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.rename(1, b"a", 1, b"b", pyfuse3.RENAME_EXCHANGE, ROOT)
    assert info.value.errno == errno.EINVAL
    await ops.rename(1, b"a", 1, b"c", pyfuse3.RENAME_NOREPLACE, ROOT)
    await ops.rename(1, b"c", 1, b"b", 0, ROOT)
    assert (export.path / "b").read_bytes() == b"a"


async def test_read_only_mount(export: Export, nursery: trio.Nursery) -> None:
    cfg = build_config(export.spec, "/nonexistent", ["cache=off", "ro"])
    client = await open_client(nursery, "127.0.0.1", export.export_path,
                               ClientOptions(nfs_port=export.server.nfs_port,
                                             mount_port=export.server.mount_port))
    ops = Operations((await build(client, cfg)).store, cfg)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.mkdir(pyfuse3.ROOT_INODE, b"d", 0o755, ROOT)
    assert info.value.errno == errno.EROFS
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.open(pyfuse3.ROOT_INODE, os.O_WRONLY, ROOT)
    assert info.value.errno == errno.EROFS
    client.close()
