"""Prometheus exporter of one mount: `metrics=HOST:PORT` (default 127.0.0.1:9477).

Each scrape takes one `wancache.snapshot` of the mount (what `wancache status`
renders too) and a custom collector renders it; nothing is sampled in between.
The HTTP endpoint is served by trio in the mount's own event loop, so a scrape
sees consistent numbers.  Every series carries `mount="<mount point>"`.  If the address cannot
be bound the mount logs one warning and serves without metrics.

Only counters, sizes and procedure names are exported: no file names, no contents.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from wancache import snapshot
from wancache.control import mount_label
from wancache.nfs_backend.stats import LATENCY_BUCKETS

if TYPE_CHECKING:
    from wancache.components import Components
    from wancache.config import Config
    from wancache.fs.operations import Operations
    from wancache.snapshot import MountSnapshot

log = logging.getLogger(__name__)

MAX_REQUEST = 16 << 10     # bytes of an HTTP request we read
REQUEST_TIMEOUT = 10.0     # seconds a scraper gets to send its request
_listening = ""            # the address actually served ("" if none)


def listening() -> str:
    """HOST:PORT the exporter of this process serves ("" when off or not bound)."""
    return _listening


def split_address(addr: str) -> tuple[str, int]:
    """'127.0.0.1:9477' / '[::1]:9477' -> (host, port)."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class MountCollector(Collector):
    """Every metric of one mount, rendered from one snapshot."""

    def __init__(self, cfg: Config, snap: MountSnapshot) -> None:
        self.cfg = cfg
        self.snap = snap
        self.mount = mount_label(cfg.mountpoint)

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=["mount"])
        g.add_metric([self.mount], value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=["mount"])
        c.add_metric([self.mount], value)
        return c

    def collect(self) -> Iterator[Metric]:
        m, s = self.mount, self.snap
        info = GaugeMetricFamily("wancache_info", "The mount and its server (always 1).",
                                 labels=["mount", "server", "consistency"])
        info.add_metric([m, self.cfg.spec, self.cfg.consistency], 1)
        yield info
        yield self._gauge("wancache_server_up",
                          "1 while the NFS server is connected, 0 while disconnected.",
                          1 if s.rpc.server_up else 0)
        yield self._gauge("wancache_server_offline",
                          "1 while the server is known unreachable (calls fail at once).",
                          1 if s.rpc.offline else 0)
        yield from self._caches()
        yield from self._blocks()
        yield from self._rpc()
        yield from self._data()
        yield from self._writeback()
        yield from self._journal()
        yield from self._process()
        fuse = CounterMetricFamily("wancache_fuse_requests", "FUSE requests served.",
                                   labels=["mount", "op"])
        for op, n in sorted(s.fuse_requests.items()):
            fuse.add_metric([m, op], n)
        yield fuse
        yield self._gauge("wancache_open_files", "Files open through the mount.",
                          s.tables.open_files)

    def _caches(self) -> Iterator[Metric]:
        m, s = self.mount, self.snap
        req = CounterMetricFamily(
            "wancache_cache_requests", "Cache lookups by cache and result.",
            labels=["mount", "cache", "result"])
        req.add_metric([m, "attr", "hit"], s.attrs.hits)
        req.add_metric([m, "attr", "miss"], s.attrs.misses)
        req.add_metric([m, "dir", "hit"], s.dirs.hits)
        req.add_metric([m, "dir", "miss"], s.dirs.misses)
        if s.blocks is not None:
            req.add_metric([m, "block", "hit"], s.blocks.stats.hits)
            req.add_metric([m, "block", "miss"], s.blocks.stats.misses)
        yield req
        yield self._counter("wancache_attr_changes",
                            "Attribute updates that showed a changed file.", s.attrs.changes)
        t = s.tables
        yield self._gauge("wancache_attr_cache_entries", "Attribute cache entries.",
                          t.attr_entries)
        yield self._gauge("wancache_dir_cache_listings", "Cached directory listings.",
                          t.dir_listings)
        yield self._gauge("wancache_inodes", "Inodes the kernel holds of the mount.",
                          t.inodes)
        yield self._gauge("wancache_nodes", "Entries of the node table (live file handles).",
                          t.nodes)
        yield self._gauge("wancache_overlay_entries",
                          "Files and directories with changes not yet on the server.",
                          t.overlay_entries)

    def _blocks(self) -> Iterator[Metric]:
        if self.snap.blocks is None:
            return
        b, limit = self.snap.blocks.stats, self.snap.blocks.limit_bytes
        yield self._gauge("wancache_cache_bytes", "Bytes used by the block cache.",
                          b.bytes_used)
        yield self._gauge("wancache_cache_limit_bytes", "Size limit of the block cache.",
                          limit)
        yield self._gauge("wancache_cache_meta_bytes",
                          "Of the block cache's bytes, its index and directories.",
                          b.meta_bytes)
        yield self._gauge("wancache_cache_blocks", "Blocks in the block cache.", b.blocks)
        yield self._gauge("wancache_cache_holes",
                          "Of the cached blocks, holes (stored as markers).", b.holes)
        yield self._gauge("wancache_cache_pinned_files", "Pinned files.",
                          self.snap.blocks.pinned_files)
        yield self._counter("wancache_cache_evictions",
                            "Blocks evicted from the block cache.", b.evictions)
        yield self._counter("wancache_cache_evicted_bytes",
                            "Bytes evicted from the block cache.", b.evicted_bytes)
        yield self._counter("wancache_cache_corrupt_blocks",
                            "Cached blocks dropped because they failed a check.", b.corrupt)
        yield self._counter("wancache_cache_put_failures",
                            "Blocks that could not be stored in the cache.", b.put_failures)

    def _rpc(self) -> Iterator[Metric]:
        m = self.mount
        st = self.snap.rpc.stats
        labels = ["mount", "program", "proc"]
        calls = CounterMetricFamily("wancache_rpc_calls", "RPC calls sent.", labels=labels)
        errors = CounterMetricFamily("wancache_rpc_errors",
                                     "RPC calls that got no reply (timeouts, lost "
                                     "connections).", labels=labels)
        retrans = CounterMetricFamily("wancache_rpc_retransmits", "RPC calls sent again.",
                                      labels=labels)
        sent = CounterMetricFamily("wancache_rpc_sent_bytes", "Bytes of RPC calls sent.",
                                   labels=labels)
        received = CounterMetricFamily("wancache_rpc_received_bytes",
                                       "Bytes of RPC replies received.", labels=labels)
        duration = HistogramMetricFamily("wancache_rpc_duration_seconds",
                                         "Time from sending an RPC call to its reply.",
                                         labels=labels)
        for name, p in sorted(st.procs.items()):
            program, _, proc = name.rpartition(".")
            lv = [m, program, proc]
            calls.add_metric(lv, p.calls)
            errors.add_metric(lv, p.errors)
            retrans.add_metric(lv, p.retransmits)
            sent.add_metric(lv, p.bytes_sent)
            received.add_metric(lv, p.bytes_received)
            cumulative, buckets = 0, []
            for le, n in zip((*LATENCY_BUCKETS, float("inf")), p.buckets, strict=True):
                cumulative += n
                buckets.append(("+Inf" if le == float("inf") else repr(le), cumulative))
            duration.add_metric(lv, buckets, p.seconds)
        yield from (calls, errors, retrans, sent, received, duration)
        yield self._gauge("wancache_rpc_in_flight", "RPC calls waiting for a reply.",
                          st.in_flight)
        yield self._counter("wancache_rpc_reconnects",
                            "Connections to the server re-established.", st.reconnects)
        yield self._counter("wancache_rpc_failed_fast",
                            "Calls failed unsent while the server was known unreachable.",
                            st.failed_fast)

    def _data(self) -> Iterator[Metric]:
        d = self.snap.data
        if d is None:
            return
        read = CounterMetricFamily("wancache_read_bytes",
                                   "File bytes read, by where they came from.",
                                   labels=["mount", "source"])
        read.add_metric([self.mount, "cache"], d.cache_bytes)
        read.add_metric([self.mount, "server"], d.server_bytes)
        yield read
        yield self._counter("wancache_blocks_fetched", "Blocks read from the server.",
                            d.blocks_fetched)
        yield self._counter("wancache_readahead_blocks", "Blocks read ahead.",
                            d.ahead_fetched)

    def _writeback(self) -> Iterator[Metric]:
        w = self.snap.writeback
        yield self._gauge("wancache_dirty_bytes",
                          "Written bytes journaled here, not yet on the server.",
                          w.dirty_bytes if w is not None else 0)
        yield self._gauge("wancache_writeback_pending_ops",
                          "Changes journaled here, not yet on the server.",
                          w.pending_ops if w is not None else 0)
        yield self._gauge("wancache_writeback_oldest_seconds",
                          "Age of the oldest change not yet on the server.",
                          w.oldest_seconds if w is not None else 0.0)
        yield self._gauge("wancache_writeback_graph_entries",
                          "Entries in the flusher's dependency maps.",
                          w.graph_size if w is not None else 0)
        s = w.flusher if w is not None else None
        yield self._counter("wancache_writeback_ops", "Changes flushed to the server.",
                            s.ops_flushed if s else 0)
        yield self._counter("wancache_writeback_bytes", "Bytes flushed to the server.",
                            s.bytes_flushed if s else 0)
        yield self._counter("wancache_writeback_retries", "Flushes retried.",
                            s.retries if s else 0)
        yield self._counter("wancache_conflicts",
                            "Changes that met another client's change on the server.",
                            s.conflicts if s else 0)
        yield self._counter("wancache_lost",
                            "Changes the server refused (their data is in lost+found).",
                            s.lost if s else 0)

    def _journal(self) -> Iterator[Metric]:
        if self.snap.writeback is None:
            return
        j = self.snap.writeback.journal
        yield self._gauge("wancache_journal_bytes",
                          "Disk bytes of the write-back journal's segment files.",
                          j.bytes_on_disk)
        yield self._gauge("wancache_journal_limit_bytes",
                          "The journal's cap on its disk bytes.", j.max_bytes)
        yield self._gauge("wancache_journal_segments", "Segment files of the journal.",
                          j.segments)
        yield self._gauge("wancache_journal_pending_records",
                          "Journal records not yet on the server.", j.records_pending)
        yield self._gauge("wancache_journal_pending_bytes",
                          "Payload bytes of the journal records not yet on the server.",
                          j.bytes_pending)
        yield self._counter("wancache_journal_compactions",
                            "Journal segments evacuated by compaction.", j.compactions)

    def _process(self) -> Iterator[Metric]:
        p = self.snap.process
        yield self._gauge("wancache_process_resident_memory_bytes",
                          "Resident memory of the daemon (VmRSS).", p.rss_bytes)
        yield self._gauge("wancache_process_peak_resident_memory_bytes",
                          "Peak resident memory of the daemon (VmHWM).", p.peak_rss_bytes)
        yield self._gauge("wancache_process_open_fds",
                          "File descriptors open in the daemon.", p.open_fds)
        yield self._gauge("wancache_process_threads", "Threads of the daemon.", p.threads)
        yield self._gauge("wancache_trio_tasks", "Trio tasks alive in the daemon.",
                          p.trio_tasks)


def exposition(cfg: Config, snap: MountSnapshot) -> bytes:
    """The Prometheus text of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MountCollector(cfg, snap))
    return generate_latest(registry)


async def serve(parts: Components, ops: Operations, *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve /metrics on cfg.metrics until cancelled (start in the mount's nursery)."""
    global _listening
    cfg = parts.cfg
    if not cfg.metrics:
        task_status.started()
        return
    host, port = split_address(cfg.metrics)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        log.warning("metrics: cannot listen on %s (%s); this mount runs without metrics",
                    cfg.metrics, exc.strerror or exc)
        task_status.started()
        return
    _listening = cfg.metrics
    task_status.started()

    async def render() -> bytes:
        return exposition(cfg, await snapshot.take(parts, ops))

    async def handle(stream: trio.SocketStream) -> None:
        await _answer(stream, render)

    try:
        await trio.serve_listeners(handle, listeners)
    finally:
        _listening = ""


async def _answer(stream: trio.abc.Stream, render: Callable[[], Awaitable[bytes]]) -> None:
    """One HTTP/1.0-style exchange: GET /metrics (or /) -> the exposition text."""
    async with stream:
        request = b""
        with trio.move_on_after(REQUEST_TIMEOUT) as scope:
            while b"\r\n\r\n" not in request and b"\n\n" not in request:
                data = await stream.receive_some(4096)
                if not data or len(request) > MAX_REQUEST:
                    return
                request += data
        if scope.cancelled_caught:
            return
        words = request.split(b"\n", 1)[0].decode("latin-1").split()
        method, path = (words[0], words[1].split("?", 1)[0]) if len(words) >= 2 else ("", "")
        if method not in ("GET", "HEAD"):
            status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
        elif path in ("/metrics", "/"):
            status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, await render()
        else:
            status, ctype, body = "404 Not Found", "text/plain", b"try /metrics\n"
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(head + (body if method != "HEAD" else b""))
