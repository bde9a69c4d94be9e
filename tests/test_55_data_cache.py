"""Block cache and read-ahead on a real mount over ganesha (RPC counters, not timings)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Export, MountFactory, wait_until

MiB = 1 << 20


def stats(m) -> dict:
    return m.request("stats")


def test_random_reads_match_a_local_copy(export: Export, mount_factory: MountFactory,
                                         tmp_path: Path) -> None:
    blob = bytearray(os.urandom(5 * MiB + 777))
    blob[2 * MiB:3 * MiB] = bytes(MiB)          # a hole
    with (export.path / "f").open("wb") as f:
        f.write(blob[:2 * MiB])
        f.seek(3 * MiB)
        f.write(blob[3 * MiB:])
    m = mount_factory(["block_size=256K", "readahead=1M"])
    fd = os.open(m.mountpoint / "f", os.O_RDONLY)

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.integers(0, len(blob) + 1000), st.integers(0, 700_000))
    def check(offset: int, length: int) -> None:
        assert os.pread(fd, length, offset) == bytes(blob[offset:offset + length])

    try:
        check()
    finally:
        os.close(fd)


def test_reread_after_remount_costs_no_read(export: Export, mount_factory: MountFactory) -> None:
    blob = os.urandom(6 * MiB)
    (export.path / "f").write_bytes(blob)
    m = mount_factory(["cache_size=64M"], name="first")
    assert (m.mountpoint / "f").read_bytes() == blob
    assert m.rpc_calls()["READ"] == 6
    m.unmount()
    again = mount_factory(["cache_size=64M"], name="first")   # same cache_dir
    again.reset_rpc_calls()
    assert (again.mountpoint / "f").read_bytes() == blob
    assert again.rpc_calls()["READ"] == 0


def test_sequential_read_reads_ahead(export: Export, mount_factory: MountFactory) -> None:
    (export.path / "f").write_bytes(os.urandom(16 * MiB))
    m = mount_factory(["block_size=1M", "readahead=8M"])
    with (m.mountpoint / "f").open("rb") as f:
        f.read(256 << 10)
        time.sleep(0.5)
        assert stats(m)["data"]["ahead_fetched"] >= 2
        while f.read(MiB):
            pass
    assert m.rpc_calls()["READ"] == 16          # every block exactly once


def test_corrupt_block_is_dropped_and_refetched(export: Export, mount_factory: MountFactory,
                                                allow_log_warnings: None,
                                                tmp_path: Path) -> None:
    blob = os.urandom(4 * MiB)
    (export.path / "f").write_bytes(blob)
    m = mount_factory([], name="c")
    assert (m.mountpoint / "f").read_bytes() == blob
    m.unmount()
    block_files = sorted((tmp_path / "cache-c" / "blocks").rglob("*.val"))
    assert len(block_files) == 4
    damaged = bytearray(block_files[1].read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    block_files[1].write_bytes(bytes(damaged))
    block_files[2].write_bytes(block_files[2].read_bytes()[:1000])   # truncated
    again = mount_factory([], name="c")
    again.drop_kernel_caches()
    again.reset_rpc_calls()
    assert (again.mountpoint / "f").read_bytes() == blob   # never the bad bytes
    assert stats(again)["blocks"]["corrupt"] == 2
    assert again.rpc_calls()["READ"] == 2                    # healed from the server
    assert "failed" in again.log() or "corrupt" in again.log().lower()


def test_eviction_keeps_the_cache_under_its_limit(export: Export,
                                                  mount_factory: MountFactory) -> None:
    for i in range(3):
        (export.path / f"f{i}").write_bytes(os.urandom(4 * MiB))
    m = mount_factory(["cache_size=6M", "block_size=1M"])
    for i in range(3):
        (m.mountpoint / f"f{i}").read_bytes()
    deadline = time.monotonic() + 10       # blocks are stored in the background

    def settled() -> bool:
        b = stats(m)["blocks"]
        return b["puts"] + b["put_failures"] >= 12

    while not settled() and time.monotonic() < deadline:
        time.sleep(0.1)
    blocks = stats(m)["blocks"]
    assert blocks["puts"] + blocks["put_failures"] == 12
    assert blocks["bytes_used"] <= 6 * MiB
    assert blocks["evictions"] >= 4


def test_sparse_file_costs_no_cache_disk(export: Export, mount_factory: MountFactory) -> None:
    """Regression (issue 14): blocks of sparse holes filled the cache disk."""
    with (export.path / "sparse").open("wb") as f:
        f.seek(16 * MiB)
        f.write(b"end")
    m = mount_factory(["block_size=1M", "cache_size=8M"])
    assert (m.mountpoint / "sparse").read_bytes() == bytes(16 * MiB) + b"end"
    assert wait_until(lambda: stats(m)["blocks"]["puts"] >= 17, 10)
    blocks = stats(m)["blocks"]
    assert blocks["holes"] == 16 and blocks["blocks"] == 17 and blocks["evictions"] == 0
    assert blocks["bytes_used"] < MiB      # 16 rows and one 4 KiB file, not 16 MiB
    m.drop_kernel_caches()
    m.reset_rpc_calls()
    assert (m.mountpoint / "sparse").read_bytes() == bytes(16 * MiB) + b"end"
    assert m.rpc_calls()["READ"] == 0


def test_change_on_the_server_invalidates_blocks(export: Export,
                                                 mount_factory: MountFactory) -> None:
    (export.path / "f").write_bytes(b"old" * 100_000)
    m = mount_factory(["actimeo=2"])
    assert (m.mountpoint / "f").read_bytes()[:3] == b"old"
    export.overwrite_as_other_client("f", b"new" * 200_000)
    deadline = time.monotonic() + 2 + 1.5
    while (m.mountpoint / "f").read_bytes() != b"new" * 200_000:
        assert time.monotonic() < deadline, "old blocks served past the lease"
        time.sleep(0.1)


def test_file_growing_on_the_server(export: Export, mount_factory: MountFactory) -> None:
    (export.path / "log").write_bytes(b"line 1\n")
    m = mount_factory(["actimeo=1"])
    assert (m.mountpoint / "log").read_bytes() == b"line 1\n"
    grown = b"line 1\n" + b"line 2\n" * 50_000
    export.overwrite_as_other_client("log", grown)
    deadline = time.monotonic() + 3
    while (m.mountpoint / "log").read_bytes() != grown:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_warm_reread_never_reaches_the_daemon(export: Export,
                                              mount_factory: MountFactory) -> None:
    (export.path / "f").write_bytes(os.urandom(2 * MiB))
    m = mount_factory([])
    data = (m.mountpoint / "f").read_bytes()
    before = stats(m)["data"]
    assert (m.mountpoint / "f").read_bytes() == data         # kernel page cache (keep_cache)
    after = stats(m)["data"]
    assert after["cache_bytes"] == before["cache_bytes"]
    assert m.rpc_calls()["READ"] == 2
