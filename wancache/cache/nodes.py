"""The node table: one `Node` per file handle, the names they were seen under, the
nodes created here, and finding a node again when the server calls its handle stale.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

from wancache.creds import Cred
from wancache.nfs_backend.client import NfsClient
from wancache.nfs_backend.errors import NfsError
from wancache.nfs_backend.nfs3 import Fattr3, Nfsstat3

from .lru import Lru
from .node import Node

log = logging.getLogger(__name__)

T = TypeVar("T")
STALE = (Nfsstat3.NFS3ERR_STALE, Nfsstat3.NFS3ERR_BADHANDLE)


class NodeTable:
    """handle -> Node (weak: a node lives while something refers to it).

    The nodes the kernel holds an inode of (most of them) are `hold`-en by the inode
    table, which refers to them anyway: they are kept here without a weak reference
    (~90 bytes each less), and go back to a weak one when let go.
    """

    def __init__(self, client: NfsClient, root: Node, names: int) -> None:
        self.client = client
        self.root = root
        self._held: dict[bytes, Node] = {root.fh: root}
        self._weak: weakref.WeakValueDictionary[bytes, Node] = weakref.WeakValueDictionary()
        # (directory handle, name) -> handle, as last seen: to expire a removed name's
        # attributes without a listing, and to answer lookups while disconnected.
        self._names: Lru[tuple[bytes, bytes], bytes] = Lru(names)
        self._locals: dict[int, Node] = {}     # created here, by local id

    def __len__(self) -> int:
        return len(self._held) + len(self._weak)

    def get(self, fh: bytes) -> Node | None:
        """The Node of `fh` if something still refers to it."""
        node = self._held.get(fh)
        return node if node is not None else self._weak.get(fh)

    def _set(self, fh: bytes, node: Node, *, held: bool = False) -> None:
        """`node` is the one Node of `fh` from now on."""
        if held:
            self._weak.pop(fh, None)
            self._held[fh] = node
        else:
            self._held.pop(fh, None)
            self._weak[fh] = node

    def _unset(self, fh: bytes, node: Node) -> bool:
        """`node` is no longer the Node of `fh` (if it was); whether it was held."""
        if self._held.get(fh) is node:
            del self._held[fh]
            return True
        if self._weak.get(fh) is node:
            del self._weak[fh]
        return False

    def hold(self, node: Node) -> None:
        """Something that outlives every other holder (the kernel's inode) refers to
        `node`: no weak reference is needed until `let_go`."""
        if self._weak.get(node.fh) is node:
            self._set(node.fh, node, held=True)

    def let_go(self, node: Node) -> None:
        """The holder of `hold` is gone: `node` lives on while something refers to it."""
        if self._held.get(node.fh) is node:
            self._set(node.fh, node)

    def node_for(self, fh: bytes, attrs: Fattr3, parent: Node | None = None,
                 name: bytes = b"") -> Node:
        """The one Node of handle `fh` (created on first sight), path updated."""
        node = self.get(fh)
        if node is None:
            node = Node.from_attrs(fh, attrs, parent, name)
            self._set(fh, node)
        elif parent is not None:
            node.parent, node.name = parent, name
        if parent is not None:
            self._names[(parent.fh, name)] = fh
        return node

    def register(self, node: Node) -> None:
        """Make `node` the one Node of its handle (a node created here)."""
        self._set(node.fh, node, held=self._held.get(node.fh) is node)
        if node.local_id is not None:
            self._locals[node.local_id] = node

    def local(self, local_id: int) -> Node | None:
        return self._locals.get(local_id)

    def forget_local(self, local_id: int) -> None:
        """Nothing refers to local id `local_id` any more (its journal records are done)."""
        self._locals.pop(local_id, None)

    def rebind(self, node: Node, fh: bytes, attrs: Fattr3) -> None:
        """`node` (created here, or found stale) is now known to the server as `fh`."""
        held = self._unset(node.fh, node)
        node.fh = fh
        node.fileid, node.fsid = attrs.fileid, attrs.fsid
        self._set(fh, node, held=held)
        if node.parent is not None:
            self._names[(node.parent.fh, node.name)] = fh

    # -- names ----------------------------------------------------------------------

    def named(self, parent: Node, name: bytes) -> bytes | None:
        return self._names.get((parent.fh, name))

    def forget_name(self, parent: Node, name: bytes) -> bytes | None:
        return self._names.pop((parent.fh, name), None)

    def names(self) -> dict[tuple[bytes, bytes], bytes]:
        return dict(self._names.items())

    def load_names(self, names: dict[tuple[bytes, bytes], bytes]) -> None:
        for key, fh in names.items():
            self._names[key] = fh

    # -- stale handles ----------------------------------------------------------------

    async def on(self, node: Node, cred: Cred, op: Callable[[bytes], Awaitable[T]]) -> T:
        """Run `op(handle)`, finding the node again once if the server calls it stale."""
        try:
            return await op(node.fh)
        except NfsError as exc:
            if exc.status not in STALE or not await self.reresolve(node, cred):
                raise
        return await op(node.fh)

    async def reresolve(self, node: Node, cred: Cred) -> bool:
        """Find `node` again by its last known path; True if it is the same file."""
        parent = node.parent
        if parent is None or node.gone or node.is_local:
            return False
        try:
            res = await self.on(parent, cred,
                                lambda fh: self.client.lookup(fh, node.name, cred))
        except NfsError:
            return False
        if res.object is None or res.obj_attributes is None or \
                res.obj_attributes.fileid != node.fileid:
            return False
        log.info("re-resolved stale handle of %r", node.path())
        self.rebind(node, res.object, res.obj_attributes)
        return True
