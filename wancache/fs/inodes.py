"""Inode numbers and the kernel's lookup counts.

Inode numbers are the server's fileids, so they are stable across remounts; the
export root is always 1.  A fileid that is 1, or that is already the inode of a
different live node (another file system under the export, or a fileid the server
reused while the kernel still knows the old file), gets a synthetic number above
2**63 instead.  A node leaves the table when the kernel has forgotten every lookup
and no open file refers to it, so forgotten inodes leak no state.
"""

from __future__ import annotations

import errno
import itertools
import logging
from dataclasses import dataclass

import pyfuse3

from wancache.cache.node import Node

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
SYNTHETIC_BASE = 1 << 63


@dataclass(slots=True)
class _Slot:
    node: Node
    lookups: int = 0
    opens: int = 0


class InodeTable:
    """inode <-> Node, with lookup and open counts."""

    def __init__(self, root: Node) -> None:
        self.root = root
        self._slots: dict[int, _Slot] = {ROOT_INODE: _Slot(root, lookups=1)}
        self._inos: dict[Node, int] = {root: ROOT_INODE}
        self._synthetic = itertools.count(SYNTHETIC_BASE)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, ino: int) -> bool:
        return ino in self._slots

    def node(self, ino: int) -> Node:
        """The node of a live inode (ESTALE if the kernel names one we dropped)."""
        slot = self._slots.get(ino)
        if slot is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return slot.node

    def ino_of(self, node: Node) -> int:
        """The inode number of `node`, assigned (without a lookup) if new."""
        ino = self._inos.get(node)
        if ino is not None:
            return ino
        ino = node.fileid
        if ino in (0, ROOT_INODE) or ino >= SYNTHETIC_BASE or ino in self._slots:
            ino = next(self._synthetic)
        self._slots[ino] = _Slot(node)
        self._inos[node] = ino
        return ino

    def peek(self, node: Node) -> int | None:
        """The inode of `node` if it has one."""
        return self._inos.get(node)

    def remember(self, node: Node) -> int:
        """The kernel got an entry for `node`: one more lookup; returns its inode."""
        ino = self.ino_of(node)
        self._slots[ino].lookups += 1
        return ino

    def forget(self, ino: int, nlookup: int) -> None:
        """The kernel dropped `nlookup` references (never raises)."""
        slot = self._slots.get(ino)
        if slot is None or ino == ROOT_INODE:
            return
        slot.lookups -= nlookup
        if slot.lookups < 0:
            log.debug("inode %d forgotten more often than looked up", ino)
            slot.lookups = 0
        self._drop_if_unused(ino, slot)

    def opened(self, node: Node) -> int:
        """An open file now refers to `node`; returns its inode."""
        ino = self.ino_of(node)
        self._slots[ino].opens += 1
        return ino

    def closed(self, node: Node) -> int:
        """An open file of `node` was released; returns how many opens remain."""
        ino = self._inos.get(node)
        if ino is None:
            return 0
        slot = self._slots[ino]
        slot.opens = max(0, slot.opens - 1)
        remaining = slot.opens
        self._drop_if_unused(ino, slot)
        return remaining

    def open_count(self, node: Node) -> int:
        ino = self._inos.get(node)
        return self._slots[ino].opens if ino is not None else 0

    def drop_unreferenced(self, node: Node) -> None:
        """Forget a node that was given an inode but never reached the kernel."""
        ino = self._inos.get(node)
        if ino is not None:
            self._drop_if_unused(ino, self._slots[ino])

    def _drop_if_unused(self, ino: int, slot: _Slot) -> None:
        if slot.lookups <= 0 and slot.opens <= 0 and ino != ROOT_INODE:
            del self._slots[ino]
            del self._inos[slot.node]
