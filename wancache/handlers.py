"""What the control socket of a mount answers: `wancache status/flush/pin/...`.

Commands (`{"cmd": NAME, ...}`, see `wancache.control` for the protocol):

* `ping`, `stats` (every counter), `reset_stats` (zero the RPC counters), `memory`
  and `tasks` (what holds the daemon's memory, which tasks run: `wancache.debugmem`);
* `status`: the summary `wancache status` shows (both render one `wancache.snapshot`);
* `flush`: wait until every journaled change is on the server, with progress lines
  `{"pending": ops, "dirty_bytes": n, "total": ops at start}` every half second;
* `flusher` with `action` `pause`/`resume`/`state`: hold the write-back flusher (tests
  use it to let changes pile up, as a slow link would);
* `pin`/`unpin`/`evict` with `path` (relative to the mount point; a directory means
  every regular file below it), `pins` (the pinned files and how much of each is
  cached), `cached` with `path` (one file's cache state), `refresh_pins`.

Paths are resolved by walking the store from the mount's root (never through the
mount point itself: the daemon asking its own FUSE file system would deadlock).
Pinning itself (`wancache.cache.pins`) reaches the store through `StoreFiles`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import trio

from wancache import debugmem, metrics, snapshot
from wancache.cache.blocks import BlockStore
from wancache.cache.node import Node
from wancache.cache.pins import PinKeeper, PinTarget
from wancache.cache.store import Store
from wancache.components import Components
from wancache.control import Handler, Progress, mount_label
from wancache.fs.operations import Operations
from wancache.nfs_backend.errors import NfsError, TransportError, WancacheError
from wancache.nfs_backend.nfs3 import Fattr3, Ftype3
from wancache.nfs_backend.transport import Cred
from wancache.snapshot import MountSnapshot

log = logging.getLogger(__name__)

PROGRESS_EVERY = 0.5       # seconds between progress lines
ROOT = Cred.root()


def _ratio(hits: int, misses: int) -> float | None:
    total = hits + misses
    return hits / total if total else None


def _os_error(exc: WancacheError, path: str) -> OSError:
    """A one-line error for a control client (NfsError -> its errno)."""
    if isinstance(exc, NfsError):
        return OSError(f"{path or '/'}: {os.strerror(exc.errno)}")
    if isinstance(exc, TransportError):
        return OSError(f"server unreachable: {exc}")
    return OSError(str(exc))


def _relpath(req: dict[str, Any]) -> str:
    """The request's `path`, normalised; ValueError if it leaves the mount."""
    raw = req.get("path", "")
    if not isinstance(raw, str):
        raise TypeError("path must be a string")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{raw}: '..' is not allowed (give a path inside the mount)")
    return "/".join(parts)


def stats_view(s: MountSnapshot) -> dict[str, Any]:
    """Every counter of a snapshot (the `stats` command)."""
    rpc, t, w = s.rpc.stats, s.tables, s.writeback
    return {"rpc": dict(rpc.snapshot()), "in_flight": rpc.in_flight,
            "max_in_flight": rpc.max_in_flight, "reconnects": rpc.reconnects,
            "late_replies": rpc.late_replies, "failed_fast": rpc.failed_fast,
            "server_up": s.rpc.server_up, "offline": s.rpc.offline,
            "inodes": t.inodes, "open_files": t.open_files, "nodes": t.nodes,
            "overlay_entries": t.overlay_entries,
            "fuse_requests": dict(s.fuse_requests),
            "process": asdict(s.process),
            "attrs": {**asdict(s.attrs), "entries": t.attr_entries},
            "dirs": {"listings": t.dir_listings, **asdict(s.dirs)},
            "data": asdict(s.data) if s.data is not None else {},
            "blocks": {**asdict(s.blocks.stats), "pinned": s.blocks.pinned_files,
                       "limit": s.blocks.limit_bytes} if s.blocks is not None else {},
            "writeback": {**asdict(w.flusher), "pending": w.pending_ops,
                          "dirty_bytes": w.dirty_bytes, "oldest_seconds": w.oldest_seconds,
                          "graph_size": w.graph_size} if w is not None else {},
            "journal": asdict(w.journal) if w is not None else {}}


