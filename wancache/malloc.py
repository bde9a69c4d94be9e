"""The C allocator's part in the daemon's RAM bound (issue 14).

The daemon moves data in buffers of up to an I/O size (1 MiB): WRITE data read
from the journal, its RPC record, READ replies, blocks.  glibc serves an
allocation of at least `M_MMAP_THRESHOLD` bytes with its own mmap and unmaps it
when freed, but by default it raises that threshold to the size of the largest
such buffer freed (up to 32 MiB), after which 1 MiB buffers come from the heap
and its per-thread arenas: freed, they stay in the process (fragmented, and
per arena), and RSS keeps the high-water mark of every burst.

`tune()` fixes the threshold (which also stops glibc's dynamic adjustment), so
big buffers always go back to the system when freed and RSS follows what is in
use.  On other C libraries it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3       # mallopt parameter numbers (glibc malloc.h)
MMAP_THRESHOLD = 256 << 10  # buffers this big or bigger: mmap, unmapped when freed


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt     # noqa: B018  (glibc only)
    except (OSError, AttributeError):
        return None
    return libc


def tune() -> bool:
    """Set glibc's mmap threshold for good (see the module docstring); whether it was."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    log.debug("malloc mmap threshold %d: %s", MMAP_THRESHOLD, "set" if ok else "refused")
    return ok
