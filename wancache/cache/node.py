"""`Node`: one file system object on the server, as the cache layer knows it."""

from __future__ import annotations

from dataclasses import dataclass, field

from wancache.nfs_backend.nfs3 import Fattr3, Ftype3


@dataclass(eq=False, slots=True, weakref_slot=True)
class Node:
    """A file, directory, symlink, ... identified by its NFS file handle.

    Nodes are compared by identity: the store hands out one Node per handle.
    `parent` and `name` are the last path it was seen under, used to re-resolve a
    handle the server declared stale.
    """

    fh: bytes
    fileid: int
    fsid: int
    ftype: Ftype3
    parent: Node | None = None
    name: bytes = b""
    gone: bool = field(default=False)   # removed on the server by us

    @classmethod
    def from_attrs(cls, fh: bytes, attrs: Fattr3, parent: Node | None = None,
                   name: bytes = b"") -> Node:
        return cls(fh, attrs.fileid, attrs.fsid, attrs.type, parent, name)

    @property
    def key(self) -> str:
        """Stable identity for on-disk caches: '<fsid>-<fileid>'."""
        return f"{self.fsid:x}-{self.fileid:x}"

    @property
    def is_dir(self) -> bool:
        return self.ftype is Ftype3.DIR

    def path(self) -> bytes:
        """The last known path below the mount root (for log messages)."""
        parts: list[bytes] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/" + b"/".join(reversed(parts))
