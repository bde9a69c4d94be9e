"""File contents through the block cache: cached blocks are served from local disk,
missing ones fetched with READ (several in flight), read-ahead fetches the next
ones in the background, and concurrent readers of a block share one fetch.

Blocks are keyed by the file's identity and version (its change attributes), so a
file that changed on the server never serves old blocks: the attribute cache
reports the change (within one lease) and the old version's blocks are dropped.
A READ whose reply shows a newer version than the one being read restarts the
read with the new attributes instead of mixing old and new bytes.  Files of up to
`small_file` bytes are fetched whole on their first read.
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
from .blocks import BlockStore
from .flight import SingleFlight
from .node import Node
from .readahead import ReadAhead

log = logging.getLogger(__name__)

BlockKey = tuple[str, str, int]
AHEAD_FETCHES = 64          # read-ahead blocks in flight, for the whole mount
RECENT_BLOCKS = 64 << 20    # bytes of freshly fetched blocks kept in RAM


class VersionChanged(Exception):
    """The server's copy changed while we were reading it."""


@dataclass
class DataStats:
    """Where read bytes came from."""

    cache_bytes: int = 0
    server_bytes: int = 0
    blocks_fetched: int = 0
    ahead_fetched: int = 0


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
        self._recent: OrderedDict[BlockKey, bytes] = OrderedDict()
        self._recent_bytes = 0
        self._ahead = trio.Semaphore(AHEAD_FETCHES)
        self.stats = DataStats()

    def readahead(self) -> ReadAhead:
        """A fresh read-ahead state for one open file."""
        return ReadAhead(self.block_size, max(self.cfg.readahead, 0))

    # -- invalidation ----------------------------------------------------------------

    def attrs_changed(self, fh: bytes, old: Fattr3 | None, new: Fattr3,
                      ours: bool) -> None:
        """AttrCache listener: a file's version changed, its old blocks are garbage."""
        if old is None or data_version(old) == data_version(new):
            return
        self.forget(f"{new.fsid:x}-{new.fileid:x}", keep=data_version(new))

    def changed(self, key: str) -> None:
        """We changed file `key` on the server: every block cached of it may be old."""
        self.forget(key)

    def forget(self, key: str, keep: str | None = None) -> None:
        """Drop every cached block of file `key` (except those of version `keep`)."""
        for k in [k for k in self._recent if k[0] == key and k[1] != keep]:
            self._recent_bytes -= len(self._recent.pop(k))
        if self.blocks is not None:
            self._nursery.start_soon(self._invalidate, key, keep)

    async def _invalidate(self, key: str, keep: str | None) -> None:
        assert self.blocks is not None
        try:
            await self.blocks.invalidate(key, keep_version=keep)
        except Exception as exc:   # a background helper must never take the mount down
            log.warning("dropping cached blocks of %s failed: %s", key, exc)

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

        async def one(i: int) -> None:
            idx = first + i
            lo = max(offset, idx * bs) - idx * bs
            hi = min(end, (idx + 1) * bs) - idx * bs
            parts[i] = await self._range(node, version, idx, lo, hi, cred, file_size)

        async with trio.open_nursery() as nursery:
            for i in range(len(parts)):
                nursery.start_soon(one, i)
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
        (kept in RAM for the requests that follow) beats eight."""
        if self.blocks is not None:
            got = await self.blocks.get(node.key, version, idx)
            if got is not None:
                self.stats.cache_bytes += len(got)
                self._remember((node.key, version, idx), got)
                return got
        return await self._fetch(node, version, idx, cred, file_size)

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
        changed: list[Fattr3] = []

        async def read(i: int, off: int, n: int) -> None:
            res = await self.client.read(node.fh, off, n, cred)
            if res.file_attributes is not None and \
                    data_version(res.file_attributes) != version:
                changed.append(res.file_attributes)
            parts[i] = res.data

        if len(spans) == 1:
            await read(0, *spans[0])
        elif spans:
            async with trio.open_nursery() as nursery:
                for i, (off, n) in enumerate(spans):
                    nursery.start_soon(read, i, off, n)
        if changed:
            raise VersionChanged(node.path())
        data = b"".join(parts)
        self.stats.server_bytes += len(data)
        self.stats.blocks_fetched += 1
        self._remember((node.key, version, idx), data)
        if self.blocks is not None:
            self._nursery.start_soon(self._store, node.key, version, idx, data)
        return data

    def _remember(self, key: BlockKey, data: bytes) -> None:
        old = self._recent.pop(key, None)
        if old is not None:
            self._recent_bytes -= len(old)
        self._recent[key] = data
        self._recent_bytes += len(data)
        limit = max(RECENT_BLOCKS, 2 * self.cfg.readahead)
        while self._recent_bytes > limit and self._recent:
            _, dropped = self._recent.popitem(last=False)
            self._recent_bytes -= len(dropped)

    async def _store(self, file_key: str, version: str, idx: int, data: bytes) -> None:
        assert self.blocks is not None
        try:
            await self.blocks.put(file_key, version, idx, data)
        except Exception as exc:   # a full or broken cache disk only costs caching
            log.warning("storing a block of %s failed: %s", file_key, exc)

