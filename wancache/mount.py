"""The composition root: builds a mount from its parts and serves it.

Order: check the mount point, connect to the server (discovery, MOUNT, FSINFO),
build the store and the FUSE operations, mount, report readiness, serve until
unmounted (`fusermount3 -u`, `umount`) or told to stop (SIGTERM/SIGINT), then
unmount cleanly.  Every worker runs in one nursery.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from wancache import malloc, metrics
from wancache.cache.attrs import AttrCache
from wancache.cache.blocks import BlockStore, BlockStoreError
from wancache.cache.data import DataCache
from wancache.cache.dirs import DirCache
from wancache.cache.flusher import Flusher
from wancache.cache.journal import Journal, JournalError
from wancache.cache.node import Node
from wancache.cache.nodes import NodeTable
from wancache.cache.ownchanges import OwnChanges
from wancache.cache.persist import (
    SavedState,
    load_state,
    mark_clean,
    mark_in_use,
    save_state,
)
from wancache.cache.store import Store, WritePolicy
from wancache.cache.writeback import WriteBack
from wancache.cache.writethrough import WriteThrough
from wancache.components import Components
from wancache.config import Config, ConfigError
from wancache.control import ControlServer, socket_path
from wancache.creds import Cred
from wancache.fs.notify import KernelNotifier
from wancache.fs.operations import Operations
from wancache.handlers import control_handlers
from wancache.nfs_backend.client import ClientOptions, NfsClient, offline_client, open_client
from wancache.nfs_backend.errors import RpcTimeoutError, ServerUnreachableError, TransportError
from wancache.nfs_backend.nfs3 import Fattr3
from wancache.nfs_backend.stats import RpcStats
from wancache.nfs_backend.transport import TransportOptions

log = logging.getLogger(__name__)

MAX_FUSE_TASKS = 512   # FUSE requests served at once (each waits on the WAN)
UNMOUNT_FLUSH = 60.0   # seconds an unmount waits for the write-back journal to drain
SAVE_EVERY = 60.0      # seconds between saves of the metadata caches to cache_dir


class MountPointError(ConfigError):
    """The mount point cannot be used."""


def mounted_at(path: Path) -> str | None:
    """The file system type mounted exactly at `path`, if any (from /proc/mounts)."""
    target = os.path.realpath(path)
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[1].replace("\\040", " ") == target:
            found = parts[2]
    return found


def check_mountpoint(path: Path) -> None:
    """MountPointError (one line) unless `path` is an existing, unused directory."""
    if not path.exists():
        raise MountPointError(f"mount point {path} does not exist")
    if not path.is_dir():
        raise MountPointError(f"mount point {path} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise MountPointError(f"mount point {path} is not accessible")
    fstype = mounted_at(path)
    if fstype is not None:
        raise MountPointError(f"mount point {path} is busy: {fstype} is mounted there")


def prepare_cache_dir(cfg: Config) -> Path | None:
    """Create cache_dir (root only); ConfigError (one line) if it cannot be used."""
    if not cfg.cache or cfg.cache_dir is None:
        return None
    path = cfg.cache_dir
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cache_dir {path} is not usable: {exc.strerror or exc}") from None
    return path


async def open_block_store(cfg: Config, path: Path | None) -> BlockStore | None:
    """The persistent block cache under `path` (the prepared cache_dir; None: none)."""
    if path is None:
        return None
    try:
        return await BlockStore.open(path / "blocks", size_limit=cfg.cache_size,
                                     block_size=cfg.block_size)
    except BlockStoreError as exc:
        raise ConfigError(f"cache_dir {path}: {exc}") from None


def journal_cap(cfg: Config) -> int:
    """The journal's own cap on cache_dir: twice max_dirty (room for the records
    done but not yet given back), at least 64 MiB."""
    return max(2 * cfg.max_dirty, 64 << 20)


async def open_journal(cfg: Config) -> Journal | None:
    """The write-back journal under cache_dir (None when writing through)."""
    if not cfg.writeback or cfg.cache_dir is None:
        return None
    try:
        return await Journal.open(cfg.cache_dir / "journal", max_bytes=journal_cap(cfg))
    except JournalError as exc:
        raise ConfigError(f"write-back journal in {cfg.cache_dir}: {exc}") from None


async def flush_before_exit(wb: WriteBack, cfg: Config) -> None:
    """Put what is journaled on the server, within `UNMOUNT_FLUSH` seconds."""
    if not wb.pending_ops:
        return
    log.info("flushing %d changes to the server before exiting", wb.pending_ops)
    with trio.move_on_after(UNMOUNT_FLUSH):
        # What fails is logged (and its data saved in lost+found) when it fails.
        with contextlib.suppress(OSError):
            await wb.sync()
        return
    log.warning("%d changes could not reach the server %s; they stay in the journal in %s "
                "and are flushed at the next mount", wb.pending_ops, cfg.host,
                cfg.cache_dir)


async def _release_left_open(ops: Operations) -> None:
    """Release what the kernel did not (within `UNMOUNT_FLUSH` seconds)."""
    with trio.move_on_after(UNMOUNT_FLUSH):
        left = await ops.release_all()
        if left:
            log.info("released %d files the kernel left open at the unmount", left)
        return
    log.warning("releasing the files left open at the unmount timed out")


async def _root_attrs(client: NfsClient, saved: SavedState | None) -> Fattr3:
    """The export root's attributes (the saved ones if the server is away)."""
    try:
        return await client.getattr(client.root_fh, Cred.root())
    except TransportError:
        if saved is None or client.root_fh not in saved.attrs:
            raise
        return saved.attrs[client.root_fh]