def status_view(s: MountSnapshot) -> dict[str, Any]:
    """The summary of a snapshot that `wancache status` shows (less the mount's
    identity and options)."""
    b = s.blocks.stats if s.blocks is not None else None
    w, rpc, data = s.writeback, s.rpc.stats, s.data
    j = w.journal if w is not None else None
    return {
        "cache": {"used_bytes": b.bytes_used if b else 0,
                  "size_bytes": s.blocks.limit_bytes if s.blocks else 0,
                  "blocks": b.blocks if b else 0,
                  "holes": b.holes if b else 0,
                  "meta_bytes": b.meta_bytes if b else 0,
                  "pinned_files": s.blocks.pinned_files if s.blocks else 0,
                  "evictions": b.evictions if b else 0,
                  "attr_entries": s.tables.attr_entries,
                  "dir_listings": s.tables.dir_listings},
        "writeback": {"enabled": w is not None,
                      "dirty_bytes": w.dirty_bytes if w else 0,
                      "pending_ops": w.pending_ops if w else 0,
                      "oldest_seconds": round(w.oldest_seconds, 1) if w else 0.0,
                      "flushed_ops": w.flusher.ops_flushed if w else 0,
                      "conflicts": w.flusher.conflicts if w else 0,
                      "lost": w.flusher.lost if w else 0,
                      "graph_size": w.graph_size if w else 0},
        "journal": {"bytes_on_disk": j.bytes_on_disk if j else 0,
                    "max_bytes": j.max_bytes if j else 0,
                    "segments": j.segments if j else 0,
                    "records_pending": j.records_pending if j else 0,
                    "bytes_pending": j.bytes_pending if j else 0,
                    "compactions": j.compactions if j else 0},
        "hit_ratio": {
            "attr": _ratio(s.attrs.hits, s.attrs.misses),
            "dir": _ratio(s.dirs.hits, s.dirs.misses),
            "block": _ratio(b.hits, b.misses) if b else None,
            "read_bytes": _ratio(data.cache_bytes, data.server_bytes) if data else None},
        "rpc": {"calls": sum(p.calls for p in rpc.procs.values()),
                "errors": sum(p.errors for p in rpc.procs.values()),
                "in_flight": rpc.in_flight, "reconnects": rpc.reconnects,
                "failed_fast": rpc.failed_fast, "offline": s.rpc.offline},
        "tables": asdict(s.tables),
        "process": asdict(s.process),
    }


