"""Prometheus exporter of one mount: `metrics=HOST:PORT` (default 127.0.0.1:9477).

A custom collector reads the live counters (RPC stats, caches, write-back) at each
scrape; nothing is copied or sampled in between.  The HTTP endpoint is served by
trio in the mount's own event loop, so a scrape sees consistent numbers and needs
no thread.  Every series carries `mount="<mount point>"`.  If the address cannot
be bound the mount logs one warning and serves without metrics.

Only counters, sizes and procedure names are exported: no file names, no contents.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
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

from wancache.control import mount_label
from wancache.fs.errors import REQUESTS
from wancache.nfs_backend.stats import LATENCY_BUCKETS

if TYPE_CHECKING:
    from wancache.cache.store import Store
    from wancache.components import Components
    from wancache.fs.operations import Operations

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
    """Every metric of one mount, read from the live objects at scrape time."""

    def __init__(self, parts: Components, ops: Operations) -> None:
        self.cfg = parts.cfg
        self.client = parts.client
        self.parts = parts
        self.ops = ops
        self.mount = mount_label(parts.cfg.mountpoint)

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=["mount"])
        g.add_metric([self.mount], value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=["mount"])
        c.add_metric([self.mount], value)
        return c

    def collect(self) -> Iterator[Metric]:
        m = self.mount
        store = self.ops.store
        info = GaugeMetricFamily("wancache_info", "The mount and its server (always 1).",
                                 labels=["mount", "server", "consistency"])
        info.add_metric([m, self.cfg.spec, self.cfg.consistency], 1)
        yield info
        yield self._gauge("wancache_server_up",
                          "1 while the NFS server is connected, 0 while disconnected.",
                          1 if self.client.up else 0)
        yield from self._caches(store)
        yield from self._rpc()
        yield from self._data(store)
        yield from self._writeback(store)
        fuse = CounterMetricFamily("wancache_fuse_requests", "FUSE requests served.",
                                   labels=["mount", "op"])
        for op, n in sorted(REQUESTS.items()):
            fuse.add_metric([m, op], n)
        yield fuse
        yield self._gauge("wancache_open_files", "Files open through the mount.",
                          self.ops.open_files)

    def _caches(self, store: Store) -> Iterator[Metric]:
        m = self.mount
        req = CounterMetricFamily(
            "wancache_cache_requests", "Cache lookups by cache and result.",
            labels=["mount", "cache", "result"])
        a = store.attrs.stats
        req.add_metric([m, "attr", "hit"], a.hits)
        req.add_metric([m, "attr", "miss"], a.misses)
        dir_stats = getattr(store.dirs, "stats", None)
        if dir_stats is not None:
            req.add_metric([m, "dir", "hit"], dir_stats.hits)
            req.add_metric([m, "dir", "miss"], dir_stats.misses)
        blocks = store.data.blocks if store.data is not None else None
        if blocks is not None:
            b = blocks.stats
            req.add_metric([m, "block", "hit"], b.hits)
            req.add_metric([m, "block", "miss"], b.misses)
        yield req
        yield self._counter("wancache_attr_changes",
                            "Attribute updates that showed a changed file.", a.changes)
        yield self._gauge("wancache_attr_cache_entries", "Attribute cache entries.",
                          len(store.attrs))
        yield self._gauge("wancache_dir_cache_listings", "Cached directory listings.",
                          len(store.dirs))
        if blocks is None:
            return
        b = blocks.stats
        yield self._gauge("wancache_cache_bytes", "Bytes used by the block cache.",
                          b.bytes_used)
        yield self._gauge("wancache_cache_limit_bytes", "Size limit of the block cache.",
                          blocks.size_limit)
        yield self._gauge("wancache_cache_blocks", "Blocks in the block cache.", b.blocks)
        yield self._gauge("wancache_cache_pinned_files", "Pinned files.",
                          len(blocks.pinned()))
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
        st = self.client.stats
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
        for name, p in sorted(list(st.procs.items())):
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

    def _data(self, store: Store) -> Iterator[Metric]:
        if store.data is None:
            return
        d = store.data.stats
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

    def _writeback(self, store: Store) -> Iterator[Metric]:
        wb, flusher = self.parts.writeback, self.parts.flusher
        yield self._gauge("wancache_dirty_bytes",
                          "Written bytes journaled here, not yet on the server.",
                          wb.dirty_bytes if wb is not None else 0)
        yield self._gauge("wancache_writeback_pending_ops",
                          "Changes journaled here, not yet on the server.",
                          wb.pending_ops if wb is not None else 0)
        yield self._gauge("wancache_writeback_oldest_seconds",
                          "Age of the oldest change not yet on the server.",
                          flusher.oldest_age() if flusher is not None else 0.0)
        s = flusher.stats if flusher is not None else None
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


def registry_for(parts: Components, ops: Operations) -> CollectorRegistry:
    """A registry holding only this mount's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MountCollector(parts, ops))
    return registry


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
    registry = registry_for(parts, ops)
    _listening = cfg.metrics
    task_status.started()

    async def handle(stream: trio.SocketStream) -> None:
        await _answer(stream, registry)

    try:
        await trio.serve_listeners(handle, listeners)
    finally:
        _listening = ""


async def _answer(stream: trio.abc.Stream, registry: CollectorRegistry) -> None:
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
            status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(registry)
        else:
            status, ctype, body = "404 Not Found", "text/plain", b"try /metrics\n"
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(head + (body if method != "HEAD" else b""))