async def build(client: NfsClient, cfg: Config, nursery: trio.Nursery | None = None, *,
                blocks: BlockStore | None = None, saved: SavedState | None = None,
                journal: Journal | None = None) -> Components:
    """Wire a mount's caches and write policy over `client` (write-back if given a
    `journal`: it is replayed and its workers started in `nursery`)."""
    root_attrs = await _root_attrs(client, saved)
    nodes = NodeTable(client, Node.from_attrs(client.root_fh, root_attrs), cfg.attr_entries)
    attrs = AttrCache(cfg, enabled=cfg.cache)
    client.attr_sinks.append(attrs.update)
    attrs.update(client.root_fh, root_attrs, None, trio.current_time())
    data = None
    if cfg.cache and nursery is not None:
        data = DataCache(client, cfg, blocks, nursery)
        attrs.listeners.append(data.attrs_changed)
    own = OwnChanges(cfg, nodes, attrs, DirCache(cfg), data)
    flusher = wb = None
    writes: WritePolicy
    if journal is not None:
        flusher = Flusher(client, cfg, nodes)
        writes = wb = WriteBack(cfg, nodes, attrs, journal, flusher)
    else:
        writes = WriteThrough(client, cfg, nodes, own)
    store = Store(client, cfg, nodes, attrs, own.dirs, data, own, writes, nursery,
                  journaled=wb is not None,
                  direct=WriteThrough(client, cfg, nodes, own) if wb is not None else None)
    if saved is not None:
        store.restore(saved)
    await store.probe_name_max()
    if wb is not None and flusher is not None:
        assert nursery is not None, "write-back needs a nursery for its workers"
        flusher.hooks = wb.hooks(dir_changed=own.dir_changed, own_dir=own.own_dir,
                                 file_changed=own.file_changed)
        wb.read_server = store.read_server
        wb.read_cached = store.read_cached
        if data is not None:
            held = data
            wb.hold = lambda node, on: held.hold(node.key) if on else held.release(node.key)
        wb.settled = lambda node, local: own.times.keep(node.fh, local)
        wb.shown = lambda node, server, stale: own.times.show(node.fh, server, stale=stale)
        await wb.replay()
        await nursery.start(wb.run)
        await nursery.start(flusher.run)
    return Components(cfg, client, store, blocks, journal, wb, flusher)


async def _save(store: Store, cache_dir: Path, *, last: bool = False) -> None:
    """Save the metadata caches (a failure only costs a slower next start); `last`:
    at a clean unmount (see wancache.cache.persist)."""
    state = store.saved_state()
    try:
        await trio.to_thread.run_sync(save_state, cache_dir, state)
        if last:
            await trio.to_thread.run_sync(mark_clean, cache_dir)
    except OSError as exc:
        log.warning("could not save the metadata caches in %s: %s", cache_dir, exc)


async def _save_periodically(store: Store, cache_dir: Path) -> None:
    while True:
        await trio.sleep(SAVE_EVERY)
        await _save(store, cache_dir)


def transport_options(cfg: Config) -> TransportOptions:
    return TransportOptions(timeout=None if cfg.hard else cfg.timeout, timeo=cfg.timeo,
                            nconnect=cfg.nconnect, resvport=cfg.resvport)


