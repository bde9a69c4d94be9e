"""One mount's counters and gauges, read at one moment into plain dataclasses.

`take` is the only code that looks into a mount's parts for numbers; the control
socket's `status`/`stats` (wancache.handlers) and the Prometheus exporter
(wancache.metrics) render what it returns.  Counter objects are copied, so a
snapshot does not change under its reader.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import trio

from wancache.cache.attrs import AttrStats
from wancache.cache.blocks import BlockStats
from wancache.cache.data import DataStats
from wancache.cache.dirs import DirStats
from wancache.cache.flusher import FlushStats
from wancache.cache.journal import JournalStats
from wancache.components import Components
from wancache.fs.errors import REQUESTS
from wancache.fs.operations import Operations
from wancache.nfs_backend.stats import RpcStats


@dataclass(frozen=True)
class ProcessSnapshot:
    """The daemon process (from /proc/self and trio)."""

    pid: int
    rss_bytes: int            # VmRSS
    peak_rss_bytes: int       # VmHWM
    threads: int
    open_fds: int
    trio_tasks: int


@dataclass(frozen=True)
class TablesSnapshot:
    """Entries of the in-memory tables that grow with use."""

    inodes: int               # inodes the kernel knows (the FUSE inode table)
    open_files: int
    nodes: int                # the node table (one per live file handle)
    attr_entries: int
    dir_listings: int
    overlay_entries: int      # nodes with local changes not yet on the server


@dataclass(frozen=True)
class BlocksSnapshot:
    stats: BlockStats
    limit_bytes: int
    pinned_files: int


@dataclass(frozen=True)
class WriteBackSnapshot:
    pending_ops: int
    dirty_bytes: int
    oldest_seconds: float
    graph_size: int           # entries in the flusher's dependency maps
    flusher: FlushStats
    journal: JournalStats


@dataclass(frozen=True)
class RpcSnapshot:
    stats: RpcStats
    server_up: bool
    offline: bool             # known unreachable: calls fail at once


@dataclass(frozen=True)
class MountSnapshot:
    """Everything `status`, `stats` and /metrics show of one mount."""

    process: ProcessSnapshot
    tables: TablesSnapshot
    rpc: RpcSnapshot
    attrs: AttrStats
    dirs: DirStats
    fuse_requests: dict[str, int] = field(default_factory=dict)
    data: DataStats | None = None             # None: cache=off
    blocks: BlocksSnapshot | None = None      # None: no block cache
    writeback: WriteBackSnapshot | None = None    # None: writing through


def read_process() -> tuple[int, int, int, int]:
    """(VmRSS bytes, VmHWM bytes, threads, open fds) of this process (blocking I/O)."""
    found = {"VmRSS": 0, "VmHWM": 0, "Threads": 0}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in found:
                found[key] = int(rest.split()[0])
    fds = len(os.listdir("/proc/self/fd")) - 1       # not the one listing them
    return found["VmRSS"] << 10, found["VmHWM"] << 10, found["Threads"], fds


def all_tasks() -> Iterator[trio.lowlevel.Task]:
    """Every task alive in this trio run (the root task's tree, system tasks included)."""
    root = trio.lowlevel.current_root_task()
    stack = [root] if root is not None else []
    while stack:
        task = stack.pop()
        yield task
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)


def trio_tasks() -> int:
    return sum(1 for _ in all_tasks())


async def take(parts: Components, ops: Operations) -> MountSnapshot:
    """Read every counter and gauge of the mount `parts` served by `ops`."""
    rss, peak, threads, fds = await trio.to_thread.run_sync(read_process)
    process = ProcessSnapshot(os.getpid(), rss, peak, threads, fds, trio_tasks())
    return collect(parts, ops, process)


def collect(parts: Components, ops: Operations, process: ProcessSnapshot) -> MountSnapshot:
    """The snapshot, with `process` read beforehand (no awaits: one moment)."""
    store, client = parts.store, parts.client
    tables = TablesSnapshot(inodes=len(ops.inodes), open_files=ops.open_files,
                            nodes=len(store.nodes), attr_entries=len(store.attrs),
                            dir_listings=len(store.dirs), overlay_entries=len(store.overlay))
    blocks = None
    if parts.blocks is not None:
        b = parts.blocks
        blocks = BlocksSnapshot(replace(b.stats), b.size_limit, len(b.pinned()))
    writeback = None
    wb, flusher, journal = parts.writeback, parts.flusher, parts.journal
    if wb is not None and flusher is not None and journal is not None:
        writeback = WriteBackSnapshot(
            pending_ops=wb.pending_ops, dirty_bytes=wb.dirty_bytes,
            oldest_seconds=flusher.oldest_age(), graph_size=flusher.graph_size(),
            flusher=replace(flusher.stats), journal=replace(journal.stats))
    return MountSnapshot(
        process=process, tables=tables,
        rpc=RpcSnapshot(copy.deepcopy(client.stats), client.up, client.offline),
        attrs=replace(store.attrs.stats), dirs=replace(store.dirs.stats),
        fuse_requests=dict(REQUESTS),
        data=replace(store.data.stats) if store.data is not None else None,
        blocks=blocks, writeback=writeback)
