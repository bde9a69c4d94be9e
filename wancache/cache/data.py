"""File contents through the block cache: cached blocks are served from local disk,
missing ones fetched with READ (several in flight), read-ahead fetches the next
ones in the background, and concurrent readers of a block share one fetch.

Blocks are keyed by the file's identity and version (its change attributes), so a
file that changed on the server never serves old blocks: the attribute cache
reports the change (within one lease) and the old version's blocks are dropped.
A READ whose reply shows a newer version than the one being read, or that ends
before the block should (the file shrank), restarts the read with fresh attributes
(`VersionChanged`) instead of mixing old and new bytes.  A short READ that is not
at the end of the file is continued.  Files of up to `small_file` bytes are fetched
whole on their first read.

Epochs.  `forget` (a file changed, was removed or superseded) and `changed` (we
changed it on the server) start a new epoch of the file: a block load (from the
server or the disk) that began in an older one is neither kept (RAM or disk) nor
returned; its readers get `VersionChanged` and read again.  A READ sent before our
own WRITE reached the server can come back after it with old bytes under a version
(mtime, ctime, size) that, on a server with coarse timestamps, equals the new one.

RAM.  Whatever holds block bytes here has a fixed bound: `RECENT_BYTES` of recently
loaded blocks, `FETCH_BYTES` of blocks being fetched (read-ahead at most half of
it), `STORE_BYTES` of fetched blocks waiting for the disk (beyond it a block is
not cached).  A block costs its size in each while it is there.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import trio

from wancache.config import Config
from wancache.nfs_backend.client import NfsClient
from wancache.nfs_backend.nfs3 import Fattr3
from wancache.nfs_backend.transport import Cred

from .attrs import data_version
from .blocks import BlockStore, BlockStoreError
from .flight import SingleFlight
from .node import Node
from .readahead import ReadAhead

log = logging.getLogger(__name__)

BlockKey = tuple[str, str, int]
RECENT_BYTES = 16 << 20     # freshly loaded blocks kept in RAM
FETCH_BYTES = 32 << 20      # blocks being fetched from the server at once
FETCH_BLOCKS = 128          # ... and at most this many (read-ahead: half)
STORE_BYTES = 16 << 20      # fetched blocks waiting to be written to the disk cache
EPOCH_KEYS = 4096           # files remembered as changed while fetches are in flight


class VersionChanged(Exception):
    """The server's copy changed while we were reading it."""


@dataclass
class DataStats:
    """Where read bytes came from."""

    cache_bytes: int = 0
    server_bytes: int = 0
    blocks_fetched: int = 0
    ahead_fetched: int = 0
    stale_loads: int = 0        # loads dropped because their file changed meanwhile
    store_skipped: int = 0      # fetched blocks not cached: too many waiting for the disk


class Epochs:
    """Which files changed since a load began, for the loads in flight.

    `begin` returns a ticket; `valid(key, ticket)` is False once `bump(key)` was
    called after it.  Only changes that loads in flight can see are remembered
    (at most `limit` files; beyond that every load in flight counts as stale).
    """

    def __init__(self, limit: int = EPOCH_KEYS) -> None:
        self._seq = 0
        self._bumped: dict[str, int] = {}   # file key -> seq of its last bump
        self._floor = 0                     # tickets below it are stale
        self._open: dict[int, int] = {}     # ticket -> loads holding it
        self._limit = limit

    def begin(self) -> int:
        return self.retain(self._seq)

    def retain(self, ticket: int) -> int:
        """Hold `ticket` once more (a load handing its block on to a store)."""
        self._open[ticket] = self._open.get(ticket, 0) + 1
        return ticket

    def end(self, ticket: int) -> None:
        left = self._open.pop(ticket) - 1
        if left:
            self._open[ticket] = left
        elif not self._open:
            self._bumped.clear()            # nobody in flight can see them

    def bump(self, key: str) -> None:
        self._seq += 1
        if not self._open:
            return
        self._bumped[key] = self._seq
        if len(self._bumped) > self._limit:
            self._floor = self._seq
            self._bumped.clear()

    def valid(self, key: str, ticket: int) -> bool:
        return ticket >= self._floor and self._bumped.get(key, 0) <= ticket


