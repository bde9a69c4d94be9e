"""The test NFS server (bench/nfsserver.py) really serves the export over NFSv3."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from bench import nfsserver
from bench.nfsserver import NfsServer, rpc_null
from tests.conftest import Export, run_tool


def test_serves_files_written_locally_and_through_nfs(export: Export, tmp_path: Path) -> None:
    (export.path / "local.txt").write_bytes(b"written on the server's disk\n")
    assert export.nfs_cat("local.txt") == b"written on the server's disk\n"

    blob = os.urandom(300_000)
    (tmp_path / "blob").write_bytes(blob)
    export.nfs_cp_in(tmp_path / "blob", "via-nfs.bin")
    assert (export.path / "via-nfs.bin").read_bytes() == blob
    assert export.nfs_cat("via-nfs.bin") == blob
    assert export.nfs_ls() == ["local.txt", "via-nfs.bin"]


def test_answers_nfs3_and_mount3_on_its_own_ports(nfs_server: NfsServer) -> None:
    assert nfs_server.host == "127.0.0.1"
    assert rpc_null(nfs_server.nfs_port, 100003, 3)
    assert rpc_null(nfs_server.mount_port, 100005, 3)
    assert rpc_null(nfs_server.nfs_port, 100003, 4)
    conf = (nfs_server.workdir / "ganesha.conf").read_text()
    assert "Bind_addr = 127.0.0.1" in conf
    assert "No_Root_Squash" in conf


def test_export_is_root_writable_without_squash(export: Export, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    export.nfs_cp_in(tmp_path / "f", "owned-by-root")
    st = (export.path / "owned-by-root").stat()
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_private_server_restarts_on_same_ports(private_nfs_server: NfsServer,
                                               tmp_path: Path) -> None:
    srv = private_nfs_server
    (srv.export / "keep.txt").write_bytes(b"survives a restart")
    ports, pid = (srv.nfs_port, srv.mount_port), srv.pid
    srv.restart()
    assert (srv.nfs_port, srv.mount_port) == ports
    assert srv.pid != pid
    assert run_tool(["nfs-cat", srv.url("keep.txt")]).stdout == b"survives a restart"


def test_stop_is_by_pid_and_kill_is_a_crash(private_nfs_server: NfsServer) -> None:
    srv = private_nfs_server
    pid = srv.pid
    assert pid is not None
    srv.kill()
    assert not rpc_null(srv.nfs_port, 100003, 3, timeout=0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, signal.SIG_DFL)
    srv.start()
    assert rpc_null(srv.nfs_port, 100003, 3)


def test_two_servers_side_by_side(nfs_server: NfsServer, private_nfs_server: NfsServer) -> None:
    assert nfs_server.nfs_port != private_nfs_server.nfs_port
    (nfs_server.export / "a-marker").write_bytes(b"a")
    (private_nfs_server.export / "b-marker").write_bytes(b"b")
    assert run_tool(["nfs-cat", private_nfs_server.url("b-marker")]).stdout == b"b"
    assert run_tool(["nfs-cat", nfs_server.url("a-marker")]).stdout == b"a"


def test_missing_ganesha_names_the_debian_packages(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    monkeypatch.setattr(nfsserver.shutil, "which", lambda _name: None)
    monkeypatch.setattr(nfsserver, "Path", _NoFiles)
    with pytest.raises(nfsserver.NfsServerError, match=r"apt-get install .*nfs-ganesha"):
        nfsserver.NfsServer(export=tmp_path / "e", workdir=tmp_path).start()


class _NoFiles(type(Path())):  # type: ignore[misc]
    """A Path on which no file exists (pretends ganesha is not installed)."""

    def exists(self, *, follow_symlinks: bool = True) -> bool:
        return False