def fuse_options(cfg: Config) -> set[str]:
    """Options for pyfuse3.init: the kernel checks permissions, every user may enter."""
    opts = set(pyfuse3.default_options) | {f"fsname={cfg.fsname}", "subtype=wancache"}
    opts.add("default_permissions")
    if cfg.allow_other:
        opts.add("allow_other")
    if cfg.read_only:
        opts.add("ro")
    return opts


async def connect(nursery: trio.Nursery, cfg: Config, stats: RpcStats,
                  saved: SavedState | None = None) -> NfsClient:
    """Discover the server, mount the export and start the client in `nursery`.

    If the server cannot be reached but `saved` holds what it told us last time, the
    mount starts disconnected (serving the caches, journaling changes) and connects
    when the server comes back.
    """
    options = ClientOptions(nfs_port=cfg.nfs_port, mount_port=cfg.mount_port,
                            rsize=cfg.rsize, wsize=cfg.wsize,
                            transport=transport_options(cfg))
    try:
        return await open_client(nursery, cfg.host, cfg.export, options, stats)
    except (ServerUnreachableError, RpcTimeoutError) as exc:
        if saved is None or saved.info is None:
            raise
        log.warning("%s; mounting disconnected from the saved caches", exc)
        return await offline_client(nursery, cfg.host, saved.info, options, stats)


async def _stop_on_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s, unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def serve(cfg: Config, ready: Callable[[], None] | None = None) -> None:
    """Mount `cfg` and serve it until unmounted or signalled."""
    check_mountpoint(cfg.mountpoint)
    malloc.tune()           # big buffers go back to the system when freed (issue 14)
    # Nothing below may touch the mount point's path once it is mounted: the
    # kernel would ask this very process, which is busy asking: a deadlock.
    control_path = socket_path(cfg.mountpoint)
    stats = RpcStats()
    cache_dir = prepare_cache_dir(cfg)   # an unusable cache_dir fails before any network
    saved = load_state(cache_dir, cfg.spec) if cache_dir is not None else None
    blocks: BlockStore | None = None
    try:
        async with trio.open_nursery() as nursery:
            client = await connect(nursery, cfg, stats, saved)
            try:
                blocks = await open_block_store(cfg, cache_dir)
                await _serve_mounted(cfg, client, blocks, control_path, ready, saved)
            finally:
                client.close()
                nursery.cancel_scope.cancel()
    finally:
        if blocks is not None:
            with trio.CancelScope(shield=True):
                await blocks.close()


async def _serve_mounted(cfg: Config, client: NfsClient, blocks: BlockStore | None,
                         control_path: Path, ready: Callable[[], None] | None,
                         saved: SavedState | None) -> None:
    """Mount FUSE and serve until unmounted; every worker runs in `workers`, which is
    cancelled (and done) before the caller closes the block store and the client."""
    async with trio.open_nursery() as workers:
        journal = await open_journal(cfg)
        parts = await build(client, cfg, workers, blocks=blocks, saved=saved, journal=journal)
        store = parts.store
        ops = Operations(store, cfg)
        try:
            pyfuse3.init(ops, str(cfg.mountpoint), fuse_options(cfg))
        except RuntimeError as exc:
            raise OSError(errno.EIO, f"cannot mount FUSE at {cfg.mountpoint}: {exc}") from None
        log.info("mounted %s at %s", cfg.spec, cfg.mountpoint)
        try:
            await workers.start(_stop_on_signals)
            if cfg.cache_dir is not None and cfg.cache:
                await trio.to_thread.run_sync(mark_in_use, cfg.cache_dir)
                workers.start_soon(_save_periodically, store, cfg.cache_dir)
            await workers.start(KernelNotifier(store, ops.inodes).run)
            await workers.start(ControlServer(control_path, control_handlers(parts, ops)).run)
            await workers.start(metrics.serve, parts, ops)
            if ready is not None:
                ready()
            await pyfuse3.main(min_tasks=4, max_tasks=MAX_FUSE_TASKS)
        finally:
            with trio.CancelScope(shield=True):
                pyfuse3.close(unmount=True)
                log.info("unmounted %s", cfg.mountpoint)
                await _release_left_open(ops)
                if parts.writeback is not None and parts.flusher is not None:
                    await flush_before_exit(parts.writeback, cfg)
                    await parts.flusher.stop()
                    await parts.writeback.drain()
                if journal is not None:
                    await journal.close()
                if store.data is not None:
                    await store.data.settle()
                if cfg.cache_dir is not None and cfg.cache:
                    await _save(store, cfg.cache_dir, last=True)
            workers.cancel_scope.cancel()
