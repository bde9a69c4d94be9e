"""The root of wancache's own exceptions: each says which errno a caller gets.

It lives outside every layer so that the FUSE edge can map any of them without
knowing the layer (NFS, cache) that raised it.
"""

from __future__ import annotations

import errno as _errno


class WancacheError(Exception):
    """Base class of all wancache domain errors."""

    @property
    def errno(self) -> int:
        """What a system call that failed with this answers (EIO unless said)."""
        return _errno.EIO
