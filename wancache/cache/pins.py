"""Pinned files: kept whole in the block cache, never evicted, and kept fresh.

`PinKeeper` pins files by path: it reserves in the block store the bytes each file
takes (refusing, with `PinError`, what would not fit the cache), reads the blocks
missing from the cache, and every `PIN_REFRESH` seconds checks every pinned path
again (within its attribute lease), reading what changed.  The paths (file key ->
path) persist in ``cache_dir/pinned-paths.json``; the pins themselves in the block
store.

It reaches the file system only through `PinFiles` (resolve a path, read a range),
which the mount provides over its store: nothing here knows the store.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from wancache.nfs_backend.errors import NfsError, TransportError
from wancache.nfs_backend.nfs3 import Fattr3
from wancache.nfs_backend.transport import Cred

from .attrs import data_version
from .blocks import BlockStore, PinError

log = logging.getLogger(__name__)

PIN_REFRESH = 30.0         # seconds between freshness checks of pinned files
FETCH_CONCURRENCY = 8      # blocks of a pinned file read at once
PINS_FILE = "pinned-paths.json"
ROOT = Cred.root()


@dataclass
class PinTarget:
    """A regular file to pin: its cache key, current attributes and the mount's
    handle for it (opaque here, given back to `PinFiles.read`)."""

    key: str
    attrs: Fattr3
    handle: object


class PinFiles(Protocol):
    """What pinning needs of the mount."""

    @property
    def offline(self) -> bool:
        """True while the server is known to be unreachable."""
        ...

    async def resolve(self, path: str) -> PinTarget:
        """The file at `path` (relative to the mount's root) with fresh attributes;
        NfsError(ENOENT) if there is none."""
        ...

    async def read(self, target: PinTarget, offset: int, size: int, cred: Cred) -> bytes:
        """Bytes of the file as readers see them (through the block cache)."""
        ...


class PinKeeper:
    """Pinned files by path: pins them in the block cache, fetches their blocks and
    keeps them fresh."""

    def __init__(self, files: PinFiles, blocks: BlockStore, cache_dir: Path | None) -> None:
        self.files = files
        self.blocks = blocks
        self.file = cache_dir / PINS_FILE if cache_dir is not None else None
        self.paths: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        if self.file is None or not self.file.exists():
            return
        try:
            loaded = json.loads(self.file.read_text())
        except (OSError, ValueError) as exc:
            log.warning("cannot read the pinned paths in %s (%s); they are not refreshed",
                        self.file, exc)
            return
        if isinstance(loaded, dict):
            pinned = self.blocks.pinned()
            self.paths = {k: v for k, v in loaded.items()
                          if isinstance(k, str) and isinstance(v, str) and k in pinned}

    def save(self) -> None:
        if self.file is None:
            return
        tmp = self.file.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(self.paths, f)
            os.replace(tmp, self.file)
        except OSError as exc:
            log.warning("cannot save the pinned paths in %s: %s", self.file, exc)

    def check(self, targets: list[PinTarget]) -> None:
        """PinError unless all of `targets` fit the cache's room for pins."""
        self.blocks.check_pins({t.key: self.blocks.file_cost(t.attrs.size) for t in targets})

    def pin(self, target: PinTarget, path: str) -> None:
        """Pin one file (PinError if it does not fit)."""
        self.blocks.pin(target.key, self.blocks.file_cost(target.attrs.size))
        self.paths[target.key] = path

    def unpin(self, key: str) -> None:
        self.blocks.unpin(key)
        self.paths.pop(key, None)

    def cached(self, target: PinTarget) -> tuple[int, int]:
        """(blocks cached, blocks in the file) for the file's current version."""
        bs = self.blocks.block_size
        total = (target.attrs.size + bs - 1) // bs
        have = self.blocks.cached_indexes(target.key, data_version(target.attrs))
        return len([i for i in have if i < total]), total

    async def fetch(self, target: PinTarget) -> int:
        """Read the blocks of `target` missing from the cache; the bytes read."""
        bs = self.blocks.block_size
        attrs = target.attrs
        have = self.blocks.cached_indexes(target.key, data_version(attrs))
        missing = [i for i in range((attrs.size + bs - 1) // bs) if i not in have]
        got = [0]
        failed: list[Exception] = []
        limiter = trio.CapacityLimiter(FETCH_CONCURRENCY)
        cred = ROOT

        async def read(idx: int) -> bytes:
            nonlocal cred
            try:
                return await self.files.read(target, idx * bs, bs, cred)
            except NfsError as exc:
                if exc.errno not in (errno.EACCES, errno.EPERM) or cred != ROOT:
                    raise
                # A server squashing root: read as the file's owner.
                cred = Cred(attrs.uid, attrs.gid, (attrs.gid,))
                return await self.files.read(target, idx * bs, bs, cred)

        async def one(idx: int) -> None:
            async with limiter:
                if failed:
                    return
                try:
                    got[0] += len(await read(idx))
                except Exception as exc:   # raised below, outside the nursery's group
                    failed.append(exc)

        async with trio.open_nursery() as nursery:
            for idx in missing:
                nursery.start_soon(one, idx)
        if failed:
            raise failed[0]
        return got[0]

    async def refresh(self) -> dict[str, int]:
        """One round: every pinned path checked, what changed or is missing fetched."""
        checked = fetched = gone = 0
        if self.files.offline:
            return {"checked": 0, "fetched": 0, "gone": 0}
        for key, path in list(self.paths.items()):
            try:
                target = await self.files.resolve(path)
                if target.key != key:        # replaced by another file of that name
                    self.unpin(key)
                    self.pin(target, path)
                    self.save()
                else:
                    self.pin(target, path)   # again: its size may have changed
                fetched += await self.fetch(target)
                checked += 1
            except PinError as exc:
                log.warning("pinned file %s no longer fits the cache: %s", path, exc)
            except NfsError as exc:
                if exc.errno == errno.ENOENT:
                    log.info("pinned file %s is gone; unpinned", path)
                    self.unpin(key)
                    self.save()
                    gone += 1
                else:
                    log.debug("refreshing pinned file %s failed: %s", path, exc)
            except (TransportError, OSError) as exc:
                log.debug("refreshing pinned file %s failed: %s", path, exc)
        return {"checked": checked, "fetched": fetched, "gone": gone}

    async def run(self) -> None:
        """Refresh every PIN_REFRESH seconds (start in the mount's nursery)."""
        while True:
            await trio.sleep(PIN_REFRESH)
            try:
                await self.refresh()
            except Exception as exc:   # a background helper must never take the mount down
                log.debug("refreshing pinned files failed: %s", exc)
