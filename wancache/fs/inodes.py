"""Inode numbers and the kernel's lookup counts.

Inode numbers are the server's fileids, so they are stable across remounts; the
export root is always 1.  A fileid that is 1, or that is already the inode of a
different live node (another file system under the export, or a fileid the server
reused while the kernel still knows the old file), gets a synthetic number above
2**63 instead.  A node leaves the table when the kernel has forgotten every lookup
and no open file refers to it, so forgotten inodes leak no state.

One entry per inode the kernel holds (issue 14: memory): the table is a single
dict inode -> Node, and a node's inode number, lookup and open counts are kept on
the node itself.  While it has an inode, the node table (`NodeTable.hold`) needs
no weak reference to it.
"""

from __future__ import annotations

import errno
import itertools
import logging

import pyfuse3

from wancache.cache.node import Node
from wancache.cache.nodes import NodeTable

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
SYNTHETIC_BASE = 1 << 63


class InodeTable:
    """inode <-> Node, with lookup and open counts."""

    def __init__(self, root: Node, nodes: NodeTable | None = None) -> None:
        self.root = root
        self._nodes: dict[int, Node] = {ROOT_INODE: root}
        root.ino, root.lookups, root.opens = ROOT_INODE, 1, 0
        self._table = nodes
        self._synthetic = itertools.count(SYNTHETIC_BASE)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, ino: int) -> bool:
        return ino in self._nodes

    def node(self, ino: int) -> Node:
        """The node of a live inode (ESTALE if the kernel names one we dropped)."""
        node = self._nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def _ino(self, node: Node) -> int:
        """`node`'s inode in this table, 0 if none."""
        ino = node.ino
        return ino if ino and self._nodes.get(ino) is node else 0

    def ino_of(self, node: Node) -> int:
        """The inode number of `node`, assigned (without a lookup) if new."""
        ino = self._ino(node)
        if ino:
            return ino
        ino = node.fileid
        if ino in (0, ROOT_INODE) or ino >= SYNTHETIC_BASE or ino in self._nodes:
            ino = next(self._synthetic)
        self._nodes[ino] = node
        node.ino, node.lookups, node.opens = ino, 0, 0
        if self._table is not None:
            self._table.hold(node)
        return ino

    def peek(self, node: Node) -> int | None:
        """The inode of `node` if it has one."""
        return self._ino(node) or None

    def remember(self, node: Node) -> int:
        """The kernel got an entry for `node`: one more lookup; returns its inode."""
        ino = self.ino_of(node)
        node.lookups += 1
        return ino

    def forget(self, ino: int, nlookup: int) -> None:
        """The kernel dropped `nlookup` references (never raises)."""
        node = self._nodes.get(ino)
        if node is None or ino == ROOT_INODE:
            return
        node.lookups -= nlookup
        if node.lookups < 0:
            log.debug("inode %d forgotten more often than looked up", ino)
            node.lookups = 0
        self._drop_if_unused(ino, node)

    def opened(self, node: Node) -> int:
        """An open file now refers to `node`; returns its inode."""
        ino = self.ino_of(node)
        node.opens += 1
        return ino

    def closed(self, node: Node) -> int:
        """An open file of `node` was released; returns how many opens remain."""
        ino = self._ino(node)
        if not ino:
            return 0
        node.opens = max(0, node.opens - 1)
        remaining = node.opens
        self._drop_if_unused(ino, node)
        return remaining

    def open_count(self, node: Node) -> int:
        return node.opens if self._ino(node) else 0

    def drop_unreferenced(self, node: Node) -> None:
        """Forget a node that was given an inode but never reached the kernel."""
        ino = self._ino(node)
        if ino:
            self._drop_if_unused(ino, node)

    def _drop_if_unused(self, ino: int, node: Node) -> None:
        if node.lookups <= 0 and node.opens <= 0 and ino != ROOT_INODE:
            del self._nodes[ino]
            node.ino = node.lookups = node.opens = 0
            if self._table is not None:
                self._table.let_go(node)
