"""Metadata caches on a real mount over ganesha, proved with the daemon's RPC counters."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.conftest import Export, MountFactory


def ls_l(path: Path) -> list[str]:
    out = subprocess.run(["ls", "-l", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def other_client_writes(export: Export, tmp_path: Path, name: str, data: bytes) -> None:
    local = tmp_path / f"other-{time.monotonic_ns()}"
    local.write_bytes(data)
    export.nfs_cp_in(local, name)


def test_ls_l_of_2000_entries(export: Export, mount_factory: MountFactory) -> None:
    big = export.path / "big"
    big.mkdir()
    for i in range(2000):
        (big / f"file-{i:04}").write_bytes(b"x" * (i % 7))
    m = mount_factory(["actimeo=3", "prefetch_depth=0"])
    m.reset_rpc_calls()
    cold = ls_l(m.mountpoint / "big")
    calls = m.rpc_calls()
    assert len(cold) == 2001
    others = sum(n for proc, n in calls.items() if proc != "READDIRPLUS")
    assert calls["READDIRPLUS"] >= 1 and others <= 2, calls   # nothing per entry

    m.reset_rpc_calls()
    assert ls_l(m.mountpoint / "big") == cold
    assert sum(m.rpc_calls().values()) == 0                    # within the lease

    time.sleep(3.5)                                            # every lease expired
    m.reset_rpc_calls()
    assert ls_l(m.mountpoint / "big") == cold
    calls = m.rpc_calls()
    assert calls["GETATTR"] <= 1, calls                        # per directory
    assert calls["LOOKUP"] <= 1 and calls["READDIRPLUS"] <= 40, calls


def test_other_clients_changes_visible_within_one_lease(export: Export, tmp_path: Path,
                                                        mount_factory: MountFactory) -> None:
    other_client_writes(export, tmp_path, "f", b"version one")
    m = mount_factory(["actimeo=2"])
    f = m.mountpoint / "f"
    assert f.read_bytes() == b"version one"
    export.overwrite_as_other_client("f", b"version two, longer")
    deadline = time.monotonic() + 2 + 1.5
    while f.read_bytes() != b"version two, longer":
        assert time.monotonic() < deadline, "change not visible within one lease"
        time.sleep(0.1)


def test_cto_sees_changes_at_the_next_open(export: Export, tmp_path: Path,
                                           mount_factory: MountFactory) -> None:
    other_client_writes(export, tmp_path, "f", b"first")
    m = mount_factory(["consistency=cto", "actimeo=600"])
    f = m.mountpoint / "f"
    assert f.read_bytes() == b"first"
    export.overwrite_as_other_client("f", b"second version")
    assert f.read_bytes() == b"second version"                 # no waiting for a lease
    m.reset_rpc_calls()
    os.stat(f)
    assert m.rpc_calls()["GETATTR"] == 0                       # stat alone: still leased


def test_name_created_elsewhere_found_after_negative_lease(export: Export, tmp_path: Path,
                                                           mount_factory: MountFactory) -> None:
    m = mount_factory(["neg_lease=2", "acdirmin=60", "acdirmax=60"])
    target = m.mountpoint / "late"
    assert not target.exists()
    m.reset_rpc_calls()
    for _ in range(5):
        assert not target.exists()
    assert sum(m.rpc_calls().values()) == 0                    # negative entry cached
    other_client_writes(export, tmp_path, "late", b"here now")
    deadline = time.monotonic() + 2 + 1.5
    while not target.exists():
        assert time.monotonic() < deadline, "new name not found after the negative lease"
        time.sleep(0.1)
    assert target.read_bytes() == b"here now"


def test_tree_walk_prefetches_subdirectories(export: Export, mount_factory: MountFactory) -> None:
    for i in range(10):
        for j in range(5):
            d = export.path / "tree" / f"d{i}" / f"e{j}"
            d.mkdir(parents=True)
            (d / "leaf").write_bytes(b"")
    m = mount_factory(["prefetch_depth=3"])
    m.reset_rpc_calls()
    out = subprocess.run(["find", str(m.mountpoint / "tree")], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert len(out) == 1 + 10 + 50 + 50
    calls = m.rpc_calls()
    # One listing per directory (and one of the mount root, read when "tree" was
    # looked up in it) and no per-entry lookups: prefetch did the walking.
    assert calls["READDIRPLUS"] <= 62, calls
    assert calls["LOOKUP"] <= 2 and calls["GETATTR"] <= 2, calls