class DataCache:
    """Reads of file contents for one mount, through `blocks` (None: RAM only)."""

    def __init__(self, client: NfsClient, cfg: Config, blocks: BlockStore | None,
                 nursery: trio.Nursery) -> None:
        self.client = client
        self.cfg = cfg
        self.blocks = blocks
        self.block_size = cfg.block_size
        self._nursery = nursery
        self._flights: SingleFlight[BlockKey, bytes] = SingleFlight()
        self._held: set[str] = set()      # files whose blocks local changes apply to
        self._recent: OrderedDict[BlockKey, bytes] = OrderedDict()
        self._recent_bytes = 0
        in_flight = max(2, min(FETCH_BLOCKS, FETCH_BYTES // self.block_size))
        self._fetching = trio.CapacityLimiter(in_flight)
        self._ahead = trio.Semaphore(in_flight // 2)
        self._storing = 0
        self._stored = trio.Event()        # set whenever nothing waits for the disk
        self._stored.set()
        self._epochs = Epochs()
        self._purge_due = False
        self.stats = DataStats()

    def readahead(self) -> ReadAhead:
        """A fresh read-ahead state for one open file."""
        return ReadAhead(self.block_size, max(self.cfg.readahead, 0))

    # -- invalidation ----------------------------------------------------------------

    def hold(self, key: str) -> None:
        """Keep file `key`'s cached blocks when another version of it is seen (local
        changes apply to them: a conflict copy reads them), until `release`."""
        self._held.add(key)

    def release(self, key: str) -> None:
        self._held.discard(key)

    async def cached_block(self, key: str, version: str, idx: int) -> bytes | None:
        """Block `idx` of version `version` of file `key` if it is cached (RAM, disk)."""
        data = self._recent.get((key, version, idx))
        if data is None and self.blocks is not None:
            data = await self.blocks.get(key, version, idx)
        return data

    def attrs_changed(self, fh: bytes, old: Fattr3 | None, new: Fattr3,
                      ours: bool) -> None:
        """AttrCache listener: a file's version changed, its old blocks are garbage
        (unless held)."""
        if old is None or data_version(old) == data_version(new) or \
                f"{new.fsid:x}-{new.fileid:x}" in self._held:
            return
        # The old version's blocks leave the block store at the next checkpoint, not
        # at once: write-back still reads its base version for a conflict copy.
        self._drop(f"{new.fsid:x}-{new.fileid:x}", data_version(new), now=False)

    def forget(self, key: str, keep: str | None = None) -> None:
        """Drop every cached block of file `key` (except those of version `keep`):
        from RAM and the index now, from the disk with its next change.  Loads of
        the file in flight are discarded (their readers get VersionChanged).

        Call it when the file is removed from the server (REMOVE of its last link,
        nlink 0) and when it changed there."""
        self._drop(key, keep, now=True)

    def _drop(self, key: str, keep: str | None, *, now: bool) -> None:
        self._epochs.bump(key)
        for k in [k for k in self._recent if k[0] == key and k[1] != keep]:
            self._recent_bytes -= len(self._recent.pop(k))
        if self.blocks is None:
            return
        if now:
            self.blocks.discard(key, keep)
            if not self._purge_due:
                self._purge_due = True
                self._nursery.start_soon(self._purge)
        else:
            self._nursery.start_soon(self._discard_later, key, keep)

    def changed(self, key: str) -> None:
        """We changed file `key` on the server (WRITE, SETATTR of its size, ...): no
        block of it read before is trusted, whatever version it claims."""
        self.forget(key)

    async def _discard_later(self, key: str, keep: str | None) -> None:
        assert self.blocks is not None
        self.blocks.discard(key, keep)
        await self._purge()

    async def _purge(self) -> None:
        assert self.blocks is not None
        self._purge_due = False
        try:
            await self.blocks.purge()
        except BlockStoreError as exc:   # closed: the mount is going away
            log.debug("deleting dropped cache blocks: %s", exc)
        except Exception as exc:   # a background helper must never take the mount down
            log.warning("deleting dropped cache blocks failed: %s", exc)

    # -- reads -------------------------------------------------------------------------

    async def read(self, node: Node, attrs: Fattr3, offset: int, size: int, cred: Cred,
                   ra: ReadAhead | None) -> bytes:
        """`size` bytes at `offset` of `node` as of `attrs` (fewer at end of file).

        Raises VersionChanged if the server's copy turned out to be newer.
        """
        file_size = attrs.size
        if offset >= file_size or size <= 0:
            return b""
        end = min(offset + size, file_size)
        version = data_version(attrs)
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        if file_size <= self.cfg.small_file:
            ahead = range((file_size - 1) // bs + 1)
        elif ra is not None:
            ahead = ra.plan(offset, end - offset, file_size)
        else:
            ahead = range(0)
        for idx in ahead:
            if not first <= idx <= last:
                self._start_ahead(node, version, idx, cred, file_size)
        if first == last:
            return await self._range(node, version, first, offset - first * bs,
                                     end - first * bs, cred, file_size)
        parts: list[bytes] = [b""] * (last - first + 1)
        failed: list[Exception] = []

        async def one(i: int) -> None:
            idx = first + i
            lo = max(offset, idx * bs) - idx * bs
            hi = min(end, (idx + 1) * bs) - idx * bs
            try:
                parts[i] = await self._range(node, version, idx, lo, hi, cred, file_size)
            except Exception as exc:   # raised below, outside the nursery's group
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(len(parts)):
                nursery.start_soon(one, i)
        if failed:
            raise failed[0]
        return b"".join(parts)

    async def _range(self, node: Node, version: str, idx: int, lo: int, hi: int,
                     cred: Cred, file_size: int) -> bytes:
        key = (node.key, version, idx)
        data = self._recent.get(key)
        if data is None:
            data = await self._flights.run(
                key, lambda: self._load(node, version, idx, cred, file_size))
        else:
            self._recent.move_to_end(key)
            self.stats.cache_bytes += hi - lo
        return data[lo:hi]

    async def _load(self, node: Node, version: str, idx: int, cred: Cred,
                    file_size: int) -> bytes:
        """A whole block, from the disk cache if it has it, else from the server.
        Whole: the kernel asks for 128 KiB at a time, and one disk read per block
        (kept in RAM for the requests that follow) beats eight.  Raises
        VersionChanged if the file's epoch moved on meanwhile."""
        ticket = self._epochs.begin()
        try:
            got = None
            if self.blocks is not None:
                got = await self.blocks.get(node.key, version, idx)
            data = got if got is not None else await self._fetch(node, version, idx, cred,
                                                                  file_size)
            if not self._epochs.valid(node.key, ticket):
                self.stats.stale_loads += 1
                raise VersionChanged(node.path())
            if got is not None:
                self.stats.cache_bytes += len(got)
            else:
                self.stats.server_bytes += len(data)
                self.stats.blocks_fetched += 1
                self._store_later(node.key, version, idx, data, ticket)
            self._remember((node.key, version, idx), data)
            return data
        finally:
            self._epochs.end(ticket)

    def is_cached(self, node: Node, attrs: Fattr3) -> bool:
        """True if every block of `node` (as of `attrs`) is held here."""
        version = data_version(attrs)
        blocks = range((attrs.size + self.block_size - 1) // self.block_size)
        return all((node.key, version, i) in self._recent or (
            self.blocks is not None and self.blocks.contains(node.key, version, i))
            for i in blocks)

    def prefetch(self, node: Node, attrs: Fattr3, cred: Cred) -> None:
        """Fetch all of `node` in the background (a file we expect to be read)."""
        version = data_version(attrs)
        for idx in range((attrs.size + self.block_size - 1) // self.block_size):
            self._start_ahead(node, version, idx, cred, attrs.size)

    def _start_ahead(self, node: Node, version: str, idx: int, cred: Cred,
                     file_size: int) -> None:
        key = (node.key, version, idx)
        if key in self._recent or self._flights.busy(key):
            return    # (a block on disk is read ahead too: into RAM, for the reader)
        self._nursery.start_soon(self._ahead_fetch, node, version, idx, cred, file_size)

    async def _ahead_fetch(self, node: Node, version: str, idx: int, cred: Cred,
                           file_size: int) -> None:
        async with self._ahead:
            key = (node.key, version, idx)
            if key in self._recent or self._flights.busy(key):
                return
            try:
                await self._flights.run(
                    key, lambda: self._load(node, version, idx, cred, file_size))
                self.stats.ahead_fetched += 1
            except Exception as exc:   # the reader will fetch (and report) it itself
                log.debug("read-ahead of block %d of %r failed: %s", idx, node.path(), exc)

    async def _fetch(self, node: Node, version: str, idx: int, cred: Cred,
                     file_size: int) -> bytes:
        """READ one block from the server (rsize at a time, all in flight)."""
        log.debug("fetching block %d of %r (version %s)", idx, node.path(), version)
        bs, rsize = self.block_size, self.client.info.rsize
        start = idx * bs
        count = max(0, min(bs, file_size - start))
        spans = [(off, min(rsize, start + count - off))
                 for off in range(start, start + count, rsize)]
        parts: list[bytes] = [b""] * len(spans)
        failed: list[Exception] = []

        async def read(i: int, off: int, n: int) -> None:
            try:
                parts[i] = await self._read_span(node, version, off, n, cred)
            except Exception as exc:   # raised below, outside the nursery's group
                failed.append(exc)

        async with self._fetching:
            if len(spans) == 1:
                await read(0, *spans[0])
            elif spans:
                async with trio.open_nursery() as nursery:
                    for i, (off, n) in enumerate(spans):
                        nursery.start_soon(read, i, off, n)
        if failed:
            raise failed[0]
        return b"".join(parts)

    async def _read_span(self, node: Node, version: str, offset: int, count: int,
                         cred: Cred) -> bytes:
        """`count` bytes at `offset` of version `version`, however many READs the
        server needs; VersionChanged if it is not that version or ends before."""
        got: list[bytes] = []
        done = 0
        while done < count:
            res = await self.client.read(node.fh, offset + done, count - done, cred)
            if res.file_attributes is not None and \
                    data_version(res.file_attributes) != version:
                raise VersionChanged(node.path())
            chunk = res.data[:res.count]
            got.append(chunk)
            done += len(chunk)
            if done < count and (res.eof or not chunk):
                log.debug("READ of %r ended at %d, before its version's end: it changed",
                          node.path(), offset + done)
                raise VersionChanged(node.path())
        return got[0] if len(got) == 1 else b"".join(got)

    def _remember(self, key: BlockKey, data: bytes) -> None:
        old = self._recent.pop(key, None)
        if old is not None:
            self._recent_bytes -= len(old)
        self._recent[key] = data
        self._recent_bytes += len(data)
        while self._recent_bytes > RECENT_BYTES and self._recent:
            _, dropped = self._recent.popitem(last=False)
            self._recent_bytes -= len(dropped)

    def _store_later(self, file_key: str, version: str, idx: int, data: bytes,
                     ticket: int) -> None:
        """Write a fetched block to the disk cache in the background, unless too many
        bytes already wait for the disk; it is not stored if its epoch ends first."""
        if self.blocks is None:
            return
        if self._storing + len(data) > STORE_BYTES:
            self.stats.store_skipped += 1
            return
        self._storing += len(data)
        if self._stored.is_set():
            self._stored = trio.Event()
        self._nursery.start_soon(self._store, file_key, version, idx, data,
                                 self._epochs.retain(ticket))

    async def _store(self, file_key: str, version: str, idx: int, data: bytes,
                     ticket: int) -> None:
        assert self.blocks is not None
        try:
            await self.blocks.put(file_key, version, idx, data,
                                  valid=lambda: self._epochs.valid(file_key, ticket))
        except BlockStoreError as exc:   # closed: the mount is going away
            log.debug("storing a block of %s: %s", file_key, exc)
        except Exception as exc:   # a full or broken cache disk only costs caching
            log.warning("storing a block of %s failed: %s", file_key, exc)
        finally:
            self._storing -= len(data)
            if not self._storing:
                self._stored.set()
            self._epochs.end(ticket)

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait (a while) for fetched blocks still on their way to the disk cache, so
        an unmount keeps what was read."""
        with trio.move_on_after(timeout):
            await self._stored.wait()
