"""Who is asking: the caller's identity, as every layer passes it down.

It is the AUTH_SYS identity NFS calls carry, but nothing here is NFS: the FUSE
layer builds it from the request context and the cache layer checks permissions
with it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Cred:
    """uid, gid and supplementary groups (at most 16 reach the server)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @classmethod
    def root(cls) -> Cred:
        """The daemon's own identity, for calls no user makes (MNT, FSINFO)."""
        return cls(0, 0, ())

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups
