"""Kernel cache invalidation: when we learn that something changed on the server,
the kernel must not keep serving its cached copy of it either.

Store events are queued and sent from worker threads: pyfuse3's invalidation calls
block until the kernel is done, and the kernel may be waiting for us.
"""

from __future__ import annotations

import errno
import logging
import math

import pyfuse3
import trio

from wancache.cache.node import Node
from wancache.cache.store import Store

from .inodes import InodeTable

log = logging.getLogger(__name__)


class KernelNotifier:
    """Turns store change events into pyfuse3 invalidate_inode/invalidate_entry."""

    def __init__(self, store: Store, inodes: InodeTable) -> None:
        self.store = store
        self.inodes = inodes
        self._send, self._receive = trio.open_memory_channel[tuple[int, bytes | None]](math.inf)
        store.attrs.listeners.append(self._attrs_changed)
        store.own.entry_listeners.append(self._entry_gone)
        self.sent = 0

    def _attrs_changed(self, fh: bytes, old: object, new: object, ours: bool) -> None:
        if ours:
            return
        node = self.store.nodes.get(fh)
        ino = self.inodes.peek(node) if node is not None else None
        if ino is not None:
            self._send.send_nowait((ino, None))

    def _entry_gone(self, parent: Node, name: bytes) -> None:
        ino = self.inodes.peek(parent)
        if ino is not None:
            self._send.send_nowait((ino, name))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Send queued invalidations until cancelled."""
        task_status.started()
        async for ino, name in self._receive:
            try:
                if name is None:
                    await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
                else:
                    await trio.to_thread.run_sync(pyfuse3.invalidate_entry, ino, name)
                self.sent += 1
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    log.debug("kernel invalidation of inode %d failed: %s", ino, exc)
