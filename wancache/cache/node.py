"""`Node`: one file system object on the server, as the cache layer knows it."""

from __future__ import annotations

from dataclasses import dataclass, field

from wancache.nfs_backend.nfs3 import Fattr3, Ftype3

LOCAL_PREFIX = b"\0wancache-local\0"   # placeholder handles of nodes created locally
_FSIDS: dict[int, int] = {}   # one int object per file system id, shared by its nodes


def local_fh(local_id: int) -> bytes:
    """The placeholder handle of the locally created node `local_id`."""
    return LOCAL_PREFIX + local_id.to_bytes(8, "big")


@dataclass(eq=False, slots=True, weakref_slot=True)
class Node:
    """A file, directory, symlink, ... identified by its NFS file handle.

    Nodes are compared by identity: the store hands out one Node per handle.
    `parent` and `name` are the last path it was seen under, used to re-resolve a
    handle the server declared stale.

    There is one per inode the kernel holds, so it is kept small (issue 14): the
    FUSE layer's inode table (fs/inodes.py) keeps its inode number and counts here
    rather than in an object of its own.
    """

    fh: bytes
    fileid: int
    fsid: int
    ftype: Ftype3
    parent: Node | None = None
    name: bytes = b""
    gone: bool = field(default=False)   # its last name removed by us
    local_id: int | None = None         # created here: the write-back layer's id for it
    ino: int = 0        # the kernel's inode number of it (0: none), see InodeTable
    lookups: int = 0    # ... the kernel's lookups of that inode not forgotten yet
    opens: int = 0      # ... its open files

    @classmethod
    def from_attrs(cls, fh: bytes, attrs: Fattr3, parent: Node | None = None,
                   name: bytes = b"") -> Node:
        fsid = _FSIDS.setdefault(attrs.fsid, attrs.fsid)
        return cls(fh, attrs.fileid, fsid, attrs.type, parent, name)

    @property
    def key(self) -> str:
        """Stable identity for on-disk caches: '<fsid>-<fileid>'."""
        return f"{self.fsid:x}-{self.fileid:x}"

    @property
    def is_dir(self) -> bool:
        return self.ftype is Ftype3.DIR

    @property
    def is_local(self) -> bool:
        """Created here and not yet on the server: `fh` is a placeholder."""
        return self.fh.startswith(LOCAL_PREFIX)

    def child_path(self, name: bytes) -> bytes:
        """The path of `name` in this directory (for log messages)."""
        return self.path().rstrip(b"/") + b"/" + name

    def path(self) -> bytes:
        """The last known path below the mount root (for log messages)."""
        parts: list[bytes] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/" + b"/".join(reversed(parts))