class StoreFiles:
    """`PinFiles` over the mount's store (paths walked from its root)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def offline(self) -> bool:
        return self.store.offline

    async def resolve(self, path: str) -> PinTarget:
        node = await resolve(self.store, path)
        return PinTarget(node.key, await self.store.server_attrs(node, ROOT), node)

    async def read(self, target: PinTarget, offset: int, size: int, cred: Cred) -> bytes:
        assert isinstance(target.handle, Node)
        return await self.store.read(target.handle, offset, size, cred)


async def resolve(store: Store, path: str) -> Node:
    """The node at `path` (relative to the mount's root), walking the store."""
    node = store.root
    for part in path.split("/") if path else []:
        node, _ = await store.lookup(node, os.fsencode(part), ROOT)
    return node


async def regular_files(store: Store, node: Node, path: str
                        ) -> list[tuple[Node, Fattr3, str]]:
    """`node` itself if it is a regular file, else every regular file below it."""
    if not node.is_dir:
        if node.ftype is not Ftype3.REG:
            raise ValueError(f"{path or '/'}: not a regular file or directory")
        return [(node, await store.server_attrs(node, ROOT), path)]
    found: list[tuple[Node, Fattr3, str]] = []
    stack = [(node, path)]
    while stack:
        directory, dpath = stack.pop()
        for rec in await store.merged_records(directory, ROOT):
            if rec.name in (b".", b".."):
                continue
            child, _ = await store.lookup(directory, rec.name, ROOT)
            cpath = f"{dpath}/{os.fsdecode(rec.name)}" if dpath else os.fsdecode(rec.name)
            if child.is_dir:
                stack.append((child, cpath))
            elif child.ftype is Ftype3.REG:
                found.append((child, await store.server_attrs(child, ROOT), cpath))
    return found


class Handlers:
    """The control commands of one mount."""

    def __init__(self, parts: Components, ops: Operations) -> None:
        self.cfg = parts.cfg
        self.client = parts.client
        self.parts = parts
        self.ops = ops
        self.store: Store = ops.store
        self.started = time.time()
        self.mountpoint = mount_label(self.cfg.mountpoint)
        data = self.store.data
        self.blocks = data.blocks if data is not None else None
        self.pins: PinKeeper | None = None
        if self.blocks is not None:
            self.pins = PinKeeper(StoreFiles(self.store), self.blocks, self.cfg.cache_dir)
            self.store.nursery.start_soon(self.pins.run)

    def table(self) -> dict[str, Handler]:
        plain = {"ping": self.ping, "stats": self.stats, "reset_stats": self.reset_stats,
                 "status": self.status, "memory": self.memory, "tasks": self.tasks}
        working = {"flush": self.flush, "flusher": self.flusher, "pin": self.pin,
                   "unpin": self.unpin, "evict": self.evict, "cached": self.cached,
                   "pins": self.list_pins, "refresh_pins": self.refresh_pins}
        return {**plain, **{name: _clean_errors(fn) for name, fn in working.items()}}

    # -- counters -------------------------------------------------------------------------

    async def ping(self, req: dict[str, Any], progress: Progress) -> Any:
        return "pong"

    async def stats(self, req: dict[str, Any], progress: Progress) -> Any:
        return stats_view(await snapshot.take(self.parts, self.ops))

    async def memory(self, req: dict[str, Any], progress: Progress) -> Any:
        return await trio.to_thread.run_sync(debugmem.command, req)

    async def tasks(self, req: dict[str, Any], progress: Progress) -> Any:
        return debugmem.tasks(int(req.get("limit", 25)))

    async def reset_stats(self, req: dict[str, Any], progress: Progress) -> Any:
        self.client.stats.reset()
        return None

    async def status(self, req: dict[str, Any], progress: Progress) -> Any:
        cfg = self.cfg
        snap = await snapshot.take(self.parts, self.ops)
        return {
            "mountpoint": self.mountpoint,
            "server": cfg.spec,
            # up: the server answers; disconnected: it does not, the caches serve
            "state": "up" if snap.rpc.server_up else "disconnected",
            "pid": snap.process.pid,
            "uptime": round(time.time() - self.started, 1),
            "options": {"cache": cfg.cache, "writeback": cfg.writeback,
                        "read_only": cfg.read_only, "hard": cfg.hard,
                        "cache_dir": str(cfg.cache_dir) if cfg.cache_dir else None},
            "leases": {"consistency": cfg.consistency,
                       "files": list(cfg.lease_bounds(False)),
                       "directories": list(cfg.lease_bounds(True)),
                       "negative": cfg.neg_lease},
            **status_view(snap),
            "metrics": metrics.listening(),
        }

    # -- flush ----------------------------------------------------------------------------

    async def flush(self, req: dict[str, Any], progress: Progress) -> Any:
        wb, flusher = self.parts.writeback, self.parts.flusher
        began = trio.current_time()
        if wb is None or flusher is None:
            return {"pending": 0, "flushed": 0, "seconds": 0.0}
        total, flushed_before = wb.pending_ops, flusher.stats.ops_flushed
        await _ticking(wb.sync, lambda: {"pending": wb.pending_ops,
                                         "dirty_bytes": wb.dirty_bytes, "total": total,
                                         "server_up": self.client.up}, progress)
        return {"pending": wb.pending_ops, "flushed": flusher.stats.ops_flushed - flushed_before,
                "seconds": round(trio.current_time() - began, 3)}

    async def flusher(self, req: dict[str, Any], progress: Progress) -> Any:
        """`action`: "pause" (start no new flush jobs), "resume", or "state"."""
        wb = self.parts.flusher
        if wb is None:
            raise ValueError(f"{self.mountpoint} does not write back (writeback=off)")
        action = req.get("action", "state")
        if action == "pause":
            wb.pause()
        elif action == "resume":
            wb.resume()
        elif action != "state":
            raise ValueError(f"flusher action must be pause, resume or state, not {action!r}")
        return {"paused": wb.paused, "pending": wb.pending_count}

    # -- pins, eviction -----------------------------------------------------------------

    def _need_blocks(self) -> tuple[BlockStore, PinKeeper]:
        if self.blocks is None or self.pins is None:
            raise ValueError(f"{self.mountpoint} has no block cache (cache=off)")
        return self.blocks, self.pins

    async def pin(self, req: dict[str, Any], progress: Progress) -> Any:
        _, pins = self._need_blocks()
        path = _relpath(req)
        files = await regular_files(self.store, await resolve(self.store, path), path)
        began = trio.current_time()
        done = {"files": 0, "of": len(files), "bytes": 0, "fetched": 0}
        # Not on the server yet: nothing to cache.
        skipped = [fpath for node, _, fpath in files if node.is_local]
        targets = [(PinTarget(node.key, attrs, node), fpath)
                   for node, attrs, fpath in files if not node.is_local]
        pins.check([t for t, _ in targets])     # all or nothing: PinError if too big

        async def work() -> None:
            for target, fpath in targets:
                pins.pin(target, fpath)
                done["fetched"] += await pins.fetch(target)
                done["files"] += 1
                done["bytes"] += target.attrs.size
            pins.save()

        await _ticking(work, lambda: dict(done), progress)
        return {"files": done["files"], "bytes": done["bytes"],
                "fetched_bytes": done["fetched"], "skipped": skipped,
                "seconds": round(trio.current_time() - began, 3)}

    async def unpin(self, req: dict[str, Any], progress: Progress) -> Any:
        blocks, pins = self._need_blocks()
        path = _relpath(req)
        under = [k for k, p in pins.paths.items()
                 if not path or p == path or p.startswith(path + "/")]
        if not under:
            node = await resolve(self.store, path)
            under = [n.key for n, _, _ in await regular_files(self.store, node, path)
                     if n.key in blocks.pinned()]
        for key in under:
            pins.unpin(key)
        pins.save()
        return {"files": len(under)}

    async def evict(self, req: dict[str, Any], progress: Progress) -> Any:
        blocks, _ = self._need_blocks()
        path = _relpath(req)
        files = await regular_files(self.store, await resolve(self.store, path), path)
        dropped = evicted = 0
        kept: list[str] = []
        pinned = blocks.pinned()
        for node, _attrs, fpath in files:
            if node.key in pinned:
                kept.append(fpath)
                continue
            dropped += await blocks.evict_file(node.key)
            if self.store.data is not None:
                self.store.data.forget(node.key)
            evicted += 1
        return {"files": evicted, "blocks": dropped, "pinned_kept": kept}

    async def cached(self, req: dict[str, Any], progress: Progress) -> Any:
        blocks, pins = self._need_blocks()
        path = _relpath(req)
        node = await resolve(self.store, path)
        attrs = await self.store.server_attrs(node, ROOT)
        have, total = pins.cached(PinTarget(node.key, attrs, node))
        return {"path": path, "size": attrs.size, "blocks": total, "cached_blocks": have,
                "pinned": node.key in blocks.pinned()}

    async def list_pins(self, req: dict[str, Any], progress: Progress) -> Any:
        _, pins = self._need_blocks()
        out = []
        for key, path in sorted(pins.paths.items(), key=lambda kv: kv[1]):
            entry: dict[str, Any] = {"path": path}
            with contextlib.suppress(NfsError, TransportError, OSError):
                node = await resolve(self.store, path)
                attrs = self.store.attrs.peek(node.fh)
                if attrs is not None and node.key == key:
                    have, total = pins.cached(PinTarget(key, attrs.attrs, node))
                    entry.update(size=attrs.attrs.size, blocks=total, cached_blocks=have)
            out.append(entry)
        return out

    async def refresh_pins(self, req: dict[str, Any], progress: Progress) -> Any:
        _, pins = self._need_blocks()
        return await pins.refresh()


async def _ticking(work: Callable[[], Awaitable[None]],
                   snapshot: Callable[[], dict[str, Any]], progress: Progress) -> None:
    """Run `work`, sending `snapshot()` as a progress line every PROGRESS_EVERY seconds
    (at least once) until it is done; its exception, if any, is raised."""
    done = trio.Event()
    failed: list[Exception] = []

    async def run() -> None:
        try:
            await work()
        except Exception as exc:
            failed.append(exc)
        finally:
            done.set()

    hung_up = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        try:
            while not done.is_set():
                await progress(snapshot())
                with trio.move_on_after(PROGRESS_EVERY):
                    await done.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            hung_up = True            # the client went away: stop the work
            nursery.cancel_scope.cancel()
    if hung_up:
        raise trio.BrokenResourceError("the control client hung up")
    if failed:
        raise failed[0]


def _clean_errors(fn: Callable[[dict[str, Any], Progress], Awaitable[Any]]) -> Handler:
    """Turn NFS and transport errors into one-line OSErrors naming the path."""
    async def handler(req: dict[str, Any], progress: Progress) -> Any:
        try:
            return await fn(req, progress)
        except WancacheError as exc:
            raise _os_error(exc, str(req.get("path", ""))) from None
        except ExceptionGroup as group:
            leaf: BaseException = group
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            if isinstance(leaf, WancacheError):
                raise _os_error(leaf, str(req.get("path", ""))) from None
            if isinstance(leaf, OSError | ValueError | LookupError):
                raise leaf from None
            raise
    return handler


def control_handlers(parts: Components, ops: Operations) -> dict[str, Handler]:
    """What the control socket of the mount answers."""
    return Handlers(parts, ops).table()
