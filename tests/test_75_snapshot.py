"""One stats snapshot of a mount (against the fake backend), rendered by the control
socket's `status`/`stats` and by the Prometheus exporter: the same numbers in all
three, every metric the exporter served before still there, and the new gauges."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import FakeNfs
from wancache import cli, debugmem, snapshot
from wancache.cache.blocks import BlockStore
from wancache.cache.journal import Journal
from wancache.config import build_config
from wancache.creds import Cred
from wancache.fs.operations import Operations
from wancache.handlers import stats_view, status_view
from wancache.metrics import exposition
from wancache.mount import build

ROOT = Cred.root()
MiB = 1 << 20

# Every family the exporter served before the snapshot (issue 14): none may go.
OLD_FAMILIES = {
    "wancache_info", "wancache_server_up", "wancache_cache_requests", "wancache_attr_changes",
    "wancache_attr_cache_entries", "wancache_dir_cache_listings", "wancache_cache_bytes",
    "wancache_cache_limit_bytes", "wancache_cache_blocks", "wancache_cache_pinned_files",
    "wancache_cache_evictions", "wancache_cache_evicted_bytes",
    "wancache_cache_corrupt_blocks", "wancache_cache_put_failures", "wancache_rpc_calls",
    "wancache_rpc_errors", "wancache_rpc_retransmits", "wancache_rpc_sent_bytes",
    "wancache_rpc_received_bytes", "wancache_rpc_duration_seconds", "wancache_rpc_in_flight",
    "wancache_rpc_reconnects", "wancache_read_bytes", "wancache_blocks_fetched",
    "wancache_readahead_blocks", "wancache_dirty_bytes", "wancache_writeback_pending_ops",
    "wancache_writeback_oldest_seconds", "wancache_writeback_ops", "wancache_writeback_bytes",
    "wancache_writeback_retries", "wancache_conflicts", "wancache_lost",
    "wancache_fuse_requests", "wancache_open_files",
}
NEW_GAUGES = {
    "wancache_journal_bytes", "wancache_journal_limit_bytes", "wancache_journal_segments",
    "wancache_journal_pending_records", "wancache_journal_pending_bytes",
    "wancache_cache_holes", "wancache_cache_meta_bytes", "wancache_process_open_fds",
    "wancache_process_resident_memory_bytes", "wancache_process_peak_resident_memory_bytes",
    "wancache_process_threads", "wancache_trio_tasks", "wancache_inodes", "wancache_nodes",
    "wancache_overlay_entries", "wancache_writeback_graph_entries", "wancache_server_offline",
}
NEW_COUNTERS = {"wancache_journal_compactions", "wancache_rpc_failed_fast"}


def families(text: bytes) -> dict[str, Any]:
    """family -> {sample name: value} (unlabelled samples, or the first one) and type."""
    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text.decode()):
        out[fam.name] = {"type": fam.type, **{s.name: s.value for s in fam.samples}}
    return out


async def test_status_stats_and_metrics_render_one_snapshot(tmp_path: Path) -> None:
    fake = FakeNfs()
    fake.server_create("/old", b"s" * 100_000)
    cfg = build_config("fake:/x", str(tmp_path / "mnt"),
                       [f"cache_dir={tmp_path}", "writeback_delay=60", "block_size=64K"])
    journal = await Journal.open(tmp_path / "journal", max_bytes=64 * MiB)
    blocks = await BlockStore.open(tmp_path / "blocks", size_limit=32 * MiB,
                                   block_size=64 << 10)
    try:
        async with trio.open_nursery() as nursery:
            parts = await build(fake, cfg, nursery, blocks=blocks,  # type: ignore[arg-type]
                                journal=journal)
            ops = Operations(parts.store, cfg)
            store = parts.store
            ctx: Any = SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)
            await ops.lookup(pyfuse3.ROOT_INODE, b"old", ctx)      # one inode more
            old, _ = await store.lookup(store.root, b"old", ROOT)
            assert await store.read(old, 0, 100_000, ROOT) == b"s" * 100_000
            f, _ = await store.create(store.root, b"new", 0o644, ROOT, exclusive=True)
            await store.write(f, 0, b"w" * 300_000, ROOT)

            snap = await snapshot.take(parts, ops)
            status, stats = status_view(snap), stats_view(snap)
            fams = families(exposition(cfg, snap))
            assert parts.flusher is not None
            await parts.flusher.stop()
            assert parts.writeback is not None
            await parts.writeback.drain()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await journal.close()
            await blocks.close()

    p = snap.process
    assert p.pid == os.getpid() and 0 < p.rss_bytes <= p.peak_rss_bytes
    assert p.open_fds > 0 and p.threads >= 1 and p.trio_tasks >= 3
    assert snap.tables.inodes == 2 and snap.tables.nodes >= 3
    assert snap.writeback is not None
    j = snap.writeback.journal
    assert j.bytes_on_disk >= 300_000 and j.segments >= 1 and j.records_pending >= 2
    assert j.bytes_pending >= 300_000 and j.max_bytes == 64 * MiB
    # status, stats and /metrics say the same
    assert status["journal"]["bytes_on_disk"] == stats["journal"]["bytes_on_disk"] == \
        fams["wancache_journal_bytes"]["wancache_journal_bytes"] == j.bytes_on_disk
    assert status["writeback"]["dirty_bytes"] == stats["writeback"]["dirty_bytes"] == \
        fams["wancache_dirty_bytes"]["wancache_dirty_bytes"] >= 300_000
    assert status["writeback"]["graph_size"] == stats["writeback"]["graph_size"] == \
        fams["wancache_writeback_graph_entries"]["wancache_writeback_graph_entries"] > 0
    assert status["process"]["open_fds"] == stats["process"]["open_fds"] == \
        fams["wancache_process_open_fds"]["wancache_process_open_fds"] == p.open_fds
    assert status["tables"]["inodes"] == stats["inodes"] == \
        fams["wancache_inodes"]["wancache_inodes"] == 2
    assert status["cache"]["size_bytes"] == stats["blocks"]["limit"] == \
        fams["wancache_cache_limit_bytes"]["wancache_cache_limit_bytes"] == 32 * MiB
    assert status["rpc"]["offline"] is stats["offline"] is False
    assert fams["wancache_server_offline"]["wancache_server_offline"] == 0
    # every family served before is still served; the new ones with their types
    assert set(fams) >= OLD_FAMILIES
    for name in NEW_GAUGES:
        assert fams[name]["type"] == "gauge", name
    for name in NEW_COUNTERS:
        assert fams[name]["type"] == "counter", name
    # the human form shows the journal and the daemon
    text = cli.status_text({"mountpoint": "/m", "server": "s:/x", "state": "up", "pid": 1,
                            "leases": {"files": [1, 2], "directories": [1, 2],
                                       "negative": 1, "consistency": "close-to-open"},
                            "metrics": "", **status})
    assert "  journal     " in text and "records pending" in text
    assert "  daemon      " in text and " fds, " in text


async def test_snapshot_is_a_copy() -> None:
    """Counters taken do not move under the reader."""
    fake = FakeNfs()
    cfg = build_config("fake:/x", "/mnt", ["cache=off"])
    async with trio.open_nursery() as nursery:
        parts = await build(fake, cfg, nursery)  # type: ignore[arg-type]
        ops = Operations(parts.store, cfg)
        snap = await snapshot.take(parts, ops)
        calls = dict(snap.rpc.stats.snapshot())
        await fake.getattr(fake.root_fh, ROOT)
        assert fake.stats.snapshot() != calls
        assert dict(snap.rpc.stats.snapshot()) == calls
        assert snap.blocks is None and snap.writeback is None and snap.data is None
        status = status_view(snap)
        assert status["journal"]["bytes_on_disk"] == 0 and not status["writeback"]["enabled"]
        nursery.cancel_scope.cancel()


async def test_memory_and_tasks_debug_commands() -> None:
    with pytest.raises(ValueError, match="action=start"):
        debugmem.command({"action": "top"})
    assert debugmem.command({"action": "start", "frames": 2}) == {"tracing": True}
    try:
        held = [bytes(1 << 20) for _ in range(4)]
        top = debugmem.command({"action": "top", "limit": 5})
        assert top["traced_bytes"] >= 4 << 20 and top["rss_bytes"] > 0
        assert top["top"][0]["bytes"] >= 4 << 20 and "test_75_snapshot.py" in \
            top["top"][0]["where"]
        assert top["objects"] and len(held) == 4
    finally:
        assert debugmem.command({"action": "stop"}) == {"tracing": False}
    trimmed = debugmem.command({"action": "trim"})
    assert trimmed["rss_before"] > 0 and trimmed["rss_after"] > 0
    with pytest.raises(ValueError, match="memory action"):
        debugmem.command({"action": "nonsense"})
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(trio.sleep_forever, name="sleeper")
        await trio.testing.wait_all_tasks_blocked()
        assert ("sleeper", 3) in debugmem.tasks()
        assert snapshot.trio_tasks() >= 4
        nursery.cancel_scope.cancel()
